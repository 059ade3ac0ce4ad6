#!/usr/bin/env python
"""Benchmark our training loop against HF Trainer + PEFT (throughput, accuracy) or fp32/bf16/NF4 LoRA (memory).

    # throughput: 30 steps timed after 10 warm-up steps, 3 interleaved runs of each contender
    python scripts/benchmark.py recipes/cpu/sst2_lora.yaml data.max_length=128 --out runs/bench/steps
    # accuracy at equal epochs (whole epochs timed, then the full validation split)
    python scripts/benchmark.py recipes/cpu/sst2_lora.yaml data.max_train_samples=8000 --epochs 1 --seed-per-repeat --out runs/bench/epochs
    # ablation: a bare loop with FastDropout / fused AdamW on and off
    python scripts/benchmark.py recipes/cpu/sst2_lora.yaml data.max_length=128 --levers --out runs/bench/levers
    # memory: weight bytes and peak memory of fp32, bf16, NF4 and NF4 + double quant LoRA
    python scripts/benchmark.py recipes/cpu/sst2_lora.yaml --memory --out runs/bench/memory

Writes results.json and results.md into --out; see docs/performance.md.
"""

import sys

from lora_train.commands.benchmark import main

if __name__ == "__main__":
    sys.exit(main())
