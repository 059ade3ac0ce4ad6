#!/usr/bin/env python
"""Serve trained adapters over HTTP: many adapters over one base model, micro-batched (see docs/serving.md).

`python scripts/serve.py --help` for usage. The code: lora_train.serving.server.
"""

import sys

from lora_train.serving.server import main

if __name__ == "__main__":
    sys.exit(main())
