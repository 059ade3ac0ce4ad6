"""Sweeps as Optuna studies, with real parts: a PostgreSQL server started here, worker processes, SIGKILL, pruning.

The PostgreSQL tests start their own server (initdb + pg_ctl from Debian's ``postgresql`` package, which .ci/run
installs) in a temporary directory on 127.0.0.1 and skip, saying why, where its binaries are absent.
"""

from __future__ import annotations

import csv
import glob
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from lora_lab import optuna_sweep as osw
from lora_lab.commands import sweep as sweep_command
from lora_train.config import RecipeError
from lora_train.run_lock import LOCK_FILE
from tests.conftest import ROOT, tiny_recipe, write_recipe

optuna = pytest.importorskip("optuna")


def _pg_bin() -> Path | None:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(Path(p).parts[-3]))
    if found:
        return Path(found[-1]).parent
    which = shutil.which("initdb")
    return Path(which).parent if which else None


PG_BIN = _pg_bin()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def postgres_url():
    """A fresh PostgreSQL server on 127.0.0.1 (a free port, trust auth, its socket in its own directory)."""
    if PG_BIN is None or not (PG_BIN / "pg_ctl").exists():
        pytest.skip(
            "PostgreSQL server binaries (initdb, pg_ctl) not found under /usr/lib/postgresql/*/bin or on PATH:"
            " apt-get install postgresql (.ci/run does)"
        )
    pytest.importorskip("psycopg2", reason="the PostgreSQL driver psycopg2 is not installed (pip install -e .[dev])")
    root = os.geteuid() == 0
    as_user = ["runuser", "-u", "postgres", "--"] if root else []
    directory = Path(tempfile.mkdtemp(prefix="lora-pg-"))
    if root:  # postgres refuses to run as root: the server runs as the package's postgres user
        shutil.chown(directory, "postgres", "postgres")
    data, port = directory / "data", _free_port()
    subprocess.run(
        [*as_user, str(PG_BIN / "initdb"), "-D", str(data), "-U", "postgres", "--auth=trust", "-E", "UTF8"],
        check=True,
        capture_output=True,
    )
    options = f"-p {port} -k {directory} -c listen_addresses=127.0.0.1 -c max_connections=50"
    start = [*as_user, str(PG_BIN / "pg_ctl"), "-D", str(data), "-o", options, "-l", str(directory / "log"), "-w"]
    subprocess.run([*start, "start"], check=True, capture_output=True)
    try:
        import psycopg2

        connection = psycopg2.connect(host="127.0.0.1", port=port, user="postgres", dbname="postgres")
        connection.autocommit = True
        connection.cursor().execute("CREATE DATABASE sweeps")
        connection.close()
        yield f"postgresql+psycopg2://postgres@127.0.0.1:{port}/sweeps"
    finally:
        subprocess.run([*as_user, str(PG_BIN / "pg_ctl"), "-D", str(data), "-m", "immediate", "stop"], check=False)
        shutil.rmtree(directory, ignore_errors=True)


def quick_recipe(tmp_path, tiny_bert_dir, toy_data_dir, rows: int = 64, **training) -> Path:
    """The tiny BERT on ``rows`` toy rows, one epoch (rows / 16 steps): seconds of training per run."""
    return write_recipe(
        tmp_path / "r.yaml",
        tiny_recipe(
            tiny_bert_dir,
            toy_data_dir,
            tmp_path / "unused",
            data={"max_train_samples": rows, "max_eval_samples": 64},
            training={"num_epochs": 1, "save_steps": 1000, **training},
        ),
    )


