"""Throughput and memory benchmark: our loop against HF ``Trainer`` + PEFT on the same model, data, batch and steps.

Contenders (:data:`CONTENDERS`):

- ``ours``: :func:`lora_train.train.train` on the recipe, unchanged.
- ``trainer_max_length``: the common tutorial: ``Trainer`` + PEFT, ``tokenizer(..., padding="max_length")``
  (``data.max_length`` tokens), random batches.
- ``trainer_dynamic``: a well-configured ``Trainer``: dynamic padding (``DataCollatorWithPadding``) and
  ``train_sampling_strategy="group_by_length"``.
- ``ours_compiled``: our loop with ``training.torch_compile=true`` (not run unless asked): its steady state is the
  samples/s (steps mode: after the warm-up steps, which include the compilations), its start-up cost shows in the
  whole process's seconds.

All three build the same model with :mod:`lora_train.modeling` (same checkpoint, dtype, attention kernel, LoRA
config), use the same training subset, batch size, learning-rate schedule, clipping and seed.
Every run is a subprocess of its own (so peak RSS is per run, and thread settings are identical); runs are
interleaved (the order rotates each repeat) and the report gives medians.

Modes:

- ``steps``: ``measure_steps`` optimizer steps timed after ``warmup_steps`` untimed ones.
- ``epochs``: whole epochs timed (no evaluation or checkpoint inside the timing), then one evaluation on the
  full evaluation split: the accuracy check.
- ``memory`` (:func:`run_memory`): weight bytes and peak memory of fp32, bf16 and NF4 (with and without double
  quantization) LoRA on the same model.

Peak memory is CUDA max allocated on a GPU and the process's peak RSS on CPU.
"""

from __future__ import annotations

import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

# The torch-importing modules of lora_train are imported inside the functions that use them, as torch itself is:
# importing this module (a command's --help, a test) stays light.
from lora_train.config import Recipe, build_recipe
from lora_train.machine import machine_info

CONTENDERS = ("ours", "trainer_max_length", "trainer_dynamic")
OPTIONAL_CONTENDERS = ("ours_compiled",)
"""Run only when named (``--contenders``)."""
CONTENDER_LABELS = {
    "ours": "lora_train loop",
    "ours_compiled": "lora_train loop, training.torch_compile=true",
    "trainer_max_length": "Trainer + PEFT, padding=max_length (tutorial)",
    "trainer_dynamic": "Trainer + PEFT, dynamic padding + group_by_length",
}
LEVERS = {
    "plain": (False, False, False),
    "fast_dropout": (True, False, False),
    "fused_lora": (True, True, False),  # the fused LoRA layers take FastDropout's masks (else peft's forward)
    "fused_adamw": (False, False, True),
    "all": (True, True, True),
}
"""Ablation (``--levers``): a bare loop over our data and model with (FastDropout, fused LoRA layers, fused AdamW)
on or off."""
LABELS = {
    **CONTENDER_LABELS,
    "plain": "bare loop: torch dropout, peft's LoRA layers, foreach AdamW",
    "fast_dropout": "bare loop + FastDropout (and the BERT family's attention dropout with it)",
    "fused_lora": "bare loop + FastDropout + fused LoRA layers",
    "fused_adamw": "bare loop + fused AdamW",
    "all": "bare loop + FastDropout + fused LoRA layers + fused AdamW (our loop's CPU levers)",
}
MEMORY_VARIANTS = {
    "fp32": ["model.dtype=float32", "quantization.method=none"],
    "bf16": ["model.dtype=bfloat16", "quantization.method=none"],
    "nf4": ["quantization.method=nf4", "quantization.double_quant=false", "quantization.compute_dtype=float32"],
    "nf4_double_quant": [
        "quantization.method=nf4",
        "quantization.double_quant=true",
        "quantization.compute_dtype=float32",
    ],
}
"""Recipe overrides of the memory comparison. NF4 keeps the recipe's dtype for the weights it does not quantize and
computes in float32 (bitsandbytes' fast path on CPU; a GPU recipe would use bfloat16)."""

NO_STEP = 10**9  # eval_steps / save_steps that never come: keep evaluation and checkpoints out of the timing


