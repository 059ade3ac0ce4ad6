"""The files saved beside every adapter (final, best/, pushed checkpoints): recipe, labels, metrics, model card, the
carved validation rows, and with a history, it and its learning curve."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

from lora_train.card import PLOT_NAME, model_card
from lora_train.config import Recipe, recipe_to_yaml
from lora_train.data import CARVE_FILE, Carve
from lora_train.plots import learning_curve_png


def run_files(
    recipe: Recipe,
    label_names: list[str],
    metrics: dict,
    history: Optional[list] = None,
    carve: Optional[Carve] = None,
) -> dict[str, str | bytes]:
    """File name -> content (text or bytes) of what a run saves beside its weights, with the carved validation rows
    when the data had no evaluation split."""
    files: dict[str, str | bytes] = {
        "recipe.yaml": recipe_to_yaml(recipe),
        "labels.json": json.dumps({"id2label": dict(enumerate(label_names))}, indent=1),
        "metrics.json": json.dumps(metrics, indent=1),
        "README.md": model_card(recipe, metrics, plot=PLOT_NAME if history is not None else None),
    }
    if carve is not None:
        files[CARVE_FILE] = carve.to_json()
    if history is not None:
        files["history.json"] = json.dumps(history, indent=1)
        nf4 = " on an NF4 base" if recipe.quantization.is_4bit else ""
        files[PLOT_NAME] = learning_curve_png(
            history, f"{Path(recipe.output.output_dir).name} ({recipe.peft.method}{nf4})"
        )
    return files
