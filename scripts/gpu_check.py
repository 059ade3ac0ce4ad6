#!/usr/bin/env python
"""GPU check: NF4 + double-quant LoRA vs bf16 LoRA on decoder classifiers, in minutes, offline.

`python scripts/gpu_check.py --help` for usage (`--dry-run` runs it on CPU). The code: lora_lab.commands.gpu_check.
"""

import sys

from lora_lab.commands.gpu_check import main

if __name__ == "__main__":
    sys.exit(main())
