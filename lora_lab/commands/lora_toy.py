"""The linear LoRA toy: learned rank-r update vs the SVD truncation bound, as a table and a plot.

python scripts/lora_toy.py [--ranks 1,2,4,8,16,32] [--dim 64] [--decay 0.9] [--plot docs/figures/toy_svd_bound.png]
"""

import argparse
import sys
from typing import Optional, Sequence

from lora_lab.toy import plot_toy, run_toy
from lora_train.startup import prepare_process


def main(argv: Optional[Sequence[str]] = None) -> int:
    prepare_process()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ranks", default="1,2,4,8,16,32", help="Comma-separated LoRA ranks")
    parser.add_argument("--dim", type=int, default=64, help="The layer is dim x dim")
    parser.add_argument("--decay", type=float, default=0.9, help="Singular values of W* - W0 are decay**i")
    parser.add_argument("--steps", type=int, default=3000, help="Full-batch Adam steps per rank")
    parser.add_argument("--lr", type=float, default=0.02, help="Adam learning rate (cosine decay to 0)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--plot", default=None, help="Write the learned-vs-bound plot here (PNG)")
    args = parser.parse_args(argv)
    try:
        ranks = [int(r) for r in args.ranks.split(",")]
        results = run_toy(ranks, args.dim, args.dim, args.decay, steps=args.steps, lr=args.lr, seed=args.seed)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"{'r':>4} {'SVD bound':>12} {'learned':>12} {'learned/bound':>14}")
    for res in results:
        print(f"{res.r:>4} {res.bound:>12.6g} {res.learned:>12.6g} {res.ratio:>14.6f}")
    if args.plot:
        plot_toy(results, args.plot)
        print(f"plot: {args.plot}")
    return 0