@dataclass
class Settings:
    """How long and how often to run each contender."""

    warmup_steps: int = 10
    measure_steps: int = 30
    repeats: int = 3
    threads: int = 2
    epochs: Optional[float] = None
    """Set for the ``epochs`` mode (timed whole epochs + final accuracy); None = the ``steps`` mode."""
    seed_per_repeat: bool = False
    """Repeat k trains with ``training.seed + k`` (every contender alike), so the accuracy spread over seeds is
    measured too; otherwise every repeat uses the recipe's seed."""

    def check(self) -> None:
        """Refuse settings that cannot give a measurement."""
        problems = []
        if self.epochs is None and (self.warmup_steps < 0 or self.measure_steps <= 0):
            problems.append(
                f"warm-up steps must be >= 0 and measured steps > 0 (got {self.warmup_steps}, {self.measure_steps})"
            )
        if self.epochs is not None and self.epochs <= 0:
            problems.append(f"epochs must be > 0 (got {self.epochs})")
        if self.repeats <= 0 or self.threads <= 0:
            problems.append(f"repeats and threads must be > 0 (got {self.repeats}, {self.threads})")
        if problems:
            raise ValueError("; ".join(problems))


# ---------------------------------------------------------------------------------------------
# Running jobs in subprocesses


def run_job(job: dict[str, Any], work_dir: Path, threads: int) -> dict[str, Any]:
    """Run one job in a fresh Python process with ``threads`` intra-op threads; return its result."""
    work_dir.mkdir(parents=True, exist_ok=True)
    job_path, result_path, log_path = work_dir / "job.json", work_dir / "result.json", work_dir / "log.txt"
    job_path.write_text(json.dumps(job))
    result_path.unlink(missing_ok=True)
    env = {
        **os.environ,
        "OMP_NUM_THREADS": str(threads),
        "MKL_NUM_THREADS": str(threads),
        "TOKENIZERS_PARALLELISM": "false",
    }
    start = time.perf_counter()
    with open(log_path, "w") as log:
        proc = subprocess.run(
            [sys.executable, "-m", "lora_lab.benchmark", str(job_path), str(result_path)],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    if proc.returncode != 0 or not result_path.exists():
        tail = log_path.read_text()[-3000:]
        raise RuntimeError(f"benchmark job {job.get('name')} failed (exit {proc.returncode}); log {log_path}:\n{tail}")
    # The whole process, as a user waits for it: interpreter, imports, data, model, the run, evaluation and save.
    return {**json.loads(result_path.read_text()), "process_s": time.perf_counter() - start}


def interleaved_order(names: list[str], repeats: int) -> list[tuple[int, str]]:
    """(repeat, name) pairs: every repeat runs every name once, starting one later each repeat."""
    return [(r, names[(r + i) % len(names)]) for r in range(repeats) for i in range(len(names))]


def run_benchmark(
    recipe: Recipe,
    settings: Settings,
    out_dir: Path,
    contenders: tuple[str, ...] = CONTENDERS,
    log=print,
    reference: str = "ours",
) -> dict[str, Any]:
    """Run every contender (or lever of :data:`LEVERS`) ``settings.repeats`` times, interleaved; write and
    return the report, with how many times faster ``reference`` is than each."""
    settings.check()
    unknown = set(contenders) - set(LABELS)
    if unknown:
        raise ValueError(f"unknown contender(s) {sorted(unknown)}; valid: {', '.join(LABELS)}")
    bound = run_job(
        {"kind": "bound", "name": "compute bound", "recipe": recipe.to_dict(), "threads": settings.threads},
        out_dir / "runs" / "bound",
        settings.threads,
    )
    log(
        f"compute bound: {bound['peak_gflops']:.0f} GFLOP/s ({bound['dtype']} matmul, {settings.threads} threads),"
        f" {bound['flops_per_token'] / 1e6:.0f} MFLOP per padded training token"
    )
    runs = []
    for repeat, name in interleaved_order(list(contenders), settings.repeats):
        seed = recipe.training.seed + (repeat if settings.seed_per_repeat else 0)
        job = {
            "kind": "train",
            "name": name,
            "recipe": build_recipe(recipe.to_dict(), [f"training.seed={seed}"]).to_dict(),
            "threads": settings.threads,
            "warmup_steps": settings.warmup_steps,
            "measure_steps": settings.measure_steps,
            "epochs": settings.epochs,
        }
        result = run_job(job, out_dir / "runs" / f"{repeat}-{name}", settings.threads)
        result.update(contender=name, repeat=repeat, seed=seed)
        result["bound_fraction"] = bound_fraction(result, bound)
        runs.append(result)
        log(
            f"[{repeat}] {name}: {result['samples_per_s']:.1f} samples/s, {result['step_time_ms']:.1f} ms/step, "
            f"padding {result['padding_share']:.1%}, process {result['process_s']:.1f} s,"
            f" peak {result['peak_memory_mb']:.0f} MB"
            + (f", accuracy {result['eval_accuracy']:.4f}" if result.get("eval_accuracy") is not None else "")
        )
    report = {
        "mode": "epochs" if settings.epochs is not None else "steps",
        "settings": settings.__dict__,
        "recipe": recipe.to_dict(),
        "machine": machine_info(settings.threads),
        "compute_bound": bound,
        "runs": runs,
        "reference": reference,
        "summary": summarize(runs, list(contenders), reference),
    }
    write_report(report, out_dir, throughput_markdown(report))
    return report


def run_memory(
    recipe: Recipe, settings: Settings, out_dir: Path, variants: tuple[str, ...] = tuple(MEMORY_VARIANTS), log=print
) -> dict[str, Any]:
    """Weight bytes (one process per variant) and peak memory of a short training run (another process)."""
    settings.check()
    rows = []
    for name in variants:
        variant = build_recipe(recipe.to_dict(), MEMORY_VARIANTS[name])
        base_job = {"recipe": variant.to_dict(), "threads": settings.threads, "name": name}
        weights = run_job({**base_job, "kind": "weights"}, out_dir / "runs" / f"{name}-weights", settings.threads)
        trained = run_job(
            {
                **base_job,
                "kind": "train",
                "name": "ours",
                "warmup_steps": settings.warmup_steps,
                "measure_steps": settings.measure_steps,
                "epochs": None,
            },
            out_dir / "runs" / f"{name}-train",
            settings.threads,
        )
        row = {
            "variant": name,
            "overrides": MEMORY_VARIANTS[name],
            **weights,
            **{k: trained[k] for k in ("peak_memory_mb", "samples_per_s", "step_time_ms", "trainable_params")},
        }
        rows.append(row)
        log(
            f"{name}: base Linear weights {row['linear_weight_bytes'] / 2**20:.2f} MiB, all weights"
            f" {row['weight_bytes'] / 2**20:.2f} MiB, peak {row['peak_memory_mb']:.0f} MB"
        )
    report = {
        "mode": "memory",
        "settings": settings.__dict__,
        "recipe": recipe.to_dict(),
        "machine": machine_info(settings.threads),
        "rows": rows,
    }
    write_report(report, out_dir, memory_markdown(report))
    return report


def write_report(report: dict[str, Any], out_dir: Path, markdown: str) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "results.json").write_text(json.dumps(report, indent=1))
    (out_dir / "results.md").write_text(markdown)


