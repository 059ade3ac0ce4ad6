"""SIGTERM / SIGINT during training: a checkpoint and a clean exit at the next optimizer step, on every process."""

from __future__ import annotations

import logging
import signal
import time
from typing import Any, Optional

import torch

logger = logging.getLogger("lora_train")


class StopFlag:
    """SIGTERM / SIGINT request a checkpoint and a clean exit at the next optimizer step.

    Launchers forward the signal they receive (torchrun's agent, srun, accelerate launch), and Slurm signals every
    process of a step, so one request often arrives twice within milliseconds: a repeat within
    ``DUPLICATE_WINDOW_S`` of the first is the same request. A later second signal stops at once, without a
    checkpoint."""

    DUPLICATE_WINDOW_S = 2.0

    def __init__(self) -> None:
        self.signal_name: Optional[str] = None
        self._first_at = 0.0
        self._previous: dict[int, Any] = {}

    def install(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread
                pass

    def uninstall(self) -> None:
        """Give the caller its handlers back; after a stop, once the window is over, so a repeat of the request still
        on its way from a launcher lands here and not in the caller's handler (the default one kills the process)."""
        if self.signal_name is not None:
            time.sleep(max(0.0, self._first_at + self.DUPLICATE_WINDOW_S - time.monotonic()))
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _is_repeat(self) -> bool:
        return time.monotonic() - self._first_at < self.DUPLICATE_WINDOW_S

    def _handle(self, signum, _frame) -> None:
        if self.signal_name is not None:
            if not self._is_repeat():  # a second request: stop now, as if we had not caught it
                self._stop_now(signum)
            return  # else the launcher forwarding the same request
        self.signal_name = signal.Signals(signum).name
        self._first_at = time.monotonic()
        logger.warning(
            "%s received: saving a checkpoint and stopping after this optimizer step (send it again after %.0f s"
            " to stop at once, without a checkpoint)",
            self.signal_name,
            self.DUPLICATE_WINDOW_S,
        )

    def _stop_now(self, signum: int) -> None:
        self.uninstall()
        signal.raise_signal(signum)

    def agreed(self, accelerator) -> bool:
        """True on every process once any process was signalled (so all stop at the same step)."""
        flag = self.signal_name is not None
        if accelerator.num_processes == 1:
            return flag
        total = accelerator.reduce(torch.tensor(float(flag), device=accelerator.device), reduction="sum")
        if total.item() > 0 and self.signal_name is None:
            self.signal_name = "a signal to another process"
        return bool(total.item() > 0)