def worker(recipe: Path, out: Path, storage: str, *axes: str, log: Path) -> subprocess.Popen:
    """One ``scripts/sweep.py`` worker process (1 thread), its output in ``log``."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, str(ROOT / "scripts" / "sweep.py"), str(recipe), *axes, "--out", str(out)]
    command += ["--storage", storage, "--heartbeat-interval", "1", "--grace-period", "4"]
    return subprocess.Popen(command, stdout=open(log, "w"), stderr=subprocess.STDOUT, env=env)


def trials_by_run(storage: str, name: str) -> dict[str, list]:
    study = optuna.load_study(study_name=name, storage=storage)
    runs: dict[str, list] = {}
    for t in study.get_trials():
        runs.setdefault(t.user_attrs["run"], []).append(t)
    return runs


def trainings(out: Path, run: str) -> int:
    """How many training processes started for ``run``: the plan line each one logs."""
    log = out / "logs" / f"{run}.log"
    return log.read_text().count("optimizer steps over") if log.exists() else 0


# ---------------------------------------------------------------------------------------------
# Pure parts


def test_search_axes_become_distributions_and_ties_follow():
    space, tied = osw.parse_space(
        [
            "training.learning_rate=loguniform(1e-5,1e-2)",
            "peft.r=choice(4,8,16)",
            "peft.alpha=2*peft.r",
            "peft.dropout=uniform(0,0.2)",
            "training.seed=int(0,3)",
            "peft.target_modules=[query,value],[query,key,value]",
        ]
    )
    assert space["training.learning_rate"].log and space["training.learning_rate"].low == 1e-5
    assert space["peft.r"].choices == ("4", "8", "16") and "peft.alpha" not in space
    assert not space["peft.dropout"].log and space["training.seed"].high == 3
    assert space["peft.target_modules"].choices == ("[query,value]", "[query,key,value]")
    values = {"peft.r": "8", "training.learning_rate": osw.format_value(0.000123456789)}
    assert osw.resolve_ties(values, tied, ["training.learning_rate", "peft.r", "peft.alpha"]) == {
        "training.learning_rate": "0.000123457",
        "peft.r": "8",
        "peft.alpha": "16",
    }


@pytest.mark.parametrize(
    "spec,message",
    [
        ("training.learning_rate=loguniform(0,1)", "loguniform needs low > 0"),
        ("peft.dropout=uniform(0.2,0.1)", "low must be below high"),
        ("peft.r=int(1,x)", "needs two integers"),
        ("peft.r=uniform(1)", "needs two numbers"),
        ("peft.r=choice()", "needs at least one value"),
    ],
)
def test_bad_search_axes_are_refused_with_the_reason(spec, message):
    with pytest.raises(RecipeError, match=message):
        osw.parse_space([spec])


def test_tie_to_a_non_numeric_choice_is_refused():
    with pytest.raises(RecipeError, match="are not numbers"):
        osw.parse_space(["peft.method=choice(lora,full)", "peft.alpha=2*peft.method"])


@pytest.mark.parametrize(
    "argv,message",
    [
        (["peft.r=choice(4,8)"], "needs --trials N"),
        (["peft.r=4,8", "--trials", "3"], "--trials is for searches"),
        (["peft.r=choice(4,8)", "--trials", "2", "--grid", "peft.r=1"], "--grid arms are for grids only"),
        (["peft.r=4", "--heartbeat-interval", "10", "--grace-period", "5"], "must be longer"),
        (["peft.r=4", "--heartbeat-interval", "0"], "must be >= 1"),
    ],
)
def test_bad_sweep_options_are_refused_before_any_work(argv, message, tmp_path, capsys):
    with pytest.raises(SystemExit):
        sweep_command.main(["recipes/cpu/sst2_lora.yaml", *argv, "--out", str(tmp_path / "s")])
    assert message in capsys.readouterr().err
    assert not (tmp_path / "s").exists()


def test_a_search_over_a_bad_field_or_range_is_refused_before_any_trial(tmp_path, capsys):
    argv = ["recipes/cpu/sst2_lora.yaml", "peft.rank=choice(4,8)", "peft.dropout=uniform(0.5,1.5)", "--trials", "2"]
    assert sweep_command.main([*argv, "--out", str(tmp_path / "s")]) == 2
    err = capsys.readouterr().err
    assert "peft.rank" in err and "peft.dropout = 1.5" in err
    assert not (tmp_path / "s").exists()


def test_storage_passwords_are_never_shown():
    assert osw.safe_url("postgresql://me:s3cret@db:5432/x") == "postgresql://me:***@db:5432/x"
    assert osw.safe_url("sqlite:////tmp/a.db") == "sqlite:////tmp/a.db"


def test_a_study_name_taken_by_another_sweep_or_direction_is_refused(tmp_path):
    """A worker never takes another sweep's queued runs (they would train with its recipe) nor flips the direction."""
    storage = f"sqlite:///{tmp_path / 'shared.db'}"
    first = osw.Settings("recipes/cpu/sst2_lora.yaml", tmp_path / "a", storage=storage, study_name="s")
    assert osw.open_study(first, "maximize")[1]  # created
    other = osw.Settings("recipes/cpu/imdb_lora.yaml", tmp_path / "a", storage=storage, study_name="s")
    with pytest.raises(RecipeError, match="belongs to the sweep of recipe sst2_lora.yaml"):
        osw.open_study(other, "maximize")
    with pytest.raises(RecipeError, match="created to maximize"):
        osw.open_study(first, "minimize")
    study, created = osw.open_study(first, "maximize")
    assert not created and study.user_attrs["sweep"] == {"recipe": "sst2_lora.yaml", "out": "a"}


