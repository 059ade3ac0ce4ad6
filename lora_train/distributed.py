"""What changes when a run is sharded across processes: launch checks, DeepSpeed settings, sharded checkpoints.

The loop in :mod:`lora_train.train` is the same for one process, DDP, DeepSpeed ZeRO and FSDP; only the
Accelerate launch changes. This module holds the few places where they differ:

* :func:`check_launch` refuses, before any data or weights are touched, every recipe x launch combination
  that would crash mid-run or silently do something else (see docs/distributed.md for the table and why).
* :func:`configure_deepspeed` writes the recipe's batch, accumulation and clipping into the DeepSpeed config:
  the loop prepares its dataloaders apart from the model, so Accelerate cannot infer them.
* Under DeepSpeed and FSDP the engine owns the optimizer (and under ZeRO-3 / FSDP the weights), so the
  pickle-free checkpoint of :mod:`lora_train.checkpoint` cannot capture it: :func:`save_engine_state` and
  :func:`load_engine_state` go through ``accelerator.save_state`` / ``load_state`` instead, and
  :func:`full_state_dict` gathers sharded weights before the main process saves an adapter.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch

from lora_train import checkpoint as ckpt
from lora_train.config import Recipe, RecipeError

CPU_LAUNCH = "ACCELERATE_USE_CPU=true torchrun --nproc_per_node N scripts/train.py RECIPE"
"""The command that runs N real data-parallel processes on a CPU-only host."""

ENGINE_FORMAT = "accelerate-save-state"
"""``state.json`` format of checkpoints written by :func:`save_engine_state` (DeepSpeed / FSDP)."""


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "false").lower() in ("1", "true", "yes")


@dataclass
class Launch:
    """What the launch gives this run; read from the Accelerator (or built from a config file in tests)."""

    engine: str
    """'single', 'ddp', 'deepspeed' or 'fsdp'."""
    num_processes: int
    device_type: str
    gradient_accumulation_steps: int
    deepspeed_config: dict = field(default_factory=dict)
    fsdp_version: Optional[int] = None
    requested: tuple[str, ...] = ()
    """Engines the environment asks for (ACCELERATE_USE_DEEPSPEED / ACCELERATE_USE_FSDP,
    set by ``accelerate launch``)."""
    launcher_mixed_precision: Optional[str] = None
    """ACCELERATE_MIXED_PRECISION, set by ``accelerate launch`` from its config."""

    @property
    def zero_stage(self) -> int:
        return (
            int(self.deepspeed_config.get("zero_optimization", {}).get("stage", 0)) if self.engine == "deepspeed" else 0
        )

    @property
    def engine_owns_optimizer(self) -> bool:
        """DeepSpeed and FSDP hold the optimizer state themselves: checkpoints go through the engine."""
        return self.engine in ("deepspeed", "fsdp")

    @property
    def shards_weights(self) -> bool:
        """Whether no process holds the whole model (ZeRO-3, FSDP): adapters must be gathered to be saved."""
        return self.engine == "fsdp" or self.zero_stage == 3

    @property
    def name(self) -> str:
        return (
            f"DeepSpeed ZeRO-{self.zero_stage}"
            if self.engine == "deepspeed"
            else {"fsdp": "FSDP", "ddp": "DDP"}.get(self.engine, "one process")
        )

    @classmethod
    def from_accelerator(cls, accelerator) -> "Launch":
        from accelerate.utils import DistributedType

        kind = accelerator.distributed_type
        if kind == DistributedType.DEEPSPEED:
            engine = "deepspeed"
        elif kind == DistributedType.FSDP:
            engine = "fsdp"
        else:
            engine = "ddp" if accelerator.num_processes > 1 else "single"
        plugin = accelerator.state.deepspeed_plugin if engine == "deepspeed" else None
        fsdp = accelerator.state.fsdp_plugin if engine == "fsdp" else None
        return cls(
            engine=engine,
            num_processes=accelerator.num_processes,
            device_type=accelerator.device.type,
            gradient_accumulation_steps=accelerator.gradient_accumulation_steps,
            deepspeed_config=plugin.deepspeed_config if plugin is not None else {},
            fsdp_version=getattr(fsdp, "fsdp_version", None),
            requested=tuple(
                e
                for e, var in (("deepspeed", "ACCELERATE_USE_DEEPSPEED"), ("fsdp", "ACCELERATE_USE_FSDP"))
                if _env_flag(var)
            ),
            launcher_mixed_precision=os.environ.get("ACCELERATE_MIXED_PRECISION"),
        )


# ---------------------------------------------------------------------------------------------
# Before the Accelerator exists


def accelerator_kwargs() -> dict[str, Any]:
    """Extra ``Accelerator`` arguments for this launch.

    Accelerate has no CPU path for DeepSpeed: ``ACCELERATE_USE_CPU`` turns DeepSpeed off, and without it a
    host without CUDA gets no process group, so every process would train alone. DeepSpeed itself runs on
    CPU over gloo (its CPU accelerator's backend), so on such a host we hand Accelerate that backend.
    """
    if (
        _env_flag("ACCELERATE_USE_DEEPSPEED")
        and not _env_flag("ACCELERATE_USE_CPU")
        and "LOCAL_RANK" in os.environ
        and not torch.cuda.is_available()
    ):
        from accelerate.utils import InitProcessGroupKwargs

        return {"kwargs_handlers": [InitProcessGroupKwargs(backend="gloo")]}
    return {}


def refuse_silent_duplication(num_processes: int) -> None:
    """``WORLD_SIZE > 1`` but Accelerate sees one process: N copies would each train alone."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and num_processes == 1:
        raise RecipeError(
            [
                f"WORLD_SIZE={world} but Accelerate sees a single process, so {world} independent copies of this run"
                " would each train alone and overwrite each other's output. On a CPU-only host"
                " `accelerate launch --multi_gpu` (or a multi_gpu / fsdp config) does this."
                " Run several CPU processes with:"
                f" {CPU_LAUNCH}"
            ],
            "launch",
        )


# ---------------------------------------------------------------------------------------------
# Compatibility of the recipe with the launch


def deepspeed_values(recipe: Recipe, num_processes: int) -> dict[str, Any]:
    """The DeepSpeed config entries the recipe decides."""
    t = recipe.training
    return {
        "train_micro_batch_size_per_gpu": t.per_device_train_batch_size,
        "gradient_accumulation_steps": t.gradient_accumulation_steps,
        "train_batch_size": t.per_device_train_batch_size * t.gradient_accumulation_steps * num_processes,
        "gradient_clipping": t.max_grad_norm,
    }


MIXED_PRECISION_DTYPES = {"bf16": "bfloat16", "fp16": "float16"}


def _qlora_storage_problems(recipe: Recipe, launch: Launch) -> list[str]:
    """What DeepSpeed / FSDP need of ``quantization.quant_storage_dtype``, the dtype packing the 4-bit weights.

    FSDP shards only floating parameters (Accelerate leaves uint8 ``Params4bit`` out of sharding), and both
    engines cast floating parameters to the mixed-precision dtype (DeepSpeed at initialize, FSDP at every
    all-gather), which would convert packed 4-bit data as numbers unless it is stored in that dtype already.
    uint8 storage is never cast, and DeepSpeed (ZeRO-2 and ZeRO-3) shards it as it is.
    """
    storage = recipe.quantization.quant_storage_dtype
    training_dtype = MIXED_PRECISION_DTYPES.get(recipe.training.mixed_precision)
    wanted = training_dtype or recipe.quantization.compute_dtype
    if launch.engine == "fsdp" and storage == "uint8":
        return [
            f"QLoRA under FSDP with quantization.quant_storage_dtype = uint8: Accelerate leaves non-floating 4-bit"
            f" weights out of FSDP sharding, so every GPU would hold the whole 4-bit model. Set"
            f" quantization.quant_storage_dtype={wanted}, or use DDP / DeepSpeed, which handle uint8 storage"
        ]
    if storage != "uint8" and training_dtype not in (None, storage):
        return [
            f"QLoRA under {launch.name} with quantization.quant_storage_dtype = {storage} and"
            f" training.mixed_precision = {recipe.training.mixed_precision}: the engine casts floating parameters to"
            f" {training_dtype}, which would convert the packed 4-bit data as numbers. Set"
            f" quantization.quant_storage_dtype={training_dtype}"
            + (", or keep the default uint8 storage" if launch.engine == "deepspeed" else "")
        ]
    return []


def launch_problems(recipe: Recipe, launch: Launch) -> list[str]:
    """Every reason this recipe cannot run under this launch, each naming what works instead."""
    p = _engine_request_problems(launch) + _precision_problems(recipe, launch)
    p.extend(recipe.peft.spec.launch_problems(recipe, launch))  # the method's own limits (lora_train.methods)
    if recipe.quantization.is_4bit and launch.engine_owns_optimizer:
        p.extend(_qlora_storage_problems(recipe, launch))
    if launch.engine == "deepspeed":
        p.extend(_deepspeed_problems(recipe, launch))
    if launch.engine == "fsdp" and launch.fsdp_version != 2:
        p.append(
            f"fsdp_version {launch.fsdp_version} is not supported: the loop builds its optimizer before preparing"
            " the model, and Accelerate re-points an optimizer at the sharded parameters only for FSDP2. Set"
            " fsdp_version: 2 (as accelerate_configs/fsdp.yaml does)"
        )
    if launch.shards_weights and recipe.output.push_to_hub and recipe.output.push_checkpoints:
        p.append(
            f"output.push_checkpoints is not supported under {launch.name} (the adapter is sharded at every"
            " checkpoint); keep output.push_to_hub for the final adapter and set output.push_checkpoints=false"
        )
    return p


def _engine_request_problems(launch: Launch) -> list[str]:
    """The launch asked for an engine that Accelerate is not running: the run would silently be plain DDP."""
    p = []
    if "deepspeed" in launch.requested and launch.engine != "deepspeed":
        p.append(
            f"the launch asks for DeepSpeed (ACCELERATE_USE_DEEPSPEED=true) but Accelerate runs {launch.name}:"
            " ACCELERATE_USE_CPU=true (accelerate launch --cpu) turns DeepSpeed off. Drop it: on a CPU-only host"
            " DeepSpeed runs over gloo with `accelerate launch --config_file accelerate_configs/deepspeed_zero2.yaml"
            " --num_processes N scripts/train.py RECIPE`"
        )
    if "fsdp" in launch.requested and launch.engine != "fsdp":
        p.append(
            f"the launch asks for FSDP (ACCELERATE_USE_FSDP=true) but Accelerate runs {launch.name}: Accelerate"
            f" enables FSDP only on GPUs. On CPU use DDP: {CPU_LAUNCH}"
        )
    return p


def _precision_problems(recipe: Recipe, launch: Launch) -> list[str]:
    """Mixed precision and accumulation: the recipe decides; refuse what Accelerate would ignore or cannot run."""
    p, t = [], recipe.training
    if t.mixed_precision == "fp16" and launch.device_type == "cpu":
        p.append(
            "training.mixed_precision = 'fp16' on CPU: Accelerate silently runs fp32 there (no fp16 autocast"
            " on CPU). Use training.mixed_precision=no, or bf16 (CPU autocast)"
        )
    if launch.launcher_mixed_precision not in (None, "no", t.mixed_precision):
        p.append(
            f"the Accelerate config asks for mixed_precision={launch.launcher_mixed_precision!r} but the recipe has"
            f" training.mixed_precision={t.mixed_precision!r}, which decides. Set the recipe field, and leave"
            " mixed_precision: 'no' in the Accelerate config"
        )
    if launch.gradient_accumulation_steps != t.gradient_accumulation_steps:
        p.append(
            f"the launch sets gradient_accumulation_steps={launch.gradient_accumulation_steps}"
            f" (ACCELERATE_GRADIENT_ACCUMULATION_STEPS, from the Accelerate config) but the recipe has"
            f" training.gradient_accumulation_steps={t.gradient_accumulation_steps}: remove it from the config, the"
            " recipe decides"
        )

    return p


def _deepspeed_problems(recipe: Recipe, launch: Launch) -> list[str]:
    """DeepSpeed config sections and values that would override the recipe, and ZeRO-3 saving."""
    p, t = [], recipe.training
    ds = launch.deepspeed_config
    for key in ("optimizer", "scheduler"):
        if key in ds:
            p.append(
                f"the DeepSpeed config defines a {key!r} section, but the recipe builds AdamW and its"
                f" {t.lr_scheduler} schedule: remove {key!r} from the DeepSpeed config"
            )
    for key, value in deepspeed_values(recipe, launch.num_processes).items():
        if ds.get(key, "auto") not in ("auto", value):
            p.append(
                f"the DeepSpeed config sets {key}={ds[key]} but the recipe gives {value}: set it to 'auto' (the"
                " recipe decides)"
            )
    if (
        launch.zero_stage == 3
        and ds.get("zero_optimization", {}).get("stage3_gather_16bit_weights_on_model_save") is not True
    ):
        p.append(
            "ZeRO-3 shards the adapter across processes, so saving it needs"
            " stage3_gather_16bit_weights_on_model_save: set zero3_save_16bit_model: true in the Accelerate"
            " config (as accelerate_configs/deepspeed_zero3.yaml does)"
        )
    return p


def check_launch(recipe: Recipe, accelerator) -> Launch:
    """Refuse, before any work, a recipe this launch cannot run; return the launch description."""
    refuse_silent_duplication(accelerator.num_processes)
    launch = Launch.from_accelerator(accelerator)
    problems = launch_problems(recipe, launch)
    if problems:
        raise RecipeError(problems, f"launch ({launch.name}, {launch.num_processes} process(es))")
    risk = untested_risk(recipe, launch)
    if risk:
        logging.getLogger("lora_train").warning("%s", risk)
    return launch


def configure_deepspeed(recipe: Recipe, launch: Launch) -> None:
    """Write the recipe's batch, accumulation and clipping into the DeepSpeed config.

    ``accelerator.prepare(model, optimizer)`` is called without the dataloaders (they are prepared
    first), so Accelerate cannot read ``train_micro_batch_size_per_gpu`` from them; and DeepSpeed clips
    gradients itself (``accelerator.clip_grad_norm_`` does nothing under it).
    """
    if launch.engine == "deepspeed":
        launch.deepspeed_config.update(deepspeed_values(recipe, launch.num_processes))


# ---------------------------------------------------------------------------------------------
# Saving under DeepSpeed / FSDP


def full_state_dict(accelerator, model, launch: Launch) -> Optional[dict]:
    """The model's complete state dict when weights are sharded (ZeRO-3, FSDP), else None (the module holds them).

    Gathering is collective: call it on every process; only the main process then writes.
    """
    if not launch.shards_weights:
        return None
    return accelerator.get_state_dict(model)


def every_process_rng_state(accelerator) -> list[tuple[dict[str, torch.Tensor], dict]]:
    """Every process's :func:`lora_train.checkpoint.rng_state`, by rank (collective: call it on every process).

    Each process draws its own dropout masks, so a resume must give each its own stream back, not the main one's.
    """
    state = ckpt.rng_state()
    if accelerator.num_processes == 1:
        return [state]
    from accelerate.utils import gather_object

    return gather_object([state])


def save_engine_state(accelerator, directory: Path, state: dict[str, Any], scheduler, launch: Launch) -> Path:
    """A resumable checkpoint written through ``accelerator.save_state`` (DeepSpeed / FSDP own the optimizer).

    Every process writes its own shard files into one agreed temporary directory; the main process then adds
    ``state.json`` and the ``COMPLETE`` manifest, flushes everything to disk and renames the directory into place
    (:func:`lora_train.checkpoint.publish_directory`), so no two processes write one file and a crash at any moment
    leaves the previous checkpoint usable and never a half-written one that looks complete.
    """
    tmp = directory.with_name(f".{directory.name}.tmp-engine")
    if accelerator.is_main_process:
        ckpt.restore_interrupted_replace(directory)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    kwargs = {"exclude_frozen_parameters": True} if launch.engine == "deepspeed" else {}  # adapters only, not the base
    accelerator.save_state(str(tmp), **kwargs)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if os.environ.get(ckpt.PAUSE_IN_SAVE_ENV) == directory.name:  # test hook: every shard written, not published
            time.sleep(600)
        full = dict(state, format=ENGINE_FORMAT, engine=launch.name, scheduler=scheduler.state_dict())
        (tmp / "state.json").write_text(json.dumps(full, indent=1))
        ckpt.write_manifest(tmp)
        ckpt.publish_directory(tmp, directory)
    accelerator.wait_for_everyone()
    return directory


def load_engine_state(accelerator, directory: Path, scheduler, launch: Launch) -> dict[str, Any]:
    """Restore what :func:`save_engine_state` wrote (engine weights and optimizer, RNGs, schedule); return its state."""
    state = json.loads((directory / "state.json").read_text())
    kwargs = {"load_module_strict": False} if launch.engine == "deepspeed" else {}  # frozen base weights were not saved
    accelerator.load_state(str(directory), **kwargs)
    scheduler.load_state_dict(state["scheduler"])
    return state


def check_resume_launch(saved: dict[str, Any], launch: Launch) -> None:
    """Refuse a checkpoint written under another engine or number of processes, naming what it needs."""
    problems = []
    engine_ckpt = saved.get("format") == ENGINE_FORMAT
    if engine_ckpt != launch.engine_owns_optimizer:
        problems.append(
            f"the checkpoint was written under {saved.get('engine', 'one process or DDP')} and cannot be"
            f" resumed under {launch.name}: resume with the Accelerate config that wrote it"
        )
    elif engine_ckpt and saved.get("engine") != launch.name:
        problems.append(
            f"the checkpoint was written under {saved.get('engine')}, this launch is {launch.name}:"
            " resume with the Accelerate config that wrote it"
        )
    written = saved.get("num_processes")
    if written is not None and written != launch.num_processes:
        problems.append(
            f"the checkpoint was written by {written} process(es) and this launch has {launch.num_processes}:"
            " its data position counts per-process batches (and DeepSpeed / FSDP shards are per process);"
            f" resume with {written} processes"
        )
    if problems:
        raise RecipeError(["cannot resume from this checkpoint:"] + problems, "resume")


# ---------------------------------------------------------------------------------------------
# Allowed, never run here, and reported broken upstream: warned about at start

UNTESTED_RISKS: dict[tuple[str, str], tuple[dict[str, dict[str, Any]], str]] = {
    ("fsdp", "QLoRA (bf16 storage, bf16 mixed precision)"): (
        {
            "quantization": {"method": "nf4", "quant_storage_dtype": "bfloat16", "compute_dtype": "bfloat16"},
            "training": {"mixed_precision": "bf16"},
        },
        "upstream bitsandbytes reports packed NF4 weights corrupted under FSDP2 with bf16 storage",
    ),
}
"""(engine, what) -> (the recipe fields that make it, the known upstream problem): combinations that are allowed,
never run here, and have a known upstream problem. The run logs a warning at start (:func:`untested_risk`), and the
compatibility table of docs/distributed.md (lora_lab/compat_table.py) marks them."""


def untested_risk(recipe: Recipe, launch: Launch) -> Optional[str]:
    """The known upstream problem of this never-run recipe x launch (:data:`UNTESTED_RISKS`), or None."""
    for (engine, column), (variant, risk) in UNTESTED_RISKS.items():
        if launch.engine == engine and all(
            getattr(getattr(recipe, section), key) == value
            for section, values in variant.items()
            for key, value in values.items()
        ):
            return f"{launch.name} with {column} has never been run here, and {risk}: compare its losses with a DDP run"
    return None
