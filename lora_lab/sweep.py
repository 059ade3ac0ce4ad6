"""Grid sweeps: one recipe, lists of overrides, one output directory per run, one results table.

A grid is a list of axis specs, each ``section.field=V1,V2,...`` (commas inside ``[...]`` do not split,
so ``peft.target_modules=[query,value],[query,key,value]`` is two values). An axis whose value is
``C*section.field`` (or just ``section.field``) is *tied*: it takes C times the value the named axis has in
that run, e.g. ``peft.alpha=2*peft.r`` keeps alpha / r = 2 across ``peft.r=1,2,4,8``. The runs of a grid
are the Cartesian product of its free axes; several grids (arms) are simply concatenated.

Each run trains in a fresh Python process (clean peak-memory figures, one crash does not end the sweep)
into ``<root>/<name>``, where the name spells out the run's overrides, as one trial of an Optuna study
(:mod:`lora_lab.optuna_sweep`: several workers can share it). Finished runs are not trained again, so
re-running a sweep resumes it; a run killed half-way restarts from scratch (keeping its timings clean).
Every run's recipe is built and validated before the first one starts.
"""

from __future__ import annotations

import csv
import hashlib
import itertools
import json
import logging
import math
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Optional, Sequence

from lora_train.config import RecipeError, load_recipe

if TYPE_CHECKING:
    from lora_lab.optuna_sweep import Settings

logger = logging.getLogger("lora_lab.sweep")

TIE = re.compile(
    r"^(?:(?P<coef>[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)\s*\*\s*)?(?P<ref>[A-Za-z_]\w*\.[A-Za-z_]\w*)$"
)
"""``2*peft.r``, ``0.5 * peft.r`` or ``peft.r``: a value tied to another axis."""

RESULT_COLUMNS = (
    "eval_accuracy",
    "eval_macro_f1",
    "best_eval_accuracy",
    "trainable_params",
    "train_seconds",
    "train_samples_per_s",
    "peak_memory_mb",
    "wall_seconds",
)
"""Metrics collected from each run into the results table (after the run's overrides)."""


@dataclass
class Run:
    """One point of a grid: its overrides (in axis order) and where it trains."""

    overrides: dict[str, str]
    out_dir: Path
    arm: str = ""
    extra: list[str] = field(default_factory=list)
    free: tuple[str, ...] = ()
    """The keys of its list axes (the others are tied to them): the parameters of its Optuna trial."""

    @property
    def name(self) -> str:
        return self.out_dir.name

    def override_list(self) -> list[str]:
        """``section.field=value`` strings for the command line (extra fixed overrides first)."""
        return list(self.extra) + [f"{k}={v}" for k, v in self.overrides.items()]


# ---------------------------------------------------------------------------------------------
# Grid expansion (pure)


def split_values(raw: str) -> list[str]:
    """Split ``1,2,[a,b]`` on the commas outside brackets: ``['1', '2', '[a,b]']``."""
    values, depth, current = [], 0, []
    for ch in raw:
        depth += {"[": 1, "{": 1, "]": -1, "}": -1}.get(ch, 0)
        if ch == "," and depth == 0:
            values.append("".join(current).strip())
            current = []
        else:
            current.append(ch)
    values.append("".join(current).strip())
    if depth != 0 or any(v == "" for v in values):
        raise RecipeError(
            [f"grid values '{raw}' are malformed: expected V1,V2,... with balanced brackets"], "sweep grid"
        )
    return values


def parse_axes(specs: Sequence[str]) -> tuple[dict[str, list[str]], dict[str, tuple[float, str]]]:
    """Free axes ``{key: [values]}`` and tied axes ``{key: (coefficient, referenced key)}`` of one grid."""
    free: dict[str, list[str]] = {}
    tied: dict[str, tuple[float, str]] = {}
    problems = []
    for spec in specs:
        if "=" not in spec:
            problems.append(
                f"grid axis '{spec}' is not of the form section.field=V1,V2,... or section.field=C*other.field"
            )
            continue
        key, raw = (s.strip() for s in spec.split("=", 1))
        if key.count(".") != 1:
            problems.append(f"grid axis key '{key}' must be section.field, e.g. peft.r")
            continue
        if key in free or key in tied:
            problems.append(f"grid axis '{key}' is given twice")
            continue
        match = TIE.match(raw)
        if match and "," not in raw:
            tied[key] = (float(match["coef"]) if match["coef"] else 1.0, match["ref"])
            continue
        try:
            free[key] = split_values(raw)
        except RecipeError as err:
            problems.extend(err.problems)
    for key, (_, ref) in tied.items():
        if ref not in free:
            problems.append(
                f"grid axis '{key}' is tied to '{ref}', which is not a list axis of the same grid"
                f" (list axes: {', '.join(free) or 'none'})"
            )
    if problems:
        raise RecipeError(problems, "sweep grid")
    return free, tied


