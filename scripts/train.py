#!/usr/bin/env python
"""Train a LoRA / AdaLoRA / QLoRA text classifier from a recipe.

    accelerate launch scripts/train.py recipes/sst2_qlora.yaml [section.field=value ...]

Run `python scripts/train.py --help` for every recipe field.
"""

import sys

from lora_train.commands.train import main

if __name__ == "__main__":
    sys.exit(main())
