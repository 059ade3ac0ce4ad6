"""Reload, re-score and merge finished runs: does what a run saved give back what training measured?

    python -m lora_lab.reload_check runs/studies/peft_methods --seed 0

For each run directory (one holding ``metrics.json``): reload it with ``lora_train.inference.load_run`` and score
it on the recipe's evaluation set again; for an adapter, also load it with plain peft
(``AutoPeftModelForSequenceClassification``, given the run's labels) and compare its logits with ``load_run``'s;
then merge it into a standalone model (``lora_train.merge.merge_adapter``) and score that, or record why the merge
is refused. Prints a Markdown table and writes it to ``reload_check.md`` in the directory given.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path
from typing import Any, Optional, Sequence

import torch

from lora_train.config import load_recipe
from lora_train.inference import RunError, evaluate_run, is_adapter_run, load_run
from lora_train.merge import merge_adapter
from lora_train.startup import prepare_process

TEXTS = ["a gripping, beautifully acted film", "i feel so alone and sad today", "dull and far too long", "wow!"]


@torch.no_grad()
def plain_peft_max_difference(run_dir: Path, loaded) -> float:
    """Largest |logit| difference between plain peft's AutoPeftModel and ``load_run`` on a few texts (fp32)."""
    from peft import AutoPeftModelForSequenceClassification

    labels = dict(enumerate(loaded.label_names))
    plain = AutoPeftModelForSequenceClassification.from_pretrained(
        run_dir, id2label=labels, label2id={v: k for k, v in labels.items()}
    ).eval()
    enc = loaded.tokenizer(TEXTS, padding=True, truncation=True, max_length=64, return_tensors="pt")
    return float((plain(**enc).logits - loaded.model(**enc).logits).abs().max())


def check_run(run_dir: Path) -> dict[str, Any]:
    """One row: the accuracy training wrote, the reloaded one, plain peft's logit difference, the merged one."""
    loaded = load_run(str(run_dir), device="cpu", merge=False)  # the forward training scored with
    row: dict[str, Any] = {
        "run": run_dir.name,
        "method": loaded.recipe.peft.method,
        "trained": json.loads((run_dir / "metrics.json").read_text())["eval_accuracy"],
        "reloaded": evaluate_run(loaded)["accuracy"],
        "plain_peft_max_diff": plain_peft_max_difference(run_dir, loaded) if is_adapter_run(run_dir) else None,
    }
    with tempfile.TemporaryDirectory() as tmp:
        try:
            merge_adapter(str(run_dir), Path(tmp) / "merged")
            row["merged"] = evaluate_run(load_run(str(Path(tmp) / "merged"), device="cpu"))["accuracy"]
        except RunError as err:
            row["merge_refused"] = str(err).split(":")[0]
    return row


def table(rows: Sequence[dict[str, Any]]) -> str:
    """Markdown: one line per run."""
    lines = [
        "| run | method | trained acc. | reloaded acc. | plain peft vs load_run (max logit diff) | merged acc. |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        diff = "" if r["plain_peft_max_diff"] is None else f"{r['plain_peft_max_diff']:.1e}"
        merged = f"{r['merged']:.4f}" if "merged" in r else f"refused: {r.get('merge_refused', '')}"
        lines.append(f"| {r['run']} | {r['method']} | {r['trained']:.4f} | {r['reloaded']:.4f} | {diff} | {merged} |")
    return "\n".join(lines) + "\n"


def main(argv: Optional[Sequence[str]] = None) -> int:
    prepare_process()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("root", type=Path, help="a directory of run directories (e.g. runs/studies/peft_methods)")
    parser.add_argument("--seed", type=int, default=None, help="only the runs of this training seed")
    args = parser.parse_args(argv)
    # Runs of the training loop (the frozen-features baseline has no recipe.yaml and nothing to reload).
    runs = sorted(p.parent for p in args.root.glob("*/metrics.json") if (p.parent / "recipe.yaml").exists())
    if args.seed is not None:
        runs = [p for p in runs if _seed_of(p) == args.seed]
    rows = [check_run(run_dir) for run_dir in runs]
    report = table(rows)
    (args.root / "reload_check.md").write_text(report)
    print(report)
    return 0


def _seed_of(run_dir: Path) -> int:
    return load_recipe(run_dir / "recipe.yaml").training.seed


if __name__ == "__main__":
    raise SystemExit(main())
