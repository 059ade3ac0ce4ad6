#!/usr/bin/env python
"""Merge a LoRA / AdaLoRA adapter into its base model and save a standalone safetensors classifier.

    python scripts/merge_adapter.py runs/cpu/sst2_lora runs/cpu/sst2_lora_merged
    python scripts/merge_adapter.py user/sst2-minilm-qlora merged/ --dtype float32

The result loads with transformers alone (AutoModelForSequenceClassification), without peft. An
adapter trained on a 4-bit NF4 base is merged into the dequantized NF4 weights it was trained
against, saved in the quantization's compute dtype unless --dtype says otherwise.
"""

import sys

from lora_train.commands.merge_adapter import main

if __name__ == "__main__":
    sys.exit(main())
