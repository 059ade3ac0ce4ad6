"""``lora-serve`` / ``scripts/serve.py``: load the base model once, attach the adapters, serve them over HTTP."""

from __future__ import annotations

import argparse
import ipaddress
import logging
import sys
from typing import Optional, Sequence

from lora_train.serving.registry import ADAPTER_NAME, Adapter, ServingError
from lora_train.startup import prepare_process

log = logging.getLogger("lora_train.serving")

DESCRIPTION = """Serve trained adapters over HTTP: many adapters over one base model, micro-batched.

    python scripts/serve.py runs/cpu/sst2_lora runs/cpu/emotion_lora
    python scripts/serve.py sentiment=user/sst2-minilm-lora runs/cpu/emotion_lora --port 8080

Each ADAPTER is a run directory (or its best/), a Hub repo id, or NAME=SOURCE to choose the adapter's name
(default: the directory's or repo's name). All must share one base model, quantization and training autocast.
The page is at http://HOST:PORT/, the API schema at /openapi.json; see docs/serving.md.
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("adapters", nargs="+", metavar="ADAPTER", help="run directory, Hub repo id, or NAME=SOURCE")
    parser.add_argument(
        "--host",
        default="127.0.0.1",
        help="address to bind (default 127.0.0.1: this machine only; anything else is exposed)",
    )
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--device", help="cpu, cuda, cuda:1... (default: cuda when available)")
    parser.add_argument(
        "--threads",
        type=int,
        help="torch intra-op threads (default: torch's, one per core); 1 on a CPU shared with other work",
    )
    parser.add_argument("--max-batch-texts", type=int, default=64, help="most texts in one forward")
    parser.add_argument(
        "--max-wait-ms", type=float, default=5.0, help="longest a request waits for others to share its forward"
    )
    parser.add_argument("--no-batching", action="store_true", help="one request per forward (for comparison)")
    parser.add_argument(
        "--forward-cost-tokens",
        type=int,
        help="padding tokens one more forward is worth: a batch is split by text length where that saves more"
        " (default: 128 on CPU, 4096 on GPU)",
    )
    parser.add_argument("--max-texts", type=int, default=64, help="most texts per request (more: 413)")
    parser.add_argument("--max-body-bytes", type=int, default=1 << 20, help="largest request body (more: 413)")
    parser.add_argument("--max-queued-texts", type=int, default=4096, help="queue bound (more: 503)")
    parser.add_argument(
        "--limit-concurrency", type=int, default=256, help="most concurrent connections and tasks (uvicorn; more: 503)"
    )
    return parser


def split_name(spec: str) -> tuple[Optional[str], str]:
    """``NAME=SOURCE`` -> (NAME, SOURCE); a plain source -> (None, source)."""
    name, sep, source = spec.partition("=")
    return (name, source) if sep and ADAPTER_NAME.match(name) else (None, spec)


def read_all(specs: Sequence[str]) -> list[Adapter]:
    """Read every adapter and check they can share one base, reporting every problem at once."""
    from lora_train.serving.registry import read_adapter

    adapters, problems = [], []
    for spec in specs:
        try:
            name, source = split_name(spec)
            adapters.append(read_adapter(source, name))
        except ServingError as err:
            problems.append(f"{spec}: {err.message}")
    if adapters:
        first = adapters[0]
        seen: set[str] = set()
        for adapter in adapters:
            if adapter.base != first.base:
                problems.append(
                    f"{adapter.source}: trained on {adapter.base}, but {first.source} on {first.base};"
                    " one server holds one base model"
                )
            if adapter.peft_type != first.peft_type:
                problems.append(
                    f"{adapter.source}: {adapter.peft_type} adapter, but {first.source} is {first.peft_type}"
                )
            if adapter.name in seen:
                problems.append(
                    f"{adapter.source}: adapter name {adapter.name!r} used twice; name them with NAME=SOURCE"
                )
            seen.add(adapter.name)
    if problems:
        raise ServingError(400, "\n  ".join(["cannot serve these adapters:", *problems]))
    return adapters


def main(argv: Optional[Sequence[str]] = None) -> int:
    prepare_process()
    args = build_parser().parse_args(argv)
    for flag in (
        "port",
        "threads",
        "max_batch_texts",
        "forward_cost_tokens",
        "max_texts",
        "max_body_bytes",
        "max_queued_texts",
        "limit_concurrency",
    ):
        if getattr(args, flag) is not None and getattr(args, flag) <= 0:
            print(f"error: --{flag.replace('_', '-')} must be > 0", file=sys.stderr)
            return 2
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S"
    )
    import uvicorn

    from lora_train.serving.app import Limits, create_app
    from lora_train.serving.batcher import MicroBatcher
    from lora_train.serving.registry import AdapterRegistry

    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    registry = AdapterRegistry(args.device, args.forward_cost_tokens)
    try:
        for adapter in read_all(args.adapters):
            registry.attach(adapter)  # before the worker starts, so this thread may change the model
            log.info("adapter %s: %s, labels %s", adapter.name, adapter.source, adapter.label_names)
    except ServingError as err:
        print(f"error: {err.message}", file=sys.stderr)
        return 2
    log.info("base model %s on %s", registry.base, registry.device)
    batcher = MicroBatcher(
        registry.classify,
        max_batch_texts=args.max_batch_texts,
        max_wait_s=args.max_wait_ms / 1000,
        max_queued_texts=args.max_queued_texts,
        batching=not args.no_batching,
    )
    batcher.start()
    if not _is_loopback(args.host):
        log.warning("binding %s: the server is reachable from other machines; it has no authentication", args.host)
    app = create_app(registry, batcher, Limits(max_texts=args.max_texts, max_body_bytes=args.max_body_bytes))
    try:
        uvicorn.run(app, host=args.host, port=args.port, limit_concurrency=args.limit_concurrency, access_log=False)
    finally:
        batcher.stop()
    return 0


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


if __name__ == "__main__":
    sys.exit(main())
