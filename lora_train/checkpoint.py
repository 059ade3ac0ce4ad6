"""Atomic checkpoints: the adapter a user keeps, and the training state a resume needs.

Pickle-free on one process and under DDP: every file below is safetensors or JSON, and resuming unpickles
nothing. Under DeepSpeed / FSDP the engine owns the optimizer (and the sharded weights), so
:mod:`lora_train.distributed` saves its state with ``accelerator.save_state`` instead: per-process files that
DeepSpeed / torch.distributed pickle and that DeepSpeed loads with ``torch.load(weights_only=False)``.

Layout of a run directory::

    output_dir/
      adapter_model.safetensors, adapter_config.json   final adapter (full runs: model.safetensors, config.json)
      tokenizer files, recipe.yaml, metrics.json, README.md (model card)
      best/                                            adapter with the best evaluation metric
      checkpoints/step-00000120/                       resumable training state, newest `keep_last` kept
        trainable.safetensors   trainable parameters (adapter + head)
        optimizer.safetensors   optimizer tensors; scalars in state.json
        rng.safetensors         torch (CPU, CUDA) RNG states; python / numpy RNG in state.json
        state.json              counters, data position, history, scheduler, recipe fingerprint
        COMPLETE                written last: a directory without it is ignored

Every directory is written under a temporary name, flushed to disk and renamed into place, so a crash (even
SIGKILL or a power cut) during a save leaves the previous checkpoint intact.

Test hook: ``LORA_TRAIN_PAUSE_IN_SAVE=step-00000016`` makes the save of that checkpoint sleep half-way through
writing its files, so the crash tests can SIGKILL a real run inside the save window (see docs/checkpoints.md).
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from lora_train.config import RecipeError

logger = logging.getLogger(__name__)

COMPLETE_MARKER = "COMPLETE"
PAUSE_IN_SAVE_ENV = "LORA_TRAIN_PAUSE_IN_SAVE"
CHECKPOINT_PATTERN = re.compile(r"^step-(\d{8})$")
RUN_MARKERS = ("recipe.yaml", "checkpoints", "adapter_config.json", "metrics.json")
"""Files whose presence means a directory already holds a run."""


# ---------------------------------------------------------------------------------------------
# Atomic file-system helpers


def atomic_write_text(path: Path, text: str) -> None:
    """Write a text file via a temporary file in the same directory and ``os.replace``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(fd, "w") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def restore_interrupted_replace(final: Path) -> None:
    """Undo a crash between :func:`atomic_directory`'s two renames, and drop the leftovers of one after them.

    Replacing ``final`` moves the published directory aside to ``.NAME.old-PID`` and then renames the new one into
    place; a kill between the two leaves no ``final``. The copy moved aside was complete (it was published), so the
    newest one is renamed back; older copies, or any copy once ``final`` exists, are deleted.
    """
    olds = sorted(final.parent.glob(f".{final.name}.old-*"), key=lambda p: p.stat().st_mtime)
    if olds and not final.exists():
        os.replace(olds.pop(), final)
        _fsync(final.parent)
    for old in olds:
        shutil.rmtree(old, ignore_errors=True)


