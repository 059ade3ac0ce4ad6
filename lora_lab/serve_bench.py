"""Load test of the adapter server: requests/s, p50 / p99 latency and resident memory of four setups.

(a) ``batched``: one server holding every adapter, micro-batching on; (b) ``unbatched``: the same server with
``--no-batching``; (c) ``per-adapter``: one server process per adapter; (d) ``plain``: the server a user would
write without ours (:mod:`lora_lab.plain_server`: each adapter merged into its own copy of the base, one forward
per request), the baseline of the ratio :func:`summary` reports. Each setup is started as real server
processes on 127.0.0.1 and loaded by ``clients`` concurrent HTTP clients (httpx, asyncio) for ``duration_s``
seconds after a warm-up; each request classifies one text of its adapter's own validation split, adapters
taken in turn. Memory is each server process's resident set (VmRSS) and peak (VmHWM) after the load.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

# The torch-importing modules of lora_train are imported inside the functions that use them, as torch itself is:
# importing this module (a command's --help, a test) stays light.

SETUPS = ("batched", "unbatched", "per-adapter", "plain")


@dataclass
class SetupResult:
    """What one setup measured."""

    setup: str
    processes: int
    requests: int
    errors: int
    error_causes: dict[str, int]
    """Failed requests by status code and the server's message (the first 100 characters)."""
    requests_per_s: float
    p50_ms: float
    p99_ms: float
    texts_per_batch: float
    worker_busy: float
    """Share of the load's wall time (warm-up included) the model worker spent in batches, mean over processes:
    near 1 the model is the bottleneck, well below 1 HTTP, tokenization or the clients are."""
    ms_per_batch: float
    rss_mb: float
    peak_rss_mb: float


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def validation_texts(source: str, limit: int) -> list[str]:
    """Up to ``limit`` texts of the adapter's evaluation split (its recipe's data), for realistic requests."""
    from lora_train.data import load_splits, resolve_spec
    from lora_train.inference import read_run, resolve_run

    recipe, _ = read_run(resolve_run(source))
    cfg = dataclasses.replace(recipe.data, max_train_samples=1, max_eval_samples=limit)
    data = load_splits(resolve_spec(cfg), cfg)
    return list(data.eval[data.spec.text_column])


class ServerProcess:
    """``python -m MODULE`` (our server, or :mod:`lora_lab.plain_server`) on a free port of 127.0.0.1, stopped with
    SIGINT."""

    def __init__(self, adapters: Sequence[str], extra: Sequence[str] = (), module: str = "lora_train.serving.server"):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        command = [sys.executable, "-m", module, *adapters, "--port", str(self.port), *extra]
        self.process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)

    def wait_ready(self, timeout_s: float = 600) -> None:
        import httpx

        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited with {self.process.returncode}: {self.process.stderr.read()}")
            try:
                if httpx.get(f"{self.url}/readyz", timeout=5).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise RuntimeError(f"server on {self.url} not ready after {timeout_s} s")

    def memory_mb(self) -> tuple[float, float]:
        """(VmRSS, VmHWM) of the server process in MB."""
        fields = dict(line.split(":", 1) for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines())
        return tuple(int(fields[key].split()[0]) / 1024 for key in ("VmRSS", "VmHWM"))

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


async def _load(
    routes: list[tuple[str, str, list[str]]], clients: int, warmup_s: float, duration_s: float
) -> tuple[list[float], Counter]:
    """Run ``clients`` concurrent clients; latencies (s) of the requests sent after the warm-up, and the failed
    ones counted by status and message."""
    import httpx

    turn = itertools.count()
    latencies: list[float] = []
    errors: Counter = Counter()
    start = time.monotonic()
    measure_from, stop_at = start + warmup_s, start + warmup_s + duration_s
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)

    async def client(http: httpx.AsyncClient) -> None:
        while time.monotonic() < stop_at:
            n = next(turn)
            url, adapter, texts = routes[n % len(routes)]
            sent = time.monotonic()
            response = await http.post(
                f"{url}/v1/classify", json={"adapter": adapter, "texts": [texts[n % len(texts)]]}
            )
            if sent >= measure_from:
                if response.status_code == 200:
                    latencies.append(time.monotonic() - sent)
                else:
                    errors[f"{response.status_code} {response.text[:100]}"] += 1

    async with httpx.AsyncClient(limits=limits, timeout=120) as http:
        await asyncio.gather(*(client(http) for _ in range(clients)))
    return latencies, errors


