#!/usr/bin/env python
"""GPU check: run the real SST-2 QLoRA recipe briefly on one GPU; print throughput and peak memory.

    python scripts/gpu_check.py [RECIPE] [section.field=value ...]

RECIPE defaults to recipes/sst2_qlora.yaml. The run is cut to ``training.max_steps=60`` (logging every 10
steps, one evaluation on 1000 validation rows, no trackers, output in runs/gpu_check/); any override given
on the command line wins. Throughput is the median over the logging windows after the first (which holds
CUDA start-up and kernel selection); peak memory is ``torch.cuda.max_memory_allocated`` (and reserved).
Without a CUDA device it says so and exits 0 without doing anything.

On a machine without Hub access, use a checkpoint and the dataset from a Hub cache, e.g.:
    HF_HUB_OFFLINE=1 HF_HUB_CACHE=../shared/hf-hub python scripts/gpu_check.py recipes/sst2_qlora.yaml \\
        model.name_or_path=sentence-transformers/all-MiniLM-L6-v2 peft.target_modules=[query,value]
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_RECIPE = ROOT / "recipes" / "sst2_qlora.yaml"
BRIEF = ["training.max_steps=60", "training.logging_steps=10", "training.eval_steps=0", "training.save_steps=0",
         "data.max_eval_samples=1000", "output.report_to=[]", "output.overwrite_output_dir=true"]


def summarize(metrics: dict, history: list[dict]) -> dict:
    """Throughput (median of the logging windows after the first) and peak memory of a finished run."""
    windows = [h for h in history if "samples_per_s" in h]
    steady = windows[1:] or windows
    return {
        "gpu": torch.cuda.get_device_name(0),
        "optimizer_steps": metrics["global_step"],
        "samples_per_s": statistics.median(h["samples_per_s"] for h in steady),
        "tokens_per_s": statistics.median(h["tokens_per_s"] for h in steady),
        "peak_memory_allocated_mb": metrics["peak_memory_mb"],
        "peak_memory_reserved_mb": torch.cuda.max_memory_reserved(0) / 2**20,
        "eval_accuracy": metrics["eval_accuracy"],
        "eval_samples": metrics["eval_samples"],
    }


def main(argv: list[str]) -> int:
    if not torch.cuda.is_available():
        print("gpu_check: SKIPPED, no CUDA device visible (torch.cuda.is_available() is False); nothing was run.")
        return 0
    from lora_train.cli import parse_recipe, recipe_parser
    from lora_train.train import train

    parser = recipe_parser("Run a recipe briefly on one GPU and print throughput and peak memory.")
    args = argv if argv and not argv[0].startswith("-") and "=" not in argv[0] else [str(DEFAULT_RECIPE), *argv]
    name = Path(args[0]).stem
    recipe, _ = parse_recipe(parser, [args[0], *BRIEF, f"output.output_dir=runs/gpu_check/{name}", *args[1:]])
    if not recipe.quantization.is_4bit:
        print(f"gpu_check: note: {args[0]} is not a QLoRA recipe (quantization.method = {recipe.quantization.method})")
    metrics = train(recipe)
    out = Path(recipe.output.output_dir)
    summary = summarize(metrics, json.loads((out / "history.json").read_text()))
    (out / "gpu_check.json").write_text(json.dumps(summary, indent=1))
    print("gpu_check: " + json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
