"""A short, offline GPU measurement of the QLoRA recipes' decoder path: NF4 + double-quant LoRA against bf16 LoRA.

For each model (the real llama2c stories260K, and a randomly initialised ~1.1B-parameter Llama-shaped classifier
built from a config, TinyLlama's shape, so nothing is downloaded), each base (NF4 + double quant with bf16 compute,
or bf16 weights) and gradient checkpointing on and off, it builds the classifier with the project's own
``load_base_model`` / ``apply_regime`` (LoRA r=16 on q/k/v/o, the ``score`` head trained), trains a few steps with bf16
autocast and AdamW on fixed-length batches of random token ids, and records peak memory, samples/s, tokens/s and
MFU. Only torch, transformers, peft, accelerate-free code and bitsandbytes are needed: no datasets, evaluate or
deepspeed import happens here.

MFU counts model FLOPs, not hardware FLOPs: per token 2 x (frozen parameters) forward + 2 x (frozen) backward to the
activations + 6 x (trainable), plus attention 12 x layers x sequence x hidden (forward and backward, no causal
discount); gradient checkpointing's recomputation is not counted, so it shows as lower MFU.
"""

from __future__ import annotations

import json
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch

from lora_train.config import build_recipe
from lora_train.modeling import apply_regime, count_parameters, load_base_model, load_model_config

LLAMA2C = "local/llama2c-stories260K"
ONE_B_SHAPE = {
    "hidden_size": 2048,
    "intermediate_size": 5632,
    "num_hidden_layers": 22,
    "num_attention_heads": 32,
    "num_key_value_heads": 4,
    "vocab_size": 32000,
    "max_position_embeddings": 2048,
}
"""TinyLlama-1.1B's shape: 1.1B parameters, Llama architecture (grouped-query attention, SwiGLU, RoPE)."""
TINY_SHAPE = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 512,
    "max_position_embeddings": 256,
}
"""The CPU dry run's stand-in for the 1B model: the same code path, in seconds."""
PEAK_BF16_TFLOPS = {
    "H200": 989.0,
    "H100": 989.0,
    "A100": 312.0,
    "L40S": 362.0,
    "L4": 121.0,
    "A10": 125.0,
    "RTX 4090": 165.2,
    "RTX 3090": 71.0,
}
"""Dense bf16 tensor-core peak (vendor data sheets, without sparsity), matched as a substring of the device name."""


@dataclass
class Case:
    """One measured configuration."""

    model: str
    base: str
    """'nf4' (NF4 + double quant, bf16 compute) or 'bf16' (bf16 weights)."""
    gradient_checkpointing: bool
    batch_size: int
    seq_len: int


@dataclass
class Settings:
    """How much to run; ``dry_run`` shrinks everything to run the same code on CPU in seconds."""

    device: str = "cuda"
    batch_size: int = 8
    seq_len: int = 256
    warmup_steps: int = 3
    measure_steps: int = 10
    dry_run: bool = False
    peak_tflops: Optional[float] = None
    out: Path = field(default_factory=lambda: Path("runs/gpu_check"))


def random_llama_dir(shape: dict, directory: Path) -> Path:
    """A randomly initialised Llama classifier saved (bf16 safetensors) with the llama2c tokenizer's special ids."""
    from transformers import LlamaConfig, LlamaForSequenceClassification

    config = LlamaConfig(
        **shape, bos_token_id=1, eos_token_id=2, pad_token_id=0, num_labels=2, tie_word_embeddings=False
    )
    torch.manual_seed(0)
    with torch.device("cpu"):
        model = LlamaForSequenceClassification(config).to(torch.bfloat16)
    model.save_pretrained(directory, safe_serialization=True)
    del model
    return directory


def build(case: Case, name_or_path: str, device: torch.device):
    """The classifier exactly as training builds it for the GPU QLoRA recipe (or its bf16 twin)."""
    nf4 = case.base == "nf4"
    recipe = build_recipe(
        {
            "model": {"name_or_path": name_or_path, "dtype": "bfloat16", "attn_implementation": "sdpa"},
            "quantization": {"method": "nf4" if nf4 else "none", "double_quant": True, "compute_dtype": "bfloat16"},
            "peft": {
                "method": "lora",
                "r": 16,
                "alpha": 32,
                "dropout": 0.05,
                "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"],
            },
            "training": {"mixed_precision": "bf16", "gradient_checkpointing": case.gradient_checkpointing},
        }
    )
    config = load_model_config(recipe, ["negative", "positive"])
    config.pad_token_id = 0
    model, heads = load_base_model(recipe, config, {"": device})
    model = apply_regime(recipe, model if nf4 else model.to(device), heads, total_steps=1000)
    return model


