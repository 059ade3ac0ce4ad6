#!/usr/bin/env python
"""Run a grid of one recipe, one output directory per run, and write results.csv / results.md.

`python scripts/sweep.py --help` for usage. The code: lora_train.experiments.sweep.
"""

import sys

from lora_train.experiments.sweep import sweep_main

if __name__ == "__main__":
    sys.exit(sweep_main())