# ---------------------------------------------------------------------------------------------
# Real training processes


def test_a_hopeless_trial_is_pruned_against_a_good_one(tmp_path, tiny_bert_dir, toy_data_dir):
    """The median pruner (1 startup trial, no warm-up) stops the trial whose learning rate (5.0) makes it diverge
    (validation loss in the tens against ~0.7 at the same step): its child is stopped (SIGTERM) at an evaluation,
    its directory marked pruned, its row says so. The study lives in the default SQLite file of the sweep dir."""
    # 64 steps, 32 evaluations: with 16 steps a loaded machine let the diverging child finish its loop before the
    # worker read its first evaluation, and the SIGTERM then found no loop to stop.
    recipe = quick_recipe(tmp_path, tiny_bert_dir, toy_data_dir, rows=512, eval_steps=2, num_epochs=2)
    out = tmp_path / "sweep"
    argv = [str(recipe), "training.learning_rate=5e-3,5.0", "--metric", "eval_loss", "--pruner", "median"]
    argv += ["--pruner-startup-trials", "1", "--out", str(out)]
    assert sweep_command.main(argv) == 0
    rows = {row["run"]: row for row in csv.DictReader(open(out / "results.csv"))}
    good, bad = rows["learning_rate-5e-3"], rows["learning_rate-5.0"]
    assert good["state"] == "complete" and bad["state"] == "pruned" and int(bad["pruned_at_step"]) < 64
    assert float(good["eval_loss"]) < 1 < float(bad["eval_loss"]) and bad["eval_accuracy"]  # its last evaluation
    marker = json.loads((out / "learning_rate-5.0" / osw.PRUNED_MARKER).read_text())
    assert marker["step"] == int(bad["pruned_at_step"]) and marker["pruner"] == "median"
    good_losses = dict(osw.read_evaluations(out / "learning_rate-5e-3", "eval_loss"))
    assert marker["eval_loss"] > good_losses[marker["step"]]  # pruned for being worse at the same step
    assert not (out / "learning_rate-5.0" / "metrics.json").exists()  # stopped: it never finished
    assert "SIGTERM received" in (out / "logs" / "learning_rate-5.0.log").read_text()
    storage = f"sqlite:///{out / 'optuna.db'}"
    states = {t.user_attrs["run"]: t.state.name for t in optuna.load_study(study_name="sweep", storage=storage).trials}
    assert states == {"learning_rate-5e-3": "COMPLETE", "learning_rate-5.0": "PRUNED"}
    assert (out / "optuna_history.png").stat().st_size > 0 and (out / "optuna_intermediate_values.png").exists()
    assert sweep_command.main(argv) == 0  # resumes: nothing to do, no new trial
    assert len(optuna.load_study(study_name="sweep", storage=storage).trials) == 2


