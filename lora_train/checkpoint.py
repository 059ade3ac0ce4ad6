"""Atomic checkpoints: the adapter a user keeps, and the training state a resume needs.

Pickle-free on one process and under DDP: every file below is safetensors or JSON, and resuming unpickles
nothing. Under DeepSpeed / FSDP the engine owns the optimizer (and the sharded weights), so
:mod:`lora_train.distributed` saves its state with ``accelerator.save_state`` instead: per-process files that
DeepSpeed / torch.distributed pickle and that DeepSpeed loads with ``torch.load(weights_only=False)``.

Layout of a run directory::

    output_dir/
      adapter_model.safetensors, adapter_config.json   final adapter (full runs: model.safetensors, config.json;
                                                       bitfit / head_only: trained.safetensors, see
                                                       :func:`save_trained_tensors`)
      tokenizer files, recipe.yaml, metrics.json, README.md (model card)
      best/                                            adapter with the best evaluation metric
      checkpoints/step-00000120/                       resumable training state, newest `keep_last` kept
        trainable.safetensors   trainable parameters (adapter + head)
        optimizer.safetensors   optimizer tensors; scalars in state.json
        rng-rank0.safetensors   each process's RNG states: torch (CPU, CUDA) as tensors, python / numpy in its
        rng-rank1.safetensors   metadata (one file per process; the main process gathers and writes them all)
        state.json              counters, data position, history, scheduler, recipe fingerprint
        COMPLETE                written last: the size and sha256 of every other file; a directory without it is
                                ignored, one whose files do not match it is damaged (see :func:`verify_checkpoint`)

Every directory is written under a temporary name, flushed to disk and renamed into place, so a crash (even
SIGKILL or a power cut) during a save leaves the previous checkpoint intact.

Test hook: ``LORA_TRAIN_PAUSE_IN_SAVE=step-00000016`` makes the save of that checkpoint sleep half-way through
writing its files, so the crash tests can SIGKILL a real run inside the save window (see docs/checkpoints.md).
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import random
import re
import shutil
import struct
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from lora_train.config import RecipeError
from lora_train.mutated_init import convert_saved_adapter

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


def restore_moved_aside_run(final: Path) -> bool:
    """Rename back a run directory (a ``best/``) that a kill between :func:`atomic_directory`'s two renames left
    moved aside as ``.NAME.old-PID``, when ``final`` is missing; True if one was restored.

    The read side of :func:`restore_interrupted_replace` (eval, predict, merge opening ``RUN`` or ``RUN/best``): it
    deletes nothing and renames only a copy that is itself a run (``recipe.yaml`` and ``labels.json``), so pointed
    at any other folder it changes nothing there.
    """
    if final.exists() or final.is_symlink() or not final.parent.is_dir():
        return False
    pattern = re.compile(rf"^\.{re.escape(final.name)}\.old-\d+$")
    copies = [
        p
        for p in final.parent.iterdir()
        if pattern.match(p.name)
        and not p.is_symlink()
        and p.is_dir()
        and all((p / name).is_file() for name in ("recipe.yaml", "labels.json"))
    ]
    if not copies:
        return False
    os.replace(max(copies, key=lambda p: p.stat().st_mtime), final)
    _fsync(final.parent)
    return True


def atomic_directory(final: Path, write) -> Path:
    """Call ``write(tmp_dir)``, flush it to disk, then move ``tmp_dir`` to ``final``, replacing any older ``final``."""
    final.parent.mkdir(parents=True, exist_ok=True)
    restore_interrupted_replace(final)
    tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}.tmp-"))
    try:
        write(tmp)
        publish_directory(tmp, final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return final


def publish_directory(tmp: Path, final: Path) -> None:
    """Flush the finished ``tmp`` to disk and rename it to ``final``; a crash at any point leaves a usable ``final``
    (the previous one, or one moved aside that :func:`restore_interrupted_replace` renames back)."""
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


# ---------------------------------------------------------------------------------------------
# Integrity: what a reader checks before loading any weights


def safetensors_problem(path: Path) -> Optional[str]:
    """Why ``path`` is not a whole safetensors file (header unreadable, tensors past its end, bytes missing), or None.

    Reads the header only: cheap enough for every file before any weights are loaded.
    """
    size = path.stat().st_size
    with open(path, "rb") as handle:
        prefix = handle.read(8)
        if len(prefix) < 8:
            return f"{path} is truncated: {size} bytes, not even a safetensors header"
        (header_len,) = struct.unpack("<Q", prefix)
        if 8 + header_len > size:
            return f"{path} is truncated: its header announces {header_len} bytes but the file has {size}"
        try:
            header = json.loads(handle.read(header_len))
            end = max((int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"), default=0)
        except (ValueError, KeyError, TypeError, IndexError):
            return f"{path} is corrupt: its safetensors header is not valid JSON with tensor offsets"
    if 8 + header_len + end != size:
        return f"{path} is truncated or corrupt: its tensors need {8 + header_len + end} bytes, the file has {size}"
    return None


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_manifest(directory: Path) -> None:
    """Write the ``COMPLETE`` marker (last): the size and sha256 of every file already in ``directory``."""
    files = {
        p.relative_to(directory).as_posix(): {"size": p.stat().st_size, "sha256": _sha256(p)}
        for p in sorted(directory.rglob("*"))
        if p.is_file()
    }
    (directory / COMPLETE_MARKER).write_text(json.dumps({"files": files}, indent=1))


def verify_checkpoint(directory: Path) -> Optional[str]:
    """What is wrong with a checkpoint's files (the first file that is missing, truncated or altered), or None.

    Checks sizes and safetensors headers first (cheap), then sha256 against the ``COMPLETE`` manifest (one read of
    each file, before any of it is loaded). Checkpoints written before manifests existed get the cheap checks only.
    """
    try:
        manifest = json.loads((directory / COMPLETE_MARKER).read_text())["files"]
    except (OSError, ValueError, KeyError, TypeError):
        manifest = None
    expected = manifest or {p.name: {} for p in directory.iterdir() if p.suffix in (".safetensors", ".json")}
    for name, entry in expected.items():
        path = directory / name
        if not path.is_file():
            return f"{path} is missing"
        if "size" in entry and path.stat().st_size != entry["size"]:
            return f"{path} is truncated or corrupt: {path.stat().st_size} bytes, {entry['size']} were written"
        if path.suffix == ".safetensors" and (problem := safetensors_problem(path)):
            return problem
    for name, entry in (manifest or {}).items():
        if _sha256(directory / name) != entry["sha256"]:
            return f"{directory / name} is corrupt: its sha256 differs from the one written with the checkpoint"
    return None


# ---------------------------------------------------------------------------------------------
# A full disk or a file-size limit during a save

DISK_FULL_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}
SAVE_FAILED_EXIT_STATUS = 3
"""Exit status of scripts/train.py when a save failed for lack of space or the file-size limit."""


class SaveFailedError(RuntimeError):
    """A save hit a full disk, a quota or the file-size limit; what was saved before is intact (the message says)."""


def disk_full_errno(err: BaseException) -> Optional[int]:
    """ENOSPC / EDQUOT / EFBIG behind ``err`` (an OSError, or safetensors' error naming the OS error), else None."""
    code = err.errno if isinstance(err, OSError) else None
    if code is None and (found := re.search(r"os error (\d+)", str(err))):  # safetensors (Rust) reports it in text
        code = int(found.group(1))
    return code if code in DISK_FULL_ERRNOS else None


@contextmanager
def report_full_disk(what: str, checkpoints_root: Path) -> Iterator[None]:
    """Turn a full disk, quota or file-size limit while saving ``what`` into one :class:`SaveFailedError` line that
    names the checkpoint a resume will use (atomic saves leave everything older as it was)."""
    try:
        yield
    except Exception as err:  # OSError, or safetensors' own error type for the same failure
        code = disk_full_errno(err)
        if code is None:
            raise
        raise SaveFailedError(
            f"could not write {what} ({os.strerror(code)}); {kept_checkpoint(checkpoints_root)}."
            " Free space (or raise the file-size limit, ulimit -f), then resume with"
            " training.resume_from_checkpoint=latest"
        ) from None


def kept_checkpoint(checkpoints_root: Path) -> str:
    """Which checkpoint a failed save left for resuming."""
    found = list_checkpoints(checkpoints_root)
    return f"kept {found[-1]}" if found else "no checkpoint had been saved yet"


def holds_run(directory: Path) -> bool:
    """Whether ``directory`` already contains (part of) a training run."""
    return directory.is_dir() and any((directory / name).exists() for name in RUN_MARKERS)


def writable_directory_problem(directory: Path) -> Optional[str]:
    """None once ``directory`` exists and a file can be created in it, else what is wrong, e.g. "is a file, not a
    directory". Really creates and writes: permission bits say nothing for root, read-only mounts or a file in the
    path."""
    if directory.exists() and not directory.is_dir():
        return "is a file, not a directory"
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=directory):
            pass
    except OSError as err:
        return f"is not a writable directory ({err.strerror or err}: '{err.filename or directory}')"
    return None


