"""Where a CPU training run's memory goes: a bare LoRA loop on MiniLM that reports RSS before and after
``malloc_trim`` (live memory vs freed heap) as the batches' sequence lengths vary or not.

    python -m lora_lab.memory_probe --precision bf16 --lengths random --steps 60
    python -m lora_lab.memory_probe --precision bf16 --lengths random --multiple 32 --steps 80
    python -m lora_lab.memory_probe --precision bf16 --lengths random --buckets --steps 80
    python -m lora_lab.memory_probe --lengths fixed --attention-dropout 0 --steps 30

Measured figures: docs/results.md ("Memory: where the IMDb recipe's gigabytes went"). Linux with glibc only.
"""

from __future__ import annotations

import argparse
import time
from typing import Optional, Sequence

from lora_train.startup import heap_release, prepare_process


def _status_mb(field: str) -> int:
    """``VmRSS`` (resident now) or ``VmHWM`` (peak resident) of this process, in MB."""
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) // 1024 for line in status if line.startswith(field + ":"))


def main(argv: Optional[Sequence[str]] = None) -> int:
    prepare_process()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="sentence-transformers/all-MiniLM-L6-v2")
    parser.add_argument("--precision", choices=["bf16", "fp32"], default="bf16")
    parser.add_argument("--lengths", choices=["random", "fixed"], default="random", help="random: 100 to 256 tokens")
    parser.add_argument("--multiple", type=int, default=1, help="round each batch's length up to a multiple of this")
    parser.add_argument(
        "--buckets", action="store_true", help="pad each batch as training does under bf16 on a CPU (length buckets)"
    )
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument(
        "--attention-dropout",
        type=float,
        help="dropout on the attention probabilities (default: the checkpoint's, 0.1); 0: sdpa's fused kernel",
    )
    args = parser.parse_args(argv)
    for name in ("multiple", "batch_size", "steps"):
        if getattr(args, name) <= 0:
            parser.error(f"--{name.replace('_', '-')} must be > 0")
    if args.attention_dropout is not None and not 0 <= args.attention_dropout < 1:
        parser.error("--attention-dropout must be in [0, 1)")
    release_heap = heap_release()
    if release_heap is None:
        parser.error("this probe needs glibc's malloc_trim (Linux with glibc)")

    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoConfig, AutoModelForSequenceClassification

    # torch, after prepare_process and the argument checks
    from lora_train.data import padded_length
    from lora_train.modeling import ATTENTION_DROPOUT_FIELDS, attention_dropout_field

    torch.manual_seed(0)
    config = AutoConfig.from_pretrained(args.model, num_labels=2)
    if args.attention_dropout is not None:
        field = attention_dropout_field(config)
        if field is None:
            parser.error(f"--attention-dropout: {args.model} has none of the fields {ATTENTION_DROPOUT_FIELDS}")
        setattr(config, field, args.attention_dropout)
    model = AutoModelForSequenceClassification.from_pretrained(args.model, config=config)
    lora = LoraConfig(
        r=16,
        lora_alpha=32,
        lora_dropout=0.1,
        target_modules=["query", "key", "value", "intermediate.dense", "output.dense"],
        modules_to_save=["pooler", "classifier"],
        task_type="SEQ_CLS",
    )
    model = get_peft_model(model, lora).train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    start = time.perf_counter()
    for step in range(1, args.steps + 1):
        length = 256 if args.lengths == "fixed" else int(torch.randint(100, 257, ()))
        length = -(-length // args.multiple) * args.multiple
        if args.buckets:
            length = padded_length(length, 256, "cpu", bf16=True)
        ids = torch.randint(1000, 30000, (args.batch_size, length))
        labels = torch.randint(0, 2, (args.batch_size,))
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.precision == "bf16"):
            loss = model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step % 10 == 0:
            rss = _status_mb("VmRSS")
            release_heap()  # hand freed heap back, so what remains is live memory
            print(
                f"step {step}: RSS {rss} MB, after malloc_trim {_status_mb('VmRSS')} MB,"
                f" peak {_status_mb('VmHWM')} MB, {time.perf_counter() - start:.0f} s",
                flush=True,
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