def test_postgres_two_workers_share_a_grid_each_run_trains_once(tmp_path, tiny_bert_dir, toy_data_dir, postgres_url):
    recipe = quick_recipe(tmp_path, tiny_bert_dir, toy_data_dir)
    out = tmp_path / "sweep"
    axes = ("peft.r=1,2,4", "peft.alpha=2*peft.r")
    workers = [worker(recipe, out, postgres_url, *axes, log=tmp_path / f"w{i}.log") for i in range(2)]
    codes = [w.wait(timeout=900) for w in workers]
    assert codes == [0, 0], [(tmp_path / f"w{i}.log").read_text()[-3000:] for i in range(2)]
    runs = trials_by_run(postgres_url, "sweep")
    assert sorted(runs) == ["r-1_alpha-2", "r-2_alpha-4", "r-4_alpha-8"]
    for run, trials in runs.items():  # one trial per run: the worker that created the study queued the grid once
        assert [t.state.name for t in trials] == ["COMPLETE"] and trainings(out, run) == 1, (run, trials)
        assert trials[0].value == json.loads((out / run / "metrics.json").read_text())["eval_accuracy"]
    assert len({t.user_attrs["worker"] for trials in runs.values() for t in trials}) == 2  # both workers trained


def _wait_for(condition, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.mark.slow
def test_postgres_killed_worker_trial_is_retried_by_the_other(tmp_path, tiny_bert_dir, toy_data_dir, postgres_url):
    """SIGKILL one worker while its child trains: its child dies with it, the trial fails by heartbeat, the other
    worker trains it again (into the same directory) and the study completes with every run done once."""
    recipe = quick_recipe(tmp_path, tiny_bert_dir, toy_data_dir, rows=512)
    out = tmp_path / "sweep"
    axes = ("peft.r=1,2", "peft.alpha=2*peft.r")
    storage = optuna.storages.RDBStorage(postgres_url)  # one connection pool for all the polling below
    victim = worker(recipe, out, postgres_url, *axes, log=tmp_path / "victim.log")

    def victim_training():
        try:
            study = optuna.load_study(study_name="sweep", storage=storage)
        except KeyError:
            return None
        for t in study.get_trials(states=(optuna.trial.TrialState.RUNNING,)):
            lock = out / t.user_attrs.get("run", "-") / LOCK_FILE
            if lock.exists() and lock.read_text().startswith("process") and trainings(out, t.user_attrs["run"]):
                return t, int(lock.read_text().split()[1])
        return None

    trial, child = _wait_for(victim_training, 600, "the first worker's child to train")
    survivor = worker(recipe, out, postgres_url, *axes, log=tmp_path / "survivor.log")
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    _wait_for(
        lambda: not os.path.exists(f"/proc/{child}") or "zombie" in open(f"/proc/{child}/status").read(),
        30,
        "the killed worker's child to die with it",
    )
    assert survivor.wait(timeout=900) == 0, (tmp_path / "survivor.log").read_text()[-3000:]
    runs = trials_by_run(postgres_url, "sweep")
    killed = [t for t in runs[trial.user_attrs["run"]] if t.number == trial.number][0]
    assert killed.state.name == "FAIL"
    retry = [t for t in runs[trial.user_attrs["run"]] if t.system_attrs.get("failed_trial") == trial.number]
    assert len(retry) == 1 and retry[0].state.name == "COMPLETE"
    assert trainings(out, trial.user_attrs["run"]) == 2  # the killed attempt and the retry, in one log
    for run, trials in runs.items():
        assert [t.state.name for t in trials].count("COMPLETE") == 1
        assert (out / run / "metrics.json").exists()
    rows = list(csv.DictReader(open(out / "results.csv")))
    assert [row["state"] for row in rows] == ["complete", "complete"]
