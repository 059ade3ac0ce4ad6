"""Merge a LoRA / AdaLoRA adapter into its base model and save a standalone safetensors classifier.

    python scripts/merge_adapter.py runs/cpu/sst2_lora runs/cpu/sst2_lora_merged
    python scripts/merge_adapter.py user/sst2-minilm-qlora merged/ --dtype float32

The result loads with transformers alone (AutoModelForSequenceClassification), without peft. An
adapter trained on a 4-bit NF4 base is merged into the dequantized NF4 weights it was trained
against, saved in the quantization's compute dtype unless --dtype says otherwise.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Optional, Sequence

from lora_train.config import RecipeError
from lora_train.startup import prepare_process


def main(argv: Optional[Sequence[str]] = None) -> int:
    prepare_process()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", help="run output directory (or its best/ subdirectory), or Hub repo id user/name")
    parser.add_argument("output_dir", help="directory for the merged model (must be empty or new)")
    parser.add_argument(
        "--dtype",
        choices=["float32", "bfloat16", "float16"],
        help="dtype of the saved weights (default: the training dtype; the compute dtype for NF4 runs)",
    )
    parser.add_argument("--overwrite", action="store_true", help="write into a non-empty output directory")
    args = parser.parse_args(argv)

    # These import torch: loaded once the arguments are checked (--help starts without them)
    from lora_train.inference import RunError
    from lora_train.merge import merge_adapter

    try:
        summary = merge_adapter(args.run, args.output_dir, args.dtype, args.overwrite)
    except (RunError, RecipeError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(json.dumps(summary, indent=1))
    return 0
