#!/usr/bin/env python
"""The linear LoRA toy: learned rank-r update vs the SVD truncation bound, as a table and a plot.

`python scripts/lora_toy.py --help` for usage. The code: lora_lab.commands.lora_toy.
"""

import sys

from lora_lab.commands.lora_toy import main

if __name__ == "__main__":
    sys.exit(main())