def directory_contents(directory: Path, ignore: tuple[str, ...] = ()) -> list[str]:
    """Names in ``directory`` (none if it does not exist), sorted, without those in ``ignore``."""
    return sorted(p.name for p in directory.iterdir() if p.name not in ignore) if directory.is_dir() else []


# ---------------------------------------------------------------------------------------------
# The adapter (what users keep and share)


TRAINED_TENSORS = "trained.safetensors"
"""The file of a run that keeps only what it trained (BitFit, head_only): parameter name -> tensor, applied to the
base model its recipe.yaml names."""


def save_model_dir(
    directory: Path,
    model,
    tokenizer,
    extra_files: dict[str, str | bytes],
    state_dict: Optional[dict] = None,
    saves: str = "adapter",
) -> None:
    """Save weights in safetensors as the method keeps them (``saves``, :attr:`lora_train.methods.Method.saves`:
    adapter-only for peft models, the trained tensors, or the whole model), the tokenizer and extra files (text or
    bytes). ``state_dict`` is the model's gathered weights when they are sharded across processes (ZeRO-3, FSDP).
    """
    if saves == "trained":
        save_trained_tensors(directory / TRAINED_TENSORS, model, state_dict)
    else:
        extra = {"state_dict": state_dict} if state_dict is not None else {}
        model.save_pretrained(directory, safe_serialization=True, **extra)
        convert_saved_adapter(directory, model)  # PiSSA / OLoRA: as a plain LoRA of the original base
    tokenizer.save_pretrained(directory)
    for name, content in extra_files.items():
        path = directory / name
        path.write_bytes(content) if isinstance(content, bytes) else path.write_text(content)


