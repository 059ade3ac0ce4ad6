"""Sweeps and searches as Optuna studies: any number of workers, on any machines, share one study.

A *grid* (the runs :func:`lora_lab.sweep.plan` lists) is put in the study's queue once, one WAITING trial per
run with its values fixed; a *search* (axes such as ``loguniform(1e-5,1e-2)``) lets the sampler (TPE by default)
propose ``--trials`` trials. A worker claims a WAITING trial with the storage's atomic WAITING -> RUNNING
transition (or, in a search, asks the sampler for a new one), trains it in a fresh process into its own run
directory, and tells the study the result. So no trial runs twice: Optuna's GridSampler picks grid points at
random and can hand one point to two workers at once (and re-evaluates a point once the grid is exhausted),
which is why grid points are queued rather than sampled.

While the child trains, the worker reads the ``history.json`` the loop rewrites after every evaluation, reports
each evaluation to the trial, and, when the pruner says so, stops the child with SIGTERM (it checkpoints and
exits), writes ``pruned.json`` into the run directory and ends the trial as PRUNED. It also records a heartbeat:
a worker killed mid-trial leaves a RUNNING trial whose heartbeat stops, which another worker fails after the
grace period and retries (``RetryHeartbeatStaleTrialCallback``) in the same run directory. Re-running the command
resumes: finished trials are kept, failed runs are queued again, a run directory that already holds
``metrics.json`` is recorded without training.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import logging
import os
import re
import signal
import socket
import subprocess
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

from lora_lab import sweep
from lora_train.config import RecipeError, load_recipe
from lora_train.plots import finish_plot, pyplot

logger = logging.getLogger("lora_lab.optuna_sweep")

PRUNED_MARKER = "pruned.json"
"""Written into a run directory whose trial the pruner stopped."""

METRICS = {"eval_accuracy": "maximize", "eval_macro_f1": "maximize", "eval_loss": "minimize"}
"""Metrics a sweep can optimise: keys of both ``metrics.json`` and the evaluation entries of ``history.json``."""

PRUNERS = ("none", "median", "hyperband")

SEARCH = re.compile(r"^(?P<kind>loguniform|uniform|int|choice)\((?P<args>.*)\)$")
"""``loguniform(1e-5,1e-2)``, ``uniform(0,0.2)``, ``int(1,8)``, ``choice(4,8,16)``: an axis the sampler explores."""

SAMPLERS = {"tpe": "TPESampler", "random": "RandomSampler", "cmaes": "CmaEsSampler", "qmc": "QMCSampler"}

STOP_GRACE_S = 300
"""How long a pruned child may take to checkpoint and exit after SIGTERM before it is killed."""


@dataclass
class Settings:
    """How one worker runs the study (the ``lora-sweep`` options)."""

    recipe: str
    out: Path
    storage: Optional[str] = None
    """Database URL; None: ``sqlite:///<out>/optuna.db``."""
    study_name: Optional[str] = None
    """None: the name of ``out``."""
    metric: str = "eval_accuracy"
    pruner: str = "none"
    pruner_startup_trials: int = 3
    """Median pruner: complete trials needed before it prunes."""
    sampler: str = "tpe"
    trials: Optional[int] = None
    seed: Optional[int] = None
    heartbeat_interval: int = 10
    grace_period: int = 60
    poll_s: float = 0.25
    """How often a worker reads its child's history.json (and a waiting worker the study)."""
    extra: list[str] = field(default_factory=list)

    @property
    def storage_url(self) -> str:
        return self.storage or f"sqlite:///{(self.out / 'optuna.db').resolve()}"

    @property
    def name(self) -> str:
        return self.study_name or self.out.resolve().name


# ---------------------------------------------------------------------------------------------
# Search spaces (pure)


def is_search_axis(spec: str) -> bool:
    """Whether ``section.field=...`` is a search axis (``uniform(...)`` etc.) rather than a list or a tie."""
    return "=" in spec and SEARCH.match(spec.split("=", 1)[1].strip()) is not None


