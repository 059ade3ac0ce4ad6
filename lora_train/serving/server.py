"""``lora-serve`` / ``scripts/serve.py``: load the base model once, attach the adapters, serve them over HTTP."""

from __future__ import annotations

import argparse
import ipaddress
import logging
import os
import sys
from pathlib import Path
from typing import Optional, Sequence

from lora_train.serving.access import LOOPBACK_HOSTS, Access, normal_host, read_admin_token
from lora_train.serving.batcher import MicroBatcher
from lora_train.serving.registry import Adapter, ServingError, check_adapter_name, read_adapter
from lora_train.serving.replicas import ReplicatedRegistry
from lora_train.startup import KERNEL_CACHE_VARIABLES, bound_kernel_caches, prepare_process

log = logging.getLogger("lora_train.serving")

DEFAULT_KERNEL_CACHE = 128
"""Compiled oneDNN kernels a CPU server keeps in each cache (:func:`lora_train.startup.bound_kernel_caches`). With
the libraries' 1,024 a server of two short-text adapters held 852 and 861 MB against the plain server's 836; with
128, 808 and 782 MB at 2.59x and 2.72x its requests/s (docs/serving.md, "Both kernel caches bounded")."""

DESCRIPTION = """Serve trained adapters over HTTP: many adapters over one base model, micro-batched.

    python scripts/serve.py runs/cpu/sst2_lora runs/cpu/emotion_lora
    python scripts/serve.py sentiment=user/sst2-minilm-lora runs/cpu/emotion_lora --port 8080

Each ADAPTER is a run directory (or its best/), a Hub repo id, or NAME=SOURCE to choose the adapter's name
(default: the directory's or repo's name): LoRA / AdaLoRA / QLoRA adapters, and BitFit / head_only runs (only the
tensors they trained). All must share one base model, quantization and training autocast.
The page is at http://HOST:PORT/, the API schema at /openapi.json; see docs/serving.md.

Loading and unloading adapters while serving (POST / DELETE /v1/adapters) is off unless an admin token is given
(--admin-token-file, or $LORA_SERVE_ADMIN_TOKEN); loads then read only under --adapter-root, and the Hub only with
--allow-hub:

    python scripts/serve.py runs/cpu/sst2_lora --admin-token-file ~/.serve-token --adapter-root runs/cpu
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
    parser.add_argument(
        "--allowed-host",
        action="append",
        default=[],
        metavar="NAME",
        help="a Host header name the server answers to, besides localhost, 127.0.0.1, [::1] and --host (repeat it;"
        " '*' for any, only behind a gateway that checks Host); others get 400",
    )
    parser.add_argument(
        "--admin-token-file",
        metavar="FILE",
        help="file holding the bearer token that POST / DELETE /v1/adapters need (or set $LORA_SERVE_ADMIN_TOKEN);"
        " without one, loading and unloading while serving is off",
    )
    parser.add_argument(
        "--adapter-root",
        metavar="DIR",
        help="the directory hot loads may read: a load names a run under it, relative to it (default: none)",
    )
    parser.add_argument(
        "--allow-hub", action="store_true", help="hot loads may download Hub repos (user/name); default: off"
    )
    parser.add_argument("--device", help="cpu, cuda, cuda:1... (default: cuda when available)")
    parser.add_argument(
        "--threads",
        type=int,
        help="torch intra-op threads (default: torch's, one per core); 1 on a CPU shared with other work",
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=1,
        help="model worker threads, each with its own replica of the model (sharing its weights): 2 with --threads 1"
        " keeps a 2-core CPU busier than one worker on 2 threads (docs/serving.md); 1 on a GPU",
    )
    parser.add_argument(
        "--no-merge",
        action="store_true",
        help="keep plain LoRA adapters unmerged on a CPU too (a GPU always does): batches of many adapters then share"
        " one grouped forward, faster and smaller than merged adapters from about 8 adapters on (docs/serving.md);"
        " the probabilities are then predict.py --no-merge's",
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
        " (default: 104 on CPU, 4096 on GPU; a merged forward skips padding and is not split)",
    )
    parser.add_argument(
        "--kernel-cache",
        type=int,
        metavar="N",
        help=f"compiled oneDNN kernels kept on a CPU, in each of oneDNN's and PyTorch's caches (default:"
        f" {DEFAULT_KERNEL_CACHE} unless ${KERNEL_CACHE_VARIABLES[0]} or ${KERNEL_CACHE_VARIABLES[1]} is set; the"
        " libraries' own is 1024): fewer hold less memory under load and compile more often (docs/serving.md)",
    )
    parser.add_argument("--max-texts", type=int, default=64, help="most texts per request (more: 413)")
    parser.add_argument("--max-body-bytes", type=int, default=1 << 20, help="largest request body (more: 413)")
    parser.add_argument("--max-queued-texts", type=int, default=4096, help="queue bound (more: 503)")
    parser.add_argument(
        "--limit-concurrency", type=int, default=256, help="most concurrent connections and tasks (uvicorn; more: 503)"
    )
    return parser


def split_name(spec: str) -> tuple[Optional[str], str]:
    """``NAME=SOURCE`` -> (NAME, SOURCE); a plain source (or an existing path with '=' in it) -> (None, source).
    An invalid NAME is refused, saying what a valid one is."""
    name, sep, source = spec.partition("=")
    if not sep or Path(spec).exists():
        return None, spec
    try:
        check_adapter_name(name)
    except ServingError as err:
        raise ServingError(err.status, f"{err.message} (NAME=SOURCE; a path with '=' in it must exist)") from None
    return name, source


def registry_for(args: argparse.Namespace) -> ReplicatedRegistry:
    """The (still empty) registry the command line asks for: one replica per worker; LoRA merged where the device
    merges it (:data:`lora_train.merged.MERGED_FORWARDS`) unless ``--no-merge``."""
    merge = False if args.no_merge else None
    return ReplicatedRegistry(args.device, args.forward_cost_tokens, replicas=args.workers, merge=merge)


def read_all(specs: Sequence[str]) -> list[Adapter]:
    """Read every adapter and check they can share one base, reporting every problem at once."""
    adapters, problems = [], []
    for spec in specs:
        try:
            name, source = split_name(spec)
            adapters.append(read_adapter(source, name))
        except ServingError as err:
            problems.append(f"{spec}: {err.message}")
    if adapters:
        first = adapters[0]
        first_peft = next((a for a in adapters if a.is_peft), None)  # runs of trained tensors add no peft type
        seen: set[str] = set()
        for adapter in adapters:
            if adapter.base != first.base:
                problems.append(
                    f"{adapter.source}: trained on {adapter.base}, but {first.source} on {first.base};"
                    " one server holds one base model"
                )
            if adapter.is_peft and adapter.peft_type != first_peft.peft_type:
                problems.append(
                    f"{adapter.source}: {adapter.peft_type} adapter, but {first_peft.source} is {first_peft.peft_type}"
                )
            if adapter.name in seen:
                problems.append(
                    f"{adapter.source}: adapter name {adapter.name!r} used twice; name them with NAME=SOURCE"
                )
            seen.add(adapter.name)
    if problems:
        raise ServingError(400, "\n  ".join(["cannot serve these adapters:", *problems]))
    return adapters


def kernel_cache_for(requested: Optional[int]) -> Optional[int]:
    """How many compiled kernels each oneDNN cache keeps: ``--kernel-cache``, else :data:`DEFAULT_KERNEL_CACHE` unless
    the environment already sizes either cache (None: left as it says)."""
    if requested:
        return requested
    return None if any(name in os.environ for name in KERNEL_CACHE_VARIABLES) else DEFAULT_KERNEL_CACHE


def access_for(args: argparse.Namespace) -> Access:
    """The operator's access choices from the command line (and $LORA_SERVE_ADMIN_TOKEN), checked."""
    token = read_admin_token(args.admin_token_file)
    root = Path(args.adapter_root).expanduser() if args.adapter_root else None
    if root is not None and not root.is_dir():
        raise ServingError(400, f"--adapter-root '{args.adapter_root}' is not a directory")
    if token is None and (root is not None or args.allow_hub):
        raise ServingError(
            400,
            "--adapter-root and --allow-hub apply to loads while serving, which are off without an admin token:"
            " add --admin-token-file FILE (or set $LORA_SERVE_ADMIN_TOKEN)",
        )
    if token is not None and root is None and not args.allow_hub:
        log.warning("admin token given without --adapter-root or --allow-hub: adapters can be unloaded, not loaded")
    wildcard = args.host in ("0.0.0.0", "::", "")
    hosts = {*LOOPBACK_HOSTS, *(normal_host(h) for h in args.allowed_host)}
    if not wildcard:
        hosts.add(normal_host(args.host))
    return Access(admin_token=token, adapter_root=root, allow_hub=args.allow_hub, allowed_hosts=frozenset(hosts))


