#!/usr/bin/env python
"""Run one LoRA study end to end: its training runs (resumable), tables (CSV + Markdown) and plots.

    HF_HUB_OFFLINE=1 HF_HUB_CACHE=../shared/hf-hub python scripts/study.py rank     # Study 1
    ... scripts/study.py regimes | quant | toy

Results go to runs/studies/<study>/ (report.md, results.csv, summary.csv) and the plots to docs/figures/.
"""

import sys

from lora_train.experiments.studies import study_main

if __name__ == "__main__":
    sys.exit(study_main())
