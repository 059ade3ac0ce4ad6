#!/usr/bin/env python
"""Load-test the adapter server: requests/s, p50 / p99 latency and memory, batched vs unbatched vs one process

`python scripts/serve_bench.py --help` for usage. The code: lora_lab.commands.serve_bench.
"""

import sys

from lora_lab.commands.serve_bench import main

if __name__ == "__main__":
    sys.exit(main())
