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
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from torch.utils.data import DataLoader

from lora_train import checkpoint as ckpt
from lora_train import distributed as dist
from lora_train import hub
from lora_train.build import TaskData, build_classifier, load_task_data
from lora_train.config import Recipe, build_recipe, recipe_to_yaml
from lora_train.data import (
    CARVE_FILE,
    Carve,
    EpochSampler,
    longest_first,
    padding_collator,
    steps_per_epoch,
    tokenize,
)
from lora_train.machine import hardware_summary, native_bf16
from lora_train.metrics import evaluate, peak_memory_mb
from lora_train.modeling import (
    ParamCount,
    autocast_dtype,
    count_parameters,
    keep_lora_inputs_uncast,
    load_model_config,
    load_tokenizer,
    store_frozen_linears_in,
    use_fast_dropout,
    use_fused_lora,
)
from lora_train.optim import param_groups
from lora_train.preflight import check_model_fits, check_output_dir
from lora_train.progress import progress_bar
from lora_train.run_files import run_files
from lora_train.run_lock import is_launch_main_process, run_lock
from lora_train.savers import CheckpointSaver, checkpoint_saver
from lora_train.startup import configure_logging
from lora_train.stop_signal import StopFlag

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


@dataclass(kw_only=True)
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
    saver: CheckpointSaver
    """Writes and restores resumable checkpoints the way this launch needs (:mod:`lora_train.savers`)."""
    last_eval: dict[str, Any] = field(default_factory=dict)
    """``{"step", "report"}`` of the newest evaluation (the model card of a pushed checkpoint quotes it)."""
    startup: dict[str, float] = field(default_factory=dict)
    """Where the seconds before the first step went (:func:`process_seconds` at each phase's end)."""

    @property
    def unwrapped(self) -> torch.nn.Module:
        return self.accelerator.unwrap_model(self.model)

    def model_writer(self, files: dict[str, str | bytes], weights: Optional[dict] = None) -> Callable[[Path], None]:
        """``write(directory)``: the model as its method keeps it (adapter, trained tensors or all), the tokenizer and
        ``files``; ``weights`` are the gathered ones when sharded."""
        saves = self.recipe.peft.spec.saves
        return lambda d: ckpt.save_model_dir(d, self.unwrapped, self.tokenizer, files, weights, saves)

    @property
    def checkpoints_root(self) -> Path:
        return self.out / "checkpoints"

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
        stop = StopFlag()
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


def fit(run: Run, state: LoopState, stop: StopFlag) -> Session:
    """The optimisation loop, from ``state`` to ``total_steps`` or a stop signal."""
    from accelerate import DistributedType

    accelerator, model, t = run.accelerator, run.model, run.recipe.training
    per_process_batches, first_step = len(run.train_loader), state.global_step
    window = LogWindow(accelerator.device)
    step_hook = run.recipe.peft.spec.step_hook  # e.g. AdaLoRA's rank allocation
    progress = _progress_bar(run, state)
    # What clipping walks: the parameters that train (walking every module's at each step cost about 1 ms of a
    # MiniLM step on a CPU); Accelerate's FSDP clipping looks for the model's whole list.
    clipped = list(model.parameters())
    if accelerator.distributed_type != DistributedType.FSDP:
        clipped = [p for p in clipped if p.requires_grad]
    model.train()
    interrupted = False
    while state.global_step < run.total_steps and not interrupted:
        for batch in _epoch_batches(run, state):
            with accelerator.accumulate(model):
                outputs = model(**batch)
                accelerator.backward(outputs.loss)
                window.add_micro_batch(outputs.loss, batch)
                if accelerator.sync_gradients:
                    if t.max_grad_norm > 0:
                        accelerator.clip_grad_norm_(clipped, t.max_grad_norm)
                    run.optimizer.step()
                    run.scheduler.step()
                    if step_hook is not None:
                        step_hook(run.unwrapped, state.global_step)
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
            interrupted = stop.agreed(accelerator)
            log_evaluate_save(run, state, window, progress, end_of_epoch, last, interrupted)
            if last or interrupted or end_of_epoch:
                break
    progress.close()
    return Session(interrupted, first_step, time.perf_counter() - window.train_start, window.samples_this_process)


def _epoch_batches(run: Run, state: LoopState):
    """The rest of the current epoch's batches (all of them, or those after a resumed checkpoint's position)."""
    # Accelerate's loader re-sets the sampler's epoch from its own counter at every iteration start.
    run.train_loader.set_epoch(state.epoch)
    if state.batches_in_epoch:
        return run.accelerator.skip_first_batches(run.train_loader, state.batches_in_epoch)
    return run.train_loader


