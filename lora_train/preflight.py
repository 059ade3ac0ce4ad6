"""Checks before any work: the output directory, and what the model's config.json and file names allow (seconds,
before data or weights are loaded). Each raises :class:`~lora_train.config.RecipeError` naming the field."""

from __future__ import annotations

from pathlib import Path

import torch

from lora_train import checkpoint as ckpt
from lora_train.config import Recipe, RecipeError
from lora_train.modeling import check_method_runs, check_target_modules, meta_model
from lora_train.run_lock import LOCK_FILE


def check_output_dir(recipe: Recipe) -> Path:
    """Refuse to mix two runs, or a run and other files, in one directory, and unwritable directories, before any
    work."""
    if not recipe.output.output_dir.strip():  # what an unset shell variable gives; Path("") is the current directory
        raise RecipeError(
            [
                "output.output_dir is empty: the run would write into the current directory (its README.md"
                " replaced by the model card); name a directory, e.g. output.output_dir=runs/my_run"
            ]
        )
    out = Path(recipe.output.output_dir)
    overwrite = recipe.output.overwrite_output_dir
    if ckpt.holds_run(out) and not overwrite and recipe.training.resume_from_checkpoint is None:
        raise RecipeError(
            [
                f"output.output_dir '{out}' already holds a run. Resume it with training.resume_from_checkpoint=latest,"
                " allow overwriting with output.overwrite_output_dir=true, or choose another directory"
            ]
        )
    others = ckpt.directory_contents(out, ignore=(LOCK_FILE,))
    if others and not ckpt.holds_run(out) and not overwrite:
        shown = ", ".join(others[:5]) + (", ..." if len(others) > 5 else "")
        raise RecipeError(
            [
                f"output.output_dir '{out}' is not empty ({shown}) and holds no run: a run adds and replaces"
                " files there (README.md becomes the model card). Choose a new or empty directory, or allow"
                " it with output.overwrite_output_dir=true"
            ]
        )
    problem = ckpt.writable_directory_problem(out)
    if problem:
        raise RecipeError([f"output.output_dir '{out}' {problem}; choose a directory you can write to"])
    return out


def check_model_fits(recipe: Recipe, config) -> None:
    """Checks that need only config.json and file names: sequence length, target modules, the method and pooling
    (model built on 'meta'), safetensors weights for a local model, and bitsandbytes kernels that run when NF4 is
    asked."""
    limit = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    if limit and recipe.data.max_length > limit:
        raise RecipeError(
            [
                f"data.max_length = {recipe.data.max_length} exceeds {recipe.model.name_or_path}'s limit"
                f" of {limit} positions"
            ]
        )
    meta = meta_model(config)
    check_target_modules(recipe, meta)
    check_method_runs(recipe, meta)
    check_safetensors_weights(Path(recipe.model.name_or_path))
    if recipe.quantization.is_4bit:
        check_nf4_kernels()


def check_safetensors_weights(local: Path) -> None:
    """Refuse a local model directory without .safetensors weights: pickle checkpoints are never loaded."""
    if local.is_dir() and not any(local.glob("*.safetensors")):
        pickled = sorted(p.name for p in local.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt"))
        raise RecipeError(
            [
                f"model.name_or_path '{local}' holds no .safetensors weights{f' (only {pickled})' if pickled else ''};"
                " pickle checkpoints are never loaded. Convert it once in a trusted environment:"
                " AutoModel.from_pretrained(dir).save_pretrained(dir, safe_serialization=True)"
            ]
        )


def check_nf4_kernels() -> None:
    """A 64x64 NF4 round trip on this device: bitsandbytes installed is not enough, its kernels must run here."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        import bitsandbytes.functional as bnb_functional

        bnb_functional.dequantize_4bit(
            *bnb_functional.quantize_4bit(torch.ones(64, 64, device=device), quant_type="nf4")
        )
    except Exception as err:  # noqa: BLE001 - import, library-loading and kernel errors alike
        raise RecipeError(
            [
                f"quantization.method = 'nf4' needs bitsandbytes 4-bit kernels that run on {device}, but"
                f" they fail here ({type(err).__name__}: {err}). Install a bitsandbytes build for this"
                " platform (CPU support needs >= 0.46), or train without quantization:"
                " quantization.method=none"
            ]
        ) from None
