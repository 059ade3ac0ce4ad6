#!/usr/bin/env python
"""Run one LoRA study end to end: its training runs (resumable), tables (CSV + Markdown) and plots.

`python scripts/study.py --help` for usage. The code: lora_train.experiments.studies.
"""

import sys

from lora_train.experiments.studies import study_main

if __name__ == "__main__":
    sys.exit(study_main())
