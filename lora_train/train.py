"""The training loop: one explicit Accelerate loop for CPU, one GPU, DDP, DeepSpeed and FSDP.

Read it top to bottom: :func:`train` is setup, the loop and the final save. :func:`setup` runs the checks and
builds the run's parts (data, model, optimizer, schedule) once; :func:`fit` is the loop (accumulate, clip, step,
log, evaluate, checkpoint); :func:`finish` evaluates, saves and pushes the final adapter.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch
from torch.utils.data import DataLoader

from lora_train import checkpoint as ckpt
from lora_train import distributed as dist
from lora_train import hub
from lora_train.build import TaskData, build_classifier, load_task_data
from lora_train.config import Recipe, RecipeError, build_recipe, recipe_to_yaml
from lora_train.data import CARVE_FILE, Carve, EpochSampler, padding_collator, steps_per_epoch, tokenize
from lora_train.machine import hardware_summary, native_bf16
from lora_train.metrics import evaluate, peak_memory_mb
from lora_train.modeling import (
    ParamCount,
    check_method_runs,
    check_target_modules,
    count_parameters,
    load_model_config,
    load_tokenizer,
    meta_model,
    use_fast_dropout,
)
from lora_train.optim import param_groups
from lora_train.run_lock import LOCK_FILE, is_launch_main_process, run_lock

logger = logging.getLogger("lora_train")
_IMPORTED = time.perf_counter()


class TrainingError(RuntimeError):
    """The run cannot continue (non-finite loss, incompatible checkpoint...)."""


class TrainingInterrupted(KeyboardInterrupt):
    """Raised by :func:`train` once a SIGTERM / SIGINT stopped the run and its checkpoint is saved.

    A stopped run used to return ``{"interrupted": True}`` like a finished one, so an in-process caller went on as if
    it had finished: a test suite stopped by ``timeout`` (SIGTERM) under load carried on, and the test that was
    training failed reading a ``history.json`` that only the final save writes. As a KeyboardInterrupt it stops
    notebooks and test runners the way the signal asked; the command line catches it and exits 0 (docs/checkpoints.md).
    """

    def __init__(self, signal_name: str, step: int):
        super().__init__(
            f"stopped by {signal_name} at step {step}; checkpoint saved. Resume with"
            " training.resume_from_checkpoint=latest"
        )
        self.signal_name, self.step = signal_name, step


@dataclass
class LoopState:
    """Counters and history saved with every checkpoint."""

    global_step: int = 0
    epoch: int = 0
    batches_in_epoch: int = 0
    best_metric: Optional[float] = None
    best_step: Optional[int] = None
    history: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class Run:
    """The parts of one training run, built once by :func:`setup` and read by the loop."""

    recipe: Recipe
    out: Path
    accelerator: Any
    launch: dist.Launch
    tokenizer: Any
    label_names: list[str]
    carve: Optional[Carve]
    """The validation rows carved out of train, when the data had no evaluation split (saved as data_split.json)."""
    train_loader: DataLoader
    eval_loader: DataLoader
    model: torch.nn.Module
    """As prepared by Accelerate (DDP / engine-wrapped); :attr:`unwrapped` is the PEFT or transformers model."""
    optimizer: Any
    scheduler: Any
    total_steps: int
    updates_per_epoch: int
    params: ParamCount
    pusher: Optional[hub.HubPusher]
    last_eval: dict[str, Any] = field(default_factory=dict)
    """``{"step", "report"}`` of the newest evaluation (the model card of a pushed checkpoint quotes it)."""
    startup: dict[str, float] = field(default_factory=dict)
    """Where the seconds before the first step went (:func:`process_seconds` at each phase's end)."""

    @property
    def unwrapped(self) -> torch.nn.Module:
        return self.accelerator.unwrap_model(self.model)

    @property
    def checkpoints_root(self) -> Path:
        return self.out / "checkpoints"

    @property
    def is_adalora(self) -> bool:
        return self.recipe.peft.method == "adalora"

    @property
    def global_batch(self) -> int:
        t = self.recipe.training
        return t.per_device_train_batch_size * t.gradient_accumulation_steps * self.accelerator.num_processes


@dataclass
class Session:
    """What one call of :func:`fit` did (a resumed run's session starts at its checkpoint's step)."""

    interrupted: bool
    first_step: int
    seconds: float
    samples_this_process: torch.Tensor


# ---------------------------------------------------------------------------------------------
# The run


def train(recipe: Recipe) -> dict[str, Any]:
    """Train, evaluate and save the recipe; return the final metrics. A SIGTERM / SIGINT during the loop saves a
    checkpoint and raises :class:`TrainingInterrupted`."""
    out = check_output_dir(recipe)
    # One run per directory: the main process holds its lock, and a second run into it is refused at once.
    with run_lock(out) if is_launch_main_process() else contextlib.nullcontext():
        run, state = setup(recipe, out)
        stop = _StopFlag()
        stop.install()
        try:
            session = fit(run, state, stop)
        finally:
            stop.uninstall()
        if session.interrupted:
            interrupted = TrainingInterrupted(stop.signal_name, state.global_step)
            logger.warning("%s", interrupted)
            _end_training(run.accelerator)
            raise interrupted
        return finish(run, state, session)


def fit(run: Run, state: LoopState, stop: "_StopFlag") -> Session:
    """The optimisation loop, from ``state`` to ``total_steps`` or a stop signal."""
    accelerator, model, t = run.accelerator, run.model, run.recipe.training
    per_process_batches, first_step = len(run.train_loader), state.global_step
    window = LogWindow(accelerator.device)
    progress = _progress_bar(run, state)
    model.train()
    interrupted = False
    while state.global_step < run.total_steps and not interrupted:
        # Accelerate's loader re-sets the sampler's epoch from its own counter at every iteration start.
        run.train_loader.set_epoch(state.epoch)
        loader = run.train_loader
        if state.batches_in_epoch:
            loader = accelerator.skip_first_batches(run.train_loader, state.batches_in_epoch)
        for batch in loader:
            with accelerator.accumulate(model):
                outputs = model(**batch)
                accelerator.backward(outputs.loss)
                window.add_micro_batch(outputs.loss, batch)
                if accelerator.sync_gradients:
                    if t.max_grad_norm > 0:
                        accelerator.clip_grad_norm_(model.parameters(), t.max_grad_norm)
                    run.optimizer.step()
                    run.scheduler.step()
                    if run.is_adalora:
                        run.unwrapped.base_model.update_and_allocate(state.global_step)
                    run.optimizer.zero_grad(set_to_none=True)
            state.batches_in_epoch += 1
            if not accelerator.sync_gradients:
                continue
            state.global_step += 1
            if not run.startup.get("first_step_s"):
                run.startup["first_step_s"] = process_seconds()  # torch.compile compiles in the first steps
            window.end_step(state.global_step)
            progress.update(1)

            end_of_epoch = state.batches_in_epoch >= per_process_batches
            if end_of_epoch:
                state.epoch, state.batches_in_epoch = state.epoch + 1, 0
            last = state.global_step >= run.total_steps
            due_eval = (
                (t.eval_steps and state.global_step % t.eval_steps == 0) or (not t.eval_steps and end_of_epoch) or last
            )
            due_save = (t.save_steps and state.global_step % t.save_steps == 0) or (not t.save_steps and end_of_epoch)
            interrupted = stop.agreed(accelerator)
            if state.global_step % t.logging_steps == 0 or due_eval or due_save or last or interrupted:
                entry = window.flush(run, state)
                if entry:
                    progress.set_postfix(loss=f"{entry['loss']:.4f}", lr=f"{entry['learning_rate']:.2e}")
            if due_eval:
                evaluate_and_keep_best(run, state)
            if due_save or interrupted:
                save_checkpoint(run, state)
            if due_eval or due_save:
                window.restart()  # samples/s of the next window: training only, not this evaluation or save
            if last or interrupted or end_of_epoch:
                break
    progress.close()
    return Session(interrupted, first_step, time.perf_counter() - window.train_start, window.samples_this_process)


def finish(run: Run, state: LoopState, session: Session) -> dict[str, Any]:
    """Final evaluation (reused when the loop just ran it), metrics, the saved run directory and the push."""
    accelerator = run.accelerator
    report = (
        run.last_eval["report"]
        if run.last_eval.get("step") == state.global_step
        else evaluate_and_keep_best(run, state)
    )
    metrics = final_metrics(run, state, session, report)
    weights = dist.full_state_dict(accelerator, run.model, run.launch)  # every process: gathers ZeRO-3 / FSDP shards
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        files = _run_files(run.recipe, run.label_names, metrics, state.history, run.carve)
        with ckpt.report_full_disk(f"the final adapter into {run.out}", run.checkpoints_root):
            ckpt.save_final(run.out, run.unwrapped, run.tokenizer, files, weights)
        logger.info(
            "final: accuracy %.4f | macro-F1 %.4f | saved to %s",
            metrics["eval_accuracy"],
            metrics["eval_macro_f1"],
            run.out,
        )
        logger.info(
            "seconds since the process started: %s; final evaluation and save done at %.1f",
            ", ".join(f"{k[:-2]} {v:.1f}" for k, v in run.startup.items()),
            process_seconds(),
        )
    accelerator.wait_for_everyone()
    if run.pusher is not None:
        _push_final(run.pusher, run.out, state.global_step)
    _end_training(accelerator)
    return metrics


# ---------------------------------------------------------------------------------------------
# Setup


def setup(recipe: Recipe, out: Path) -> tuple[Run, LoopState]:
    """Checks first (seconds, before data or weights), then data, model, optimizer and schedule; resume last.
    ``out`` is the output directory :func:`check_output_dir` accepted."""
    recipe, precision_note = fp16_on_gpus_without_bf16(recipe, native_bf16())
    t = recipe.training
    startup = {"imports_s": process_seconds()}  # the interpreter, imports and recipe checks before setup
    check_model_fits(recipe, load_model_config(recipe))  # config.json only: seconds, before any weights or data
    resume_dir = ckpt.resolve_resume(t.resume_from_checkpoint, out / "checkpoints")
    saved = json.loads((resume_dir / "state.json").read_text()) if resume_dir is not None else None
    if saved is not None:
        ckpt.check_resume_compatible(recipe.to_dict(), saved["recipe"])

    from accelerate import Accelerator  # heavy imports (peft, bitsandbytes) only once the checks passed
    from accelerate.utils import set_seed
    from transformers import get_scheduler

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
    if precision_note:
        logger.warning("%s", precision_note)
    if accelerator.is_main_process:
        ckpt.restore_interrupted_replace(out / "best")  # a kill while the last run replaced best/
    pusher = hub.pusher_for(recipe) if accelerator.is_main_process else None  # repo and token checked before any work
    set_seed(t.seed)

    startup["accelerate_s"] = process_seconds()
    tokenizer = load_tokenizer(recipe)
    saved_carve = out / CARVE_FILE
    carve = Carve.read(saved_carve) if resume_dir is not None and saved_carve.is_file() else None
    data = load_task_data(recipe, accelerator.main_process_first, carve)  # cheap data and label checks before the model
    # The text column found in the data is written into the run's recipe: predict, eval and serving read it there.
    recipe = dataclasses.replace(recipe, data=dataclasses.replace(recipe.data, text_column=data.spec.text_column))
    train_loader, eval_loader = make_loaders(recipe, data, tokenizer, accelerator)
    startup["data_s"] = process_seconds()
    updates_per_epoch = steps_per_epoch(len(train_loader), t.gradient_accumulation_steps)
    total_steps = t.max_steps if t.max_steps > 0 else math.ceil(t.num_epochs * updates_per_epoch)

    # NF4 weights are quantized where they load; everything else is placed by accelerator.prepare.
    device = accelerator.device if recipe.quantization.is_4bit else None
    model = build_classifier(recipe, data.label_names, tokenizer, device, total_steps)
    if accelerator.device.type == "cpu":
        use_fast_dropout(model)  # bernoulli_ is slow on CPU; CUDA's fused dropout is not
    params = count_parameters(model)
    optimizer = build_optimizer(model, recipe, accelerator.device)
    scheduler = get_scheduler(
        t.lr_scheduler if t.lr_scheduler != "constant" else "constant_with_warmup",
        optimizer,
        num_warmup_steps=int(t.warmup_ratio * total_steps),
        num_training_steps=total_steps,
    )
    model, optimizer = accelerator.prepare(model, optimizer)
    if t.torch_compile:
        model = torch.compile(model)
    startup["model_s"] = process_seconds()
    run = Run(
        recipe,
        out,
        accelerator,
        launch,
        tokenizer,
        data.label_names,
        data.carve,
        train_loader,
        eval_loader,
        model,
        optimizer,
        scheduler,
        total_steps,
        updates_per_epoch,
        params,
        pusher,
        startup=startup,
    )
    _log_plan(run, data)
    state = restore(run, resume_dir, saved) if resume_dir is not None else LoopState()
    if resume_dir is None and t.resume_from_checkpoint == "latest":
        logger.info("no checkpoint in %s yet: starting from scratch", run.checkpoints_root)

    if accelerator.is_main_process:
        if recipe.output.overwrite_output_dir and t.resume_from_checkpoint is None:
            ckpt.clear_training_state(out)  # or 'latest' could later resume the overwritten run
        ckpt.atomic_write_text(out / "recipe.yaml", recipe_to_yaml(recipe))
        if data.carve is not None:
            ckpt.atomic_write_text(saved_carve, data.carve.to_json())
    if trackers:
        accelerator.init_trackers("lora_train", config=_flat_config(recipe))
    return run, state


def fp16_on_gpus_without_bf16(recipe: Recipe, native_bf16: bool) -> tuple[Recipe, Optional[str]]:
    """The recipe this device trains, and a note when it differs: a bf16 recipe on a GPU without native bfloat16
    (before Ampere: T4, V100) trains in fp16, which those GPUs run at full speed; bf16 would run there emulated,
    slowly. recipe.yaml saves what ran.

    With a 4-bit base the 4-bit compute and the bfloat16 weights become float16 too: peft's kbit preparation keeps
    every trained parameter in float32 there. Without one, bfloat16 weights stay: trained parameters in float16 would
    stop fp16's gradient scaler ("Attempting to unscale FP16 gradients"), and autocast runs the matmuls in fp16."""
    if native_bf16 or recipe.training.mixed_precision != "bf16":
        return recipe, None
    switched = ["training.mixed_precision=fp16"]
    q = recipe.quantization
    if q.is_4bit:
        switched += ["model.dtype=float16"] if recipe.model.dtype == "bfloat16" else []
        switched += [
            f"quantization.{name}=float16"
            for name in ("compute_dtype", "quant_storage_dtype")
            if getattr(q, name) == "bfloat16"
        ]
    note = (
        "this GPU has no native bfloat16 (NVIDIA before Ampere, e.g. T4 or V100: it would emulate bf16, slowly), so"
        f" this run trains in fp16: {' '.join(switched)} (saved in recipe.yaml). fp16 has a narrower range; a"
        " non-finite loss stops the run and names the step"
    )
    return build_recipe(recipe.to_dict(), switched), note


def make_loaders(recipe: Recipe, data: TaskData, tokenizer, accelerator) -> tuple[DataLoader, DataLoader]:
    """Tokenize once; batch dynamically (length-grouped training batches); both loaders prepared by Accelerate."""
    t = recipe.training
    with accelerator.main_process_first():
        d = recipe.data
        train_ds = tokenize(data.train, tokenizer, data.spec, d.max_length, d.truncation)
        eval_ds = tokenize(data.eval, tokenizer, data.spec, d.max_length, d.truncation)
    lengths = train_ds["length"]
    train_ds, eval_ds = train_ds.remove_columns("length"), eval_ds.remove_columns("length")
    collator = padding_collator(tokenizer, recipe.data.max_length, accelerator.device.type, t.mixed_precision)
    global_batch = t.per_device_train_batch_size * accelerator.num_processes
    sampler = EpochSampler(lengths, global_batch, t.seed, recipe.data.group_by_length)
    common = dict(
        collate_fn=collator, num_workers=recipe.data.num_workers, pin_memory=accelerator.device.type == "cuda"
    )
    # Own generators: a DataLoader draws a worker seed from its generator (else from the global RNG that dropout
    # uses) at every iteration start, so a resumed run's fresh iterator would shift dropout masks.
    train_loader = DataLoader(
        train_ds,
        batch_size=t.per_device_train_batch_size,
        sampler=sampler,
        generator=torch.Generator().manual_seed(t.seed),
        **common,
    )
    eval_loader = DataLoader(
        eval_ds, batch_size=t.per_device_eval_batch_size, generator=torch.Generator().manual_seed(t.seed), **common
    )
    return accelerator.prepare(train_loader, eval_loader)


def restore(run: Run, resume_dir: Path, saved: dict[str, Any]) -> LoopState:
    """Load a checkpoint's weights, optimizer, scheduler, RNGs (and AdaLoRA allocator); return its loop state."""
    dist.check_resume_launch(saved, run.launch)
    if run.launch.engine_owns_optimizer:
        loaded = dist.load_engine_state(run.accelerator, resume_dir, run.scheduler, run.launch)
    else:
        base_optimizer = getattr(run.optimizer, "optimizer", run.optimizer)  # the torch optimizer inside Accelerate's
        loaded = ckpt.load_training_state(
            resume_dir, run.unwrapped, base_optimizer, run.scheduler, run.accelerator.process_index
        )
    state = LoopState(**loaded["loop"])
    if run.is_adalora:
        ckpt.load_adalora_state(run.unwrapped, loaded["extra_tensors"], loaded.get("adalora") or {})
    logger.info(
        "resumed from %s at step %d (epoch %d, batch %d)",
        resume_dir,
        state.global_step,
        state.epoch,
        state.batches_in_epoch,
    )
    return state


# ---------------------------------------------------------------------------------------------
# What the loop calls


class LogWindow:
    """Step losses not yet copied to the host, and the samples and tokens of the current logging window.

    Losses stay on the device until a log line is due, so a step does not wait for the device.
    """

    def __init__(self, device: torch.device):
        self.device = device
        self.pending: list[tuple[int, torch.Tensor]] = []  # (step, mean loss of its micro-batches)
        self.micro_losses: list[torch.Tensor] = []
        self.samples = torch.zeros((), device=device)
        self.tokens = torch.zeros((), device=device)
        self.padded_tokens = torch.zeros((), device=device)
        self.samples_this_process = torch.zeros(1, device=device)  # reported per process: shows every rank trained
        self.start = self.train_start = time.perf_counter()

    def add_micro_batch(self, loss: torch.Tensor, batch: dict[str, torch.Tensor]) -> None:
        self.micro_losses.append(loss.detach().float())
        self.samples += batch["labels"].numel()
        self.samples_this_process += batch["labels"].numel()
        self.tokens += batch["attention_mask"].sum()
        self.padded_tokens += batch["attention_mask"].numel()

    def end_step(self, step: int) -> None:
        self.pending.append((step, torch.stack(self.micro_losses).mean()))
        self.micro_losses.clear()

    def restart(self) -> None:
        self.start = time.perf_counter()

    def flush(self, run: Run, state: LoopState) -> Optional[dict[str, Any]]:
        """Copy pending losses to the host in one sync, refuse non-finite ones, log and return the window's entry."""
        if not self.pending:
            return None
        accelerator = run.accelerator
        losses = accelerator.reduce(torch.stack([loss for _, loss in self.pending]), reduction="mean").tolist()
        for (step, _), value in zip(self.pending, losses):
            if not math.isfinite(value):
                raise TrainingError(
                    f"loss became {value} at optimizer step {step}; stopping. {_last_good(run.checkpoints_root)}"
                )
        elapsed = time.perf_counter() - self.start
        totals = torch.stack([self.samples, self.tokens, self.padded_tokens])
        samples, tokens, padded = accelerator.reduce(totals, reduction="sum").tolist()
        entry = {
            "step": self.pending[-1][0],
            "loss": sum(losses) / len(losses),
            "learning_rate": run.scheduler.get_last_lr()[0],
            "samples_per_s": samples / elapsed,
            "tokens_per_s": tokens / elapsed,
            "window_s": elapsed,
            "window_samples": int(samples),
            "window_tokens": int(tokens),
            "window_padded_tokens": int(padded),
            "padding_share": 1 - tokens / padded if padded else 0.0,
            "peak_memory_mb": peak_memory_mb(accelerator.device),
            "step_losses": losses,
        }
        state.history.append(entry)
        accelerator.log({k: v for k, v in entry.items() if k != "step_losses"}, step=entry["step"])
        self.pending.clear()
        self.samples.zero_()
        self.tokens.zero_()
        self.padded_tokens.zero_()
        self.restart()
        return entry


def evaluate_and_keep_best(run: Run, state: LoopState) -> dict[str, Any]:
    """Evaluate, log and record the report; save ``best/`` when the accuracy improved."""
    report = evaluate(run.model, run.eval_loader, run.accelerator, len(run.label_names), run.label_names)
    entry = {
        "step": state.global_step,
        "eval_loss": report["loss"],
        "eval_accuracy": report["accuracy"],
        "eval_macro_f1": report["macro_f1"],
    }
    state.history.append(entry)
    run.accelerator.log(entry, step=state.global_step)
    logger.info(
        "step %d | eval loss %.4f | accuracy %.4f | macro-F1 %.4f",
        state.global_step,
        report["loss"],
        report["accuracy"],
        report["macro_f1"],
    )
    run.last_eval.update(step=state.global_step, report=report)
    if run.accelerator.is_main_process:  # kept current, so a watcher (e.g. a sweep's pruner) sees every evaluation
        ckpt.atomic_write_text(run.out / "history.json", json.dumps(state.history, indent=1))
    if state.best_metric is None or report["accuracy"] > state.best_metric:
        state.best_metric, state.best_step = report["accuracy"], state.global_step
        weights = dist.full_state_dict(run.accelerator, run.model, run.launch)  # every process: gathers shards
        if run.accelerator.is_main_process:
            files = _run_files(run.recipe, run.label_names, {"step": state.global_step, **report}, carve=run.carve)
            with ckpt.report_full_disk(f"the best adapter {run.out / 'best'}", run.checkpoints_root):
                ckpt.atomic_directory(
                    run.out / "best", lambda d: ckpt.save_model_dir(d, run.unwrapped, run.tokenizer, files, weights)
                )
    return report


def save_checkpoint(run: Run, state: LoopState) -> None:
    """Write a resumable checkpoint (every process its shard under DeepSpeed / FSDP), rotate old ones, push if asked."""
    accelerator, recipe = run.accelerator, run.recipe
    accelerator.wait_for_everyone()
    path = run.checkpoints_root / ckpt.checkpoint_name(state.global_step)
    bad = ckpt.non_finite(run.unwrapped)
    if bad:  # keep the last good checkpoint rather than save a broken one
        raise TrainingError(
            f"parameters {bad[:3]} became non-finite at optimizer step {state.global_step}; stopping"
            f" without saving. {_last_good(run.checkpoints_root)}"
        )
    extra, adalora_meta = ckpt.adalora_state(run.unwrapped) if run.is_adalora else (None, None)
    saved_state = {
        "loop": state.__dict__,
        "recipe": recipe.to_dict(),
        "num_processes": accelerator.num_processes,
        "adalora": adalora_meta,
    }
    if run.launch.engine_owns_optimizer:
        dist.save_engine_state(accelerator, path, saved_state, run.scheduler, run.launch)
    else:
        rng_states = dist.every_process_rng_state(accelerator)  # every process: its dropout stream is its own
        if accelerator.is_main_process:
            base_optimizer = getattr(run.optimizer, "optimizer", run.optimizer)
            ckpt.save_training_state(path, run.unwrapped, base_optimizer, run.scheduler, saved_state, extra, rng_states)
    if accelerator.is_main_process:
        ckpt.rotate_checkpoints(run.checkpoints_root, recipe.training.keep_last)
        logger.info("saved checkpoint %s", path)
        if run.pusher is not None and recipe.output.push_checkpoints:
            card_metrics = {
                "global_step": state.global_step,
                "step": run.last_eval.get("step"),
                **run.last_eval.get("report", {}),
            }
            files = _run_files(recipe, run.label_names, card_metrics, state.history, run.carve)
            run.pusher.push_in_background(
                lambda d: ckpt.save_model_dir(d, run.unwrapped, run.tokenizer, files),
                f"lora_train: adapter at step {state.global_step}",
            )
    accelerator.wait_for_everyone()


def final_metrics(run: Run, state: LoopState, session: "Session", report: dict[str, Any]) -> dict[str, Any]:
    """What ``metrics.json``, the model card and the command line report at the end of a run."""
    accelerator, params = run.accelerator, run.params
    return {
        "eval_accuracy": report["accuracy"],
        "eval_macro_f1": report["macro_f1"],
        "eval_loss": report["loss"],
        "eval_samples": report["num_samples"],
        "per_class": report["per_class"],
        "confusion_matrix": report["confusion_matrix"],
        "best_eval_accuracy": state.best_metric,
        "best_step": state.best_step,
        "global_step": state.global_step,
        "epochs": state.global_step / run.updates_per_epoch,
        "train_seconds_this_session": session.seconds,
        "train_steps_per_s": (state.global_step - session.first_step) / max(session.seconds, 1e-9),
        "peak_memory_mb": peak_memory_mb(accelerator.device),
        "trainable_params": params.trainable,
        "total_params": params.total,
        "trainable_percent": params.percent,
        "num_processes": accelerator.num_processes,
        "global_batch_size": run.global_batch,
        "train_samples_per_process": [int(n) for n in accelerator.gather(session.samples_this_process).tolist()],
        "device": str(accelerator.device),
        "label_names": run.label_names,
        "hardware": hardware_summary(accelerator.device, accelerator.num_processes),
        "resumed_from_step": session.first_step,
        "startup_seconds": run.startup,
    }


def process_seconds() -> float:
    """Seconds since this process started (Linux: /proc; elsewhere since this module was imported)."""
    try:
        start_ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
        uptime = float(Path("/proc/uptime").read_text().split()[0])
        return uptime - start_ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return time.perf_counter() - _IMPORTED


def _progress_bar(run: Run, state: LoopState):
    from lora_train.progress import progress_bar

    return progress_bar(
        total=run.total_steps, initial=state.global_step, disable=not run.accelerator.is_main_process, desc="train"
    )


def _log_plan(run: Run, data: TaskData) -> None:
    t, accelerator = run.recipe.training, run.accelerator
    logger.info("%s", run.params)
    logger.info(
        "examples: train %d, eval %d | %s, processes %d | global batch %d (= %d per device x %d accumulation"
        " x %d; learning rate %.2e applies to it, not scaled with processes) | %d optimizer steps over %d"
        " epoch(s)",
        len(data.train),
        len(data.eval),
        run.launch.name,
        accelerator.num_processes,
        run.global_batch,
        t.per_device_train_batch_size,
        t.gradient_accumulation_steps,
        accelerator.num_processes,
        t.learning_rate,
        run.total_steps,
        math.ceil(run.total_steps / run.updates_per_epoch),
    )


# ---------------------------------------------------------------------------------------------
# Checks and small pieces


def setup_logging(is_main: bool) -> None:
    """Readable logs on the main process; warnings only elsewhere."""
    logging.basicConfig(
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        level=logging.INFO if is_main else logging.WARNING,
        force=True,
    )
    import datasets
    import transformers

    if not is_main:
        datasets.utils.logging.set_verbosity_error()
        transformers.utils.logging.set_verbosity_error()
    else:
        transformers.utils.logging.set_verbosity_warning()


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
    """Checks that need only config.json and file names: sequence length, target modules (model built on 'meta'),
    safetensors weights for a local model, and bitsandbytes kernels that run when NF4 is asked."""
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
    local = Path(recipe.model.name_or_path)
    if local.is_dir() and not any(local.glob("*.safetensors")):
        pickled = sorted(p.name for p in local.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt"))
        raise RecipeError(
            [
                f"model.name_or_path '{local}' holds no .safetensors weights{f' (only {pickled})' if pickled else ''};"
                " pickle checkpoints are never loaded. Convert it once in a trusted environment:"
                " AutoModel.from_pretrained(dir).save_pretrained(dir, safe_serialization=True)"
            ]
        )
    if recipe.quantization.is_4bit:
        device = "cuda" if torch.cuda.is_available() else "cpu"
        try:  # a 64x64 round trip: installed is not enough, its kernels must run on this device
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


def build_optimizer(model: torch.nn.Module, recipe: Recipe, device: torch.device) -> torch.optim.Optimizer:
    """AdamW without weight decay on biases and norms, with layer-wise learning rates when training.layer_lr_decay < 1;
    fused (one kernel for all tensors) on CUDA and CPU."""
    t = recipe.training
    groups = param_groups(model, t.weight_decay, t.learning_rate, t.layer_lr_decay)
    return torch.optim.AdamW(groups, lr=t.learning_rate, fused=device.type in ("cuda", "cpu"))


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


def _run_files(
    recipe: Recipe,
    label_names: list[str],
    metrics: dict,
    history: Optional[list] = None,
    carve: Optional[Carve] = None,
) -> dict[str, str | bytes]:
    """Files saved beside every adapter: recipe, labels, metrics, model card, the carved validation rows;
    with a history, it and its learning curve."""
    from lora_train.card import PLOT_NAME, model_card
    from lora_train.plots import learning_curve_png

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


def _push_final(pusher: "hub.HubPusher", out: Path, step: int) -> None:
    """Push the final run directory; a failure leaves the saved run intact and says how to retry."""
    try:
        pusher.push_directory(out, f"lora_train: final adapter, step {step}")
    except Exception as err:  # noqa: BLE001 - network / HTTP errors of any kind
        raise TrainingError(
            f"training finished and {out} is saved, but the push to {pusher.repo_id} failed"
            f" ({type(err).__name__}: {err}). Retry with: python scripts/push_to_hub.py {out} {pusher.repo_id}"
        ) from None


def _last_good(checkpoints_root: Path) -> str:
    """Where a run stopped by a non-finite value can restart from, and what to change."""
    kept = ckpt.list_checkpoints(checkpoints_root)
    where = f"The last good checkpoint is kept: {kept[-1]}." if kept else "No checkpoint had been saved yet."
    return where + " Lower training.learning_rate (or raise training.warmup_ratio), or check the data for broken rows."


class _StopFlag:
    """SIGTERM / SIGINT request a checkpoint and a clean exit at the next optimizer step.

    Launchers forward the signal they receive (torchrun's agent, srun, accelerate launch), and Slurm signals every
    process of a step, so one request often arrives twice within milliseconds: a repeat within
    ``DUPLICATE_WINDOW_S`` is the same request. A later second signal stops at once, without a checkpoint."""

    DUPLICATE_WINDOW_S = 2.0

    def __init__(self) -> None:
        self.signal_name: Optional[str] = None
        self._first_at = 0.0
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
        if self.signal_name is not None:
            if time.monotonic() - self._first_at < self.DUPLICATE_WINDOW_S:
                return  # the launcher forwarding the same request
            self.uninstall()  # a second request: stop now, as if we had not caught it
            signal.raise_signal(signum)
            return
        self.signal_name = signal.Signals(signum).name
        self._first_at = time.monotonic()
        logger.warning(
            "%s received: saving a checkpoint and stopping after this optimizer step (send it again after %.0f s"
            " to stop at once, without a checkpoint)",
            self.signal_name,
            self.DUPLICATE_WINDOW_S,
        )

    def agreed(self, accelerator) -> bool:
        """True on every process once any process was signalled (so all stop at the same step)."""
        flag = self.signal_name is not None
        if accelerator.num_processes == 1:
            return flag
        total = accelerator.reduce(torch.tensor(float(flag), device=accelerator.device), reduction="sum")
        if total.item() > 0 and self.signal_name is None:
            self.signal_name = "a signal to another process"
        return bool(total.item() > 0)