def flops_per_token(model, seq_len: int) -> float:
    """Model FLOPs per trained token (see the module docstring)."""
    params = count_parameters(model)
    config = model.config
    attention = 12 * config.num_hidden_layers * seq_len * config.hidden_size
    return 4 * (params.total - params.trainable) + 6 * params.trainable + attention


def measure(case: Case, name_or_path: str, settings: Settings) -> dict[str, Any]:
    """Train ``warmup + measure`` steps on random token batches; time and peak memory of the measured steps."""
    device = torch.device(settings.device)
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    model = build(case, name_or_path, device)
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    generator = torch.Generator().manual_seed(0)
    vocab = model.config.vocab_size
    ids = torch.randint(3, vocab, (case.batch_size, case.seq_len), generator=generator).to(device)
    labels = torch.randint(0, 2, (case.batch_size,), generator=generator).to(device)
    mask = torch.ones_like(ids)
    losses, start = [], 0.0
    for step in range(settings.warmup_steps + settings.measure_steps):
        if step == settings.warmup_steps:
            if cuda:
                torch.cuda.synchronize(device)
            start = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.detach())
    if cuda:
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    tokens_per_s = settings.measure_steps * case.batch_size * case.seq_len / seconds
    peak = settings.peak_tflops or peak_tflops(device)
    achieved = flops_per_token(model, case.seq_len) * tokens_per_s
    result = {
        **asdict(case),
        "device": device_name(device),
        "steps": settings.measure_steps,
        "seconds": seconds,
        "samples_per_s": settings.measure_steps * case.batch_size / seconds,
        "tokens_per_s": tokens_per_s,
        "model_tflops_per_s": achieved / 1e12,
        "mfu": achieved / (peak * 1e12) if peak else None,
        "peak_memory_allocated_mb": torch.cuda.max_memory_allocated(device) / 2**20 if cuda else None,
        "peak_memory_reserved_mb": torch.cuda.max_memory_reserved(device) / 2**20 if cuda else None,
        "losses_finite": bool(torch.isfinite(torch.stack(losses)).all()),
    }
    del model, optimizer
    return result


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def peak_tflops(device: torch.device) -> Optional[float]:
    """The device's dense bf16 peak from :data:`PEAK_BF16_TFLOPS`, or None (then MFU is not reported)."""
    name = device_name(device)
    return next((tflops for key, tflops in PEAK_BF16_TFLOPS.items() if key in name), None)


def cases(settings: Settings) -> list[tuple[Case, str]]:
    """Every (case, model key): 2 models x {NF4, bf16} x gradient checkpointing {on, off}."""
    one_b = "llama-1.1b-random" if not settings.dry_run else "llama-tiny-random"
    batch, seq = (2, 32) if settings.dry_run else (settings.batch_size, settings.seq_len)
    return [
        (Case(model, base, ckpt, batch, seq), model)
        for model in ("llama2c-stories260K", one_b)
        for base in ("nf4", "bf16")
        for ckpt in (True, False)
    ]


def markdown(results: list[dict[str, Any]]) -> str:
    """The results as a Markdown table."""

    def number(value: Optional[float], fmt: str) -> str:
        return "n/a" if value is None else format(value, fmt)

    lines = [
        "| model | base | grad. ckpt | batch x seq | peak allocated MB | samples/s | tokens/s | MFU |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        lines.append(
            f"| {r['model']} | {r['base']} | {'on' if r['gradient_checkpointing'] else 'off'} |"
            f" {r['batch_size']} x {r['seq_len']} | {number(r['peak_memory_allocated_mb'], ',.0f')} |"
            f" {r['samples_per_s']:,.1f} | {r['tokens_per_s']:,.0f} | {number(r['mfu'], '.1%')} |"
        )
    return "\n".join(lines) + f"\n\nDevice: {results[0]['device'] if results else 'none'}.\n"


def run(settings: Settings, llama2c: str = LLAMA2C) -> list[dict[str, Any]]:
    """Measure every case, writing ``gpu_check.json`` and ``gpu_check.md`` into ``settings.out`` after each."""
    settings.out.mkdir(parents=True, exist_ok=True)
    results: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as tmp:
        paths = {"llama2c-stories260K": llama2c}
        for case, model in cases(settings):
            if model not in paths:
                shape = TINY_SHAPE if settings.dry_run else ONE_B_SHAPE
                paths[model] = str(random_llama_dir(shape, Path(tmp) / model))
            result = measure(case, paths[model], settings)
            results.append(result)
            print("gpu_check: " + json.dumps(result), flush=True)
            (settings.out / "gpu_check.json").write_text(json.dumps(results, indent=1))
            (settings.out / "gpu_check.md").write_text(markdown(results))
    return results
