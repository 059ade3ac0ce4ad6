"""Command-line parsing shared by the scripts: ``RECIPE [section.field=value ...]``."""

from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

from lora_train.config import Recipe, RecipeError, fields_help, load_recipe


def recipe_parser(description: str) -> argparse.ArgumentParser:
    """A parser taking a recipe path and dotted overrides; ``--help`` lists every recipe field."""
    parser = argparse.ArgumentParser(
        description=description,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Recipe fields (override any of them as section.field=value):\n\n" + fields_help(),
    )
    parser.add_argument("recipe", help="Recipe YAML file, e.g. recipes/sst2_lora.yaml")
    parser.add_argument("overrides", nargs="*", help="Overrides such as training.learning_rate=1e-4 peft.r=16")
    return parser


def parse_recipe(
    parser: argparse.ArgumentParser, argv: Optional[Sequence[str]] = None
) -> tuple[Recipe, argparse.Namespace]:
    """Parse arguments and load the recipe; on a bad recipe print every problem and exit 2."""
    args = parser.parse_args(argv)
    try:
        recipe = load_recipe(args.recipe, args.overrides)
    except RecipeError as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    return recipe, args


def train_main(argv: Optional[Sequence[str]] = None) -> int:
    """``lora-train RECIPE [overrides]``: the same as ``scripts/train.py``."""
    import json

    recipe, _ = parse_recipe(recipe_parser("Train a LoRA / AdaLoRA / QLoRA text classifier from a recipe."), argv)
    # These import torch: only once the recipe is known to be valid.
    from lora_train.checkpoint import SAVE_FAILED_EXIT_STATUS, SaveFailedError
    from lora_train.data import DataError
    from lora_train.train import TrainingError, TrainingInterrupted, train

    try:
        metrics = train(recipe)
    except TrainingInterrupted:  # logged, checkpoint saved: a clean stop (a scheduler may requeue the job)
        return 0
    except SaveFailedError as err:
        print(f"error: {err}", file=sys.stderr)
        return SAVE_FAILED_EXIT_STATUS
    except (RecipeError, DataError, TrainingError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1 if isinstance(err, TrainingError) else 2
    from accelerate import PartialState

    if PartialState().is_main_process:  # one report, not one per process
        print(json.dumps({k: v for k, v in metrics.items() if k not in ("per_class", "confusion_matrix")}, indent=1))
    return 0