def parse_space(specs: Sequence[str]):
    """Optuna distributions of the free axes and the ties of one search: ``({key: distribution}, {key: (c, ref)})``.

    List axes (``peft.r=4,8``) become categorical choices; ties (``peft.alpha=2*peft.r``) are derived, not sampled.
    """
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    plain = [s for s in specs if not is_search_axis(s)]
    free, tied = sweep.parse_axes(plain + [s.split("=", 1)[0] + "=0" for s in specs if is_search_axis(s)])
    space, problems = {}, []
    for spec in specs:
        key, raw = (s.strip() for s in spec.split("=", 1))
        match = SEARCH.match(raw)
        if key in tied:
            continue
        if match is None:
            space[key] = CategoricalDistribution(free[key])
            continue
        kind, args = match["kind"], sweep.split_values(match["args"]) if match["args"].strip() else []
        if kind == "choice":
            space[key] = CategoricalDistribution(args) if args else None
            if not args:
                problems.append(f"search axis '{key}': choice() needs at least one value, e.g. choice(4,8,16)")
            continue
        try:
            low, high = (int(a) if kind == "int" else float(a) for a in args)
        except ValueError:
            numbers = "integers" if kind == "int" else "numbers"
            problems.append(f"search axis '{key}={raw}': {kind}(low,high) needs two {numbers}")
            continue
        if not low < high:
            problems.append(f"search axis '{key}={raw}': low must be below high")
        elif kind == "loguniform" and low <= 0:
            problems.append(f"search axis '{key}={raw}': loguniform needs low > 0")
        else:
            log = kind == "loguniform"
            space[key] = IntDistribution(low, high) if kind == "int" else FloatDistribution(low, high, log=log)
    for key, (_, ref) in tied.items():
        if ref in space and isinstance(space[ref], CategoricalDistribution):
            bad = [c for c in space[ref].choices if not _is_number(c)]
            if bad:
                problems.append(f"search axis '{key}' is tied to '{ref}', whose choices {bad} are not numbers")
    if problems:
        raise RecipeError(problems, "sweep search space")
    return space, tied


def _is_number(value: Any) -> bool:
    try:
        float(value)
    except (TypeError, ValueError):
        return False
    return True


def format_value(value: Any) -> str:
    """A sampled value as a command-line override (6 significant digits for floats)."""
    return f"{value:.6g}" if isinstance(value, float) else str(value)


def resolve_ties(values: dict[str, str], tied: dict[str, tuple[float, str]], order: Sequence[str]) -> dict[str, str]:
    """``values`` plus the tied axes (C x the referenced value), in axis order."""
    out = dict(values)
    for key, (coef, ref) in tied.items():
        out[key] = sweep.format_number(coef * float(values[ref]))
    return {k: out[k] for k in order}


def validate_space(recipe: str, space, tied, order: Sequence[str], extra: Sequence[str], out: Path) -> None:
    """Build the recipe at both ends of every distribution now, so a bad field or range stops the search before
    any trial (rather than failing every trial it samples)."""
    from optuna.distributions import CategoricalDistribution

    problems = []
    for end in (0, -1):
        values = {
            key: format_value(d.choices[end] if isinstance(d, CategoricalDistribution) else (d.low, d.high)[end])
            for key, d in space.items()
        }
        overrides = resolve_ties(values, tied, order)
        try:
            load_recipe(recipe, [*extra, *(f"{k}={v}" for k, v in overrides.items()), f"output.output_dir={out}/x"])
        except RecipeError as err:
            problems.extend(p for p in err.problems if p not in problems)
    if problems:
        raise RecipeError(problems, f"search space of {recipe}")


# ---------------------------------------------------------------------------------------------
# The study


