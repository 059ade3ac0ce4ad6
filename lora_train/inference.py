"""Use a trained run: load it (local directory or Hub repo), classify texts, evaluate a split.

The base model is rebuilt from the run's own ``recipe.yaml`` with :func:`lora_train.build.build_classifier`,
so an adapter trained on a 4-bit NF4 base is applied to the same NF4 base it was trained with.
"""

from __future__ import annotations

import dataclasses
import json
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Optional

import torch
from torch import nn

from lora_train.build import build_classifier
from lora_train.checkpoint import (
    TRAINED_TENSORS,
    load_trained_tensors,
    restore_moved_aside_run,
    safetensors_problem,
)
from lora_train.config import Recipe, RecipeError, build_recipe, read_text_file, read_yaml
from lora_train.data import (
    CARVE_FILE,
    Carve,
    encode_texts,
    load_splits,
    longest_first,
    padding_collator,
    resolve_spec,
    tokenize,
)
from lora_train.hub import lookup_error
from lora_train.merged import mergeable, merged_tensors, merges_lora, put_tensors
from lora_train.metrics import evaluate
from lora_train.modeling import (
    autocast_dtype,
    last_layer_at_first_position,
    pack_padded_tokens,
    packed_tokens,
    require_tokenizer_files,
    store_frozen_linears_in,
    tokenizer_error,
)

REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
DOWNLOAD_IGNORE = ["*.png", "checkpoints/*", "best/*"]
"""Files of a pushed run that inference does not need."""


class RunError(ValueError):
    """The given run directory or Hub repo cannot be used; the message says why and what would work."""


@dataclass
class LoadedRun:
    """A trained classifier ready for inference, with what it was trained from."""

    model: torch.nn.Module
    tokenizer: Any
    recipe: Recipe
    label_names: list[str]
    directory: Path
    source: str

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device


def resolve_run(source: str, revision: Optional[str] = None, repair: bool = True) -> Path:
    """A local run directory as it is; a Hub repo id (``user/name``) downloaded into the Hub cache.

    With ``repair``, a ``best/`` that a killed run left moved aside is renamed back first (only a copy that is
    itself a run; nothing is deleted). The server passes ``repair=False``: it writes nowhere.
    """
    path = Path(source).expanduser()
    if repair:
        restore_moved_aside_run(path if path.name == "best" else path / "best")
    if path.exists():
        directory = path
    elif REPO_ID.match(source):
        from huggingface_hub import snapshot_download

        try:
            directory = Path(snapshot_download(source, revision=revision, ignore_patterns=DOWNLOAD_IGNORE))
        except Exception as err:  # noqa: BLE001 - offline, 404, auth...: re-raised with what is missing
            raise RunError(lookup_error(f"Hub repo '{source}'", source, err, revision)) from None
    else:
        raise RunError(f"'{source}' is neither an existing run directory nor a Hub repo id of the form user/name")
    missing = [name for name in ("recipe.yaml", "labels.json") if not (directory / name).is_file()]
    if missing:
        raise RunError(
            f"'{source}' is not a lora_train run: it lacks {missing}. Give the output_dir of a training run"
            " (or its best/ subdirectory), or a Hub repo pushed by lora_train."
        )
    for weights in sorted(directory.glob("*.safetensors")):  # a damaged file named now, not deep inside safetensors
        problem = safetensors_problem(weights)
        if problem:
            raise RunError(
                f"{problem}. Copy it again, use the run's best/ adapter, or write it again from the"
                " run's last checkpoint: scripts/train.py RUN/recipe.yaml"
                " training.resume_from_checkpoint=latest"
            )
    return directory


def read_run(directory: Path) -> tuple[Recipe, list[str]]:
    """The recipe a run was trained with and its class names (``labels.json``)."""
    try:
        recipe = build_recipe(read_yaml(directory / "recipe.yaml"), source=str(directory / "recipe.yaml"))
    except RecipeError as err:
        raise RunError(str(err)) from None
    labels = directory / "labels.json"
    try:
        id2label = json.loads(read_text_file(labels, "labels file"))["id2label"]
        return recipe, [id2label[str(i)] for i in range(len(id2label))]
    except json.JSONDecodeError as err:
        problem = f"not valid JSON ({err})"
    except (ValueError, KeyError, TypeError) as err:
        problem = f"{type(err).__name__}: {err}"
    raise RunError(
        f"'{labels}' is corrupt: {problem}; it should read"
        ' {"id2label": {"0": NAME, "1": NAME, ...}} as training wrote it'
    )


