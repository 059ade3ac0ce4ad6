"""SIGTERM / SIGINT during training: a checkpoint and a clean exit at the next optimizer step, on every process."""

from __future__ import annotations

import logging
import signal
from typing import Any, Optional

import torch

logger = logging.getLogger("lora_train")


class StopFlag:
    """SIGTERM / SIGINT request a checkpoint and a clean exit at the next optimizer step; a second one stops at once."""

    def __init__(self) -> None:
        self.signal_name: Optional[str] = None
        self._previous: dict[int, Any] = {}

    def install(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread
                pass

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum, _frame) -> None:
        if self.signal_name is not None:  # a second signal: stop now, as if we had not caught it
            self.uninstall()
            signal.raise_signal(signum)
            return
        self.signal_name = signal.Signals(signum).name
        logger.warning(
            "%s received: saving a checkpoint and stopping after this optimizer step (send it again to stop"
            " at once, without a checkpoint)",
            self.signal_name,
        )

    def agreed(self, accelerator) -> bool:
        """True on every process once any process was signalled (so all stop at the same step)."""
        flag = self.signal_name is not None
        if accelerator.num_processes == 1:
            return flag
        total = accelerator.reduce(torch.tensor(float(flag), device=accelerator.device), reduction="sum")
        if total.item() > 0 and self.signal_name is None:
            self.signal_name = "a signal to another process"
        return bool(total.item() > 0)
