"""A signal that stops an in-process training run stops its caller too.

The history.json failure of tests/test_train_real.py under load: the suite ran under ``timeout``; on a loaded machine
it ran past the limit while that test trained in-process, timeout sent SIGTERM, train() saved a checkpoint and
*returned* ``{"interrupted": True}``, and the test read a history.json only the final save writes (reproduced with
``timeout 900`` around that test beside other CPU-bound jobs: FileNotFoundError after "stopped by SIGTERM at step
24"). Now train() raises :class:`TrainingInterrupted`, a KeyboardInterrupt, so the caller stops as the signal asked.
"""

from __future__ import annotations

import os
import signal
import threading
import time

import pytest

from lora_train import checkpoint as ckpt
from lora_train.config import build_recipe
from lora_train.train import TrainingInterrupted, train
from tests.conftest import tiny_recipe


def test_sigterm_during_an_in_process_run_raises_after_the_checkpoint(tmp_path, tiny_bert_dir, toy_data_dir):
    out = tmp_path / "run"
    recipe = tiny_recipe(
        tiny_bert_dir,
        toy_data_dir,
        out,
        training={"max_steps": 400, "eval_steps": 0, "save_steps": 2, "logging_steps": 2},
    )
    first = out / "checkpoints" / ckpt.checkpoint_name(2) / ckpt.COMPLETE_MARKER

    def signal_once_a_checkpoint_exists() -> None:
        deadline = time.monotonic() + 300
        while not first.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        os.kill(os.getpid(), signal.SIGTERM)  # what `timeout` sends

    before = signal.getsignal(signal.SIGTERM)
    sender = threading.Thread(target=signal_once_a_checkpoint_exists, daemon=True)
    sender.start()
    with pytest.raises(TrainingInterrupted, match=r"stopped by SIGTERM at step \d+; checkpoint saved") as stopped:
        train(build_recipe(recipe))
    sender.join(timeout=10)
    assert isinstance(stopped.value, KeyboardInterrupt) and stopped.value.signal_name == "SIGTERM"
    assert 2 <= stopped.value.step < 400
    saved = out / "checkpoints" / ckpt.checkpoint_name(stopped.value.step) / ckpt.COMPLETE_MARKER
    assert saved.exists()
    assert not (out / "history.json").exists()  # what the caller would otherwise have gone on to read
    assert signal.getsignal(signal.SIGTERM) is before  # the caller's handler is back
