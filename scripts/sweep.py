#!/usr/bin/env python
"""Run a grid of one recipe, one output directory per run, and write results.csv / results.md.

    python scripts/sweep.py recipes/cpu/sst2_lora.yaml peft.r=1,2,4,8 peft.alpha=2*peft.r \
        training.seed=0,1,2 --out runs/sweeps/rank --aggregate-over training.seed

Re-running the same command skips finished runs (those with metrics.json). `--help` for the syntax.
"""

import sys

from lora_train.experiments.sweep import sweep_main

if __name__ == "__main__":
    sys.exit(sweep_main())