def run_setup(
    setup: str,
    adapters: Sequence[str],
    names: Sequence[str],
    texts: dict[str, list[str]],
    clients: int,
    warmup_s: float,
    duration_s: float,
    server_args: Sequence[str] = (),
) -> SetupResult:
    """Start the setup's servers, load them, measure, stop them."""
    import httpx

    named = [f"{name}={source}" for name, source in zip(names, adapters, strict=True)]
    if setup == "per-adapter":
        servers = [ServerProcess([spec], server_args) for spec in named]
        routes = [(server.url, name, texts[name]) for server, name in zip(servers, names, strict=True)]
    elif setup == "plain":
        threads = [arg for i, arg in enumerate(server_args) if i and server_args[i - 1] == "--threads"]
        servers = [ServerProcess(named, ["--threads", *threads] if threads else [], module="lora_lab.plain_server")]
        routes = [(servers[0].url, name, texts[name]) for name in names]
    else:
        extra = [*server_args, "--no-batching"] if setup == "unbatched" else list(server_args)
        servers = [ServerProcess(named, extra)]
        routes = [(servers[0].url, name, texts[name]) for name in names]
    try:
        for server in servers:
            server.wait_ready()
        latencies, errors = asyncio.run(_load(routes, clients, warmup_s, duration_s))
        health = [httpx.get(f"{server.url}/healthz").json() for server in servers]
        memory = [server.memory_mb() for server in servers]
    finally:
        for server in servers:
            server.stop()
    ms = np.asarray(latencies) * 1000
    batches = max(1, sum(h["batches"] for h in health))
    busy_s = sum(h["busy_s"] for h in health)
    return SetupResult(
        setup=setup,
        processes=len(servers),
        requests=len(latencies),
        errors=sum(errors.values()),
        error_causes=dict(errors),
        requests_per_s=len(latencies) / duration_s,
        p50_ms=float(np.percentile(ms, 50)) if len(ms) else float("nan"),
        p99_ms=float(np.percentile(ms, 99)) if len(ms) else float("nan"),
        texts_per_batch=sum(h["texts"] for h in health) / batches,
        worker_busy=busy_s / len(health) / (warmup_s + duration_s),
        ms_per_batch=1000 * busy_s / batches,
        rss_mb=sum(m[0] for m in memory),
        peak_rss_mb=sum(m[1] for m in memory),
    )


def markdown_table(results: list[SetupResult]) -> str:
    lines = [
        "| setup | processes | requests/s | p50 ms | p99 ms | requests (errors) | texts per batch | ms per batch"
        " | model busy | RSS MB | peak RSS MB |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        lines.append(
            f"| {r.setup} | {r.processes} | {r.requests_per_s:.1f} | {r.p50_ms:.0f} | {r.p99_ms:.0f} |"
            f" {r.requests} ({r.errors}) | {r.texts_per_batch:.1f} | {r.ms_per_batch:.1f} | {r.worker_busy:.0%} |"
            f" {r.rss_mb:.0f} | {r.peak_rss_mb:.0f} |"
        )
    causes = [f"- {r.setup}: {count} x {cause}" for r in results for cause, count in r.error_causes.items()]
    return "\n".join(lines + (["", "Errors:", *causes] if causes else []))


