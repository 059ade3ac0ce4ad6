#!/usr/bin/env python
"""Serve trained adapters over HTTP: many adapters over one base model, micro-batched (see docs/serving.md).

python scripts/serve.py runs/cpu/sst2_lora runs/cpu/emotion_lora [--host 127.0.0.1 --port 8000]
"""

import sys

from lora_train.serving.server import main

if __name__ == "__main__":
    sys.exit(main())
