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
    checkpoints = out / "checkpoints"
    test_over = threading.Event()

    def signal_once_a_checkpoint_exists() -> None:
        # Any complete checkpoint: with save_steps 2 and keep_last 2, step 2's is deleted again within milliseconds,
        # and a poll waiting for that one can miss it, time out after the test and stop a later test's run.
        while not any(checkpoints.glob(f"*/{ckpt.COMPLETE_MARKER}")):
            if test_over.wait(0.01):
                return
        os.kill(os.getpid(), signal.SIGTERM)  # what `timeout` sends

    before = signal.getsignal(signal.SIGTERM)
    sender = threading.Thread(target=signal_once_a_checkpoint_exists, daemon=True)
    sender.start()
    try:
        with pytest.raises(TrainingInterrupted, match=r"stopped by SIGTERM at step \d+; checkpoint saved") as stopped:
            train(build_recipe(recipe))
    finally:
        test_over.set()
        sender.join(timeout=10)
    assert isinstance(stopped.value, KeyboardInterrupt) and stopped.value.signal_name == "SIGTERM"
    assert 2 <= stopped.value.step < 400
    saved = out / "checkpoints" / ckpt.checkpoint_name(stopped.value.step) / ckpt.COMPLETE_MARKER
    assert saved.exists()
    assert not (out / "history.json").exists()  # what the caller would otherwise have gone on to read
    assert signal.getsignal(signal.SIGTERM) is before  # the caller's handler is back
