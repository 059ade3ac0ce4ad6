"""Push an existing run to the Hugging Face Hub: adapter-only weights, tokenizer, model card, metrics, plot.

    python scripts/push_to_hub.py runs/cpu/sst2_lora your-name/sst2-minilm-lora [--public]

The token comes from HF_TOKEN or `hf auth login`, and is never printed. The run's model card is
refreshed so that its usage snippet names REPO_ID; checkpoints/ and best/ are not pushed.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional, Sequence

from lora_train.hub import HubError, push_run
from lora_train.startup import prepare_process


def main(argv: Optional[Sequence[str]] = None) -> int:
    prepare_process()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("output_dir", help="output directory of a finished training run")
    parser.add_argument("repo_id", help="Hub repo to push to, user/name (created when missing)")
    parser.add_argument("--public", action="store_true", help="create the repo as public (default: private)")
    args = parser.parse_args(argv)
    if args.repo_id.count("/") != 1:
        parser.error(f"repo_id {args.repo_id!r} must be of the form user/name")

    try:
        url = push_run(Path(args.output_dir), args.repo_id, private=not args.public)
    except HubError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"pushed {args.output_dir} to {args.repo_id}: {url}")
    return 0
