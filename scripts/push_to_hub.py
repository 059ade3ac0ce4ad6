#!/usr/bin/env python
"""Push an existing run to the Hugging Face Hub: adapter-only weights, tokenizer, model card, metrics, plot.

    python scripts/push_to_hub.py runs/cpu/sst2_lora your-name/sst2-minilm-lora [--public]

The token comes from HF_TOKEN or `hf auth login`, and is never printed. The run's model card is
refreshed so that its usage snippet names REPO_ID; checkpoints/ and best/ are not pushed.
"""

import sys

from lora_train.commands.push_to_hub import main

if __name__ == "__main__":
    sys.exit(main())
