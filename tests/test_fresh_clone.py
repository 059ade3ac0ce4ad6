"""The README's CPU command, unchanged, from a fresh copy of the project that has a Hub cache beside it and no
``../shared/data``: data and model come by their Hub ids through the cache, offline."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

from tests.conftest import HF_HUB, ROOT, needs_hub_data, needs_shared

TINY = [
    "data.max_train_samples=64",
    "data.max_eval_samples=64",
    "training.eval_steps=0",
    "training.save_steps=0",
    "output.report_to=[]",
]
"""Overrides that keep the run to two optimizer steps; the recipe's data, model and output stay as they are."""


def readme_offline_command() -> tuple[dict[str, str], list[str]]:
    """The README's offline CPU command, split into its environment assignments and its argv."""
    [line] = [
        line
        for line in (ROOT / "README.md").read_text().splitlines()
        if line.startswith("HF_HUB_OFFLINE=1 ") and "scripts/train.py recipes/cpu/" in line
    ]
    words = line.split()
    env = dict(word.split("=", 1) for word in words if "=" in word and not word.startswith(("python", "scripts")))
    return env, [word for word in words if "=" not in word]


def copy_of_the_project(destination) -> None:
    """What a clone holds: the tracked files and the new files git does not ignore (no runs/, no caches)."""
    listed = (
        subprocess.run(
            ["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
            cwd=ROOT,
            capture_output=True,
            check=True,
        )
        .stdout.decode()
        .split("\0")
    )
    for name in filter(None, listed):
        if (ROOT / name).is_file():
            (destination / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, destination / name)


@needs_shared
@needs_hub_data
def test_readme_cpu_command_runs_from_a_fresh_clone_without_shared_data(tmp_path):
    project, shared = tmp_path / "lora_train", tmp_path / "shared"
    copy_of_the_project(project)
    shared.mkdir()
    (shared / "hf-hub").symlink_to(HF_HUB)  # the Hub cache only: no shared/data beside the clone
    hub_env, argv = readme_offline_command()
    assert hub_env == {"HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": "../shared/hf-hub"} and argv[0] == "python"
    env = {**os.environ, **hub_env, "PYTHONPATH": str(project), "HF_DATASETS_CACHE": str(tmp_path / "datasets-cache")}

    proc = subprocess.run(
        [sys.executable, *argv[1:], *TINY], cwd=project, env=env, capture_output=True, text=True, timeout=900
    )

    assert proc.returncode == 0, proc.stderr[-3000:]
    assert not (shared / "data").exists()
    assert "kernels-community" not in proc.stderr  # no notice about an optional kernel a run never uses
    assert "LOAD REPORT" not in proc.stderr  # transformers' table that only says the new head is new
    assert "is_gradient_checkpointing" not in proc.stderr  # peft reading an attribute transformers deprecates
    run = project / "runs" / "cpu" / "sst2_lora"
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["eval_samples"] == 64 and metrics["global_step"] == 2
    card = (run / "README.md").read_text()
    assert "- nyu-mll/glue" in card and "`nyu-mll/glue` / `sst2`" in card  # the card names the canonical dataset