def save_trained_tensors(path: Path, model: torch.nn.Module, state_dict: Optional[dict] = None) -> None:
    """The parameters ``model`` trains (``requires_grad``), by name, in one safetensors file; values from
    ``state_dict`` when given (gathered from shards)."""
    source = state_dict if state_dict is not None else dict(model.named_parameters())
    names = [name for name, param in model.named_parameters() if param.requires_grad]
    save_file({name: source[name].detach().cpu().contiguous() for name in names}, path)


def load_trained_tensors(path: Path, model: torch.nn.Module) -> None:
    """Copy what :func:`save_trained_tensors` wrote into ``model`` (the base it was trained on); a name the model
    lacks or a shape it does not have raises ``ValueError`` naming them."""
    tensors = load_file(path)
    params = dict(model.named_parameters())
    wrong = [
        f"{name} {tuple(value.shape)}" + (f" (model: {tuple(params[name].shape)})" if name in params else " (absent)")
        for name, value in tensors.items()
        if name not in params or params[name].shape != value.shape
    ]
    if wrong:
        raise ValueError(f"{path} does not fit this base model: {', '.join(wrong[:5])}")
    with torch.no_grad():
        for name, value in tensors.items():
            params[name].copy_(value.to(params[name].device, params[name].dtype))


def save_final(output_dir: Path, write: Callable[[Path], None]) -> None:
    """Write the final model into ``output_dir`` itself (``write(directory)``, e.g. :func:`save_model_dir`), each file
    replaced atomically."""
    staging = Path(tempfile.mkdtemp(dir=output_dir, prefix=".final.tmp-"))
    try:
        write(staging)
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


def rng_file(rank: int) -> str:
    """The file holding process ``rank``'s RNG states in a checkpoint."""
    return f"rng-rank{rank}.safetensors"


def save_training_state(
    checkpoint_dir: Path,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler,
    state: dict[str, Any],
    extra_tensors: Optional[dict[str, torch.Tensor]] = None,
    rng_states: Optional[list[tuple[dict[str, torch.Tensor], dict]]] = None,
) -> Path:
    """Atomically write a resumable checkpoint (see the module docstring for its files).

    ``rng_states`` holds every process's :func:`rng_state`, by rank (default: this process's only). A failure for
    lack of space or the file-size limit raises :class:`SaveFailedError` naming the checkpoint kept.
    """

    def write(tmp: Path) -> None:
        save_file(trainable_state(model), tmp / "trainable.safetensors")
        opt_tensors, opt_meta = _flatten_optimizer(optimizer.state_dict())
        save_file(opt_tensors, tmp / "optimizer.safetensors")
        if os.environ.get(PAUSE_IN_SAVE_ENV) == checkpoint_dir.name:  # test hook, see the module docstring
            time.sleep(600)
        for rank, (rng_tensors, rng_meta) in enumerate(rng_states or [rng_state()]):
            save_file(rng_tensors, tmp / rng_file(rank), metadata={"rng": json.dumps(rng_meta)})
        if extra_tensors:
            save_file({k: v.detach().cpu().contiguous() for k, v in extra_tensors.items()}, tmp / "extra.safetensors")
        full = dict(state, optimizer=opt_meta, scheduler=scheduler.state_dict())
        (tmp / "state.json").write_text(json.dumps(full, indent=1))
        write_manifest(tmp)

    with report_full_disk(f"checkpoint {checkpoint_dir}", checkpoint_dir.parent):
        return atomic_directory(checkpoint_dir, write)


