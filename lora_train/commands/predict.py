"""Classify texts with a trained run (output directory or Hub repo).

    python scripts/predict.py runs/cpu/sst2_lora "a delightful film" "a dull, lifeless mess"
    python scripts/predict.py runs/cpu/sst2_lora --file reviews.csv --text-column review --json
    cat texts.txt | python scripts/predict.py user/sst2-minilm-lora

Texts come from the arguments, a file (.txt one per line, .jsonl or .csv with a text field) or
stdin, and are classified in batches. Each line of output is `label<TAB>probability<TAB>text`
(then `<TAB>pair` for a run trained on text pairs), or a JSON object with --json. The base model
is loaded in the quantization the run trained with. stderr shows a progress bar (a line every 20 s when it
is not a terminal) and, at the end, texts per second.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Optional, Sequence

from lora_train.config import RecipeError
from lora_train.progress import progress_bar, stderr_is_terminal
from lora_train.startup import prepare_process


def main(argv: Optional[Sequence[str]] = None) -> int:
    prepare_process()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", help="run output directory (or its best/ subdirectory), or Hub repo id user/name")
    parser.add_argument("texts", nargs="*", help="texts to classify (none: read --file or stdin)")
    parser.add_argument("--file", help="input file: .txt (one text per line), .jsonl or .csv; '-' for stdin")
    parser.add_argument(
        "--text-column", help="field of .jsonl / .csv records holding the text (default: the run's text column)"
    )
    parser.add_argument(
        "--text-pair-column",
        help="field holding the second text, for a run trained on text pairs (default: the run's pair column)",
    )
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument(
        "--json", action="store_true", help="print one JSON object per text, with every class probability"
    )
    parser.add_argument("--device", help="cpu, cuda, cuda:1... (default: cuda when available)")
    parser.add_argument(
        "--no-merge",
        action="store_true",
        help="keep a LoRA adapter unmerged (the forward training evaluated with, as eval.py and lora-serve"
        " --no-merge); by default a CPU merges it into the base's weights, as lora-serve does: faster, the same"
        " up to rounding",
    )
    args = parser.parse_args(argv)
    if args.texts and args.file:
        parser.error("give texts as arguments or --file, not both")
    if args.batch_size <= 0:
        parser.error("--batch-size must be > 0")
    if not args.texts and not args.file and sys.stdin.isatty():
        parser.error("no input: give texts as arguments, --file PATH, or pipe texts (one per line) on stdin")

    # These import torch: loaded once the arguments are checked (--help starts without them)
    from lora_train.data import resolve_spec
    from lora_train.inference import RunError, load_run, predict, read_run, read_texts, resolve_run

    try:
        directory = resolve_run(args.run)  # a Hub repo is downloaded once, here
        texts, total = args.texts, len(args.texts)
        data = read_run(directory)[0].data
        if data.text_pair_column and texts:
            raise RunError(
                f"{args.run} classifies text pairs (data.text_pair_column = {data.text_pair_column!r}): give --file,"
                " a .csv or .jsonl file with both fields"
            )
        if not texts:
            column = args.text_column or resolve_spec(data).text_column or "text"
            pair = args.text_pair_column or data.text_pair_column
            texts = read_texts(args.file or "-", column, pair)
            total = None if args.file in (None, "-") else sum(1 for _ in read_texts(args.file, column, pair))
        run = load_run(str(directory), device=args.device, merge=False if args.no_merge else None)
        # A progress bar (stderr: stdout stays one result per line) once there is more than one batch to classify.
        start, count = time.perf_counter(), 0
        rows = progress_bar(
            predict(run, texts, args.batch_size),
            total=total,
            desc="predict",
            unit="text",
            disable=total is None or total <= args.batch_size,
        )
        for row in rows:
            fields = [row["label"], f"{row['probability']:.4f}", row["text"]] + (
                [row["text_pair"]] if "text_pair" in row else []
            )
            line = json.dumps(row, ensure_ascii=False) if args.json else "\t".join(fields)
            # On a terminal tqdm.write keeps the bar below the results; elsewhere (no bar redrawn) print directly.
            if stderr_is_terminal():
                rows.write(line, file=sys.stdout)
            else:
                print(line)
            sys.stdout.flush()
            count += 1
        rows.close()
        seconds = time.perf_counter() - start
        print(f"predict: {count} texts in {seconds:.1f} s, {count / seconds:.1f} texts/s", file=sys.stderr)
    except (RunError, RecipeError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0
