#!/usr/bin/env python
"""Push an existing run to the Hugging Face Hub: adapter-only weights, tokenizer, model card, metrics, plot.

`python scripts/push_to_hub.py --help` for usage. The code: lora_train.commands.push_to_hub.
"""

import sys

from lora_train.commands.push_to_hub import main

if __name__ == "__main__":
    sys.exit(main())