def load_training_state(
    checkpoint_dir: Path, model: torch.nn.Module, optimizer, scheduler, rank: int = 0
) -> dict[str, Any]:
    """Restore weights, optimizer, scheduler and process ``rank``'s RNGs from a checkpoint; return ``state.json``."""
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
    set_rng_state(*_read_rng(checkpoint_dir, rank, state))
    extra = checkpoint_dir / "extra.safetensors"
    state["extra_tensors"] = load_file(extra) if extra.exists() else {}
    return state


def _read_rng(checkpoint_dir: Path, rank: int, state: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """Process ``rank``'s RNG states; checkpoints written before per-process files hold the main process's only."""
    path = checkpoint_dir / rng_file(rank)
    if not path.exists() and "rng" in state:
        return load_file(checkpoint_dir / "rng.safetensors"), state["rng"]
    with safe_open(path, framework="pt") as handle:
        meta = json.loads(handle.metadata()["rng"])
    return load_file(path), meta


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
    """``latest`` -> newest complete and intact checkpoint (None when there is none yet); a path -> that checkpoint.

    A damaged newest checkpoint (a file truncated or altered, see :func:`verify_checkpoint`) is named in the log and
    the next older intact one is used; a damaged checkpoint given by path is refused, naming the one to pass instead.
    """
    if spec is None:
        return None
    if spec == "latest":
        found = list_checkpoints(checkpoints_root)
        damaged = []
        for candidate in reversed(found):
            problem = verify_checkpoint(candidate)
            if problem is None:
                if damaged:
                    logger.warning(
                        "resuming from %s, the newest intact checkpoint, instead of %s", candidate, damaged[0]
                    )
                return candidate
            logger.warning("checkpoint %s is damaged and skipped: %s", candidate, problem)
            damaged.append(candidate)
        if damaged:
            raise RecipeError(
                [
                    (
                        f"training.resume_from_checkpoint = 'latest', but every checkpoint in"
                        f" {checkpoints_root} is damaged (see the warnings above); start again with"
                        " output.overwrite_output_dir=true"
                    )
                ]
            )
        return None
    path = Path(spec)
    if not (path / COMPLETE_MARKER).exists():
        raise RecipeError(
            [
                f"training.resume_from_checkpoint = {spec!r} is not a complete checkpoint directory"
                f" (no {path / COMPLETE_MARKER}); give a checkpoints/step-XXXXXXXX directory,"
                " or 'latest' for the newest complete one"
            ]
        )
    problem = verify_checkpoint(path)
    if problem:
        others = (c for c in reversed(list_checkpoints(path.parent)) if c != path)
        intact = next((c for c in others if verify_checkpoint(c) is None), None)
        instead = (
            f"the newest intact checkpoint is {intact}: pass training.resume_from_checkpoint={intact}"
            if intact
            else "no other checkpoint there is intact"
        )
        raise RecipeError([f"training.resume_from_checkpoint = {spec!r} is damaged: {problem}; {instead}"])
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


# ---------------------------------------------------------------------------------------------
# What a resume must agree on


RESUME_KEYS = (
    ("model", "name_or_path"),
    ("quantization", "method"),
    ("peft", "method"),
    ("peft", "r"),
    ("peft", "target_modules"),
    ("peft", "init_r"),
    ("peft", "use_dora"),
    ("peft", "init_lora_weights"),
    ("peft", "num_virtual_tokens"),
    ("data", "task"),
    ("data", "path"),
    ("training", "per_device_train_batch_size"),
    ("training", "gradient_accumulation_steps"),
    ("training", "seed"),
)
"""Recipe fields a checkpoint must agree on to be resumed."""


def check_resume_compatible(recipe: dict[str, dict[str, Any]], saved_recipe: dict) -> None:
    """Refuse a checkpoint from a different recipe (``Recipe.to_dict()`` of both), naming every field that differs."""
    diffs = [
        f"{s}.{k}: checkpoint has {saved_recipe.get(s, {}).get(k)!r}, recipe has {recipe[s][k]!r}"
        for s, k in RESUME_KEYS
        if saved_recipe.get(s, {}).get(k) != recipe[s][k]
    ]
    if diffs:
        raise RecipeError(["cannot resume from a checkpoint of a different recipe:"] + diffs, "resume")
