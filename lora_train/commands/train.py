"""``lora-train`` / ``scripts/train.py``: train from a recipe."""

from __future__ import annotations

import json
import sys
from typing import Optional, Sequence

from lora_train.cli import parse_recipe, recipe_parser
from lora_train.config import RecipeError
from lora_train.startup import prepare_process


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``lora-train RECIPE [overrides]``: the same as ``scripts/train.py``."""
    prepare_process()
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