# ---------------------------------------------------------------------------------------------
# Summaries and Markdown


def summarize(runs: list[dict[str, Any]], contenders: list[str], reference: str = "ours") -> dict[str, Any]:
    """Medians per contender, and how many times faster ``reference`` is than each contender."""
    keys = (
        "samples_per_s",
        "tokens_per_s",
        "step_time_ms",
        "padding_share",
        "bound_fraction",
        "process_s",
        "peak_memory_mb",
        "eval_accuracy",
    )
    summary: dict[str, Any] = {}
    for name in contenders:
        mine = [r for r in runs if r["contender"] == name]
        row = {
            "runs": len(mine),
            "trainable_params": mine[0]["trainable_params"],
            "total_params": mine[0]["total_params"],
        }
        for key in keys:
            values = [r[key] for r in mine if r.get(key) is not None]
            row[key] = statistics.median(values) if values else None
            if key == "samples_per_s" and values:
                row["samples_per_s_range"] = [min(values), max(values)]
            if key == "eval_accuracy" and values:
                row["eval_accuracy_mean"] = statistics.fmean(values)
                row["eval_accuracy_std"] = statistics.stdev(values) if len(values) > 1 else 0.0
        summary[name] = row
    if reference in summary:
        for name in contenders:
            summary[name]["speedup"] = summary[reference]["samples_per_s"] / summary[name]["samples_per_s"]
            if summary[name]["process_s"] and summary[reference]["process_s"]:
                summary[name]["process_speedup"] = summary[name]["process_s"] / summary[reference]["process_s"]
    return summary