def open_study(settings: Settings, direction: str):
    """Create or load the study (retrying briefly: workers started together race to create the tables); return it
    and whether this worker created it (the creator queues a grid, the others wait for its queue)."""
    import optuna
    from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback

    url = settings.storage_url
    kwargs = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else {"pool_pre_ping": True}
    if url.startswith("sqlite"):
        settings.out.mkdir(parents=True, exist_ok=True)
    last_error: Optional[Exception] = None
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)  # heartbeat, retry: stable here
    for attempt in range(5):
        try:
            storage = RDBStorage(
                url,
                engine_kwargs=kwargs,
                heartbeat_interval=settings.heartbeat_interval,
                grace_period=settings.grace_period,
                heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback(max_retry=3),
            )
            try:
                study = optuna.create_study(
                    storage=storage,
                    study_name=settings.name,
                    direction=direction,
                    sampler=make_sampler(settings),
                    pruner=make_pruner(settings),
                )
                created = True
            except optuna.exceptions.DuplicatedStudyError:
                sampler, pruner = make_sampler(settings), make_pruner(settings)
                study = optuna.load_study(study_name=settings.name, storage=storage, sampler=sampler, pruner=pruner)
                created = False
            break
        except ImportError as err:
            raise RecipeError([f"--storage {safe_url(url)} needs a database driver: {err}"], "sweep storage") from None
        except Exception as err:  # noqa: BLE001 - concurrent table creation, a server still starting
            last_error = err
            time.sleep(1 + attempt)
    else:
        raise RecipeError(
            [f"cannot open the study storage {safe_url(url)}: {type(last_error).__name__}: {last_error}"],
            "sweep storage",
        )
    identity = {"recipe": Path(settings.recipe).name, "out": settings.out.resolve().name}
    owner = study.user_attrs.get("sweep")
    if owner is None:
        study.set_user_attr("sweep", identity)
    elif owner != identity:  # its queue holds another sweep's runs: this worker would train them with this recipe
        raise RecipeError(
            [
                f"study '{settings.name}' in {safe_url(url)} belongs to the sweep of recipe {owner['recipe']} into a"
                f" directory named {owner['out']}; this is {identity['recipe']} into {identity['out']}."
                " Give this sweep its own --study-name"
            ],
            "sweep storage",
        )
    if study.direction.name.lower() != direction:
        raise RecipeError(
            [
                f"study '{settings.name}' in {safe_url(url)} was created to {study.direction.name.lower()} its"
                f" metric; --metric {settings.metric} needs {direction}. Use another --study-name"
            ],
            "sweep storage",
        )
    return study, created


def safe_url(url: str) -> str:
    """The storage URL without its password (logs and errors never show it)."""
    return re.sub(r"(://[^:/@]+):[^@]*@", r"\1:***@", url)


def make_sampler(settings: Settings):
    import optuna

    if settings.sampler == "tpe":  # constant liar: workers running side by side do not all sample the same region
        # Random trials before TPE models the results: Optuna's 10, or a third of a smaller budget (at least 2).
        startup = max(2, min(10, (settings.trials or 30) // 3))
        return optuna.samplers.TPESampler(seed=settings.seed, constant_liar=True, n_startup_trials=startup)
    return getattr(optuna.samplers, SAMPLERS[settings.sampler])(seed=settings.seed)


def make_pruner(settings: Settings):
    import optuna

    if settings.pruner == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=settings.pruner_startup_trials, n_warmup_steps=0)
    if settings.pruner == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=1, max_resource="auto", reduction_factor=3)
    return optuna.pruners.NopPruner()


def _trials(study, states=None):
    return study.get_trials(deepcopy=False, states=states)


