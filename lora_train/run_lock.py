"""One run per output directory: an advisory lock on ``OUTPUT_DIR/.lock``, held by the run's main process.

``flock`` locks belong to the open file, so the kernel drops a lock when its process dies, however it dies
(SIGKILL, out of memory, power loss of the process): a lock left by a dead run never blocks the next one. The
file itself stays (deleting it would let two runs lock two different files of the same name); it holds the
process id and host of the last run that locked it, which is how a refused run names the one in its way.
"""

from __future__ import annotations

import fcntl
import os
import socket
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from lora_train.config import RecipeError

LOCK_FILE = ".lock"


def is_launch_main_process() -> bool:
    """True in a single-process run and on global rank 0 of a multi-process launch (torchrun, accelerate,
    deepspeed all set RANK), before any process group exists."""
    return os.environ.get("RANK", "0") == "0"


@contextmanager
def run_lock(output_dir: Path) -> Iterator[None]:
    """Hold the output directory's lock for the ``with`` block, or refuse at once if another process holds it."""
    fd = os.open(output_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 256, 0).decode(errors="replace").strip() or "another process"
            raise RecipeError(
                [
                    f"output.output_dir '{output_dir}' is in use by another run"
                    f" ({holder}, lock {output_dir / LOCK_FILE}):"
                    " two runs in one directory would overwrite each other's checkpoints and adapter. Wait for it to"
                    " finish (or stop it), or choose another output.output_dir"
                ]
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(
            fd,
            f"process {os.getpid()} on {socket.gethostname()}, started {time.strftime('%Y-%m-%d %H:%M:%S')}\n".encode(),
            0,
        )
        yield
    finally:
        os.close(fd)  # releases the lock