def _header(report: dict[str, Any]) -> list[str]:
    m, s, r = report["machine"], report["settings"], report["recipe"]
    load = ", ".join(f"{x:.2f}" for x in m["load_average"]) if m.get("load_average") else "n/a"
    if report["mode"] == "epochs":
        what = f"{s['epochs']:g} epoch(s), timed whole, then evaluated; {s['repeats']} run(s) each"
        if s.get("seed_per_repeat"):
            what += f" with training seeds {r['training']['seed']}..{r['training']['seed'] + s['repeats'] - 1}"
    elif report["mode"] == "memory":
        what = (
            f"weights measured after loading; peak memory over {s['warmup_steps'] + s['measure_steps']} training steps;"
            " one run per variant"
        )
    else:
        what = (
            f"{s['measure_steps']} optimizer steps timed after {s['warmup_steps']} warm-up steps;"
            f" {s['repeats']} run(s) each"
        )
    return [
        f"- model `{r['model']['name_or_path']}` ({r['model']['dtype']},"
        f" attention {r['model']['attn_implementation']}),"
        f" {r['peft']['method']} r={r['peft']['r']} on {r['peft']['target_modules']},"
        f" quantization {r['quantization']['method']}",
        f"- data `{r['data']['path'] or r['data']['task']}`: {r['data']['max_train_samples'] or 'all'} training rows,"
        f" max_length {r['data']['max_length']}, batch {r['training']['per_device_train_batch_size']},"
        f" mixed precision {r['training']['mixed_precision']}",
        f"- {what}" + ("" if report["mode"] == "memory" else "; medians over runs"),
        f"- machine: {m['cpu']} ({m['cpu_count']} cores), GPU {m['gpu'] or 'none'}, {m['threads']} torch threads"
        f" for every run, load average at the end {load};"
        f" torch {m['torch']}, transformers {m['transformers']}, peft {m['peft']}",
    ]


def throughput_markdown(report: dict[str, Any]) -> str:
    """The throughput table (medians, with the samples/s range over runs)."""
    lines = (
        [f"## Throughput ({report['mode']} mode)", ""]
        + _header(report)
        + [
            "",
            "| contender | samples/s (min-max) | non-pad tokens/s | ms/step | padding share | of compute bound |"
            " whole process s |"
            " peak memory MB | trainable params | accuracy |"
            f" {LABELS[report['reference']].split(' (')[0]} is x faster (samples/s, whole process) |",
            "|---|---|---|---|---|---|---|---|---|---|---|",
        ]
    )
    for name, row in report["summary"].items():
        low, high = row["samples_per_s_range"]
        acc = f"{row['eval_accuracy']:.4f}" if row.get("eval_accuracy") is not None else "-"
        if row.get("eval_accuracy") is not None and report["settings"].get("seed_per_repeat"):
            acc = f"{row['eval_accuracy_mean']:.4f} ± {row['eval_accuracy_std']:.4f} (mean ± std)"
        speed = f"{row['speedup']:.2f}" if "speedup" in row else "-"
        if "process_speedup" in row:
            speed += f", {row['process_speedup']:.2f}"
        lines.append(
            f"| {LABELS[name]} | {row['samples_per_s']:.1f} ({low:.1f}-{high:.1f}) | {row['tokens_per_s']:.0f} |"
            f" {row['step_time_ms']:.1f} | {row['padding_share']:.1%} | {row['bound_fraction']:.0%} |"
            f" {row['process_s']:.1f} |"
            f" {row['peak_memory_mb']:.0f} | {row['trainable_params']:,} |"
            f" {acc} | {speed} |"
        )
    return "\n".join(lines) + "\n"