def queue_grid(study, runs: Sequence[sweep.Run], metric: str) -> None:
    """Put every run without a live or finished trial in the queue (a run whose directory already holds metrics
    is recorded as complete without training)."""
    import optuna
    from optuna.distributions import CategoricalDistribution
    from optuna.trial import TrialState

    live = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING, TrialState.WAITING)
    have = {t.user_attrs.get("run") for t in _trials(study, live)}
    choices: dict[str, list[str]] = {}
    for run in runs:
        for key in run.free:
            choices.setdefault(key, [])
            if run.overrides[key] not in choices[key]:
                choices[key].append(run.overrides[key])
    for run in runs:
        if run.name in have:
            continue
        params = {key: run.overrides[key] for key in run.free}
        distributions = {key: CategoricalDistribution(choices[key]) for key in params}
        attrs = {"run": run.name, "arm": run.arm, "overrides": run.overrides}
        finished = _read_metrics(run.out_dir)
        if finished is not None and metric in finished:
            attrs["reused"] = True
            frozen = optuna.trial.create_trial(
                state=TrialState.COMPLETE,
                value=finished[metric],
                params=params,
                distributions=distributions,
                user_attrs=attrs,
            )
        else:
            frozen = optuna.trial.create_trial(
                state=TrialState.WAITING, params=params, distributions=distributions, user_attrs=attrs
            )
        study.add_trial(frozen)


def claim_waiting(study):
    """The lowest-numbered WAITING trial, moved to RUNNING by this worker (the storage makes the move atomic:
    a trial another worker took first is skipped), or None."""
    import optuna
    from optuna.trial import TrialState

    for frozen in sorted(_trials(study, (TrialState.WAITING,)), key=lambda t: t.number):
        if study._storage.set_trial_state_values(frozen._trial_id, state=TrialState.RUNNING):
            return optuna.Trial(study, frozen._trial_id)
    return None


def duplicate_of(study, trial) -> Optional[int]:
    """Another trial that owns this trial's run: one that finished it, or a live one with a lower number (two
    workers that queued the same failed run at once: the first queued copy runs, the other is dropped)."""
    from optuna.trial import TrialState

    run = trial.user_attrs.get("run")
    for other in _trials(study):
        if other.number == trial.number or other.user_attrs.get("run") != run:
            continue
        if other.state in (TrialState.COMPLETE, TrialState.PRUNED):
            return other.number
        if other.number < trial.number and other.state in (TrialState.RUNNING, TrialState.WAITING):
            return other.number
    return None


def search_budget_left(study, trials: int) -> bool:
    """Whether the search has run fewer than ``trials`` trials (a trial failed by heartbeat and retried counts once)."""
    every = _trials(study)
    retried = {number for t in every for number in t.system_attrs.get("retry_history", ())}
    return sum(1 for t in every if t.number not in retried) < trials


def stale_and_running(study) -> bool:
    """Fail trials whose worker stopped beating (they are queued again), and say whether any trial still runs."""
    import optuna
    from optuna.trial import TrialState

    optuna.storages.fail_stale_trials(study)
    return bool(_trials(study, (TrialState.RUNNING,)))


# ---------------------------------------------------------------------------------------------
# One trial


def _read_metrics(run_dir: Path) -> Optional[dict[str, Any]]:
    path = run_dir / "metrics.json"
    return json.loads(path.read_text()) if path.exists() else None


