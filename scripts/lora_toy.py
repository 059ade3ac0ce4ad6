#!/usr/bin/env python
"""The linear LoRA toy: learned rank-r update vs the SVD truncation bound, as a table and a plot.

    python scripts/lora_toy.py [--ranks 1,2,4,8,16,32] [--dim 64] [--decay 0.9] [--plot docs/figures/toy_svd_bound.png]
"""

import sys

from lora_train.commands.lora_toy import main

if __name__ == "__main__":
    sys.exit(main())
