#!/usr/bin/env python
"""Load-test the adapter server (see ``lora-serve-bench --help`` and docs/serving.md)."""

import sys

from lora_train.serving.bench import main

if __name__ == "__main__":
    sys.exit(main())
