"""Progress bars on stderr: live on a terminal, a few plain lines a minute when stderr is a file or a pipe."""

from __future__ import annotations

import sys
from typing import Any

QUIET_INTERVAL_S = 20.0
"""Seconds between two progress lines when stderr is not a terminal (a log file, a pipe, a batch job)."""


def stderr_is_terminal() -> bool:
    return hasattr(sys.stderr, "isatty") and sys.stderr.isatty()


def progress_bar(*args: Any, **kwargs: Any):
    """``tqdm(*args, **kwargs)`` on a terminal; elsewhere refreshed at most every :data:`QUIET_INTERVAL_S` seconds,
    each refresh on a line of its own (a redirected bar is otherwise one line per batch, or per result written)."""
    from tqdm.auto import tqdm

    if stderr_is_terminal():
        return tqdm(*args, **kwargs)
    return tqdm(*args, mininterval=QUIET_INTERVAL_S, miniters=1, file=_LineFile(sys.stderr), ascii=True, **kwargs)


class _LineFile:
    """A stream wrapper that ends each of tqdm's carriage-return refreshes with a newline."""

    def __init__(self, stream):
        self.stream = stream

    def write(self, text: str) -> None:
        text = text.replace("\r", "")
        if text.strip():
            self.stream.write(text if text.endswith("\n") else text + "\n")

    def flush(self) -> None:
        self.stream.flush()
