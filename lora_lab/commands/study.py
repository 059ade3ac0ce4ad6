"""``lora-study`` / ``scripts/study.py``: run or resume one LoRA study."""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Optional, Sequence

from lora_lab.studies import STUDIES, run_study
from lora_train.config import RecipeError
from lora_train.startup import prepare_process


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``scripts/study.py NAME``: run or resume one study and write its tables, plots and report."""
    prepare_process()
    import argparse

    parser = argparse.ArgumentParser(
        description="Run one LoRA study end to end (resumable): its runs, tables and plots."
    )
    parser.add_argument(
        "study",
        choices=[*STUDIES, "toy"],
        help="rank: Study 1 (SST-2 rank sweep); regimes: Study 2 (emotion: frozen features, full, LoRA);"
        " quant: Study 3 (LoRA vs QLoRA vs AdaLoRA); peft_methods: Study 4 (every PEFT method on"
        " SST-2 and emotion); seed_comparisons: Study 5 (the seed notebooks' emotion and IMDb settings at full"
        " size, on the test splits); toy: the linear SVD-bound toy",
    )
    parser.add_argument("--out", default="runs/studies", help="Root of the study directories (default runs/studies)")
    parser.add_argument("--figures", default="docs/figures", help="Where the PNG plots go (default docs/figures)")
    parser.add_argument("--seeds", type=int, default=None, help="Seeds per configuration (default: the study's own)")
    parser.add_argument("--analyse-only", action="store_true", help="Only rebuild tables and plots from finished runs")
    args = parser.parse_args(argv)
    logging.basicConfig(format="%(asctime)s %(message)s", datefmt="%H:%M:%S", level=logging.INFO)

    try:
        print(run_study(args.study, Path(args.out), Path(args.figures), args.seeds, args.analyse_only))
    except RecipeError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0