def format_number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else repr(float(value))


def expand_grid(specs: Sequence[str]) -> list[dict[str, str]]:
    """Every run of one grid as ``{key: raw value}``, tied axes resolved, in axis order."""
    free, tied = parse_axes(specs)
    order = [s.split("=", 1)[0].strip() for s in specs]
    runs = []
    for combo in itertools.product(*free.values()) if free else [()]:
        values = dict(zip(free, combo))
        for key, (coef, ref) in tied.items():
            try:
                base = float(values[ref])
            except ValueError:
                raise RecipeError(
                    [f"grid axis '{key}' = {coef}*{ref} needs numeric values of {ref}, got '{values[ref]}'"],
                    "sweep grid",
                ) from None
            values[key] = format_number(coef * base)
        runs.append({k: values[k] for k in order})
    return runs


def run_name(overrides: dict[str, str]) -> str:
    """A readable, filesystem-safe directory name that spells out the overrides, e.g. ``method-lora_r-8_alpha-16``.

    Fields are named without their section unless two sections share the field name
    (``peft.method-lora_quantization.method-nf4``).
    """
    fields = [key.split(".", 1)[1] for key in overrides]
    parts = []
    for key, value in overrides.items():
        short = key.split(".", 1)[1]
        short = key if fields.count(short) > 1 else short
        clean = re.sub(r"[^A-Za-z0-9.+-]+", "-", value).strip("-") or "none"
        parts.append(f"{short}-{clean}")
    name = "_".join(parts) or "base"
    if len(name) > MAX_NAME:  # file systems stop at 255 bytes: keep the start readable, a hash keeps it unique
        name = name[: MAX_NAME - 9] + "_" + hashlib.sha256(name.encode()).hexdigest()[:8]
    return name


MAX_NAME = 150
"""Longest run directory name; longer ones end in a hash of the full name."""


def plan(
    arms: dict[str, Sequence[str]] | Sequence[tuple[str, Sequence[str]]], root: Path, extra: Sequence[str] = ()
) -> list[Run]:
    """The runs of several named grids (arms) under ``root``, in the order given.

    ``arms`` maps arm names to axis specs, or is a list of ``(arm, specs)`` pairs where a name may repeat
    (e.g. one pair per seed, so that every arm's first seed finishes before any second seed starts).
    Two arms may share a run (same overrides, e.g. r=8 with alpha=16 in a scaled-alpha and a fixed-alpha
    arm): it appears in both arms' lists, shares one directory and is trained once.
    """
    pairs = arms.items() if isinstance(arms, dict) else arms
    return [
        Run(o, root / run_name(o), arm, list(extra), tuple(parse_axes(specs)[0]))
        for arm, specs in pairs
        for o in expand_grid(specs)
    ]


def unique(runs: Iterable[Run]) -> list[Run]:
    """The runs with distinct output directories, first occurrence kept."""
    seen: dict[Path, Run] = {}
    for run in runs:
        seen.setdefault(run.out_dir, run)
    return list(seen.values())


def validate_runs(recipe_path: str | Path, runs: Iterable[Run]) -> None:
    """Build every run's recipe now, so a bad value stops the sweep before any training."""
    problems = []
    for run in runs:
        try:
            load_recipe(recipe_path, run.override_list() + [f"output.output_dir={run.out_dir}"])
        except RecipeError as err:
            problems.extend(f"run {run.name}: {p}" for p in err.problems)
    if problems:
        raise RecipeError(problems, f"sweep of {recipe_path}")


# ---------------------------------------------------------------------------------------------
# Running


TRAIN_ENTRY = "import sys; from lora_train.commands.train import main; sys.exit(main(sys.argv[1:]))"


def train_command(recipe_path: str | Path, run: Run) -> list[str]:
    """The command that trains one run in a fresh interpreter."""
    overrides = run.override_list() + [f"output.output_dir={run.out_dir}"]
    if run.out_dir.exists():
        overrides.append("output.overwrite_output_dir=true")  # a run killed half-way restarts cleanly
    return [sys.executable, "-c", TRAIN_ENTRY, str(recipe_path), *overrides]