def load_run_tokenizer(directory: Path):
    """The tokenizer a run saved, or a :class:`RunError` that says which files are missing."""
    from transformers import AutoTokenizer

    try:
        require_tokenizer_files(directory)
        return AutoTokenizer.from_pretrained(directory)
    except (OSError, ValueError, TypeError) as err:
        raise RunError(f"cannot load the tokenizer of run '{directory}': {tokenizer_error(err)}") from None


def is_adapter_run(directory: Path) -> bool:
    """True for peft adapter runs (LoRA, AdaLoRA...: adapter-only weights); False for BitFit / head_only runs (only
    the trained tensors) and full models."""
    return (directory / "adapter_config.json").is_file()


def is_trained_tensors_run(directory: Path) -> bool:
    """True for runs that keep only the tensors they trained (BitFit, head_only), applied to the recipe's base."""
    return (directory / TRAINED_TENSORS).is_file()


def apply_trained_tensors(directory: Path, base: nn.Module) -> nn.Module:
    """``base`` (the run's base model, built from its recipe) with the tensors a BitFit / head_only run trained."""
    try:
        load_trained_tensors(directory / TRAINED_TENSORS, base)
    except ValueError as err:
        raise RunError(f"{err}; was model.name_or_path in its recipe.yaml changed after training?") from None
    return base


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def load_base_for_run(
    recipe: Recipe, label_names: list[str], tokenizer, device: torch.device, full_last_layer: bool = False
):
    """The run's base model with its label mapping, quantized (NF4) as in training, on ``device``; frozen, for
    inference (so :func:`store_frozen_linears_in` stores its Linear weights in the autocast dtype)."""
    return build_classifier(recipe, label_names, tokenizer, device, full_last_layer=full_last_layer).requires_grad_(
        False
    )


def load_run(
    source: str,
    device: Optional[str] = None,
    revision: Optional[str] = None,
    merge: Optional[bool] = None,
    full_last_layer: bool = False,
) -> LoadedRun:
    """Load a run for inference: the base in the training quantization plus the adapter, or a full model.

    A plain LoRA adapter is merged into the base's weights where ``merge`` says (default: where that is the faster
    forward, :data:`lora_train.merged.MERGED_FORWARDS`), as the server merges it; ``merge=False`` keeps the forward
    training evaluated with, which reproduces ``metrics.json`` exactly (``scripts/eval.py``). Where it merges, the
    last encoder layer computes only the position the head reads (:func:`last_layer_at_first_position`: that forward
    rounds differently anyway), as the merging server's does, unless ``full_last_layer`` (the model as transformers
    builds it, for baselines)."""
    from transformers import AutoModelForSequenceClassification

    directory = resolve_run(source, revision)
    recipe, label_names = read_run(directory)
    target = torch.device(device) if device else default_device()
    tokenizer = load_run_tokenizer(directory)
    merging = merges_lora(target) if merge is None else merge
    if is_adapter_run(directory):
        from peft import PeftModel

        base = load_base_for_run(recipe, label_names, tokenizer, target, full_last_layer)
        model = PeftModel.from_pretrained(base, directory)
        dtype = autocast_dtype(recipe, target)
        if merging and mergeable(model, "default"):
            tensors = merged_tensors(model, "default", dtype)
            model = model.unload()
            put_tensors(model, tensors)
        if dtype is not None:  # the server's fast path: weights stored in the autocast dtype, same outputs
            store_frozen_linears_in(model, dtype, adapters_too=True)
    elif is_trained_tensors_run(directory):
        base = load_base_for_run(recipe, label_names, tokenizer, target, full_last_layer)
        model = apply_trained_tensors(directory, base)
    else:
        m = recipe.model
        model = AutoModelForSequenceClassification.from_pretrained(
            directory, trust_remote_code=m.trust_remote_code, dtype="auto" if m.dtype == "auto" else m.dtype
        ).to(target)
    if not full_last_layer:
        last_layer_at_first_position(model, in_evaluation=merging)
    if merging:  # and on the real tokens only, within predict's packed_tokens()
        pack_padded_tokens(model)
    return LoadedRun(model.eval(), tokenizer, recipe, label_names, directory, source)


