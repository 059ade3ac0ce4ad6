"""``lora-sweep`` / ``scripts/sweep.py``: run grids or a search of one recipe as an Optuna study, write the tables."""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Optional, Sequence

from lora_lab import optuna_sweep as osw
from lora_lab.sweep import aggregate, markdown_table, plan, unique, validate_runs, write_table
from lora_train.config import RecipeError
from lora_train.startup import prepare_process

EPILOG = """\
Axis syntax: section.field=V1,V2,... (a grid; commas inside [...] do not split), a tied axis
section.field=C*other.field (e.g. peft.alpha=2*peft.r), or a search axis: loguniform(a,b), uniform(a,b),
int(a,b), choice(V1,V2,...). Any search axis makes the sweep a search (--trials N trials of the sampler);
otherwise every run of the grid(s) trains once.

Several workers (processes, machines, Slurm array tasks) running the same command with the same --storage share
the study: no run trains twice, a killed worker's trial is retried by another, re-running resumes.

Examples:
  lora-sweep recipes/cpu/sst2_lora.yaml peft.r=1,2,4,8 peft.alpha=2*peft.r training.seed=0,1,2 \\
      --out runs/sweeps/rank --aggregate-over training.seed
  lora-sweep recipes/cpu/sst2_lora.yaml 'training.learning_rate=loguniform(1e-5,1e-2)' \\
      'peft.r=choice(4,8,16,32)' peft.alpha=2*peft.r --trials 12 --pruner median --out runs/sweeps/tpe
  lora-sweep ... --storage postgresql://user:password@dbhost/sweeps   # every worker, any machine
"""


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``lora-sweep RECIPE AXIS... [--grid "AXIS AXIS"]... --out DIR``: run the grid(s) or search, write the tables."""
    prepare_process()
    import argparse
    import shlex

    parser = argparse.ArgumentParser(
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Run a grid or a search of one recipe with overrides as an Optuna study, one output directory"
        " per run, and collect a results table (results.csv, results.md; with --aggregate-over also summary.csv/.md"
        " of mean and std) and plots (PNG).",
        epilog=EPILOG,
    )
    parser.add_argument("recipe", help="Recipe YAML shared by every run")
    parser.add_argument("axes", nargs="*", help="Axes of the main grid or of the search (see below)")
    parser.add_argument(
        "--grid",
        action="append",
        default=[],
        metavar='"AXIS AXIS ..."',
        help="An additional grid (arm), its axes in one quoted string; repeatable (grids only)",
    )
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="section.field=value",
        dest="fixed",
        help="A fixed override applied to every run; repeatable",
    )
    parser.add_argument("--out", required=True, help="Root directory: one subdirectory per run, logs/, tables, plots")
    parser.add_argument(
        "--aggregate-over",
        default=None,
        metavar="section.field",
        help="Also write summary tables averaging over this axis (typically training.seed)",
    )
    parser.add_argument("--trials", type=int, default=None, help="Trials of a search (required with search axes)")
    parser.add_argument(
        "--metric",
        default="eval_accuracy",
        choices=sorted(osw.METRICS),
        help="Validation metric to optimise and prune on (eval_loss is minimised; default eval_accuracy)",
    )
    parser.add_argument("--sampler", default="tpe", choices=sorted(osw.SAMPLERS), help="Sampler of a search")
    parser.add_argument("--seed", type=int, default=None, help="Seed of the sampler")
    parser.add_argument(
        "--pruner",
        default="none",
        choices=osw.PRUNERS,
        help="Stop hopeless trials at an evaluation (set training.eval_steps for several per run)",
    )
    parser.add_argument(
        "--pruner-startup-trials",
        type=int,
        default=3,
        metavar="N",
        help="median: finished trials needed before it prunes (default 3)",
    )
    parser.add_argument(
        "--storage",
        default=None,
        metavar="URL",
        help="Study database shared by the workers, e.g. postgresql://user:pw@host/db (default: sqlite file"
        " OUT/optuna.db: one machine)",
    )
    parser.add_argument("--study-name", default=None, help="Study name in the storage (default: the name of --out)")
    parser.add_argument(
        "--heartbeat-interval",
        type=int,
        default=10,
        metavar="S",
        help="Seconds between a worker's heartbeats (default 10)",
    )
    parser.add_argument(
        "--grace-period",
        type=int,
        default=60,
        metavar="S",
        help="A trial without a heartbeat for this long is failed and retried by another worker (default 60)",
    )
    parser.add_argument("--dry-run", action="store_true", help="Print the runs (or the search space) without training")
    args = parser.parse_args(argv)
    logging.basicConfig(format="%(asctime)s %(message)s", datefmt="%H:%M:%S", level=logging.INFO)
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)

    arms = {"main": args.axes} if args.axes else {}
    arms.update({f"grid{i}": shlex.split(g) for i, g in enumerate(args.grid, 1)})
    if not arms:
        parser.error("give at least one axis or one --grid")
    searching = any(osw.is_search_axis(spec) for specs in arms.values() for spec in specs)
    if searching and len(arms) > 1:
        parser.error("a search has one set of axes: --grid arms are for grids only")
    if searching and (args.trials is None or args.trials < 1):
        parser.error("a search (uniform/loguniform/int/choice axes) needs --trials N, N >= 1")
    if not searching and args.trials is not None:
        parser.error("--trials is for searches: a grid runs each of its runs once (use choice(...) to search)")
    if args.heartbeat_interval < 1 or args.pruner_startup_trials < 0:
        parser.error("--heartbeat-interval must be >= 1 and --pruner-startup-trials >= 0")
    if args.grace_period <= args.heartbeat_interval:
        parser.error("--grace-period must be longer than --heartbeat-interval")
    root = Path(args.out)
    settings = osw.Settings(
        recipe=args.recipe,
        out=root,
        storage=args.storage,
        study_name=args.study_name,
        metric=args.metric,
        pruner=args.pruner,
        pruner_startup_trials=args.pruner_startup_trials,
        sampler=args.sampler,
        trials=args.trials,
        seed=args.seed,
        heartbeat_interval=args.heartbeat_interval,
        grace_period=args.grace_period,
        extra=list(args.fixed),
    )
    try:
        if searching:
            runs = []
            space, tied = osw.parse_space(args.axes)
            order = [s.split("=", 1)[0].strip() for s in args.axes]
            osw.validate_space(args.recipe, space, tied, order, args.fixed, root)
            if args.dry_run:
                print("\n".join(f"{k}: {d}" for k, d in space.items()))
                return 0
            search = (space, tied, order)
        else:
            runs = unique(plan(arms, root, args.fixed))
            validate_runs(args.recipe, runs)
            if args.dry_run:
                print("\n".join(" ".join(run.override_list()) for run in runs))
                return 0
            search = None
        study, created = osw.open_study(settings, osw.METRICS[args.metric])
        counts = osw.work(settings, study, runs, search, created)
    except RecipeError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    rows = osw.result_rows(settings, study, plan(arms, root, args.fixed) if runs else ())
    if args.aggregate_over:
        done = [row for row in rows if row["state"] == "complete"]
        write_table(aggregate(done, args.aggregate_over), root / "summary.csv", root / "summary.md")
    plots = osw.write_plots(settings, study, rows)
    columns = [c for c in dict.fromkeys(k for row in rows for k in row) if c != "run"]
    write_table(rows, root / "results.csv", root / "results.md", ["run", *columns])
    print(markdown_table(rows, columns) if rows else "no runs")
    print(f"this worker: {counts}; {osw.best_trial_line(study)}")
    print(f"plots: {', '.join(str(p) for p in plots) or 'none'}")
    print(f"study '{settings.name}' in {osw.safe_url(settings.storage_url)} (optuna-dashboard URL shows it)")
    failed = [row for row in rows if row["state"] == "failed"]
    for row in failed:
        print(f"failed: {row['run']} (log: {root / 'logs' / (row['run'] + '.log')})", file=sys.stderr)
    return 1 if failed else 0