def memory_markdown(report: dict[str, Any]) -> str:
    """The weight-memory / peak-memory table of the dtype and NF4 variants."""
    rows = {r["variant"]: r for r in report["rows"]}
    ref = rows.get("bf16")
    lines = (
        ["## Memory: fp32 / bf16 / NF4 LoRA", ""]
        + _header(report)
        + [
            "",
            "| variant | base Linear weights MiB | x bf16 | all weights MiB | x bf16 | peak memory MB | samples/s |"
            " trainable params |",
            "|---|---|---|---|---|---|---|---|",
        ]
    )

    def ratio(row: dict[str, Any], key: str) -> str:
        return f"{row[key] / ref[key]:.3f}" if ref else "-"

    for name, row in rows.items():
        lines.append(
            f"| {name} | {row['linear_weight_bytes'] / 2**20:.2f} | {ratio(row, 'linear_weight_bytes')} |"
            f" {row['weight_bytes'] / 2**20:.2f} | {ratio(row, 'weight_bytes')} | {row['peak_memory_mb']:.0f} |"
            f" {row['samples_per_s']:.1f} | {row['trainable_params']:,} |"
        )
    lines += [
        "",
        "Base Linear weights: the encoder's Linear layers (what NF4 quantizes), with their quantization"
        " constants; all weights: every parameter and buffer (embeddings, norms, head, adapters) plus those constants.",
    ]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------
# Inside the subprocess


def weight_memory(model) -> dict[str, int]:
    """Bytes of the base Linear weights (outside the head and adapters; NF4 quantization constants included)
    and of all parameters and buffers."""
    from torch import nn

    from lora_train.heads import head_modules

    heads = set(head_modules(model))
    linear = total = 0
    for name, module in model.named_modules():
        own = list(module.named_parameters(recurse=False)) + list(module.named_buffers(recurse=False))
        for pname, tensor in own:
            size = tensor.numel() * tensor.element_size() + _quant_state_bytes(getattr(tensor, "quant_state", None))
            total += size
            parts = name.split(".")
            if (
                pname == "weight"
                and isinstance(module, nn.Linear)
                and not heads.intersection(parts)
                and not any(p.startswith("lora_") for p in parts)
            ):
                linear += size
    return {"linear_weight_bytes": linear, "weight_bytes": total}


def _quant_state_bytes(state) -> int:
    """Bytes of a bitsandbytes QuantState: absmax, code, and the nested state of double quantization."""
    if state is None:
        return 0
    tensors = [state.absmax, state.code, getattr(state, "offset", None)]
    nested = getattr(state, "state2", None)
    if nested is not None:
        tensors += [nested.absmax, nested.code]
    return sum(t.numel() * t.element_size() for t in tensors if t is not None and hasattr(t, "numel"))


def _job_recipe(job: dict[str, Any], out_dir: Path) -> Recipe:
    """The job's recipe with evaluation and checkpoints kept out of the timed part and no trackers."""
    recipe = build_recipe(job["recipe"])
    t, o = recipe.training, recipe.output
    if job["epochs"] is None:
        t.max_steps, t.logging_steps = (
            job["warmup_steps"] + job["measure_steps"],
            math.gcd(job["warmup_steps"], job["measure_steps"]),
        )
    else:
        t.max_steps, t.num_epochs = -1, job["epochs"]
    t.eval_steps = t.save_steps = NO_STEP  # only the final evaluation, after the timing; no checkpoints
    o.output_dir, o.overwrite_output_dir, o.report_to, o.push_to_hub = str(out_dir), True, [], False
    return recipe


def bench_ours(job: dict[str, Any], out_dir: Path) -> dict[str, Any]:
    """Our loop, timed from its own log windows (which exclude evaluation and checkpoints here)."""
    from lora_train.train import train

    recipe = _job_recipe(job, out_dir)
    metrics = train(recipe)
    history = json.loads((out_dir / "history.json").read_text())
    first = job["warmup_steps"] if job["epochs"] is None else 0
    windows = [h for h in history if "window_s" in h and h["step"] > first]
    seconds = sum(h["window_s"] for h in windows)
    steps = metrics["global_step"] - first
    return {"startup_seconds": metrics["startup_seconds"]} | _result(
        samples=sum(h["window_samples"] for h in windows),
        tokens=sum(h["window_tokens"] for h in windows),
        padded_tokens=sum(h["window_padded_tokens"] for h in windows),
        seconds=seconds,
        steps=steps,
        accuracy=metrics["eval_accuracy"] if job["epochs"] is not None else None,
        trainable=metrics["trainable_params"],
        total=metrics["total_params"],
        device=metrics["device"],
    )


