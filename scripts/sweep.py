#!/usr/bin/env python
"""Run a grid of one recipe, one output directory per run, and write results.csv / results.md.

`python scripts/sweep.py --help` for usage. The code: lora_lab.commands.sweep.
"""

import sys

from lora_lab.commands.sweep import main

if __name__ == "__main__":
    sys.exit(main())