def run_sweep(
    recipe_path: str | Path,
    runs: Sequence[Run],
    dry_run: bool = False,
    settings: Optional[Settings] = None,
) -> list[Run]:
    """Train every run of the grid that the study has not finished, as one worker of an Optuna study (an SQLite
    file in the runs' root unless ``settings`` names a storage); return the runs that failed.

    See :mod:`lora_lab.optuna_sweep`: other workers running the same grid share the trials, none runs twice.
    """
    # import cycle: optuna_sweep imports this module
    from lora_lab import optuna_sweep

    runs = unique(runs)
    validate_runs(recipe_path, runs)
    if dry_run:
        for run in runs:
            print(" ".join(run.override_list()))
        return []
    root = runs[0].out_dir.parent if runs else Path(".")
    settings = settings or optuna_sweep.Settings(str(recipe_path), root, extra=list(runs[0].extra) if runs else [])
    direction = optuna_sweep.METRICS[settings.metric]
    study, created = optuna_sweep.open_study(settings, direction)
    optuna_sweep.work(settings, study, runs, created=created)
    states = optuna_sweep.run_states(study)
    return [run for run in runs if states.get(run.name) == "failed"]


# ---------------------------------------------------------------------------------------------
# Collecting results


def read_result(run: Run) -> Optional[dict[str, Any]]:
    """One table row for a finished run (its overrides, then RESULT_COLUMNS), or None if it has no metrics."""
    path = run.out_dir / "metrics.json"
    if not path.exists():
        return None
    metrics = json.loads(path.read_text())
    sweep_info = run.out_dir / "sweep_run.json"
    history_path = run.out_dir / "history.json"
    history = json.loads(history_path.read_text()) if history_path.exists() else []
    rates = [h["samples_per_s"] for h in history if "samples_per_s" in h]
    row: dict[str, Any] = {"run": run.name, "arm": run.arm, **run.overrides}
    row.update(
        {
            "eval_accuracy": metrics.get("eval_accuracy"),
            "eval_macro_f1": metrics.get("eval_macro_f1"),
            "best_eval_accuracy": metrics.get("best_eval_accuracy"),
            "trainable_params": metrics.get("trainable_params"),
            "train_seconds": metrics.get("train_seconds_this_session", metrics.get("train_seconds")),
            "train_samples_per_s": sum(rates) / len(rates) if rates else metrics.get("train_samples_per_s"),
            "peak_memory_mb": metrics.get("peak_memory_mb"),
            "wall_seconds": json.loads(sweep_info.read_text())["wall_seconds"] if sweep_info.exists() else None,
        }
    )
    return row


def collect(runs: Iterable[Run]) -> list[dict[str, Any]]:
    """Rows of every finished run, in plan order."""
    return [row for row in (read_result(run) for run in runs) if row is not None]


def aggregate(
    rows: Sequence[dict[str, Any]], over: str, metrics: Sequence[str] = RESULT_COLUMNS
) -> list[dict[str, Any]]:
    """Group rows that differ only in ``over`` (e.g. the seed): mean and sample std of each metric, and n."""
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for row in rows:
        key = tuple((k, v) for k, v in row.items() if k not in (over, "run") and k not in metrics)
        groups.setdefault(key, []).append(row)
    out = []
    for key, members in groups.items():
        agg: dict[str, Any] = dict(key)
        agg["n"] = len(members)
        for metric in metrics:
            values = [m[metric] for m in members if m.get(metric) is not None]
            if values:
                mean = sum(values) / len(values)
                agg[metric] = mean
                agg[f"{metric}_std"] = (
                    math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else 0.0
                )
        out.append(agg)
    return out


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.4f}" if abs(value) < 10 else f"{value:.1f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def write_table(
    rows: Sequence[dict[str, Any]],
    csv_path: Path,
    md_path: Optional[Path] = None,
    columns: Optional[Sequence[str]] = None,
) -> None:
    """Write rows as CSV (full precision) and optionally Markdown (rounded); columns default to the union in order."""
    if columns is None:
        columns = list(dict.fromkeys(k for row in rows for k in row))
    csv_path.parent.mkdir(parents=True, exist_ok=True)
    with open(csv_path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(columns), extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    if md_path is not None:
        md_path.write_text(markdown_table(rows, columns) + "\n")


def markdown_table(rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> str:
    """A GitHub Markdown table of ``rows`` restricted to ``columns``."""
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_cell(row.get(c)) for c in columns) + " |" for row in rows]
    return "\n".join(lines)
