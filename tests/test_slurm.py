"""Slurm for real: examples/slurm/local/start.sh starts a one-host cluster (munged, slurmctld and two slurmd of one
CPU each, as nodes n1 and n2), examples/slurm/multi_node.sbatch is submitted to it with sbatch, its two tasks (one
per node) meet at torchrun's c10d rendezvous and train like the 2-process torchrun run of tests/test_distributed.py:
the per-step losses of one process at the same global batch (16 = 2 x 8) within 1e-5, one report, exact evaluation.

Marked ``slurm`` (excluded by default; .ci/run installs slurm-wlm and munge and runs it):
``python -m pytest -m slurm tests/test_slurm.py``. Needs root (slurmd starts jobs as their user).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from lora_train.config import build_recipe
from lora_train.train import train
from tests import test_distributed, test_optuna_sweep
from tests.conftest import ROOT, write_recipe
from tests.test_distributed import (
    EVAL_ROWS,
    OFFLINE,
    TRAIN_ROWS,
    assert_one_checkpoint_and_adapter,
    assert_same_trajectory,
    needs_cpu_host,
    one_process_eval,
    printed_metrics,
    recipe_for,
)

# The tiny BERT without dropout and the 256/127-row data of the 2-process tests, as fixtures of this module too.
bert_no_dropout, uneven_data = test_distributed.bert_no_dropout, test_distributed.uneven_data
postgres_url = test_optuna_sweep.postgres_url  # the PostgreSQL server of the sweep tests

LOCAL = ROOT / "examples" / "slurm" / "local"
DAEMONS = ("munged", "mungekey", "slurmctld", "slurmd", "sbatch")
MISSING = [name for name in DAEMONS if shutil.which(name) is None]
JOB_TIMEOUT = 420  # seconds, as the 2-process runs of tests/test_distributed.py
FINISHED = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "PREEMPTED", "BOOT_FAIL"}

pytestmark = [
    pytest.mark.slurm,
    needs_cpu_host,
    pytest.mark.skipif(
        bool(MISSING), reason=f"{', '.join(MISSING)} not found: apt-get install -y slurm-wlm munge (Debian/Ubuntu)"
    ),
    pytest.mark.skipif(os.geteuid() != 0, reason="the local Slurm cluster runs as root (slurmd starts jobs as users)"),
]


@pytest.fixture
def cluster(tmp_path) -> Path:
    """A 2-node cluster on this host (start.sh), stopped afterwards (stop.sh) with no process of it left."""
    directory = tmp_path / "cluster"
    env = {**os.environ, "SLURM_LOCAL_NODES": "2", "SLURM_LOCAL_CPUS": "2"}
    try:
        start = subprocess.run([LOCAL / "start.sh", directory], env=env, capture_output=True, text=True, timeout=180)
        assert start.returncode == 0, start.stdout + start.stderr
        assert f"export SLURM_CONF={directory / 'slurm.conf'}" in start.stdout
        yield directory
    finally:
        stop = subprocess.run([LOCAL / "stop.sh", directory], capture_output=True, text=True, timeout=180)
        processes = psutil.process_iter(["pid", "cmdline"])
        left = [p.info for p in processes if str(directory) in " ".join(p.info["cmdline"] or [])]
        assert stop.returncode == 0 and left == [], (stop.stdout + stop.stderr, left)


def job_fields(job: str, env: dict[str, str]) -> dict[str, str]:
    """``scontrol show job`` as a dict (finished jobs stay listed for the cluster's MinJobAge)."""
    shown = subprocess.run(["scontrol", "show", "job", "-o", job], env=env, capture_output=True, text=True, timeout=60)
    assert shown.returncode == 0, shown.stderr
    return dict(re.findall(r"(\S+?)=(\S*)", shown.stdout))


def wait_for_job(job: str, env: dict[str, str], log: Path, timeout: float = JOB_TIMEOUT) -> dict[str, str]:
    deadline = time.monotonic() + timeout
    while (fields := job_fields(job, env))["JobState"] not in FINISHED:
        assert time.monotonic() < deadline, f"job {job} still {fields['JobState']} after {timeout}s:\n{tail(log)}"
        time.sleep(1)
    return fields


def tail(path: Path, chars: int = 3000) -> str:
    return path.read_text()[-chars:] if path.exists() else f"({path} not written)"


@pytest.fixture(scope="module")
def one_process_reference(bert_no_dropout, uneven_data, tmp_path_factory) -> Path:
    """The 1-process run at the job's global batch (16), trained in this process (as in tests/test_distributed.py)."""
    out = tmp_path_factory.mktemp("one_process") / "run"
    train(build_recipe(recipe_for(bert_no_dropout, uneven_data, out, per_device=16)))
    return out


def sbatch(options: list[str], script_and_args: list[str], env: dict[str, str]) -> str:
    """Submit from the project root, as a user does; the job id."""
    submit = subprocess.run(
        ["sbatch", "--parsable", *options, *script_and_args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert submit.returncode == 0, submit.stderr
    return submit.stdout.strip().split(";")[0]


def test_multi_node_sbatch_on_two_slurm_nodes_trains_like_one_process(
    tmp_path,
    cluster,
    bert_no_dropout,
    uneven_data,
    one_process_reference,
):
    out = tmp_path / "run"
    recipe = write_recipe(tmp_path / "recipe.yaml", recipe_for(bert_no_dropout, uneven_data, out, per_device=8))
    # The job gets this environment (sbatch --export=ALL): the Python that runs the tests, CPU processes, one per task.
    env = {
        **os.environ,
        **OFFLINE,
        "SLURM_CONF": str(cluster / "slurm.conf"),
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        "ACCELERATE_USE_CPU": "true",
        "PROCESSES_PER_TASK": "1",
    }
    job = sbatch(
        ["--gpus-per-node=0", "--cpus-per-task=1", f"--output={tmp_path}/%x-%j.out"],
        ["examples/slurm/multi_node.sbatch", str(recipe)],
        env,
    )
    log = tmp_path / f"lora_train-{job}.out"
    fields = wait_for_job(job, env, log)
    text = log.read_text()
    assert (fields["JobState"], fields["ExitCode"]) == ("COMPLETED", "0:0"), tail(log)

    # Two node daemons, one task each, meeting at the c10d store on the first node's address.
    assert (fields["NodeList"], fields["NumNodes"], fields["NumTasks"]) == ("n[1-2]", "2", "2")
    assert "2 launcher(s) x 1 process(es) on n[1-2], c10d rendezvous at 127.0.0.1:" in text
    for node in ("n1", "n2"):
        assert f"launch task StepId={job}.0 " in (cluster / "log" / f"slurmd-{node}.log").read_text()

    [metrics] = printed_metrics(text)  # only global rank 0 reports
    assert text.count("INFO lora_train: final:") == 1
    assert metrics["num_processes"] == 2 and metrics["global_batch_size"] == 16
    assert metrics["train_samples_per_process"] == [TRAIN_ROWS // 2] * 2
    assert_same_trajectory(out, one_process_reference)
    assert_one_checkpoint_and_adapter(out)
    assert metrics["eval_samples"] == EVAL_ROWS
    assert metrics["eval_accuracy"] == one_process_eval(out, uneven_data)["accuracy"]


def test_sweep_array_one_worker_per_task_shares_one_postgres_study(
    tmp_path, cluster, tiny_bert_dir, toy_data_dir, postgres_url
):
    """examples/slurm/sweep_array.sbatch as a 2-task array (one task per node): both tasks are workers of one Optuna
    study in a PostgreSQL server; the 3 runs of the grid each train exactly once, and both workers train."""
    from tests.test_optuna_sweep import quick_recipe, trainings, trials_by_run

    recipe = quick_recipe(tmp_path, tiny_bert_dir, toy_data_dir)
    out = tmp_path / "sweep"
    env = {
        **os.environ,
        **OFFLINE,
        "SLURM_CONF": str(cluster / "slurm.conf"),
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        "PYTHONPATH": str(ROOT),
        "SWEEP_STORAGE": postgres_url,
    }
    job = sbatch(
        ["--array=0-1", "--cpus-per-task=1", f"--output={tmp_path}/task-%a.out"],
        ["examples/slurm/sweep_array.sbatch", str(recipe), "peft.r=1,2,4", "peft.alpha=2*peft.r", "--out", str(out)],
        env,
    )
    for task in (0, 1):
        log = tmp_path / f"task-{task}.out"
        fields = wait_for_job(f"{job}_{task}", env, log)
        assert (fields["JobState"], fields["ExitCode"]) == ("COMPLETED", "0:0"), tail(log)
        assert f"array task {task} of job {job}" in log.read_text()
    runs = trials_by_run(postgres_url, "sweep")
    assert sorted(runs) == ["r-1_alpha-2", "r-2_alpha-4", "r-4_alpha-8"]
    for run, trials in runs.items():
        assert [t.state.name for t in trials] == ["COMPLETE"] and trainings(out, run) == 1, (run, trials)
    assert len({t.user_attrs["worker"] for trials in runs.values() for t in trials}) == 2