def run_bench(
    adapters: Sequence[str],
    names: Sequence[str],
    setups: Sequence[str] = SETUPS,
    clients: int = 32,
    warmup_s: float = 5.0,
    duration_s: float = 60.0,
    texts_per_adapter: int = 500,
    server_args: Sequence[str] = (),
    log=print,
    repeats: int = 1,
) -> list[SetupResult]:
    """Measure each setup in turn (never two at once: they share the CPU), ``repeats`` times interleaved (the order
    rotates each repeat); one result per setup, the median of its repeats (:func:`median_result`)."""
    texts = {name: validation_texts(source, texts_per_adapter) for name, source in zip(names, adapters, strict=True)}
    runs: dict[str, list[SetupResult]] = {setup: [] for setup in setups}
    for repeat in range(repeats):
        for i in range(len(setups)):
            setup = setups[(repeat + i) % len(setups)]
            log(
                f"[{repeat}] {setup}: {clients} clients, {warmup_s:g} s warm-up + {duration_s:g} s,"
                f" load average {os.getloadavg()}"
            )
            runs[setup].append(run_setup(setup, adapters, names, texts, clients, warmup_s, duration_s, server_args))
            log(f"  {runs[setup][-1]}")
    return [median_result(runs[setup]) for setup in setups]


def median_result(results: list[SetupResult]) -> SetupResult:
    """One setup's repeats as one result: the median of each rate, latency and memory figure; requests and errors
    summed over the repeats."""
    causes: Counter = Counter()
    for r in results:
        causes.update(r.error_causes)
    medians = {
        f.name: float(np.median([getattr(r, f.name) for r in results]))
        for f in dataclasses.fields(SetupResult)
        if f.type in ("float", float)
    }
    return SetupResult(
        **{
            **medians,
            "setup": results[0].setup,
            "processes": results[0].processes,
            "requests": sum(r.requests for r in results),
            "errors": sum(r.errors for r in results),
            "error_causes": dict(causes),
        }
    )


def fan_out(
    adapters: Sequence[str],
    names: Sequence[str],
    clients: int = 8,
    warmup_s: float = 3.0,
    duration_s: float = 20.0,
    texts_per_adapter: int = 200,
    server_args: Sequence[str] = (),
    repeats: int = 1,
) -> list[dict[str, Any]]:
    """One text classified by every adapter: one fan-out request (``{"adapters": names, "texts": [text]}``)
    against ``len(names)`` separate requests sent at once, on one server, ``clients`` closed-loop clients each;
    fan-outs per second and p50 / p99 latency of a whole fan-out, the median of ``repeats`` interleaved runs."""

    texts = validation_texts(adapters[0], texts_per_adapter)
    server = ServerProcess([f"{n}={s}" for n, s in zip(names, adapters, strict=True)], server_args)
    runs: dict[str, list[dict[str, float]]] = {"one fan-out request": [], "separate requests": []}
    try:
        server.wait_ready()
        for repeat in range(repeats):
            for mode in list(runs)[repeat % 2 :] + list(runs)[: repeat % 2]:
                runs[mode].append(
                    asyncio.run(_fan_out_load(server.url, list(names), texts, clients, warmup_s, duration_s, mode))
                )
        rss = server.memory_mb()[0]
    finally:
        server.stop()
    return [
        {"mode": mode, "adapters": len(names), "rss_mb": rss}
        | {key: float(np.median([r[key] for r in results])) for key in results[0]}
        for mode, results in runs.items()
    ]


