#!/usr/bin/env python
"""Load-test the adapter server: requests/s, p50 / p99 latency and memory, batched vs unbatched vs one process
per adapter (see docs/serving.md).

    python scripts/serve_bench.py runs/cpu/sst2_lora runs/cpu/emotion_lora runs/cpu/imdb_lora --clients 32 --duration 60

Each setup's servers run alone, one after the other, on 127.0.0.1 ports chosen here. Prints a Markdown table;
--out also writes the figures as JSON.
"""

import sys

from lora_train.commands.serve_bench import main

if __name__ == "__main__":
    sys.exit(main())
