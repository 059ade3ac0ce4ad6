"""Evaluate a trained run (output directory or Hub repo) on a split of its task.

    python scripts/eval.py runs/cpu/sst2_lora                     # the recipe's evaluation set
    python scripts/eval.py runs/emotion_lora --split test         # another split of the same data
    python scripts/eval.py user/sst2-minilm-lora --data-path nyu-mll/glue
    python scripts/eval.py runs/own_csv_lora --data-path new_reviews.csv  # every row of one file

Writes eval_<split>.json (accuracy, macro-F1, per-class precision / recall / F1, confusion matrix)
and confusion_matrix_<split>.png. The base model is loaded in the quantization the run trained with.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Optional, Sequence

from lora_train.config import RecipeError
from lora_train.plots import confusion_matrix_png
from lora_train.startup import prepare_process


def main(argv: Optional[Sequence[str]] = None) -> int:
    prepare_process()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", help="run output directory (or its best/ subdirectory), or Hub repo id user/name")
    parser.add_argument(
        "--split", help="split to evaluate (default: the recipe's evaluation split, exactly as in training)"
    )
    parser.add_argument(
        "--data-path",
        help="data file, directory of {split}.csv|tsv|json|jsonl|parquet files, or Hub dataset id (default: the"
        " recipe's data.path)",
    )
    parser.add_argument("--max-samples", type=int, help="evaluate a fixed random subset of this many rows")
    parser.add_argument(
        "--batch-size",
        type=int,
        help="texts per forward (default: the run's training.per_device_eval_batch_size, the batches of its"
        " metrics.json: under bf16 other batches round differently)",
    )
    parser.add_argument("--device", help="cpu, cuda, cuda:1... (default: cuda when available)")
    parser.add_argument(
        "--output-dir", help="where the JSON and PNG go (default: RUN/eval, or runs/eval/<user--name> for a Hub repo)"
    )
    args = parser.parse_args(argv)
    if args.max_samples is not None and args.max_samples <= 0:
        parser.error("--max-samples must be > 0")
    if args.batch_size is not None and args.batch_size <= 0:
        parser.error("--batch-size must be > 0")

    # These import torch: loaded once the arguments are checked (--help starts without them)
    from lora_train.checkpoint import writable_directory_problem
    from lora_train.data import DataError
    from lora_train.inference import RunError, evaluate_run, load_run, resolve_run

    local = Path(args.run).exists()
    out = (
        Path(args.output_dir)
        if args.output_dir
        else (Path(args.run) / "eval" if local else Path("runs/eval") / args.run.replace("/", "--"))
    )
    try:
        resolve_run(args.run)  # a path that is not a run is named before any directory is made for its results
        problem = writable_directory_problem(out)  # before the work (minutes on IMDb), not after it
        if problem:
            where = f"--output-dir '{out}'" if args.output_dir else f"the default output directory '{out}'"
            raise RunError(f"{where} {problem}; give a directory you can write to with --output-dir DIR")
        run = load_run(args.run, device=args.device, merge=False)  # training's own forward: metrics.json's figures
        report = evaluate_run(run, args.split, args.data_path, args.max_samples, args.batch_size)
    except (RunError, RecipeError, DataError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    split = report["split"]
    out.mkdir(parents=True, exist_ok=True)
    (out / f"eval_{split}.json").write_text(json.dumps(report, indent=1))
    title = f"{Path(args.run).name if local else args.run}: {split} ({report['num_samples']} examples)"
    (out / f"confusion_matrix_{split}.png").write_bytes(
        confusion_matrix_png(report["confusion_matrix"], run.label_names, title)
    )

    print(
        f"{split}: {report['num_samples']} examples | accuracy {report['accuracy']:.4f}"
        f" | macro-F1 {report['macro_f1']:.4f} | loss {report['loss']:.4f}"
        f" | {report['texts_per_s']:.1f} texts/s"
    )
    print(f"{'class':<16}{'precision':>10}{'recall':>10}{'F1':>10}{'support':>10}")
    for name, c in report["per_class"].items():
        print(f"{name:<16}{c['precision']:>10.4f}{c['recall']:>10.4f}{c['f1']:>10.4f}{c['support']:>10}")
    print(f"wrote {out / f'eval_{split}.json'} and {out / f'confusion_matrix_{split}.png'}")
    return 0