async def _fan_out_load(
    url: str, names: list[str], texts: list[str], clients: int, warmup_s: float, duration_s: float, mode: str
) -> dict[str, float]:
    import httpx

    turn = itertools.count()
    latencies: list[float] = []
    start = time.monotonic()
    measure_from, stop_at = start + warmup_s, start + warmup_s + duration_s
    limits = httpx.Limits(max_connections=clients * len(names), max_keepalive_connections=clients * len(names))

    async def client(http: httpx.AsyncClient) -> None:
        while time.monotonic() < stop_at:
            text = texts[next(turn) % len(texts)]
            sent = time.monotonic()
            if mode == "one fan-out request":
                responses = [await http.post(f"{url}/v1/classify", json={"adapters": names, "texts": [text]})]
            else:
                responses = await asyncio.gather(
                    *(http.post(f"{url}/v1/classify", json={"adapter": n, "texts": [text]}) for n in names)
                )
            if any(r.status_code != 200 for r in responses):
                raise RuntimeError(f"fan-out load: {[r.text[:200] for r in responses if r.status_code != 200]}")
            if sent >= measure_from:
                latencies.append(time.monotonic() - sent)

    async with httpx.AsyncClient(limits=limits, timeout=120) as http:
        await asyncio.gather(*(client(http) for _ in range(clients)))
    ms = np.asarray(latencies) * 1000
    return {
        "fan_outs_per_s": len(latencies) / duration_s,
        "p50_ms": float(np.percentile(ms, 50)),
        "p99_ms": float(np.percentile(ms, 99)),
    }


def fan_out_table(rows: list[dict[str, Any]]) -> str:
    """:func:`fan_out` as Markdown."""
    lines = [
        "| one text, N adapters | N | fan-outs/s | p50 ms | p99 ms | RSS MB |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['mode']} | {r['adapters']} | {r['fan_outs_per_s']:.1f} | {r['p50_ms']:.0f} | {r['p99_ms']:.0f} |"
            f" {r['rss_mb']:.0f} |"
        )
    return "\n".join(lines)


