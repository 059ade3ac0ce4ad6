"""The training loop: one explicit Accelerate loop for CPU, one GPU, DDP, DeepSpeed and FSDP.

Read :func:`train` top to bottom: setup (checks, data, model, optimizer), the loop (accumulate,
clip, step, log, evaluate, checkpoint) and the final save.
"""

from __future__ import annotations

import json
import logging
import math
import signal
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch
from torch.utils.data import DataLoader

from lora_train import checkpoint as ckpt
from lora_train import distributed as dist
from lora_train import hub
from lora_train.card import hardware_summary
from lora_train.config import Recipe, RecipeError, recipe_to_yaml
from lora_train.data import (
    DataError,
    EpochSampler,
    check_labels,
    label_names_of,
    load_splits,
    resolve_spec,
    steps_per_epoch,
    tokenize,
)
from lora_train.metrics import load_metric
from lora_train.modeling import (
    apply_regime,
    check_target_modules,
    count_parameters,
    load_base_model,
    load_model_config,
    load_tokenizer,
    meta_model,
    use_fast_dropout,
)

logger = logging.getLogger("lora_train")

RESUME_KEYS = (
    ("model", "name_or_path"), ("quantization", "method"), ("peft", "method"), ("peft", "r"),
    ("peft", "target_modules"), ("peft", "init_r"), ("data", "task"), ("data", "path"),
    ("training", "per_device_train_batch_size"), ("training", "gradient_accumulation_steps"), ("training", "seed"),
)
"""Recipe fields a checkpoint must agree on to be resumed."""


class TrainingError(RuntimeError):
    """The run cannot continue (non-finite loss, incompatible checkpoint...)."""


@dataclass
class LoopState:
    """Counters and history saved with every checkpoint."""

    global_step: int = 0
    epoch: int = 0
    batches_in_epoch: int = 0
    best_metric: Optional[float] = None
    best_step: Optional[int] = None
    history: list[dict[str, Any]] = field(default_factory=list)


# ---------------------------------------------------------------------------------------------
# Setup helpers


def setup_logging(is_main: bool) -> None:
    """Readable logs on the main process; warnings only elsewhere."""
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S", level=logging.INFO if is_main else logging.WARNING, force=True)
    import datasets
    import transformers

    if not is_main:
        datasets.utils.logging.set_verbosity_error()
        transformers.utils.logging.set_verbosity_error()
    else:
        transformers.utils.logging.set_verbosity_warning()


def check_output_dir(recipe: Recipe) -> Path:
    """Refuse to mix two runs in one directory, and unwritable directories, before any work."""
    out = Path(recipe.output.output_dir)
    if ckpt.holds_run(out) and not recipe.output.overwrite_output_dir and recipe.training.resume_from_checkpoint is None:
        raise RecipeError([
            f"output.output_dir '{out}' already holds a run. Resume it with training.resume_from_checkpoint=latest,"
            " allow overwriting with output.overwrite_output_dir=true, or choose another directory"
        ])
    try:  # really create and write: permission bits say nothing for root, read-only mounts or a file in the path
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=out):
            pass
    except OSError as err:
        raise RecipeError([f"output.output_dir '{out}' is not a writable directory ({err.strerror or err}: '{err.filename or out}');"
                           " choose a directory you can write to"]) from None
    return out