@torch.no_grad()
def predict(run: LoadedRun, texts: Iterable[str | tuple[str, str]], batch_size: int = 32) -> Iterator[dict[str, Any]]:
    """Classify ``texts`` in batches, streaming results in input order:
    ``{"text", "label", "probability", "probabilities"}``. A run trained on text pairs (data.text_pair_column)
    takes ``(text, pair)`` tuples and adds ``"text_pair"``."""
    run.model.eval()
    data = run.recipe.data
    collate = padding_collator(run.tokenizer, data.max_length, run.device.type, run.recipe.training.mixed_precision)
    for batch in batched(texts, batch_size):
        firsts, pairs = _split_pairs(batch, data.text_pair_column)
        enc = encode_texts(run.tokenizer, firsts, data.max_length, data.truncation, pairs)
        enc = collate([{key: enc[key][i] for key in enc.keys()} for i in range(len(firsts))])
        with autocast_like_training(run), packed_tokens():  # the precision the run was trained and scored in
            probs = torch.softmax(run.model(**enc.to(run.device)).logits.float(), dim=-1).cpu()
        for i, row in enumerate(probs):
            best = int(row.argmax())
            yield {
                "text": firsts[i],
                **({"text_pair": pairs[i]} if pairs is not None else {}),
                "label": run.label_names[best],
                "probability": float(row[best]),
                "probabilities": {name: float(p) for name, p in zip(run.label_names, row)},
            }


def _split_pairs(batch: list, pair_column: Optional[str]) -> tuple[list[str], Optional[list[str]]]:
    """The texts, and their pairs for a run trained on text pairs; a single text given to a pair run is refused."""
    if pair_column is None:
        return list(batch), None
    if not all(isinstance(item, tuple) and len(item) == 2 for item in batch):
        raise RunError(
            f"this run classifies text pairs (data.text_pair_column = {pair_column!r}): give (text, pair) tuples,"
            " or a .csv / .jsonl file with both fields"
        )
    return [a for a, _ in batch], [b for _, b in batch]


def batched(items: Iterable[str], size: int) -> Iterator[list[str]]:
    """Consecutive lists of at most ``size`` items (streams: stdin is classified as it arrives)."""
    batch: list[str] = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def read_texts(path: str, column: str = "text", pair_column: Optional[str] = None) -> Iterator[str | tuple[str, str]]:
    """Texts from a file: ``.txt`` (one per line; ``-`` = stdin, streamed), ``.jsonl`` or ``.csv`` (the ``column``
    field; with ``pair_column``, ``(text, pair)`` tuples of both fields).

    A file is read through once now (UTF-8, a byte-order mark allowed as in training data; every JSON line; every
    record's text field), so a bad input fails, naming the line, before any model is loaded; then it is streamed.
    """
    if path == "-" or Path(path).suffix.lower() in (".txt", ".text"):
        if pair_column is not None:
            raise RunError(
                f"this run classifies text pairs (data.text_pair_column = {pair_column!r}): give a .csv or .jsonl"
                " file with both fields"
            )
    if path == "-":
        return _stream_texts(path, "", column, pair_column)
    suffix = Path(path).suffix.lower()
    if not Path(path).exists():
        raise RunError(f"input file '{path}' does not exist")
    if suffix not in (".txt", ".text", ".jsonl", ".csv") and not Path(path).is_dir():
        raise RunError(
            f"input file '{path}': unsupported type '{suffix}'; use .txt (one text per line), .jsonl or .csv"
        )
    try:
        read_text_file(Path(path), "input file")
    except ValueError as err:
        raise RunError(str(err)) from None
    for _ in _stream_texts(path, suffix, column, pair_column):
        pass
    return _stream_texts(path, suffix, column, pair_column)


def _stream_texts(path: str, suffix: str, column: str, pair_column: Optional[str]) -> Iterator[str | tuple[str, str]]:
    import csv
    import sys

    if path == "-":
        yield from (line.rstrip("\n") for line in sys.stdin if line.strip())
        return
    with open(path, encoding="utf-8-sig", newline="" if suffix == ".csv" else None) as handle:
        if suffix in (".jsonl", ".csv"):
            records = (
                ((n, _json_line(line, path, n)) for n, line in enumerate(handle, 1) if line.strip())
                if suffix == ".jsonl"
                else enumerate(csv.DictReader(handle), 2)
            )
            for n, record in records:
                text = _field(record, column, path, n)
                yield (text, _field(record, pair_column, path, n)) if pair_column else text
        else:
            yield from (line.rstrip("\n") for line in handle if line.strip())