def main(argv: Optional[Sequence[str]] = None) -> int:
    prepare_process()
    args = build_parser().parse_args(argv)
    for flag in (
        "port",
        "threads",
        "workers",
        "max_batch_texts",
        "forward_cost_tokens",
        "kernel_cache",
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
    try:
        access = access_for(args)
    except ServingError as err:
        print(f"error: {err.message}", file=sys.stderr)
        return 2
    import uvicorn

    from lora_train.serving.app import Limits, create_app  # FastAPI: loaded to serve, not for --help or a bad flag

    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    kernel_cache = kernel_cache_for(args.kernel_cache)
    if kernel_cache:
        bound_kernel_caches(kernel_cache)  # before the model's first oneDNN kernel
    registry = registry_for(args)
    try:
        for adapter in read_all(args.adapters):
            registry.attach(adapter)  # before the worker starts, so this thread may change the model
            log.info("adapter %s: %s, labels %s", adapter.name, adapter.source, adapter.label_names)
    except ServingError as err:
        print(f"error: {err.message}", file=sys.stderr)
        return 2
    setup = f"{args.workers} model worker(s), oneDNN kernel caches: {kernel_cache or 'as the environment sets'}"
    log.info("base model %s on %s, %s", registry.base, registry.device, setup)
    batcher = MicroBatcher(
        registry.runners(),
        max_batch_texts=args.max_batch_texts,
        max_wait_s=args.max_wait_ms / 1000,
        max_queued_texts=args.max_queued_texts,
        batching=not args.no_batching,
    )
    batcher.start()
    if not _is_loopback(args.host):
        log.warning(
            "binding %s: the server is reachable from other machines; classification needs no authentication",
            args.host,
        )
    log.info(
        "answering Host %s; loading and unloading adapters %s",
        ", ".join(sorted(access.allowed_hosts)),
        "off"
        if access.admin_token is None
        else f"on with the admin token (from {access.adapter_root or 'no directory'}"
        + (", and the Hub)" if access.allow_hub else ")"),
    )
    limits = Limits(max_texts=args.max_texts, max_body_bytes=args.max_body_bytes)
    app = create_app(registry, batcher, limits, access)
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
