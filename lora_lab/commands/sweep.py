"""``lora-sweep`` / ``scripts/sweep.py``: run grids of one recipe and write the results tables."""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Optional, Sequence

from lora_lab.sweep import aggregate, collect, markdown_table, plan, run_sweep, write_table
from lora_train.config import RecipeError
from lora_train.startup import prepare_process


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``scripts/sweep.py RECIPE AXIS... [--grid "AXIS AXIS"]... --out DIR``: run the grid(s), write the tables."""
    prepare_process()
    import argparse
    import shlex

    parser = argparse.ArgumentParser(
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Run a grid of one recipe with overrides, one output directory per run, and collect a results table"
        " (results.csv, results.md; with --aggregate-over also summary.csv/.md of mean and std).",
        epilog="Axis syntax: section.field=V1,V2,... (commas inside [...] do not split), or a tied axis"
        " section.field=C*other.field (e.g. peft.alpha=2*peft.r).\nExample:\n"
        "  python scripts/sweep.py recipes/cpu/sst2_lora.yaml peft.r=1,2,4,8 peft.alpha=2*peft.r \\\n"
        "      training.seed=0,1,2 --out runs/sweeps/rank --aggregate-over training.seed",
    )
    parser.add_argument("recipe", help="Recipe YAML shared by every run")
    parser.add_argument(
        "axes", nargs="*", help="Axes of the main grid (section.field=V1,V2,... or section.field=C*other.field)"
    )
    parser.add_argument(
        "--grid",
        action="append",
        default=[],
        metavar='"AXIS AXIS ..."',
        help="An additional grid (arm), its axes in one quoted string; repeatable",
    )
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="section.field=value",
        dest="fixed",
        help="A fixed override applied to every run; repeatable",
    )
    parser.add_argument("--out", required=True, help="Root directory: one subdirectory per run, logs/ and the tables")
    parser.add_argument(
        "--aggregate-over",
        default=None,
        metavar="section.field",
        help="Also write summary tables averaging over this axis (typically training.seed)",
    )
    parser.add_argument("--dry-run", action="store_true", help="Print the runs' overrides without training")
    args = parser.parse_args(argv)
    logging.basicConfig(format="%(asctime)s %(message)s", datefmt="%H:%M:%S", level=logging.INFO)

    arms = {"main": args.axes} if args.axes else {}
    arms.update({f"grid{i}": shlex.split(g) for i, g in enumerate(args.grid, 1)})
    if not arms:
        parser.error("give at least one axis or one --grid")
    root = Path(args.out)
    try:
        runs = plan(arms, root, args.fixed)
        failed = run_sweep(args.recipe, runs, root / "logs", args.dry_run)
    except RecipeError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.dry_run:
        return 0
    rows = collect(runs)
    write_table(rows, root / "results.csv", root / "results.md")
    if args.aggregate_over:
        write_table(aggregate(rows, args.aggregate_over), root / "summary.csv", root / "summary.md")
    print(markdown_table(rows, [c for c in rows[0] if c != "run"]) if rows else "no finished runs")
    for run in failed:
        print(f"failed: {run.name} (log: {root / 'logs' / (run.name + '.log')})", file=sys.stderr)
    return 1 if failed else 0