def bench_trainer(job: dict[str, Any], out_dir: Path, padding: str) -> dict[str, Any]:
    """HF Trainer + PEFT on the same model and data: ``padding`` is 'max_length' (tutorial) or 'dynamic'."""
    import torch
    from transformers import DataCollatorWithPadding, Trainer, TrainingArguments, set_seed

    from lora_train.build import build_classifier, load_task_data
    from lora_train.data import steps_per_epoch, tokenize
    from lora_train.modeling import count_parameters, load_tokenizer

    recipe = _job_recipe(job, out_dir)
    t, d = recipe.training, recipe.data
    tokenizer = load_tokenizer(recipe)
    data = load_task_data(recipe)
    spec, train_raw, eval_raw = data.spec, data.train, data.eval
    if padding == "max_length":

        def encode(batch: dict) -> dict:
            enc = tokenizer(batch[spec.text_column], padding="max_length", truncation=True, max_length=d.max_length)
            enc["labels"] = batch[spec.label_column]
            return enc

        train_ds = train_raw.map(encode, batched=True, remove_columns=train_raw.column_names)
    else:
        train_ds = tokenize(train_raw, tokenizer, spec, d.max_length)  # its "length" column feeds group_by_length
    eval_ds = tokenize(eval_raw, tokenizer, spec, d.max_length).remove_columns("length")

    updates_per_epoch = steps_per_epoch(
        math.ceil(len(train_ds) / t.per_device_train_batch_size), t.gradient_accumulation_steps
    )
    total_steps = t.max_steps if t.max_steps > 0 else math.ceil(t.num_epochs * updates_per_epoch)
    set_seed(t.seed)
    cuda = torch.cuda.is_available()
    model = build_classifier(  # as transformers builds it: the Trainer's users have no first-position last layer
        recipe,
        data.label_names,
        tokenizer,
        torch.device("cuda:0" if cuda else "cpu"),
        total_steps,
        full_last_layer=True,
    )

    counter = _CountingCollator(DataCollatorWithPadding(tokenizer))
    first = job["warmup_steps"] if job["epochs"] is None else 0
    timer = _step_timer(first, total_steps)
    args = TrainingArguments(
        output_dir=str(out_dir),
        per_device_train_batch_size=t.per_device_train_batch_size,
        per_device_eval_batch_size=t.per_device_eval_batch_size,
        gradient_accumulation_steps=t.gradient_accumulation_steps,
        learning_rate=t.learning_rate,
        weight_decay=t.weight_decay,
        max_grad_norm=t.max_grad_norm,
        lr_scheduler_type=t.lr_scheduler if t.lr_scheduler != "constant" else "constant_with_warmup",
        warmup_steps=int(t.warmup_ratio * total_steps),
        max_steps=total_steps,
        seed=t.seed,
        bf16=t.mixed_precision == "bf16",
        fp16=t.mixed_precision == "fp16",
        use_cpu=not cuda,
        logging_steps=t.logging_steps,
        save_strategy="no",
        eval_strategy="no",
        report_to="none",
        disable_tqdm=True,
        dataloader_num_workers=d.num_workers,
        train_sampling_strategy="group_by_length" if padding == "dynamic" else "random",
    )
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=train_ds,
        data_collator=counter,
        processing_class=tokenizer,
        callbacks=[timer],
        compute_metrics=_accuracy,
    )
    trainer.train()
    ga = t.gradient_accumulation_steps
    batch_tokens = counter.tokens[first * ga : total_steps * ga]
    batch_samples = counter.samples[first * ga : total_steps * ga]
    batch_padded = counter.padded[first * ga : total_steps * ga]
    accuracy = trainer.evaluate(eval_ds)["eval_accuracy"] if job["epochs"] is not None else None
    params = count_parameters(model)
    return _result(
        samples=sum(batch_samples),
        tokens=sum(batch_tokens),
        padded_tokens=sum(batch_padded),
        seconds=timer.seconds,
        steps=total_steps - first,
        accuracy=accuracy,
        trainable=params.trainable,
        total=params.total,
        device="cuda" if cuda else "cpu",
    )


