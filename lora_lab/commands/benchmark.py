"""Benchmark our training loop against HF Trainer + PEFT (throughput, accuracy) or fp32/bf16/NF4 LoRA (memory).

    # throughput: 30 steps timed after 10 warm-up steps, 3 interleaved runs of each contender
    python scripts/benchmark.py recipes/cpu/sst2_lora.yaml data.max_length=128 --out runs/bench/steps
    # accuracy at equal epochs (whole epochs timed, then the full validation split)
    python scripts/benchmark.py recipes/cpu/sst2_lora.yaml data.max_train_samples=8000 --epochs 1 --seed-per-repeat \\
        --out runs/bench/epochs
    # ablation: a bare loop with FastDropout / the fused LoRA layers / fused AdamW on and off
    python scripts/benchmark.py recipes/cpu/sst2_lora.yaml data.max_length=128 --levers --out runs/bench/levers
    # memory: weight bytes and peak memory of fp32, bf16, NF4 and NF4 + double quant LoRA
    python scripts/benchmark.py recipes/cpu/sst2_lora.yaml --memory --out runs/bench/memory

Writes results.json and results.md into --out; see docs/performance.md.
"""

import sys
from pathlib import Path
from typing import Optional, Sequence

from lora_lab.benchmark import (
    CONTENDERS,
    LEVERS,
    MEMORY_VARIANTS,
    OPTIONAL_CONTENDERS,
    Settings,
    run_benchmark,
    run_memory,
)
from lora_train.cli import parse_recipe, recipe_parser
from lora_train.startup import prepare_process


def main(argv: Optional[Sequence[str]] = None) -> int:
    prepare_process()
    parser = recipe_parser(__doc__.split("\n\n")[0])
    parser.add_argument(
        "--out", default="runs/benchmark", help="Directory for results.json, results.md and per-run logs."
    )
    parser.add_argument("--warmup", type=int, default=Settings.warmup_steps, help="Untimed optimizer steps first.")
    parser.add_argument("--steps", type=int, default=Settings.measure_steps, help="Timed optimizer steps.")
    parser.add_argument(
        "--repeats", type=int, default=Settings.repeats, help="Runs of each contender (median reported)."
    )
    parser.add_argument(
        "--threads", type=int, default=Settings.threads, help="torch / OpenMP threads, the same for every run."
    )
    parser.add_argument(
        "--seed-per-repeat",
        action="store_true",
        help="Repeat k trains with training.seed + k (every contender alike): accuracy as mean ± std over seeds.",
    )
    parser.add_argument(
        "--epochs", type=float, default=None, help="Time whole epochs and report accuracy instead of --steps."
    )
    parser.add_argument(
        "--contenders",
        nargs="+",
        default=list(CONTENDERS),
        choices=CONTENDERS + OPTIONAL_CONTENDERS,
        help="default: %(default)s; ours_compiled is our loop with training.torch_compile=true",
    )
    parser.add_argument(
        "--levers", action="store_true", help="Ablation of " + ", ".join(LEVERS) + " instead (steps only)."
    )
    parser.add_argument("--memory", action="store_true", help="Compare " + ", ".join(MEMORY_VARIANTS) + " instead.")
    recipe, args = parse_recipe(parser, argv)
    settings = Settings(
        warmup_steps=args.warmup,
        measure_steps=args.steps,
        repeats=args.repeats,
        threads=args.threads,
        epochs=args.epochs,
        seed_per_repeat=args.seed_per_repeat,
    )
    try:
        if args.memory:
            report = run_memory(recipe, settings, Path(args.out))
        elif args.levers:
            if args.epochs is not None:
                raise ValueError("--levers times --steps after --warmup; it has no --epochs mode")
            report = run_benchmark(recipe, settings, Path(args.out), tuple(LEVERS), reference="all")
        else:
            report = run_benchmark(recipe, settings, Path(args.out), tuple(args.contenders))
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print((Path(args.out) / "results.md").read_text())
    return 0 if report else 1