def log_evaluate_save(
    run: Run, state: LoopState, window: "LogWindow", progress, end_of_epoch: bool, last: bool, interrupted: bool
) -> None:
    """What is due after an optimizer step: a log line, an evaluation, a checkpoint."""
    t, step = run.recipe.training, state.global_step
    due_eval = (t.eval_steps and step % t.eval_steps == 0) or (not t.eval_steps and end_of_epoch) or last
    due_save = (t.save_steps and step % t.save_steps == 0) or (not t.save_steps and end_of_epoch)
    if step % t.logging_steps == 0 or due_eval or due_save or last or interrupted:
        entry = window.flush(run, state)
        if entry:
            progress.set_postfix(loss=f"{entry['loss']:.4f}", lr=f"{entry['learning_rate']:.2e}")
    if due_eval:
        evaluate_and_keep_best(run, state)
    if due_save or interrupted:
        save_checkpoint(run, state)
    if due_eval or due_save:
        window.restart()  # samples/s of the next window: training only, not this evaluation or save


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
        files = run_files(run.recipe, run.label_names, metrics, state.history, run.carve)
        with ckpt.report_full_disk(f"the final adapter into {run.out}", run.checkpoints_root):
            ckpt.save_final(run.out, run.model_writer(files, weights))
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
    ``out`` is the output directory :func:`~lora_train.preflight.check_output_dir` accepted."""
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
    configure_logging(accelerator.is_main_process)
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
    model, optimizer, scheduler, params = build_trainable(recipe, data, tokenizer, accelerator, total_steps)
    startup["model_s"] = process_seconds()
    run = Run(
        recipe=recipe,
        out=out,
        accelerator=accelerator,
        launch=launch,
        tokenizer=tokenizer,
        label_names=data.label_names,
        carve=data.carve,
        train_loader=train_loader,
        eval_loader=eval_loader,
        model=model,
        optimizer=optimizer,
        scheduler=scheduler,
        total_steps=total_steps,
        updates_per_epoch=updates_per_epoch,
        params=params,
        pusher=pusher,
        saver=checkpoint_saver(launch, accelerator, accelerator.unwrap_model(model), optimizer, scheduler),
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


def build_trainable(recipe: Recipe, data: TaskData, tokenizer, accelerator, total_steps: int) -> tuple:
    """The classifier in its training regime, its optimizer and schedule, prepared by Accelerate (and compiled when
    asked); with the parameter counts taken before preparing."""
    from accelerate import DistributedType
    from transformers import get_scheduler

    t = recipe.training
    # NF4 weights are quantized where they load; everything else is placed by accelerator.prepare.
    device = accelerator.device if recipe.quantization.is_4bit else None
    model = build_classifier(recipe, data.label_names, tokenizer, device, total_steps)
    sharded = accelerator.distributed_type in (DistributedType.DEEPSPEED, DistributedType.FSDP)
    if accelerator.device.type == "cpu":
        use_fast_dropout(model)  # bernoulli_ is slow on CPU; CUDA's fused dropout is not
        if not sharded:  # ZeRO-3 / FSDP gather a layer's weights in hooks on the base layer, which this bypasses
            use_fused_lora(model)
    dtype = autocast_dtype(recipe, accelerator.device)
    if dtype is not None:
        keep_lora_inputs_uncast(model)
        if not sharded:
            # autocast would cast every frozen weight at every step: the same values, stored once (ZeRO and FSDP
            # flatten the parameters, which must then share one dtype)
            store_frozen_linears_in(model, dtype)
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
    return model, optimizer, scheduler, params


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
    lengths, eval_order = train_ds["length"], longest_first(eval_ds["length"])
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
        eval_ds,
        batch_size=t.per_device_eval_batch_size,
        sampler=eval_order,
        generator=torch.Generator().manual_seed(t.seed),
        **common,
    )
    return accelerator.prepare(train_loader, eval_loader)


def restore(run: Run, resume_dir: Path, saved: dict[str, Any]) -> LoopState:
    """Load a checkpoint's weights, optimizer, scheduler, RNGs (and AdaLoRA allocator); return its loop state."""
    dist.check_resume_launch(saved, run.launch)
    loaded = run.saver.load(resume_dir)
    state = LoopState(**loaded["loop"])
    method_state = run.recipe.peft.spec.resume_state
    if method_state is not None:  # "adalora": the key of checkpoints written before the method table
        meta = loaded.get("method_state", loaded.get("adalora")) or {}
        method_state.load(run.unwrapped, loaded["extra_tensors"], meta)
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
            files = run_files(run.recipe, run.label_names, {"step": state.global_step, **report}, carve=run.carve)
            with ckpt.report_full_disk(f"the best adapter {run.out / 'best'}", run.checkpoints_root):
                ckpt.atomic_directory(run.out / "best", run.model_writer(files, weights))
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
    method_state = recipe.peft.spec.resume_state
    extra, method_meta = method_state.save(run.unwrapped) if method_state is not None else (None, None)
    saved_state = {
        "loop": state.__dict__,
        "recipe": recipe.to_dict(),
        "num_processes": accelerator.num_processes,
        "method_state": method_meta,
    }
    run.saver.save(path, saved_state, extra)
    if accelerator.is_main_process:
        ckpt.rotate_checkpoints(run.checkpoints_root, recipe.training.keep_last)
        logger.info("saved checkpoint %s", path)
        if run.pusher is not None and recipe.output.push_checkpoints:
            _push_checkpoint(run, state)
    accelerator.wait_for_everyone()


def _push_checkpoint(run: Run, state: LoopState) -> None:
    """Push the adapter at this step, with a card quoting the newest evaluation, in the background."""
    card_metrics = {
        "global_step": state.global_step,
        "step": run.last_eval.get("step"),
        **run.last_eval.get("report", {}),
    }
    files = run_files(run.recipe, run.label_names, card_metrics, state.history, run.carve)
    run.pusher.push_in_background(run.model_writer(files), f"lora_train: adapter at step {state.global_step}")


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
# Small pieces


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
