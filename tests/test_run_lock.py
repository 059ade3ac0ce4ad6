"""One run per output directory: a second real process is refused at once, naming the first; a lock left by a
killed run does not block the next one."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

from lora_train.commands.train import main as train_main
from lora_train.run_lock import LOCK_FILE
from tests.conftest import ROOT, tiny_recipe, write_recipe
from tests.test_resume import Run


def test_a_second_run_into_a_busy_directory_is_refused_and_a_dead_runs_lock_does_not_block(
    tmp_path, tiny_bert_dir, toy_data_dir, capsys
):
    out = tmp_path / "run"
    recipe = write_recipe(
        tmp_path / "recipe.yaml",
        tiny_recipe(tiny_bert_dir, toy_data_dir, out, training={"max_steps": 4, "save_steps": 2}),
    )
    # The first run sleeps inside its first checkpoint save (the test hook), so it is surely alive and busy.
    first = Run(recipe, env={"LORA_TRAIN_PAUSE_IN_SAVE": "step-00000002"})
    first.wait_for("the first save", lambda: any((out / "checkpoints").glob(".step-00000002.tmp-*")))

    # What a job retry does: same recipe, resume=latest. Before the lock it trained into the directory too (exit 0).
    start = time.monotonic()
    second = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "train.py"), str(recipe), "training.resume_from_checkpoint=latest"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert second.returncode == 2, second.stderr[-3000:]
    assert f"is in use by another run (process {first.proc.pid} on " in second.stderr
    assert "Traceback" not in second.stderr
    assert time.monotonic() - start < 60  # refused at once, not after waiting for the first run
    assert first.proc.poll() is None  # the first run is untouched

    first.proc.send_signal(signal.SIGKILL)
    assert first.finish() == -signal.SIGKILL
    assert f"process {first.proc.pid} on " in (out / LOCK_FILE).read_text()  # the dead run's lock file is still there
    assert train_main([str(recipe), "training.resume_from_checkpoint=latest"]) == 0  # and does not block
    assert f"process {first.proc.pid} on " not in (out / LOCK_FILE).read_text()
