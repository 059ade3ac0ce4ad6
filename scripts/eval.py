#!/usr/bin/env python
"""Evaluate a trained run (output directory or Hub repo) on a split of its task.

`python scripts/eval.py --help` for usage. The code: lora_train.commands.eval.
"""

import sys

from lora_train.commands.eval import main

if __name__ == "__main__":
    sys.exit(main())
