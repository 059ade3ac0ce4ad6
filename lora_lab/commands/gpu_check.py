"""GPU check: NF4 + double-quant LoRA vs bf16 LoRA on decoder classifiers, in minutes, offline.

    python scripts/gpu_check.py [--out runs/gpu_check] [--batch-size 8] [--seq-len 256] [--steps 10]
    python scripts/gpu_check.py --dry-run        # the same code on CPU at toy sizes, in seconds (what CI runs)

Measures, on the real llama2c stories260K weights and on a randomly initialised ~1.1B-parameter Llama-shaped
classifier built from a config (TinyLlama's shape; nothing is downloaded), with LoRA r=16 on q/k/v/o + the score
head and bf16 autocast: peak GPU memory, samples/s, tokens/s and MFU, each with gradient checkpointing on and off.
Writes gpu_check.json and gpu_check.md (a Markdown table) into --out. See lora_lab/gpu_check.py.
Expected time on one H100/H200-class GPU: about 1-3 minutes (8 cases, 13 steps each, plus writing and loading the
1.1B model twice per base); budget 8 minutes.

A GPU host with torch, transformers, peft and accelerate but without bitsandbytes (nor datasets, evaluate, deepspeed,
which this script never imports) gets what it lacks from the working tree, within a 64 MiB transfer:
  * bitsandbytes: its 0.50.2 manylinux wheel (43 MB, `pip download bitsandbytes==0.50.2 --no-deps -d wheels/`
    on a machine with network), installed there with `pip install --no-index --no-deps wheels/bitsandbytes-*.whl`;
  * the llama2c weights (1 MB): `shared/hf-hub/models--local--llama2c-stories260K` (the run's HF_HUB_CACHE).
One prepared command for the slot:
    pip install --no-index --no-deps wheels/bitsandbytes-*.whl && HF_HUB_OFFLINE=1 HF_HUB_CACHE=shared/hf-hub \\
        timeout 480 python scripts/gpu_check.py --out $OUT/gpu_check
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Optional, Sequence

import torch

from lora_lab.gpu_check import LLAMA2C, Settings, run
from lora_train.startup import prepare_process


def main(argv: Optional[Sequence[str]] = None) -> int:
    prepare_process()
    defaults = Settings()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=defaults.out, help="Directory for gpu_check.json and gpu_check.md.")
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size, help="Sequences per step.")
    parser.add_argument("--seq-len", type=int, default=defaults.seq_len, help="Tokens per sequence (no padding).")
    parser.add_argument("--steps", type=int, default=defaults.measure_steps, help="Timed optimizer steps per case.")
    parser.add_argument("--warmup", type=int, default=defaults.warmup_steps, help="Untimed optimizer steps first.")
    parser.add_argument(
        "--peak-tflops", type=float, help="Dense bf16 peak of the device for MFU (default: known GPUs)."
    )
    parser.add_argument("--llama2c", default=LLAMA2C, help="Hub id or directory of the llama2c checkpoint.")
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="Run the same code on CPU with a tiny random model and tiny batches (seconds).",
    )
    args = parser.parse_args(argv)
    device = "cpu" if args.dry_run else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        print(
            "gpu_check: no CUDA device visible (torch.cuda.is_available() is False); nothing was run."
            " Use --dry-run to run the same code on CPU."
        )
        return 1
    settings = Settings(
        device=device,
        batch_size=args.batch_size,
        seq_len=args.seq_len,
        warmup_steps=args.warmup,
        measure_steps=2 if args.dry_run else args.steps,
        dry_run=args.dry_run,
        peak_tflops=args.peak_tflops,
        out=args.out,
    )
    run(settings, args.llama2c)
    print((args.out / "gpu_check.md").read_text())
    return 0