def _read_history(run_dir: Path) -> list[dict[str, Any]]:
    try:
        return json.loads((run_dir / "history.json").read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return []


def read_evaluations(run_dir: Path, metric: str) -> list[tuple[int, float]]:
    """(step, metric) of every evaluation in the run's ``history.json`` so far."""
    return [(h["step"], h[metric]) for h in _read_history(run_dir) if metric in h]


def _die_with_parent() -> None:
    """In the child: be killed when the worker dies (SIGKILL included), so a retried trial finds its directory free."""
    with contextlib.suppress(Exception):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def run_trial(settings: Settings, study, trial, run: sweep.Run) -> str:
    """Train ``run`` for ``trial`` in a fresh process, report its evaluations, prune it if the pruner says so, and
    tell the study how it ended: ``complete``, ``pruned`` or ``failed``."""
    from optuna.trial import TrialState

    finished = _read_metrics(run.out_dir)
    if finished is not None and settings.metric in finished:  # trained already (another study, an older sweep)
        trial.set_user_attr("reused", True)
        study.tell(trial, finished[settings.metric])
        return "complete"
    for stale in ("history.json", PRUNED_MARKER):  # left by a killed or pruned attempt: this one starts afresh
        (run.out_dir / stale).unlink(missing_ok=True)
    command = sweep.train_command(settings.recipe, run)
    log_path = settings.out / "logs" / f"{run.name}.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    storage, beat = study._storage, 0.0
    reported: set[int] = set()
    pruned: Optional[tuple[int, float]] = None
    start = time.perf_counter()
    with open(log_path, "a") as log:
        log.write(f"=== trial {trial.number} on {socket.gethostname()} at {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
        log.flush()
        trial.set_user_attr("worker", f"{socket.gethostname()}:{os.getpid()}")
        child = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, preexec_fn=_die_with_parent)
        try:
            while True:
                code = child.poll()
                if time.monotonic() - beat >= settings.heartbeat_interval:
                    storage.record_heartbeat(trial._trial_id)
                    beat = time.monotonic()
                for step, value in read_evaluations(run.out_dir, settings.metric):
                    if step in reported or pruned is not None:
                        continue
                    trial.report(value, step)
                    reported.add(step)
                    if code is None and trial.should_prune():
                        pruned = (step, value)
                        logger.info(
                            "trial %d (%s): pruned at step %d (%s %.4f)",
                            trial.number,
                            run.name,
                            step,
                            settings.metric,
                            value,
                        )
                        child.send_signal(signal.SIGTERM)  # the loop checkpoints and exits at its next step
                if code is not None:
                    break
                time.sleep(settings.poll_s)
                if pruned is not None and time.perf_counter() - start > STOP_GRACE_S and child.poll() is None:
                    child.kill()
        except BaseException:
            child.kill()
            child.wait()
            study.tell(trial, state=TrialState.FAIL)
            raise
    wall = time.perf_counter() - start
    trial.set_user_attr("wall_seconds", wall)
    if pruned is not None:
        info = {"trial": trial.number, "step": pruned[0], settings.metric: pruned[1], "pruner": settings.pruner}
        (run.out_dir / PRUNED_MARKER).write_text(json.dumps(info, indent=1))
        study.tell(trial, state=TrialState.PRUNED)
        return "pruned"
    metrics = _read_metrics(run.out_dir)
    if code == 0 and metrics is not None:
        info = {
            "arm": run.arm,
            "overrides": run.overrides,
            "extra": run.extra,
            "wall_seconds": wall,
            "command": command,
            "trial": trial.number,
        }
        (run.out_dir / "sweep_run.json").write_text(json.dumps(info, indent=1))
        study.tell(trial, metrics[settings.metric])
        return "complete"
    trial.set_user_attr("exit_code", code)
    study.tell(trial, state=TrialState.FAIL)
    logger.warning("trial %d (%s) failed with exit code %s (log: %s)", trial.number, run.name, code, log_path)
    return "failed"


# ---------------------------------------------------------------------------------------------
# The worker


def trial_run(settings: Settings, trial, space=None, tied=None, order=()) -> sweep.Run:
    """The run a claimed trial trains: its queued overrides, or (a new search trial) the sampler's values."""
    if "run" not in trial.user_attrs:  # a new search trial: sample it
        values = {key: format_value(_suggest(trial, key, dist)) for key, dist in space.items()}
        overrides = resolve_ties(values, tied, order)
        name = f"t{trial.number:03d}_{sweep.run_name(overrides)}"[: sweep.MAX_NAME]
        trial.set_user_attr("run", name)
        trial.set_user_attr("overrides", overrides)
    attrs = trial.user_attrs
    return sweep.Run(attrs["overrides"], settings.out / attrs["run"], attrs.get("arm", ""), list(settings.extra))


def _suggest(trial, key: str, distribution):
    from optuna.distributions import CategoricalDistribution, IntDistribution

    if isinstance(distribution, CategoricalDistribution):
        return trial.suggest_categorical(key, distribution.choices)
    if isinstance(distribution, IntDistribution):
        return trial.suggest_int(key, distribution.low, distribution.high)
    return trial.suggest_float(key, distribution.low, distribution.high, log=distribution.log)


QUEUE_WAIT_S = 120
"""How long a worker that did not create a grid's study waits for the creator to queue the grid."""


def work(
    settings: Settings,
    study,
    runs: Sequence[sweep.Run] = (),
    search: Optional[tuple] = None,
    created: bool = True,
) -> dict[str, int]:
    """Claim and train trials until the grid (``runs``) or the search budget is done and no other worker's trial is
    still running (it may yet fail by heartbeat and come back to the queue); return the count of each outcome.

    A grid is queued by the worker that ``created`` the study; workers started beside it wait for its ``queued``
    mark, so the queue holds each run once (later invocations queue only the runs with no live or finished trial).
    """
    from optuna.trial import TrialState

    counts = {"complete": 0, "pruned": 0, "failed": 0, "duplicate": 0}
    if runs:
        deadline = time.monotonic() + QUEUE_WAIT_S
        while not created and not study.user_attrs.get("queued") and time.monotonic() < deadline:
            time.sleep(settings.poll_s)
        queue_grid(study, runs, settings.metric)
        study.set_user_attr("queued", True)
    while True:
        running = stale_and_running(study)
        trial = claim_waiting(study)
        if trial is None and search is not None and search_budget_left(study, settings.trials):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # "heartbeat is supposed to be used with optimize": this loop beats
                trial = study.ask()
        if trial is None:
            if not running:
                return counts
            time.sleep(settings.poll_s)
            continue
        owner = duplicate_of(study, trial)
        if owner is not None:
            trial.set_user_attr("duplicate_of", owner)
            study.tell(trial, state=TrialState.FAIL)
            counts["duplicate"] += 1
            continue
        space, tied, order = search or (None, None, ())
        try:
            run = trial_run(settings, trial, space, tied, order)
            load_recipe(settings.recipe, run.override_list() + [f"output.output_dir={run.out_dir}"])
        except RecipeError as err:
            trial.set_user_attr("error", str(err))
            study.tell(trial, state=TrialState.FAIL)
            logger.warning("trial %d: %s", trial.number, err)
            counts["failed"] += 1
            continue
        logger.info("trial %d: %s training", trial.number, run.name)
        outcome = run_trial(settings, study, trial, run)
        logger.info("trial %d: %s %s", trial.number, run.name, outcome)
        counts[outcome] += 1


def run_states(study) -> dict[str, str]:
    """Each run's state in the study (complete > pruned > running > waiting > failed), by run name."""
    rank = {"COMPLETE": 0, "PRUNED": 1, "RUNNING": 2, "WAITING": 3, "FAIL": 4}
    states: dict[str, str] = {}
    for t in _trials(study):
        run = t.user_attrs.get("run")
        if run is None or "duplicate_of" in t.user_attrs:
            continue
        state = t.state.name
        if run not in states or rank[state] < rank[states[run]]:
            states[run] = state
    return {run: {"FAIL": "failed"}.get(s, s.lower()) for run, s in states.items()}


def result_rows(settings: Settings, study, runs: Sequence[sweep.Run] = ()) -> list[dict[str, Any]]:
    """One row per run (the grid's runs in plan order, else the study's trials in order): its state, overrides
    and results; a pruned run shows the step it stopped at and its last evaluation."""
    states = run_states(study)
    if not runs:
        seen: dict[str, sweep.Run] = {}
        for t in sorted(_trials(study), key=lambda t: t.number):
            name = t.user_attrs.get("run")
            if name and name not in seen and "duplicate_of" not in t.user_attrs:
                seen[name] = sweep.Run(t.user_attrs["overrides"], settings.out / name, t.user_attrs.get("arm", ""))
        runs = list(seen.values())
    rows = []
    for run in runs:
        row = sweep.read_result(run) or {"run": run.name, "arm": run.arm, **run.overrides}
        state = states.get(run.name, "not run")
        row = {"run": row.pop("run"), "state": state, **row}
        metrics = _read_metrics(run.out_dir) or {}
        row[settings.metric] = metrics.get(settings.metric)
        marker = run.out_dir / PRUNED_MARKER
        if state == "pruned" and marker.exists():
            info = json.loads(marker.read_text())
            evals = [h for h in _read_history(run.out_dir) if "eval_accuracy" in h and h["step"] <= info["step"]]
            if evals:
                row.update({key: evals[-1][key] for key in ("eval_accuracy", "eval_macro_f1", "eval_loss")})
                row["best_eval_accuracy"] = max(h["eval_accuracy"] for h in evals)
            row["pruned_at_step"] = info["step"]
        rows.append(row)
    return rows


def write_plots(settings: Settings, study, rows: Sequence[dict[str, Any]]) -> list[Path]:
    """Optuna's optimisation history, intermediate values, parameter importances (two or more parameters) and
    parallel coordinates, and accuracy vs rank when the sweep has a ``peft.r`` axis, as PNG in the sweep dir."""
    import optuna.visualization.matplotlib as ovm
    from optuna.trial import TrialState

    plt = pyplot()
    done = _trials(study, (TrialState.COMPLETE,))
    params = {k for t in done for k, d in t.distributions.items() if len(getattr(d, "choices", (0, 1))) > 1}
    plots = {"optuna_history.png": lambda: ovm.plot_optimization_history(study, target_name=settings.metric)}
    if any(t.intermediate_values for t in _trials(study)):
        plots["optuna_intermediate_values.png"] = lambda: ovm.plot_intermediate_values(study)
    if params:
        plots["optuna_parallel_coordinates.png"] = lambda: ovm.plot_parallel_coordinate(
            study, params=sorted(params), target_name=settings.metric
        )
    if len(params) >= 2 and len(done) >= 4:
        plots["optuna_param_importances.png"] = lambda: ovm.plot_param_importances(study, target_name=settings.metric)
    written = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "experimental" warnings of optuna.visualization.matplotlib
        for name, make in plots.items():
            if not done:
                break
            try:
                ax = make()
            except (ValueError, RuntimeError) as err:  # e.g. importances of parameters that never vary
                logger.warning("plot %s skipped: %s", name, err)
                continue
            fig = (ax if hasattr(ax, "figure") else ax.flat[0]).figure
            fig.set_size_inches(7, 4.5)
            fig.tight_layout()
            fig.savefig(settings.out / name, dpi=100)
            plt.close(fig)
            written.append(settings.out / name)
    ranked = [r for r in rows if r.get("state") == "complete" and r.get("peft.r") and _is_number(r["peft.r"])]
    if len({r["peft.r"] for r in ranked}) > 1:
        written.append(plot_metric_vs_rank(settings, ranked))
    return written


def plot_metric_vs_rank(settings: Settings, rows: Sequence[dict[str, Any]]) -> Path:
    """The metric against the LoRA rank, one line per combination of the other overrides."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5.2, 3.5), dpi=100)
    lines: dict[str, list[tuple[float, float]]] = {}
    skip = {"run", "state", "peft.r", "peft.alpha", *sweep.RESULT_COLUMNS, "pruned_at_step", settings.metric}
    skip |= {key for key in rows[0] if len({str(row.get(key)) for row in rows}) == 1}  # the same in every run
    for row in rows:
        label = ", ".join(f"{k}={v}" for k, v in row.items() if k not in skip and v not in (None, "")) or "LoRA"
        lines.setdefault(label, []).append((float(row["peft.r"]), float(row[settings.metric])))
    for label, points in lines.items():
        points.sort()
        ax.plot([p[0] for p in points], [p[1] for p in points], "o-", label=label[:60])
    ax.set_xscale("log", base=2)
    path = settings.out / "metric_vs_rank.png"
    finish_plot(fig, ax, "LoRA rank r", settings.metric, f"{settings.metric} vs rank ({settings.name})", path)
    return path


def best_trial_line(study) -> str:
    """``best: trial 7 (run ...): eval_accuracy 0.8123`` or why there is none."""
    try:
        best = study.best_trial
    except ValueError:
        return "best: no complete trial yet"
    return f"best: trial {best.number} ({best.user_attrs.get('run')}): {best.value:.4f}"
