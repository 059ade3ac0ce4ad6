"""Load-test the adapter server: requests/s, p50 / p99 latency and memory, batched vs unbatched vs one process
per adapter vs the plain server a user would write (each adapter merged into its own base copy, one forward per
request; lora_lab/plain_server.py). See docs/serving.md.

    python scripts/serve_bench.py runs/cpu/sst2_lora runs/cpu/emotion_lora runs/cpu/imdb_lora --clients 32 --duration 60
    python scripts/serve_bench.py runs/cpu/sst2_lora runs/cpu/emotion_lora --setups batched plain --repeats 3 \\
        --server-threads 1 --duration 30

Each setup's servers run alone, one after the other, on 127.0.0.1 ports chosen here. Prints a Markdown table;
--out also writes the figures as JSON. --forward-costs times the model worker alone instead (no HTTP): a text per
forward against 16 per forward, the bound on what micro-batching can gain on this machine; --mixing times one
forward shared by all the adapters (grouped, or peft's adapter_names) against one forward per adapter, unmerged and
merged into the base's weights.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path
from typing import Optional, Sequence

from lora_lab.serve_bench import (
    SETUPS,
    fan_out,
    fan_out_table,
    forward_cost_table,
    forward_costs,
    markdown_table,
    mixing_costs,
    run_bench,
    scaled,
    summary,
)
from lora_train.startup import prepare_process


def main(argv: Optional[Sequence[str]] = None) -> int:
    prepare_process()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("adapters", nargs="+", metavar="ADAPTER", help="run directory, Hub repo id, or NAME=SOURCE")
    parser.add_argument("--setups", nargs="+", choices=SETUPS, default=list(SETUPS))
    parser.add_argument("--clients", type=int, default=32, help="concurrent HTTP clients")
    parser.add_argument("--duration", type=float, default=60.0, help="measured seconds per setup")
    parser.add_argument("--warmup", type=float, default=5.0, help="seconds of load before measuring")
    parser.add_argument(
        "--repeats", type=int, default=1, help="runs of each setup, interleaved; the table gives their medians"
    )
    parser.add_argument("--texts-per-adapter", type=int, default=500, help="validation texts each adapter is sent")
    parser.add_argument("--server-threads", type=int, help="--threads of every server process (default: torch's)")
    parser.add_argument(
        "--server-workers", type=int, help="--workers of lora-serve (model worker threads; default: its default)"
    )
    parser.add_argument(
        "--server-kernel-cache",
        type=int,
        metavar="N",
        help="--kernel-cache of lora-serve (compiled oneDNN kernels kept; default: its default)",
    )
    parser.add_argument(
        "--server-no-merge", action="store_true", help="--no-merge of lora-serve (LoRA adapters unmerged on a CPU)"
    )
    parser.add_argument(
        "--forward-costs",
        action="store_true",
        help="instead of the HTTP setups, time the model worker alone: ms per text when each text is its own forward"
        " and when 16 share one (the bound on what batching can gain here)",
    )
    parser.add_argument(
        "--mixing",
        action="store_true",
        help="instead of the HTTP setups, time the model worker alone on 8 texts of every adapter: one grouped forward,"
        " peft's mixed forward, one forward per adapter, one merged forward per adapter (lora_train.serving.grouped,"
        " registry.MIX_ADAPTERS, lora_train.merged)",
    )
    parser.add_argument(
        "--scale",
        type=int,
        nargs="+",
        metavar="N",
        help="run the setups with N adapters loaded at once, for each N (the given adapters taken in turn, as copies"
        " under new names): memory and requests/s against the adapter count",
    )
    parser.add_argument(
        "--fan-out",
        action="store_true",
        help="instead: one text classified by every adapter, one fan-out request against N separate requests",
    )
    parser.add_argument("--out", type=Path, help="also write the results as JSON here")
    args = parser.parse_args(argv)
    if min(args.clients, args.duration, args.texts_per_adapter, args.repeats) <= 0 or args.warmup < 0:
        parser.error("--clients, --duration, --texts-per-adapter and --repeats must be > 0, --warmup >= 0")
    if args.scale and min(args.scale) <= 0:
        parser.error("--scale counts must be > 0")
    # 0 would silently mean "the server's default"
    for flag in ("server_threads", "server_workers", "server_kernel_cache"):
        if getattr(args, flag) is not None and getattr(args, flag) <= 0:
            parser.error(f"--{flag.replace('_', '-')} must be > 0")

    # torch: loaded once the arguments are checked (--help starts without it)
    from lora_train.serving.registry import default_name
    from lora_train.serving.server import split_name

    pairs = [split_name(spec) for spec in args.adapters]
    names = [name or default_name(source, Path(source)) for name, source in pairs]
    if len(set(names)) != len(names):
        parser.error(f"adapter names {names} repeat; name them with NAME=SOURCE")
    if args.forward_costs or args.mixing:
        import torch

        if args.server_threads:
            torch.set_num_threads(args.server_threads)
        if args.mixing:
            rows = mixing_costs([source for _, source in pairs], names)
            print(json.dumps(rows, indent=1))
        else:
            rows = forward_costs([source for _, source in pairs], names, batch_size=16)
            print(forward_cost_table(rows, batch_size=16))
        if args.out:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(rows, indent=1))
        return 0
    sources = [source for _, source in pairs]
    server_args = ["--threads", str(args.server_threads)] if args.server_threads else []
    if args.server_workers:  # lora-serve's alone: the plain server takes --threads only
        server_args += ["--workers", str(args.server_workers)]
    if args.server_kernel_cache:
        server_args += ["--kernel-cache", str(args.server_kernel_cache)]
    if args.server_no_merge:
        server_args += ["--no-merge"]
    if args.fan_out:
        rows = fan_out(
            sources, names, args.clients, args.warmup, args.duration, args.texts_per_adapter, server_args, args.repeats
        )
        print(fan_out_table(rows))
        _write(args.out, rows)
        return 0
    everything = []
    for count in args.scale or [None]:
        chosen, chosen_names = scaled(sources, names, count) if count else (sources, names)
        results = run_bench(
            chosen,
            chosen_names,
            args.setups,
            args.clients,
            args.warmup,
            args.duration,
            args.texts_per_adapter,
            server_args=server_args,
            repeats=args.repeats,
        )
        if count:
            print(f"\n{count} adapter(s) loaded:")
        print(markdown_table(results))
        print(summary(results) or "")
        everything += [{"adapters": len(chosen), **dataclasses.asdict(r)} for r in results]
    _write(args.out, everything)
    return 0


def _write(path: Optional[Path], rows: list) -> None:
    if path:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(rows, indent=1))
