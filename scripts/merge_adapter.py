#!/usr/bin/env python
"""Merge a LoRA / AdaLoRA adapter into its base model and save a standalone safetensors classifier.

`python scripts/merge_adapter.py --help` for usage. The code: lora_train.commands.merge_adapter.
"""

import sys

from lora_train.commands.merge_adapter import main

if __name__ == "__main__":
    sys.exit(main())