def check_model_fits(recipe: Recipe, config) -> None:
    """Checks that need only config.json and file names: sequence length, target modules (model built on 'meta'),
    safetensors weights for a local model, and bitsandbytes kernels that run when NF4 is asked."""
    limit = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    if limit and recipe.data.max_length > limit:
        raise RecipeError([f"data.max_length = {recipe.data.max_length} exceeds {recipe.model.name_or_path}'s limit of {limit} positions"])
    check_target_modules(recipe, meta_model(config))
    local = Path(recipe.model.name_or_path)
    if local.is_dir() and not any(local.glob("*.safetensors")):
        pickled = sorted(p.name for p in local.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt"))
        raise RecipeError([f"model.name_or_path '{local}' holds no .safetensors weights{f' (only {pickled})' if pickled else ''};"
                           " pickle checkpoints are never loaded. Convert it once in a trusted environment:"
                           " AutoModel.from_pretrained(dir).save_pretrained(dir, safe_serialization=True)"])
    if recipe.quantization.method == "nf4":
        device = "cuda" if torch.cuda.is_available() else "cpu"
        try:  # a 64x64 round trip: installed is not enough, its kernels must run on this device
            import bitsandbytes.functional as bnb_functional

            bnb_functional.dequantize_4bit(*bnb_functional.quantize_4bit(torch.ones(64, 64, device=device), quant_type="nf4"))
        except Exception as err:  # noqa: BLE001 - import, library-loading and kernel errors alike
            raise RecipeError([f"quantization.method = 'nf4' needs bitsandbytes 4-bit kernels that run on {device}, but"
                               f" they fail here ({type(err).__name__}: {err}). Install a bitsandbytes build for this"
                               " platform (CPU support needs >= 0.46), or train without quantization:"
                               " quantization.method=none"]) from None


def check_resume_compatible(recipe: Recipe, saved_recipe: dict) -> None:
    """Refuse a checkpoint from a different recipe, naming every field that differs."""
    current = recipe.to_dict()
    diffs = [
        f"{s}.{k}: checkpoint has {saved_recipe.get(s, {}).get(k)!r}, recipe has {current[s][k]!r}"
        for s, k in RESUME_KEYS
        if saved_recipe.get(s, {}).get(k) != current[s][k]
    ]
    if diffs:
        raise RecipeError(["cannot resume from a checkpoint of a different recipe:"] + diffs, "resume")


def build_optimizer(model: torch.nn.Module, recipe: Recipe, device: torch.device) -> torch.optim.Optimizer:
    """AdamW without weight decay on biases and norms; fused (one kernel for all tensors) on CUDA and CPU."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (no_decay if param.ndim < 2 or "norm" in name.lower() else decay).append(param)
    groups = [
        {"params": decay, "weight_decay": recipe.training.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=recipe.training.learning_rate, fused=device.type in ("cuda", "cpu"))


def peak_memory_mb(device: torch.device) -> float:
    """CUDA max allocated on GPU, the process's peak RSS on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


@torch.no_grad()
def evaluate(model, loader: DataLoader, accelerator, num_labels: int, label_names: list[str]) -> dict[str, Any]:
    """Exact metrics over the whole split: ``gather_for_metrics`` drops the padding of the last batch."""
    model.eval()
    metric = load_metric(num_labels, label_names)
    total_loss, total_n = torch.zeros((), device=accelerator.device), 0
    for batch in loader:
        # Labels stay out of the forward: the loss is computed here, and a reloaded AdaLoRA model fails when
        # asked for its (training-only) orthogonality loss.
        outputs = model(**{k: v for k, v in batch.items() if k != "labels"})
        preds, refs = accelerator.gather_for_metrics((outputs.logits.argmax(-1), batch["labels"]))
        losses = accelerator.gather_for_metrics(
            torch.nn.functional.cross_entropy(outputs.logits.float(), batch["labels"], reduction="none")
        )
        total_loss += losses.sum()
        total_n += losses.numel()
        metric.add_batch(predictions=preds.cpu().numpy(), references=refs.cpu().numpy())
    model.train()
    report = metric.compute()
    report["loss"] = float(total_loss) / max(total_n, 1)
    return report


# ---------------------------------------------------------------------------------------------
# The run


def train(recipe: Recipe) -> dict[str, Any]:
    """Train, evaluate and save the recipe; return the final metrics."""
    t = recipe.training
    out = check_output_dir(recipe)
    check_model_fits(recipe, load_model_config(recipe))  # config.json only: seconds, before any weights or data
    checkpoints_root = out / "checkpoints"
    resume_dir = ckpt.resolve_resume(t.resume_from_checkpoint, checkpoints_root)
    if resume_dir is not None:
        saved = json.loads((resume_dir / "state.json").read_text())
        check_resume_compatible(recipe, saved["recipe"])

    from accelerate import Accelerator  # heavy imports (peft, bitsandbytes) only once the checks passed
    from accelerate.utils import set_seed
    from tqdm.auto import tqdm
    from transformers import DataCollatorWithPadding, get_scheduler

    trackers = [name for name in recipe.output.report_to if _tracker_available(name)]
    accelerator = Accelerator(
        gradient_accumulation_steps=t.gradient_accumulation_steps,
        mixed_precision=t.mixed_precision,
        log_with=trackers or None,
        project_dir=str(out / "logs"),  # TensorBoard events land in logs/lora_train/
        **dist.accelerator_kwargs(),
    )
    launch = dist.check_launch(recipe, accelerator)  # silent duplication, unsupported recipe x launch combinations
    dist.configure_deepspeed(recipe, launch)
    setup_logging(accelerator.is_main_process)
    if accelerator.is_main_process:
        ckpt.restore_interrupted_replace(out / "best")  # a kill while the last run replaced best/
    pusher = hub.pusher_for(recipe) if accelerator.is_main_process else None  # repo and token checked before any work
    set_seed(t.seed)

    # --- data and model checks that are cheap come first -------------------------------------
    tokenizer = load_tokenizer(recipe)
    spec = resolve_spec(recipe.data)
    with accelerator.main_process_first():
        train_raw, eval_raw = load_splits(spec, recipe.data)
    label_names = label_names_of(train_raw, spec)
    num_labels = len(label_names)
    check_labels(train_raw, spec, num_labels, "train")
    check_labels(eval_raw, spec, num_labels, "eval")
    config = load_model_config(recipe, label_names)
    if config.pad_token_id is None:
        config.pad_token_id = tokenizer.pad_token_id

    # --- tokenize once, batch dynamically ---------------------------------------------------
    with accelerator.main_process_first():
        train_ds = tokenize(train_raw, tokenizer, spec, recipe.data.max_length)
        eval_ds = tokenize(eval_raw, tokenizer, spec, recipe.data.max_length)
    lengths = train_ds["length"]
    train_ds, eval_ds = train_ds.remove_columns("length"), eval_ds.remove_columns("length")
    collator = DataCollatorWithPadding(tokenizer, pad_to_multiple_of=8 if accelerator.device.type == "cuda" else None)
    sampler = EpochSampler(lengths, t.per_device_train_batch_size * accelerator.num_processes, t.seed, recipe.data.group_by_length)
    pin = accelerator.device.type == "cuda"
    # Own generators: a DataLoader draws a worker seed from its generator (else from the global RNG that dropout
    # uses) at every iteration start, so a resumed run's fresh iterator would shift dropout masks.
    train_loader = DataLoader(train_ds, batch_size=t.per_device_train_batch_size, sampler=sampler, collate_fn=collator,
                              num_workers=recipe.data.num_workers, pin_memory=pin, generator=torch.Generator().manual_seed(t.seed))
    eval_loader = DataLoader(eval_ds, batch_size=t.per_device_eval_batch_size, collate_fn=collator,
                             num_workers=recipe.data.num_workers, pin_memory=pin, generator=torch.Generator().manual_seed(t.seed))

    train_loader, eval_loader = accelerator.prepare(train_loader, eval_loader)
    per_process_batches = len(train_loader)
    updates_per_epoch = steps_per_epoch(per_process_batches, t.gradient_accumulation_steps)
    total_steps = t.max_steps if t.max_steps > 0 else math.ceil(t.num_epochs * updates_per_epoch)
    num_epochs = math.ceil(total_steps / updates_per_epoch)

    # --- model, optimizer, schedule -----------------------------------------------------------
    device_map = {"": accelerator.device} if recipe.quantization.method == "nf4" else None
    model, trainable_heads = load_base_model(recipe, config, device_map)
    model = apply_regime(recipe, model, trainable_heads, total_steps)
    if accelerator.device.type == "cpu":
        use_fast_dropout(model)  # bernoulli_ is slow on CPU; CUDA's fused dropout is not
    params = count_parameters(model)
    optimizer = build_optimizer(model, recipe, accelerator.device)
    scheduler = get_scheduler(t.lr_scheduler if t.lr_scheduler != "constant" else "constant_with_warmup", optimizer,
                              num_warmup_steps=int(t.warmup_ratio * total_steps), num_training_steps=total_steps)
    model, optimizer = accelerator.prepare(model, optimizer)
    if t.torch_compile:
        model = torch.compile(model)
    unwrapped = accelerator.unwrap_model(model)
    base_optimizer = getattr(optimizer, "optimizer", optimizer)  # the torch optimizer inside Accelerate's wrapper
    is_adalora = recipe.peft.method == "adalora"

    global_batch = t.per_device_train_batch_size * t.gradient_accumulation_steps * accelerator.num_processes
    logger.info("%s", params)
    logger.info("examples: train %d, eval %d | %s, processes %d | global batch %d (= %d per device x %d accumulation x %d;"
                " learning rate %.2e applies to it, not scaled with processes) | %d optimizer steps over %d epoch(s)",
                len(train_ds), len(eval_ds), launch.name, accelerator.num_processes, global_batch,
                t.per_device_train_batch_size, t.gradient_accumulation_steps, accelerator.num_processes,
                t.learning_rate, total_steps, num_epochs)

    # --- resume -------------------------------------------------------------------------------
    state = LoopState()
    if resume_dir is not None:
        dist.check_resume_launch(saved, launch)
        if launch.engine_owns_optimizer:
            loaded = dist.load_engine_state(accelerator, resume_dir, scheduler, launch)
        else:
            loaded = ckpt.load_training_state(resume_dir, unwrapped, base_optimizer, scheduler)
        state = LoopState(**loaded["loop"])
        if is_adalora:
            _load_adalora(unwrapped, loaded["extra_tensors"], loaded.get("adalora") or {})
        logger.info("resumed from %s at step %d (epoch %d, batch %d)", resume_dir, state.global_step, state.epoch, state.batches_in_epoch)
    elif t.resume_from_checkpoint == "latest":
        logger.info("no checkpoint in %s yet: starting from scratch", checkpoints_root)

    if accelerator.is_main_process:
        if recipe.output.overwrite_output_dir and t.resume_from_checkpoint is None:
            ckpt.clear_training_state(out)  # or 'latest' could later resume the overwritten run
        ckpt.atomic_write_text(out / "recipe.yaml", recipe_to_yaml(recipe))
    if trackers:
        accelerator.init_trackers("lora_train", config=_flat_config(recipe))

    stop = _StopFlag()
    stop.install()

    def save_checkpoint() -> None:
        accelerator.wait_for_everyone()
        path = checkpoints_root / ckpt.checkpoint_name(state.global_step)
        bad = ckpt.non_finite(unwrapped)
        if bad:  # keep the last good checkpoint rather than save a broken one
            raise TrainingError(f"parameters {bad[:3]} became non-finite at optimizer step {state.global_step}; stopping"
                                f" without saving. {_last_good(checkpoints_root)}")
        extra, adalora_meta = _adalora_state(unwrapped) if is_adalora else (None, None)
        saved_state = {"loop": state.__dict__, "recipe": recipe.to_dict(), "num_processes": accelerator.num_processes,
                       "adalora": adalora_meta}
        if launch.engine_owns_optimizer:  # every process writes its shard
            dist.save_engine_state(accelerator, path, saved_state, scheduler, launch)
        elif accelerator.is_main_process:
            ckpt.save_training_state(path, unwrapped, base_optimizer, scheduler, saved_state, extra)
        if accelerator.is_main_process:
            ckpt.rotate_checkpoints(checkpoints_root, t.keep_last)
            logger.info("saved checkpoint %s", path)
            if pusher is not None and recipe.output.push_checkpoints:
                card_metrics = {"global_step": state.global_step, "step": last_eval.get("step"), **last_eval.get("report", {})}
                pusher.push_in_background(
                    lambda d: ckpt.save_model_dir(d, unwrapped, tokenizer, _run_files(recipe, label_names, card_metrics, state.history)),
                    f"lora_train: adapter at step {state.global_step}",
                )
        accelerator.wait_for_everyone()

    last_eval: dict[str, Any] = {}

    def run_eval() -> dict[str, Any]:
        report = evaluate(model, eval_loader, accelerator, num_labels, label_names)
        entry = {"step": state.global_step, "eval_loss": report["loss"], "eval_accuracy": report["accuracy"], "eval_macro_f1": report["macro_f1"]}
        state.history.append(entry)
        accelerator.log(entry, step=state.global_step)
        logger.info("step %d | eval loss %.4f | accuracy %.4f | macro-F1 %.4f", state.global_step, report["loss"], report["accuracy"], report["macro_f1"])
        last_eval.update(step=state.global_step, report=report)
        score = report["accuracy"]
        if state.best_metric is None or score > state.best_metric:
            state.best_metric, state.best_step = score, state.global_step
            weights = dist.full_state_dict(accelerator, model, launch)  # every process: gathers ZeRO-3 / FSDP shards
            if accelerator.is_main_process:
                ckpt.atomic_directory(out / "best", lambda d: ckpt.save_model_dir(d, unwrapped, tokenizer, _run_files(recipe, label_names, {"step": state.global_step, **report}), weights))
        return report

    # --- the loop -----------------------------------------------------------------------------
    model.train()
    progress = tqdm(total=total_steps, initial=state.global_step, disable=not accelerator.is_main_process, desc="train")
    pending: list[tuple[int, torch.Tensor]] = []  # (step, loss) not yet copied to the host
    micro_losses: list[torch.Tensor] = []
    window_samples = torch.zeros((), device=accelerator.device)
    window_tokens = torch.zeros((), device=accelerator.device)
    samples_this_process = torch.zeros(1, device=accelerator.device)  # reported per process: shows every rank trained
    window_start, train_start = time.perf_counter(), time.perf_counter()
    steps_at_start = state.global_step

    def flush_losses() -> None:
        """Copy pending step losses to the host in one sync, refuse non-finite ones, log the window."""
        nonlocal window_start
        if not pending:
            return
        losses = accelerator.reduce(torch.stack([loss for _, loss in pending]), reduction="mean").tolist()
        for (step, _), value in zip(pending, losses):
            if not math.isfinite(value):
                raise TrainingError(f"loss became {value} at optimizer step {step}; stopping. {_last_good(checkpoints_root)}")
        elapsed = time.perf_counter() - window_start
        samples, tokens = accelerator.reduce(torch.stack([window_samples, window_tokens]), reduction="sum").tolist()
        entry = {
            "step": pending[-1][0], "loss": sum(losses) / len(losses), "learning_rate": scheduler.get_last_lr()[0],
            "samples_per_s": samples / elapsed, "tokens_per_s": tokens / elapsed, "window_s": elapsed,
            "window_samples": int(samples), "window_tokens": int(tokens),
            "peak_memory_mb": peak_memory_mb(accelerator.device),
            "step_losses": losses,
        }
        state.history.append(entry)
        accelerator.log({k: v for k, v in entry.items() if k != "step_losses"}, step=entry["step"])
        progress.set_postfix(loss=f"{entry['loss']:.4f}", lr=f"{entry['learning_rate']:.2e}")
        pending.clear()
        window_samples.zero_()
        window_tokens.zero_()
        window_start = time.perf_counter()

    interrupted = False
    while state.global_step < total_steps and not interrupted:
        # Accelerate's loader re-sets the sampler's epoch from its own counter at every iteration start.
        train_loader.set_epoch(state.epoch)
        loader = accelerator.skip_first_batches(train_loader, state.batches_in_epoch) if state.batches_in_epoch else train_loader
        for batch in loader:
            with accelerator.accumulate(model):
                outputs = model(**batch)
                accelerator.backward(outputs.loss)
                micro_losses.append(outputs.loss.detach().float())
                window_samples += batch["labels"].numel()
                samples_this_process += batch["labels"].numel()
                window_tokens += batch["attention_mask"].sum()
                if accelerator.sync_gradients:
                    if t.max_grad_norm > 0:
                        accelerator.clip_grad_norm_(model.parameters(), t.max_grad_norm)
                    optimizer.step()
                    scheduler.step()
                    if is_adalora:
                        unwrapped.base_model.update_and_allocate(state.global_step)
                    optimizer.zero_grad(set_to_none=True)
            state.batches_in_epoch += 1
            if not accelerator.sync_gradients:
                continue
            state.global_step += 1
            pending.append((state.global_step, torch.stack(micro_losses).mean()))
            micro_losses.clear()
            progress.update(1)

            end_of_epoch = state.batches_in_epoch >= per_process_batches
            if end_of_epoch:
                state.epoch, state.batches_in_epoch = state.epoch + 1, 0
            last = state.global_step >= total_steps
            due_eval = (t.eval_steps and state.global_step % t.eval_steps == 0) or (not t.eval_steps and end_of_epoch) or last
            due_save = (t.save_steps and state.global_step % t.save_steps == 0) or (not t.save_steps and end_of_epoch)
            interrupted = stop.agreed(accelerator)
            if state.global_step % t.logging_steps == 0 or due_eval or due_save or last or interrupted:
                flush_losses()
            if due_eval:
                run_eval()
            if due_save or interrupted:
                save_checkpoint()
            if due_eval or due_save:
                window_start = time.perf_counter()  # samples/s of the next window: training only, not this eval/save
            if last or interrupted or end_of_epoch:
                break
    progress.close()
    stop.uninstall()
    if interrupted:
        logger.warning("stopped by %s at step %d; checkpoint saved. Resume with training.resume_from_checkpoint=latest",
                       stop.signal_name, state.global_step)
        _end_training(accelerator)
        return {"interrupted": True, "step": state.global_step}

    # --- final evaluation and save ------------------------------------------------------------
    report = last_eval["report"] if last_eval.get("step") == state.global_step else run_eval()
    train_seconds = time.perf_counter() - train_start
    metrics = {
        "eval_accuracy": report["accuracy"], "eval_macro_f1": report["macro_f1"], "eval_loss": report["loss"],
        "eval_samples": report["num_samples"], "per_class": report["per_class"], "confusion_matrix": report["confusion_matrix"],
        "best_eval_accuracy": state.best_metric, "best_step": state.best_step,
        "global_step": state.global_step, "epochs": state.global_step / updates_per_epoch,
        "train_seconds_this_session": train_seconds,
        "train_steps_per_s": (state.global_step - steps_at_start) / max(train_seconds, 1e-9),
        "peak_memory_mb": peak_memory_mb(accelerator.device),
        "trainable_params": params.trainable, "total_params": params.total, "trainable_percent": params.percent,
        "num_processes": accelerator.num_processes, "global_batch_size": global_batch,
        "train_samples_per_process": [int(n) for n in accelerator.gather(samples_this_process).tolist()],
        "device": str(accelerator.device), "label_names": label_names,
        "hardware": hardware_summary(accelerator.device, accelerator.num_processes), "resumed_from_step": steps_at_start,
    }
    weights = dist.full_state_dict(accelerator, model, launch)  # every process: gathers ZeRO-3 / FSDP shards
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        ckpt.save_final(out, unwrapped, tokenizer, _run_files(recipe, label_names, metrics, state.history), weights)
        logger.info("final: accuracy %.4f | macro-F1 %.4f | saved to %s", metrics["eval_accuracy"], metrics["eval_macro_f1"], out)
    accelerator.wait_for_everyone()
    if pusher is not None:
        _push_final(pusher, out, state.global_step)
    _end_training(accelerator)
    return metrics


# ---------------------------------------------------------------------------------------------
# Small pieces used above


def _end_training(accelerator) -> None:
    """Tear the engine down, then the process group, while the interpreter is fully alive.

    ``free_memory`` destroys a DeepSpeed engine (ZeRO-3's parameter hooks and gather handles) and drops the
    accelerator's references; without it those objects outlived ``destroy_process_group`` and were torn down during
    interpreter finalization, where a ZeRO-3 rank on gloo once aborted ("terminate called without an active exception").
    """
    accelerator.wait_for_everyone()
    accelerator.free_memory()
    accelerator.end_training()  # trackers, then destroy_process_group


def _tracker_available(name: str) -> bool:
    import importlib.util

    module = {"tensorboard": "tensorboard", "wandb": "wandb"}[name]
    if importlib.util.find_spec(module) is None:
        logger.warning("tracker %s requested but not installed; skipping it", name)
        return False
    return True


def _flat_config(recipe: Recipe) -> dict[str, Any]:
    flat = {}
    for section, values in recipe.to_dict().items():
        for key, value in values.items():
            flat[f"{section}.{key}"] = value if isinstance(value, (int, float, str, bool)) else str(value)
    return flat


def _run_files(recipe: Recipe, label_names: list[str], metrics: dict, history: Optional[list] = None) -> dict[str, str | bytes]:
    """Files saved beside every adapter: recipe, labels, metrics, model card; with a history, it and its learning curve."""
    from lora_train.card import PLOT_NAME, model_card
    from lora_train.plots import learning_curve_png

    files: dict[str, str | bytes] = {
        "recipe.yaml": recipe_to_yaml(recipe),
        "labels.json": json.dumps({"id2label": dict(enumerate(label_names))}, indent=1),
        "metrics.json": json.dumps(metrics, indent=1),
        "README.md": model_card(recipe, metrics, plot=PLOT_NAME if history is not None else None),
    }
    if history is not None:
        files["history.json"] = json.dumps(history, indent=1)
        nf4 = " on an NF4 base" if recipe.quantization.method == "nf4" else ""
        files[PLOT_NAME] = learning_curve_png(history, f"{Path(recipe.output.output_dir).name} ({recipe.peft.method}{nf4})")
    return files


def _push_final(pusher: "hub.HubPusher", out: Path, step: int) -> None:
    """Push the final run directory; a failure leaves the saved run intact and says how to retry."""
    try:
        pusher.push_directory(out, f"lora_train: final adapter, step {step}")
    except Exception as err:  # noqa: BLE001 - network / HTTP errors of any kind
        raise TrainingError(f"training finished and {out} is saved, but the push to {pusher.repo_id} failed"
                            f" ({type(err).__name__}: {err}). Retry with: python scripts/push_to_hub.py {out} {pusher.repo_id}") from None


def _last_good(checkpoints_root: Path) -> str:
    """Where a run stopped by a non-finite value can restart from, and what to change."""
    kept = ckpt.list_checkpoints(checkpoints_root)
    where = f"The last good checkpoint is kept: {kept[-1]}." if kept else "No checkpoint had been saved yet."
    return where + " Lower training.learning_rate (or raise training.warmup_ratio), or check the data for broken rows."


def _adalora_state(unwrapped) -> tuple[dict[str, torch.Tensor], dict]:
    """AdaLoRA's rank allocator: importance EMAs as named tensors, and the rank pattern once the budget is final
    (peft masks with it in the last ``tfinal`` steps, so a resume there needs it)."""
    allocator = unwrapped.base_model.rankallocator
    tensors = {}
    for kind in ("ipt", "exp_avg_ipt", "exp_avg_unc"):
        for name, value in getattr(allocator, kind).items():
            tensors[f"{kind}::{name}"] = value
    config = unwrapped.peft_config[unwrapped.base_model.trainable_adapter_name]
    return tensors, {"rank_pattern": config.rank_pattern}


def _load_adalora(unwrapped, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    allocator = unwrapped.base_model.rankallocator
    for key, value in tensors.items():
        kind, name = key.split("::", 1)
        getattr(allocator, kind)[name] = value.to(unwrapped.device)
    unwrapped.peft_config[unwrapped.base_model.trainable_adapter_name].rank_pattern = meta.get("rank_pattern")


class _StopFlag:
    """SIGTERM / SIGINT request a checkpoint and a clean exit at the next optimizer step."""

    def __init__(self) -> None:
        self.signal_name: Optional[str] = None
        self._previous: dict[int, Any] = {}

    def install(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread
                pass

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum, _frame) -> None:
        if self.signal_name is not None:  # a second signal: stop now, as if we had not caught it
            self.uninstall()
            signal.raise_signal(signum)
            return
        self.signal_name = signal.Signals(signum).name
        logger.warning("%s received: saving a checkpoint and stopping after this optimizer step (send it again to stop"
                       " at once, without a checkpoint)", self.signal_name)

    def agreed(self, accelerator) -> bool:
        """True on every process once any process was signalled (so all stop at the same step)."""
        flag = self.signal_name is not None
        if accelerator.num_processes == 1:
            return flag
        total = accelerator.reduce(torch.tensor(float(flag), device=accelerator.device), reduction="sum")
        if total.item() > 0 and self.signal_name is None:
            self.signal_name = "a signal to another process"
        return bool(total.item() > 0)
