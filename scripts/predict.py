#!/usr/bin/env python
"""Classify texts with a trained run (output directory or Hub repo).

    python scripts/predict.py runs/cpu/sst2_lora "a delightful film" "a dull, lifeless mess"
    python scripts/predict.py runs/cpu/sst2_lora --file reviews.csv --text-column review --json
    cat texts.txt | python scripts/predict.py user/sst2-minilm-lora

Texts come from the arguments, a file (.txt one per line, .jsonl or .csv with a text field) or
stdin, and are classified in batches. Each line of output is `label<TAB>probability<TAB>text`, or a
JSON object with --json. The base model is loaded in the quantization the run trained with.
"""

import sys

from lora_train.commands.predict import main

if __name__ == "__main__":
    sys.exit(main())
