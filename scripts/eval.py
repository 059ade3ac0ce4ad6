#!/usr/bin/env python
"""Evaluate a trained run (output directory or Hub repo) on a split of its task.

    python scripts/eval.py runs/cpu/sst2_lora                     # the recipe's evaluation set
    python scripts/eval.py runs/emotion_lora --split test         # another split of the same data
    python scripts/eval.py user/sst2-minilm-lora --data-path ../shared/data/sst2

Writes eval_<split>.json (accuracy, macro-F1, per-class precision / recall / F1, confusion matrix)
and confusion_matrix_<split>.png. The base model is loaded in the quantization the run trained with.
"""

import sys

from lora_train.commands.eval import main

if __name__ == "__main__":
    sys.exit(main())