def _json_line(line: str, path: str, number: int) -> Any:
    try:
        return json.loads(line)
    except json.JSONDecodeError as err:
        raise RunError(
            f"{path}, line {number}: not valid JSON ({err.msg}, column {err.colno}); every line must be one JSON object"
        ) from None


def _field(record: Any, column: str, path: str, line: int) -> str:
    if isinstance(record, str):
        return record
    if not isinstance(record, dict) or not isinstance(record.get(column), str):
        found = sorted(record) if isinstance(record, dict) else type(record).__name__
        raise RunError(
            f"{path}, line {line}: no text field '{column}' (found {found}); choose the field with --text-column"
        )
    return record[column]


def autocast_like_training(run: LoadedRun) -> "torch.autocast":
    """The autocast the run trained and evaluated under, so evaluation reproduces metrics.json (at bf16 speed)."""
    return training_autocast(run.recipe, run.device)


def training_autocast(recipe: Recipe, device: torch.device) -> "torch.autocast":
    """The autocast ``recipe`` trained under, on ``device``.

    torch.autocast directly, not a second Accelerator: Accelerate's state keeps the first mixed precision of the
    process.
    """
    dtype = autocast_dtype(recipe, device)
    return torch.autocast(device_type=device.type, dtype=dtype or torch.bfloat16, enabled=dtype is not None)


def evaluate_run(
    run: LoadedRun,
    split: Optional[str] = None,
    data_path: Optional[str] = None,
    max_samples: Optional[int] = None,
    batch_size: Optional[int] = None,
) -> dict[str, Any]:
    """Accuracy, macro-F1, per-class P/R/F1 and confusion matrix of ``run`` on a split of its task.

    ``split=None`` evaluates exactly the recipe's evaluation set, also the rows a run carved out of train
    (``data_split.json``), so the figures reproduce ``metrics.json``; another split name is loaded from the same data.
    ``data_path`` replaces the recipe's ``data.path``; when it is one file, all of its rows are evaluated.
    The loop and the metric are training's own (:func:`lora_train.metrics.evaluate`), and so are the batches unless
    ``batch_size`` says otherwise (default: the recipe's ``training.per_device_eval_batch_size``): under bf16 a
    product rounds by its batch's shape, so other batches can move an example that sits at a margin of ~1e-3.
    """
    from accelerate import Accelerator
    from torch.utils.data import DataLoader

    cfg = run.recipe.data
    # The run's classes in the run's order (string labels map to them); the whole train split gives the carve.
    cfg = dataclasses.replace(cfg, path=data_path or cfg.path, label_names=run.label_names, max_train_samples=None)
    carve_file = run.directory / CARVE_FILE
    carve = Carve.read(carve_file) if carve_file.is_file() and data_path is None else None
    if data_path is not None and Path(data_path).is_file():  # one file: all of it is evaluated
        name = split or Path(data_path).stem
        cfg = dataclasses.replace(cfg, train_split=name, eval_split=name, max_eval_samples=max_samples)
    elif split is not None and split != resolve_spec(cfg).eval_split:
        cfg = dataclasses.replace(cfg, eval_split=split, max_eval_samples=max_samples)
        carve = None
    elif max_samples is not None:
        cfg = dataclasses.replace(cfg, max_eval_samples=max_samples)
    data = load_splits(resolve_spec(cfg), cfg, carve, for_training=False)
    spec, raw = data.spec, data.eval
    dataset = tokenize(raw, run.tokenizer, spec, cfg.max_length, cfg.truncation)
    order = longest_first(dataset["length"])  # as training orders its evaluations
    accelerator = Accelerator(cpu=run.device.type == "cpu")
    loader = accelerator.prepare(
        DataLoader(
            dataset.remove_columns("length"),
            batch_size=batch_size or run.recipe.training.per_device_eval_batch_size,
            sampler=order,
            collate_fn=padding_collator(
                run.tokenizer, cfg.max_length, run.device.type, run.recipe.training.mixed_precision
            ),
        )
    )
    start = time.perf_counter()
    with autocast_like_training(run):
        report = evaluate(run.model, loader, accelerator, len(run.label_names), run.label_names)
    seconds = time.perf_counter() - start
    run.model.eval()
    return {
        "source": run.source,
        "split": spec.eval_split,
        "data": spec.source,
        **report,
        "seconds": seconds,
        "texts_per_s": report["num_samples"] / seconds,
        "label_names": run.label_names,
    }
