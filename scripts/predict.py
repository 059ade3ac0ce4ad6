#!/usr/bin/env python
"""Classify texts with a trained run (output directory or Hub repo).

`python scripts/predict.py --help` for usage. The code: lora_train.commands.predict.
"""

import sys

from lora_train.commands.predict import main

if __name__ == "__main__":
    sys.exit(main())