def _accuracy(prediction) -> dict[str, float]:
    import numpy as np

    return {"accuracy": float(np.mean(np.argmax(prediction.predictions, -1) == prediction.label_ids))}


class _CountingCollator:
    """Wraps a collator and records each batch's sample, non-pad token and padded token counts, in order."""

    def __init__(self, inner):
        self.inner = inner
        self.samples: list[int] = []
        self.tokens: list[int] = []
        self.padded: list[int] = []

    def __call__(self, features):
        batch = self.inner(features)
        self.samples.append(int(batch["input_ids"].shape[0]))
        self.tokens.append(int(batch["attention_mask"].sum()))
        self.padded.append(int(batch["attention_mask"].numel()))
        return batch


def _step_timer(start: int, stop: int):
    """A TrainerCallback timing from the end of optimizer step ``start`` (0 = training start) to the end of ``stop``."""
    import torch
    from transformers import TrainerCallback

    def now() -> float:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        return time.perf_counter()

    class StepTimer(TrainerCallback):
        t0 = seconds = float("nan")

        def on_train_begin(self, args, state, control, **kwargs):
            if start == 0:
                self.t0 = now()

        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == start:
                self.t0 = now()
            if state.global_step == stop:
                self.seconds = now() - self.t0

    return StepTimer()


def _result(
    samples: float,
    tokens: float,
    padded_tokens: float,
    seconds: float,
    steps: int,
    accuracy: Optional[float],
    trainable: int,
    total: int,
    device: str,
) -> dict[str, Any]:
    import torch

    from lora_train.metrics import peak_memory_mb

    return {
        "samples_per_s": samples / seconds,
        "tokens_per_s": tokens / seconds,
        "padded_tokens": padded_tokens,
        "padding_share": 1 - tokens / padded_tokens if padded_tokens else 0.0,
        "step_time_ms": 1000 * seconds / steps,
        "seconds": seconds,
        "steps": steps,
        "samples": samples,
        "tokens": tokens,
        "eval_accuracy": accuracy,
        "peak_memory_mb": peak_memory_mb(torch.device(device)),
        "trainable_params": trainable,
        "total_params": total,
        "device": device,
    }


def compute_bound(job: dict[str, Any], size: int = 1024, repeats: int = 10) -> dict[str, Any]:
    """What the hardware allows: the best matmul rate at the run's thread count and compute dtype (bf16 under bf16
    autocast, else float32) on ``size`` x ``size`` matrices, and the FLOPs a training step spends per padded token
    by this estimate: 2 per base Linear weight forward and 2 backward (the input gradient; the frozen weights get
    none), LoRA, attention scores and elementwise work left out (a few percent at these lengths). It counts every
    position through every layer, as the Trainer's model computes them: our loop, whose last layer computes one
    position (:func:`lora_train.modeling.last_layer_at_first_position`), is credited with the work it skips."""
    import torch

    from lora_train.modeling import head_modules, load_model_config, meta_model

    recipe = build_recipe(job["recipe"])
    dtype = torch.bfloat16 if recipe.training.mixed_precision == "bf16" else torch.float32
    a, b = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(5):
            a @ b
        best = min(best, (time.perf_counter() - start) / 5)
    model = meta_model(load_model_config(recipe, ["a", "b"]))
    heads = set(head_modules(model))
    weights = sum(
        m.in_features * m.out_features
        for name, m in model.named_modules()
        if isinstance(m, torch.nn.Linear) and not heads.intersection(name.split("."))
    )
    return {
        "dtype": str(dtype).removeprefix("torch."),
        "peak_gflops": 2 * size**3 / best / 1e9,
        "flops_per_token": 4 * weights,
    }


def bound_fraction(result: dict[str, Any], bound: dict[str, Any]) -> float:
    """The share of the compute bound a run reached: its padded tokens' estimated FLOPs over the timed seconds,
    against the peak matmul rate."""
    return result["padded_tokens"] * bound["flops_per_token"] / result["seconds"] / (bound["peak_gflops"] * 1e9)


