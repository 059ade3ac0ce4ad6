"""Merge a LoRA / DoRA / AdaLoRA / IA3 / VeRA adapter, or a BitFit / head_only run's trained tensors, into its base
and save a standalone safetensors classifier.

Soft prompts (prompt and prefix tuning) add virtual tokens to the input rather than changing weights, so they
have nothing to merge and are refused.

An adapter trained on a 4-bit NF4 base learned a correction of the *quantized* weights, so it is
merged into the dequantized NF4 weights (what it was trained against), in the quantization's
compute dtype, not into the original full-precision checkpoint.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any, Optional

import torch

from lora_train.checkpoint import writable_directory_problem
from lora_train.heads import pooling_outside_lora_train
from lora_train.inference import (
    RunError,
    apply_trained_tensors,
    is_adapter_run,
    is_trained_tensors_run,
    load_base_for_run,
    load_run_tokenizer,
    read_run,
    resolve_run,
)
from lora_train.modeling import DTYPES

COPIED_FILES = ("recipe.yaml", "labels.json", "metrics.json")


def merge_adapter(
    source: str, output_dir: str | Path, dtype: Optional[str] = None, overwrite: bool = False
) -> dict[str, Any]:
    """Merge the run's adapter into its base and save the result in ``output_dir``; return a summary.

    ``dtype`` (float32 / bfloat16 / float16) sets the saved weights' dtype; by default the training
    dtype of the base, or the compute dtype for an NF4-trained adapter.
    """
    out = Path(output_dir)
    directory = resolve_run(source)
    check_output_outside_run(out, directory)
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise RunError(f"output directory '{out}' is not empty; choose another one or allow overwriting")
    problem = writable_directory_problem(out)
    if problem:
        raise RunError(f"output directory '{out}' {problem}; give a new or empty directory you can write to")
    if not is_adapter_run(directory) and not is_trained_tensors_run(directory):
        raise RunError(f"'{source}' holds a full model (peft.method full), not an adapter: it is already standalone")
    recipe, label_names = read_run(directory)
    spec = recipe.peft.spec
    if spec.merge_refusal:
        raise RunError(f"'{source}' is a {recipe.peft.method} adapter: {spec.merge_refusal}")
    pooling = pooling_outside_lora_train(recipe.model.pooling)
    if pooling:
        raise RunError(f"'{source}' cannot be merged into a standalone model: {pooling}. Use the run as it is")
    if dtype is not None and dtype not in ("float32", "bfloat16", "float16"):
        raise RunError(f"dtype {dtype!r} is not one of float32, bfloat16, float16")
    nf4 = recipe.quantization.is_4bit
    tokenizer = load_run_tokenizer(directory)
    base = load_base_for_run(recipe, label_names, tokenizer, torch.device("cpu"))
    if nf4:  # before any forward: bitsandbytes' CPU backend repacks 4-bit weights on first use
        base = base.dequantize(dtype=DTYPES[recipe.quantization.compute_dtype])
    merged = merge_into(base, directory, spec)
    target = DTYPES[dtype] if dtype else (DTYPES[recipe.quantization.compute_dtype] if nf4 else merged.dtype)
    merged = merged.to(target).eval()

    out.mkdir(parents=True, exist_ok=True)
    merged.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    for name in COPIED_FILES:
        if (directory / name).is_file():
            shutil.copy2(directory / name, out / name)
    summary = {
        "source": source,
        "output_dir": str(out),
        "base_model": recipe.model.name_or_path,
        "peft_method": recipe.peft.method,
        "trained_on": "nf4" if nf4 else recipe.model.dtype,
        "dtype": str(target).removeprefix("torch."),
        "parameters": sum(p.numel() for p in merged.parameters()),
    }
    (out / "merge.json").write_text(json.dumps(summary, indent=1))
    return summary


def check_output_outside_run(out: Path, directory: Path) -> None:
    """Refuse an output directory that is the run (or its best/), or inside it, before anything is loaded or
    written: the merged weights, config and tokenizer would be written over the run's own files."""
    run = directory.parent if directory.name == "best" and (directory.parent / "recipe.yaml").is_file() else directory
    resolved = out.expanduser().resolve()
    if resolved.is_relative_to(run.resolve()):
        raise RunError(
            f"output directory '{out}' is the run '{run}' or inside it: the merged model.safetensors, config.json"
            " and tokenizer would be written among the run's files. Give a directory outside the run, e.g."
            f" {run.name}_merged"
        )


def merge_into(base: torch.nn.Module, directory: Path, spec) -> torch.nn.Module:
    """``base`` with the run's trained weights in it: the adapter merged, or the trained tensors copied in."""
    if is_trained_tensors_run(directory):
        return apply_trained_tensors(directory, base)
    from peft import PeftModel

    adapter = PeftModel.from_pretrained(base, directory)
    if spec.before_merge is not None:
        spec.before_merge(adapter)
    return adapter.merge_and_unload()
