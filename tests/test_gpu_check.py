"""scripts/gpu_check.py: its CPU dry run (the same code at toy sizes) here, the real measurement on a GPU host."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import HF_HUB, ROOT

NOT_ON_THE_GPU_HOST = ("datasets", "evaluate", "deepspeed")
AS_ON_THE_GPU_HOST = """
import runpy, sys
for name in {names!r}:
    sys.modules[name] = None  # import fails and importlib.util.find_spec says absent, as where it is not installed
sys.argv = ["gpu_check.py", *sys.argv[1:]]
try:
    runpy.run_path("scripts/gpu_check.py", run_name="__main__")
except SystemExit as stop:
    assert not stop.code, stop.code
"""


def gpu_check(out: Path, *args: str) -> list[dict]:
    """Run the script in a fresh process where datasets, evaluate and deepspeed cannot be imported (as on the GPU
    host, which lacks them); return its JSON results."""
    code = AS_ON_THE_GPU_HOST.format(names=NOT_ON_THE_GPU_HOST)
    env = {**os.environ, "HF_HUB_CACHE": str(HF_HUB)}
    proc = subprocess.run(
        [sys.executable, "-c", code, "--out", str(out), *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=900,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads((out / "gpu_check.json").read_text())


@pytest.mark.skipif(not (HF_HUB / "models--local--llama2c-stories260K").is_dir(), reason="needs llama2c in ../shared")
def test_dry_run_measures_every_case_on_cpu_without_the_missing_packages(tmp_path):
    results = gpu_check(tmp_path, "--dry-run", "--warmup", "0")
    cases = {(r["model"], r["base"], r["gradient_checkpointing"]) for r in results}
    assert cases == {
        (m, b, c) for m in ("llama2c-stories260K", "llama-tiny-random") for b in ("nf4", "bf16") for c in (True, False)
    }
    for r in results:
        assert r["device"] == "cpu" and r["losses_finite"] and r["samples_per_s"] > 0 and r["tokens_per_s"] > 0
        assert r["model_tflops_per_s"] > 0 and r["mfu"] is None  # no peak known for a CPU
    table = (tmp_path / "gpu_check.md").read_text()
    assert table.count("\n| llama") == 8 and "| MFU |" in table


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_check_on_the_gpu(tmp_path):
    results = gpu_check(tmp_path, "--steps", "5")
    assert len(results) == 8
    by_case = {(r["model"], r["base"], r["gradient_checkpointing"]): r for r in results}
    for ckpt in (True, False):  # NF4 must save memory on the 1.1B model
        nf4, bf16 = (by_case[("llama-1.1b-random", base, ckpt)] for base in ("nf4", "bf16"))
        assert nf4["peak_memory_allocated_mb"] < bf16["peak_memory_allocated_mb"]
    assert all(r["losses_finite"] and r["peak_memory_allocated_mb"] > 0 for r in results)