def bench_weights(job: dict[str, Any]) -> dict[str, Any]:
    """Build the recipe's model (base + adapters) and measure its weight bytes."""
    import torch

    from lora_train.build import build_classifier, load_task_data
    from lora_train.modeling import load_tokenizer

    recipe = build_recipe(job["recipe"])
    device = torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
    model = build_classifier(
        recipe, load_task_data(recipe).label_names, load_tokenizer(recipe), device, total_steps=100
    )
    return weight_memory(model)


def bench_lever(job: dict[str, Any], fast_dropout: bool, fused_lora: bool, fused_adamw: bool) -> dict[str, Any]:
    """A bare loop (forward, backward, clip, AdamW step) over our sampler, collator and model, with each lever
    on or off: what FastDropout, the fused LoRA layers and fused AdamW buy, without the rest of :func:`train` around
    them."""
    import torch
    from torch.utils.data import DataLoader
    from transformers import DataCollatorWithPadding, set_seed

    from lora_train.build import build_classifier, load_task_data
    from lora_train.data import EpochSampler, tokenize
    from lora_train.modeling import count_parameters, load_tokenizer, use_fast_dropout, use_fused_lora

    recipe = build_recipe(job["recipe"])
    t, d = recipe.training, recipe.data
    tokenizer = load_tokenizer(recipe)
    data = load_task_data(recipe)
    train_ds = tokenize(data.train, tokenizer, data.spec, d.max_length)
    loader = DataLoader(
        train_ds.remove_columns("length"),
        batch_size=t.per_device_train_batch_size,
        collate_fn=DataCollatorWithPadding(tokenizer),
        sampler=EpochSampler(train_ds["length"], t.per_device_train_batch_size, t.seed, d.group_by_length),
    )
    set_seed(t.seed)
    model = build_classifier(recipe, data.label_names, tokenizer, total_steps=100)
    if fast_dropout:
        use_fast_dropout(model)
    if fused_lora:
        use_fused_lora(model)
    optimizer = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad], lr=t.learning_rate, fused=fused_adamw
    )
    model.train()
    warmup, steps = job["warmup_steps"], job["measure_steps"]
    samples = tokens = padded = 0
    for step, batch in enumerate(loader):
        if step == warmup:
            start = time.perf_counter()
        if step == warmup + steps:
            break
        model(**batch).loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), t.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step >= warmup:
            samples, tokens = samples + len(batch["labels"]), tokens + int(batch["attention_mask"].sum())
            padded += batch["attention_mask"].numel()
    else:
        raise ValueError(f"{warmup} + {steps} steps need more than one epoch of data; raise data.max_train_samples")
    params = count_parameters(model)
    return _result(
        samples=samples,
        tokens=tokens,
        padded_tokens=padded,
        seconds=time.perf_counter() - start,
        steps=steps,
        accuracy=None,
        trainable=params.trainable,
        total=params.total,
        device="cpu",
    )


def worker_main(job_path: str, result_path: str) -> None:
    """Subprocess entry point: run the job in ``job_path``, write its result to ``result_path``."""
    import torch

    job = json.loads(Path(job_path).read_text())
    torch.set_num_threads(job["threads"])
    with tempfile.TemporaryDirectory(prefix="lora_bench_") as tmp:
        if job["kind"] == "weights":
            result = bench_weights(job)
        elif job["kind"] == "bound":
            result = compute_bound(job)
        elif job["name"] in LEVERS:
            result = bench_lever(job, *LEVERS[job["name"]])
        elif job["name"] in ("ours", "ours_compiled"):
            if job["name"] == "ours_compiled":
                job["recipe"] = build_recipe(job["recipe"], ["training.torch_compile=true"]).to_dict()
            result = bench_ours(job, Path(tmp) / "run")
        else:
            result = bench_trainer(
                job, Path(tmp) / "run", "max_length" if job["name"] == "trainer_max_length" else "dynamic"
            )
    result["torch_threads"] = torch.get_num_threads()
    Path(result_path).write_text(json.dumps(result))


if __name__ == "__main__":
    worker_main(sys.argv[1], sys.argv[2])