def _best_seconds(registry, calls: list, repeats: int) -> float:
    """The fastest of ``repeats`` passes over ``calls`` (each a ``registry.classify`` argument), in seconds."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        for call in calls:
            registry.classify(call)
        times.append(time.perf_counter() - start)
    return min(times)


def forward_costs(
    adapters: Sequence[str], names: Sequence[str], texts_per_adapter: int = 64, batch_size: int = 16, repeats: int = 3
) -> list[dict[str, Any]]:
    """The model worker alone, no HTTP: milliseconds per text when each text is its own forward and when
    ``batch_size`` texts of one adapter share a forward (best of ``repeats``). Their ratio bounds what
    micro-batching can gain on this machine, since HTTP, JSON and tokenization cost the same in both setups.
    """
    import torch

    from lora_train.serving.registry import AdapterRegistry, read_adapter

    registry = AdapterRegistry()
    for name, source in zip(names, adapters, strict=True):
        registry.attach(read_adapter(source, name))
    rows = []
    for name, source in zip(names, adapters, strict=True):
        features, _ = registry.get(name).encode(validation_texts(source, texts_per_adapter))
        alone = [[(name, [f])] for f in features]
        batched = [[(name, features[i : i + batch_size])] for i in range(0, len(features), batch_size)]

        registry.classify(batched[0])  # warm-up: first-call allocations and kernel selection
        one = _best_seconds(registry, alone, repeats) * 1000 / len(features)
        many = _best_seconds(registry, batched, repeats) * 1000 / len(features)
        tokens = sum(len(f["input_ids"]) for f in features) / len(features)
        rows.append(
            dict(
                adapter=name,
                threads=torch.get_num_threads(),
                mean_tokens=tokens,
                ms_per_text_alone=one,
                ms_per_text_batched=many,
                bound=one / many,
            )
        )
    return rows


def mixing_costs(
    adapters: Sequence[str], names: Sequence[str], texts_per_adapter: int = 8, repeats: int = 3
) -> list[dict[str, Any]]:
    """The model worker alone, no HTTP: milliseconds for ``texts_per_adapter`` validation texts of each adapter
    (cut to the shortest adapter's max_length) in one grouped forward (:mod:`lora_train.serving.grouped`), in peft's
    mixed forward, in one forward per adapter, and in one forward per adapter merged into the base's weights
    (:mod:`lora_train.merged`, the CPU's default), for the first 1, 2, ... adapters (best of ``repeats`` over 4
    such batches)."""
    import torch

    from lora_train.serving.registry import AdapterRegistry, read_adapter

    # Texts of very different lengths are split as the server splits them.
    unmerged, merged = AdapterRegistry(merge=False), AdapterRegistry(merge=True)
    for name, source in zip(names, adapters, strict=True):
        unmerged.attach(read_adapter(source, name))
        merged.attach(read_adapter(source, name))
    cut = min(unmerged.get(name).max_length for name in names)
    pool = {
        name: [
            {key: ids[:cut] for key, ids in f.items()}
            for f in unmerged.get(name).encode(validation_texts(source, 4 * texts_per_adapter))[0]
        ]
        for name, source in zip(names, adapters, strict=True)
    }
    rows = []
    for count in range(1, len(names) + 1):
        chosen = names[:count]
        calls = [
            [(n, [f]) for n in chosen for f in pool[n][i * texts_per_adapter : (i + 1) * texts_per_adapter]]
            for i in range(4)
        ]
        row = dict(adapters="+".join(chosen), texts=len(calls[0]), threads=torch.get_num_threads())
        for how, registry, group, mix in (
            ("grouped", unmerged, True, False),
            ("peft_mixed", unmerged, False, True),
            ("per_adapter", unmerged, False, False),
            ("merged", merged, True, False),
        ):
            registry.group, registry.mix = group, mix
            registry.classify(calls[0])  # warm-up
            row[f"ms_{how}"] = round(_best_seconds(registry, calls, repeats) * 1000 / len(calls), 1)
        rows.append(row)
    return rows


def forward_cost_table(rows: list[dict[str, Any]], batch_size: int) -> str:
    """:func:`forward_costs` as Markdown."""
    lines = [
        f"| adapter | torch threads | tokens per text | ms per text, alone | ms per text, {batch_size} per forward"
        " | bound on the batching speed-up |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['adapter']} | {r['threads']} | {r['mean_tokens']:.0f} | {r['ms_per_text_alone']:.1f} |"
            f" {r['ms_per_text_batched']:.1f} | {r['bound']:.2f}x |"
        )
    return "\n".join(lines)


def scaled(adapters: Sequence[str], names: Sequence[str], count: int) -> tuple[list[str], list[str]]:
    """``count`` adapters taken in turn from ``adapters`` (the same run loaded under several names: copies)."""
    chosen = [i % len(adapters) for i in range(count)]
    return [adapters[i] for i in chosen], [f"{names[i]}_{k}" if count > 1 else names[i] for k, i in enumerate(chosen)]


def summary(results: list[SetupResult]) -> Optional[str]:
    """The issue's two targets, as measured: batched vs unbatched throughput and p99, 3-in-1 vs 1 memory."""
    by = {r.setup: r for r in results}
    lines = []
    if "batched" in by and "plain" in by:
        b, p = by["batched"], by["plain"]
        lines.append(
            f"batched / plain server requests/s: {b.requests_per_s / p.requests_per_s:.2f}x;"
            f" p99 {b.p99_ms:.0f} ms vs {p.p99_ms:.0f} ms; RSS {b.rss_mb:.0f} MB vs {p.rss_mb:.0f} MB"
        )
    if "batched" in by and "unbatched" in by:
        b, u = by["batched"], by["unbatched"]
        lines.append(
            f"batched / unbatched requests/s: {b.requests_per_s / u.requests_per_s:.2f}x;"
            f" p99 {b.p99_ms:.0f} ms vs {u.p99_ms:.0f} ms"
        )
    if "batched" in by and "per-adapter" in by:
        b, p = by["batched"], by["per-adapter"]
        one = p.rss_mb / p.processes
        lines.append(
            f"RSS of {p.processes} adapters in one process / one adapter in one process:"
            f" {b.rss_mb:.0f} / {one:.0f} MB = {b.rss_mb / one:.2f}x;"
            f" one process per adapter: {p.rss_mb:.0f} MB"
        )
    return "\n".join(lines) or None
