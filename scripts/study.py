#!/usr/bin/env python
"""Run one LoRA study end to end: its training runs (resumable), tables (CSV + Markdown) and plots.

`python scripts/study.py --help` for usage. The code: lora_lab.commands.study.
"""

import sys

from lora_lab.commands.study import main

if __name__ == "__main__":
    sys.exit(main())
