#!/usr/bin/env python
"""Benchmark our training loop against HF Trainer + PEFT (throughput, accuracy) or fp32/bf16/NF4 LoRA (memory).

`python scripts/benchmark.py --help` for usage. The code: lora_lab.commands.benchmark.
"""

import sys

from lora_lab.commands.benchmark import main

if __name__ == "__main__":
    sys.exit(main())