def atomic_directory(final: Path, write) -> Path:
    """Call ``write(tmp_dir)``, flush it to disk, then move ``tmp_dir`` to ``final``, replacing any older ``final``."""
    final.parent.mkdir(parents=True, exist_ok=True)
    restore_interrupted_replace(final)
    tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}.tmp-"))
    try:
        write(tmp)
        for path in [*tmp.rglob("*"), tmp]:  # data before the rename, or a power cut could publish empty files
            _fsync(path)
        old = None
        if final.exists():
            old = final.with_name(f".{final.name}.old-{os.getpid()}")
            os.replace(final, old)
        os.replace(tmp, final)
        _fsync(final.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return final


def holds_run(directory: Path) -> bool:
    """Whether ``directory`` already contains (part of) a training run."""
    return directory.is_dir() and any((directory / name).exists() for name in RUN_MARKERS)


# ---------------------------------------------------------------------------------------------
# The adapter (what users keep and share)


def save_model_dir(directory: Path, model, tokenizer, extra_files: dict[str, str | bytes], state_dict: Optional[dict] = None) -> None:
    """Save weights (adapter-only for PEFT models) in safetensors, the tokenizer and extra files (text or bytes).

    ``state_dict`` is the model's gathered weights when they are sharded across processes (ZeRO-3, FSDP).
    """
    model.save_pretrained(directory, safe_serialization=True, **({"state_dict": state_dict} if state_dict is not None else {}))
    tokenizer.save_pretrained(directory)
    for name, content in extra_files.items():
        path = directory / name
        path.write_bytes(content) if isinstance(content, bytes) else path.write_text(content)


def save_final(output_dir: Path, model, tokenizer, extra_files: dict[str, str | bytes], state_dict: Optional[dict] = None) -> None:
    """Write the final model into ``output_dir`` itself, each file replaced atomically."""
    staging = Path(tempfile.mkdtemp(dir=output_dir, prefix=".final.tmp-"))
    try:
        save_model_dir(staging, model, tokenizer, extra_files, state_dict)
        # Weights last: a reader that sees the new weights also sees the new config.
        files = sorted(staging.iterdir(), key=lambda p: p.suffix == ".safetensors")
        for path in files:
            os.replace(path, output_dir / path.name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


# ---------------------------------------------------------------------------------------------
# Training state (what a resume needs)


def _flatten_optimizer(state_dict: dict) -> tuple[dict[str, torch.Tensor], dict]:
    tensors, scalars = {}, {}
    for idx, slots in state_dict["state"].items():
        for name, value in slots.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{idx}.{name}"] = value.detach().cpu().contiguous()
            else:
                scalars[f"{idx}.{name}"] = value
    return tensors, {"scalars": scalars, "param_groups": state_dict["param_groups"]}


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    state: dict[int, dict[str, Any]] = {}
    for key, value in list(tensors.items()) + list(meta["scalars"].items()):
        idx, name = key.split(".", 1)
        state.setdefault(int(idx), {})[name] = value
    return {"state": state, "param_groups": meta["param_groups"]}


def rng_state() -> tuple[dict[str, torch.Tensor], dict]:
    """Every RNG the loop draws from: torch CPU / CUDA as tensors, python and numpy as JSON."""
    tensors = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, state in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"torch_cuda_{i}"] = state
    np_state = np.random.get_state()
    py_state = random.getstate()
    meta = {
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
        "python": [py_state[0], list(py_state[1]), py_state[2]],
    }
    return tensors, meta


def set_rng_state(tensors: dict[str, torch.Tensor], meta: dict) -> None:
    """Restore what :func:`rng_state` captured."""
    torch.set_rng_state(tensors["torch_cpu"])
    cuda = [tensors[k] for k in sorted(k for k in tensors if k.startswith("torch_cuda_"))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)
    n = meta["numpy"]
    np.random.set_state((n[0], np.asarray(n[1], dtype=np.uint32), n[2], n[3], n[4]))
    p = meta["python"]
    random.setstate((p[0], tuple(p[1]), p[2]))


def non_finite(model: torch.nn.Module) -> list[str]:
    """Names of trainable parameters holding NaN or infinity (such a state is not worth checkpointing)."""
    return [n for n, p in model.named_parameters() if p.requires_grad and not bool(torch.isfinite(p).all())]


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The parameters being trained, by name (adapter and head; everything for full fine-tuning)."""
    return {n: p.detach().cpu().contiguous() for n, p in model.named_parameters() if p.requires_grad}


def save_training_state(
    checkpoint_dir: Path,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler,
    state: dict[str, Any],
    extra_tensors: Optional[dict[str, torch.Tensor]] = None,
) -> Path:
    """Atomically write a resumable checkpoint (see the module docstring for its files)."""

    def write(tmp: Path) -> None:
        save_file(trainable_state(model), tmp / "trainable.safetensors")
        opt_tensors, opt_meta = _flatten_optimizer(optimizer.state_dict())
        save_file(opt_tensors, tmp / "optimizer.safetensors")
        if os.environ.get(PAUSE_IN_SAVE_ENV) == checkpoint_dir.name:  # test hook, see the module docstring
            time.sleep(600)
        rng_tensors, rng_meta = rng_state()
        save_file(rng_tensors, tmp / "rng.safetensors")
        if extra_tensors:
            save_file({k: v.detach().cpu().contiguous() for k, v in extra_tensors.items()}, tmp / "extra.safetensors")
        full = dict(state, optimizer=opt_meta, rng=rng_meta, scheduler=scheduler.state_dict())
        (tmp / "state.json").write_text(json.dumps(full, indent=1))
        (tmp / COMPLETE_MARKER).write_text("ok\n")

    return atomic_directory(checkpoint_dir, write)


def load_training_state(checkpoint_dir: Path, model: torch.nn.Module, optimizer, scheduler) -> dict[str, Any]:
    """Restore weights, optimizer, scheduler and RNGs from a checkpoint; return its ``state.json``."""
    state = json.loads((checkpoint_dir / "state.json").read_text())
    weights = load_file(checkpoint_dir / "trainable.safetensors")
    params = dict(model.named_parameters())
    missing = [n for n in weights if n not in params]
    if missing:
        raise ValueError(f"checkpoint {checkpoint_dir} has parameters this model lacks: {missing[:5]}")
    with torch.no_grad():
        for name, value in weights.items():
            params[name].copy_(value.to(params[name].device))
    opt = _unflatten_optimizer(load_file(checkpoint_dir / "optimizer.safetensors"), state["optimizer"])
    optimizer.load_state_dict(opt)
    scheduler.load_state_dict(state["scheduler"])
    set_rng_state(load_file(checkpoint_dir / "rng.safetensors"), state["rng"])
    extra = checkpoint_dir / "extra.safetensors"
    state["extra_tensors"] = load_file(extra) if extra.exists() else {}
    return state


def list_checkpoints(checkpoints_root: Path) -> list[Path]:
    """Complete checkpoints, oldest first; incomplete ones are reported and skipped."""
    if not checkpoints_root.is_dir():
        return []
    found = []
    for path in sorted(checkpoints_root.iterdir()):
        if not CHECKPOINT_PATTERN.match(path.name):
            continue
        if (path / COMPLETE_MARKER).exists():
            found.append(path)
        else:
            logger.warning("skipping incomplete checkpoint %s (no %s marker)", path, COMPLETE_MARKER)
    return found


def resolve_resume(spec: Optional[str], checkpoints_root: Path) -> Optional[Path]:
    """``latest`` -> newest complete checkpoint (None when there is none yet); a path -> that checkpoint."""
    if spec is None:
        return None
    if spec == "latest":
        found = list_checkpoints(checkpoints_root)
        return found[-1] if found else None
    path = Path(spec)
    if not (path / COMPLETE_MARKER).exists():
        raise RecipeError([
            f"training.resume_from_checkpoint = {spec!r} is not a complete checkpoint directory"
            f" (no {path / COMPLETE_MARKER}); give a checkpoints/step-XXXXXXXX directory, or 'latest' for the newest"
            " complete one"
        ])
    return path


def rotate_checkpoints(checkpoints_root: Path, keep_last: int) -> None:
    """Delete the oldest complete checkpoints beyond ``keep_last`` and leftovers of interrupted saves."""
    for path in list_checkpoints(checkpoints_root)[:-keep_last]:
        shutil.rmtree(path, ignore_errors=True)
    for path in checkpoints_root.glob(".step-*"):
        shutil.rmtree(path, ignore_errors=True)


def clear_training_state(output_dir: Path) -> None:
    """Delete the checkpoints and best adapter of a run being overwritten."""
    for name in ("checkpoints", "best"):
        shutil.rmtree(output_dir / name, ignore_errors=True)


def checkpoint_name(step: int) -> str:
    return f"step-{step:08d}"
