"""Loading, checking, tokenizing and batching text-classification data."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Iterator, Optional, Sequence

import torch
from torch.utils.data import Sampler

from lora_train.config import DataConfig, read_text_file
from lora_train.tasks import TASKS, canonical_dataset_id

if TYPE_CHECKING:  # annotations only: datasets, pyarrow and numpy load when data does
    import datasets
    import numpy as np
    import pyarrow

DATA_EXTENSIONS = {".parquet": "parquet", ".csv": "csv", ".json": "json", ".jsonl": "json"}
SUBSET_SEED = 0
"""Subsets (max_train_samples, max_eval_samples) and the IMDb validation carve-out use this fixed seed, so
that runs with different training seeds see the same examples."""


class DataError(ValueError):
    """The data cannot be used as the recipe says; the message says why and what would work."""


@dataclass
class DataSpec:
    """Resolved description of where the data is and which columns hold what."""

    source: str
    """Local directory, or Hub dataset id."""
    config_name: Optional[str]
    text_column: str
    label_column: str
    train_split: str
    eval_split: str
    carve_eval_from_train: bool
    label_names: Optional[list[str]]


def resolve_spec(cfg: DataConfig) -> DataSpec:
    """Fill the recipe's nulls from the task registry."""
    task = TASKS.get(cfg.task) if cfg.task else None
    source = cfg.path or (task.hub_id if task else None)
    assert source is not None  # validate() guarantees it
    if not Path(source).expanduser().exists():
        source = canonical_dataset_id(source)
    label_names = cfg.label_names or (list(task.label_names) if task else None)
    eval_split = cfg.eval_split or (task.eval_split if task else "validation")
    carve = bool(task and not task.has_eval_split and cfg.eval_split is None)
    return DataSpec(
        source=source,
        config_name=cfg.config_name or (task.hub_config if task and source == task.hub_id else None),
        text_column=cfg.text_column or (task.text_column if task else "text"),
        label_column=cfg.label_column or (task.label_column if task else "label"),
        train_split=cfg.train_split or (task.train_split if task else "train"),
        eval_split=eval_split,
        carve_eval_from_train=carve,
        label_names=label_names,
    )


def _local_files(directory: Path) -> dict[str, str]:
    files: dict[str, str] = {}
    for path in sorted(directory.iterdir()):
        if path.suffix in DATA_EXTENSIONS and path.stem not in files:
            files[path.stem] = str(path)
    return files


def load_splits(spec: DataSpec, cfg: DataConfig) -> tuple["datasets.Dataset", "datasets.Dataset"]:
    """Load the train and eval splits (carving eval out of train when the data has none)."""
    import datasets

    local = Path(spec.source).expanduser()
    origin = {split: spec.source for split in (spec.train_split, spec.eval_split)}
    if local.exists():
        if local.is_file() and local.suffix not in DATA_EXTENSIONS:
            raise DataError(
                f"data.path '{local}' is a {local.suffix or 'suffix-less'} file; give a directory of"
                " {split}.parquet|csv|json|jsonl files, or one .parquet, .csv, .json or .jsonl file"
            )
        files = _local_files(local) if local.is_dir() else {spec.train_split: str(local)}
        if not files:
            raise DataError(f"data.path '{local}' holds no {'/'.join(DATA_EXTENSIONS)} files named after their split")
        builders = {DATA_EXTENSIONS[Path(f).suffix] for f in files.values()}
        if len(builders) != 1:
            raise DataError(f"data.path '{local}' mixes file types {sorted(builders)}; use one format")
        wanted = [spec.train_split] + ([] if spec.carve_eval_from_train else [spec.eval_split])
        missing = [s for s in wanted if s not in files]
        if missing:
            raise DataError(
                f"data.path '{local}' has no file for split(s) {missing}; found {sorted(files)}."
                " Set data.train_split / data.eval_split to one of those."
            )
        empty = [f"{s} ({files[s]})" for s in wanted if not _readable_rows(Path(files[s]))]
        if empty:
            raise DataError(
                f"data.path '{local}': split(s) {', '.join(empty)} hold no rows; every split used needs examples"
            )
        origin.update((s, files[s]) for s in wanted)
        try:
            dd = datasets.load_dataset(builders.pop(), data_files={s: files[s] for s in wanted})
        except Exception as err:  # noqa: BLE001 - parser errors of pandas / pyarrow, of many types
            cause = err.__cause__ or err
            raise DataError(
                f"cannot read the data files {[files[s] for s in wanted]}: {type(cause).__name__}: {cause}."
                " Check that each file is complete and well-formed"
            ) from None
    elif _looks_local(spec.source):
        raise DataError(
            f"data.path '{spec.source}' does not exist (resolved to '{local.resolve()}'). Give a local directory"
            " of {split}.parquet|csv|json|jsonl files, or a Hub dataset id such as user/name"
        )
    else:
        dd = load_hub_dataset(spec.source, spec.config_name)
        missing = [
            s
            for s in (spec.train_split, spec.eval_split)
            if s not in dd and not (s == spec.eval_split and spec.carve_eval_from_train)
        ]
        if missing:
            raise DataError(f"dataset '{spec.source}' has no split(s) {missing}; it has {list(dd)}")
    train = dd[spec.train_split]
    _check_columns(train, spec, spec.train_split, origin[spec.train_split])
    if spec.carve_eval_from_train:
        train = _as_class_label(train, spec.label_column)
        parts = train.train_test_split(
            test_size=cfg.validation_fraction, seed=SUBSET_SEED, stratify_by_column=spec.label_column
        )
        train, evaluation = parts["train"], parts["test"]
    else:
        evaluation = dd[spec.eval_split]
        _check_columns(evaluation, spec, spec.eval_split, origin[spec.eval_split])
    train = _subset(train, cfg.max_train_samples)
    evaluation = _subset(evaluation, cfg.max_eval_samples)
    for name, split in (("train", train), ("eval", evaluation)):
        if len(split) == 0:
            raise DataError(f"the {name} split is empty; check data.{name}_split and data.max_{name}_samples")
    return train, evaluation


def load_hub_dataset(dataset_id: str, config_name: Optional[str]) -> "datasets.DatasetDict":
    """A Hub dataset by id and config, through the Hub cache: online it downloads only that config's files,
    offline (``HF_HUB_OFFLINE=1``) it reads the cache, also a read-only one.

    ``datasets.load_dataset(id, config)`` does not read the Hub cache when offline; resolving the snapshot with
    huggingface_hub first and loading that local folder works in both cases.
    """
    import datasets
    from huggingface_hub import snapshot_download

    from lora_train.hub import offline_hint

    try:
        card = Path(snapshot_download(dataset_id, repo_type="dataset", allow_patterns=["README.md"]))
        patterns = config_file_patterns(card / "README.md", dataset_id, config_name)
        snapshot = snapshot_download(
            dataset_id, repo_type="dataset", allow_patterns=None if patterns is None else patterns + ["README.md"]
        )
    except DataError:
        raise
    except Exception as err:  # noqa: BLE001 - offline cache miss, 404, auth, network: re-raised with advice
        raise DataError(
            f"cannot load dataset '{dataset_id}': {type(err).__name__}: {str(err).rstrip('.')}."
            f" {offline_hint()} Or set data.path to a local directory of {{split}}.parquet|csv|json|jsonl"
            " files."
        ) from None
    return datasets.load_dataset(snapshot, config_name)


def config_file_patterns(readme: Path, dataset_id: str, config_name: Optional[str]) -> Optional[list[str]]:
    """The file patterns of one config, from the ``configs:`` of the dataset card's YAML header.

    None when the card declares no configs (the whole repo is then needed); a config the card lacks is refused
    with the valid names.
    """
    import yaml

    text = readme.read_text(encoding="utf-8") if readme.is_file() else ""
    header = yaml.safe_load(text.split("---")[1]) if text.startswith("---") and text.count("---") >= 2 else None
    configs = (header or {}).get("configs") if isinstance(header, dict) else None
    if not configs:
        return None
    by_name = {c.get("config_name", "default"): c for c in configs}
    if config_name is None:
        defaults = [c for c in configs if c.get("default")] or (configs if len(configs) == 1 else [])
        if not defaults:
            raise DataError(
                f"dataset '{dataset_id}' has several configs {sorted(by_name)}; choose one with data.config_name"
            )
        chosen = defaults[0]
    elif config_name in by_name:
        chosen = by_name[config_name]
    else:
        raise DataError(
            f"dataset '{dataset_id}' has no config '{config_name}'; its configs are {sorted(by_name)}."
            " Set data.config_name to one of them"
        )
    files = chosen.get("data_files", [])
    entries = files if isinstance(files, list) else [files]
    patterns: list[str] = []
    for entry in entries:
        paths = entry.get("path", []) if isinstance(entry, dict) else entry
        patterns.extend([paths] if isinstance(paths, str) else paths)
    return patterns


def _looks_local(source: str) -> bool:
    """A path rather than a Hub id (``name`` or ``user/name``)."""
    return source.startswith((".", "/", "~")) or source.count("/") > 1


def _readable_rows(path: Path) -> bool:
    """Whether a data file holds at least one example (datasets fails obscurely on empty files); a file that is
    truncated, not UTF-8, or has a malformed JSON line is refused, naming the file and the line."""
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        try:
            return pq.ParquetFile(path).metadata.num_rows > 0
        except Exception as err:  # noqa: BLE001 - ArrowInvalid, OSError (thrift), ...
            raise DataError(
                f"data file '{path}' cannot be read as parquet ({type(err).__name__}: {err}): it is"
                " truncated or corrupt; copy or export it again"
            ) from None
    try:
        text = read_text_file(path, "data file")
    except ValueError as err:
        raise DataError(str(err)) from None
    if path.suffix == ".jsonl" or (path.suffix == ".json" and not text.lstrip().startswith("[")):
        for number, line in enumerate(text.splitlines(), 1):
            try:
                line.strip() and json.loads(line)
            except json.JSONDecodeError as err:
                raise DataError(
                    f"data file '{path}', line {number} is not valid JSON ({err.msg}, column {err.colno});"
                    " every line must be one JSON object"
                ) from None
    lines = [line for line in text.splitlines() if line.strip() not in ("", "[", "]", "[]")]
    return len(lines) > (1 if path.suffix == ".csv" else 0)  # a CSV header alone is no data


def _as_class_label(ds: "datasets.Dataset", column: str) -> "datasets.Dataset":
    import datasets

    if isinstance(ds.features[column], datasets.ClassLabel):
        return ds
    return ds.class_encode_column(column)


def _subset(ds: "datasets.Dataset", n: Optional[int]) -> "datasets.Dataset":
    if n is None or n >= len(ds):
        return ds
    return ds.shuffle(seed=SUBSET_SEED).select(range(n)).flatten_indices()


def _check_columns(ds: "datasets.Dataset", spec: DataSpec, split: str, origin: str) -> None:
    """The text and label columns exist, hold texts and integer class ids, and no row lacks either."""
    for role, column in (("text", spec.text_column), ("label", spec.label_column)):
        if column not in ds.column_names:
            raise DataError(
                f"split '{split}' has no {role} column '{column}'; its columns are {ds.column_names}."
                f" Set data.{role}_column to one of them."
            )
    for role, column in (("text", spec.text_column), ("label", spec.label_column)):
        values = ds.data.column(column)
        empty = _null_rows(values)
        if len(empty):
            shown = ", ".join(str(i) for i in empty[:10]) + (", ..." if len(empty) > 10 else "")
            raise DataError(
                f"split '{split}': {role} column '{column}' is empty (null or NaN) in {len(empty)} row(s):"
                f" rows {shown} of {origin} (counting from 0); drop or fill those rows"
            )
    _check_text_type(ds.data.column(spec.text_column), spec, split)
    _check_label_type(ds.data.column(spec.label_column), spec, split)


def _null_rows(values: "pyarrow.ChunkedArray") -> "np.ndarray":
    """Row numbers of the missing values (null, or NaN in a float column)."""
    import numpy as np
    import pyarrow.compute as pc

    return np.flatnonzero(pc.is_null(values, nan_is_null=True).to_numpy(zero_copy_only=False))


def _check_text_type(values: "pyarrow.ChunkedArray", spec: DataSpec, split: str) -> None:
    import pyarrow as pa

    if not (pa.types.is_string(values.type) or pa.types.is_large_string(values.type)):
        raise DataError(
            f"split '{split}': text column '{spec.text_column}' holds {values.type} values, not text."
            " Set data.text_column to the column that holds the texts"
        )


def _check_label_type(values: "pyarrow.ChunkedArray", spec: DataSpec, split: str) -> None:
    """Labels must be integer class ids: strings, floats and anything else are refused with the way to fix them."""
    import numpy as np
    import pyarrow as pa

    column = spec.label_column
    if pa.types.is_integer(values.type):
        return
    if pa.types.is_string(values.type) or pa.types.is_large_string(values.type):
        names = spec.label_names
        order = (
            f"map them to 0..{len(names) - 1} in the order of data.label_names {names}"
            if names
            else "map them to 0..K-1 and list the class names in that order in data.label_names"
        )
        raise DataError(
            f"split '{split}': label column '{column}' holds strings (e.g. {values[0].as_py()!r}), not"
            f" class ids; {order}"
        )
    if pa.types.is_floating(values.type):
        numbers = values.to_numpy()
        fractional = np.flatnonzero(numbers != np.round(numbers))
        row = int(fractional[0]) if len(fractional) else 0
        kind = "non-integer" if len(fractional) else "floating-point"
        raise DataError(
            f"split '{split}': label column '{column}' holds {kind} values (e.g. {numbers[row]} in row"
            f" {row}); labels must be integer class ids: convert the column to integers"
        )
    raise DataError(
        f"split '{split}': label column '{column}' holds {values.type} values; labels must be integer class ids 0..K-1"
    )


def label_names_of(train: "datasets.Dataset", spec: DataSpec) -> list[str]:
    """Class names: the recipe's / task's, else the dataset's ClassLabel, else LABEL_i up to the max label."""
    import datasets

    if spec.label_names:
        return list(spec.label_names)
    feature = train.features[spec.label_column]
    if isinstance(feature, datasets.ClassLabel):
        return list(feature.names)
    highest = max(train[spec.label_column])
    return [f"LABEL_{i}" for i in range(int(highest) + 1)]


def check_labels(ds: "datasets.Dataset", spec: DataSpec, num_labels: int, split: str) -> None:
    """Refuse labels outside [0, num_labels) with the offending values named."""
    labels = torch.as_tensor(ds.with_format("numpy")[spec.label_column])
    bad = labels[(labels < 0) | (labels >= num_labels)].unique().tolist()
    if bad:
        raise DataError(
            f"split '{split}' has label(s) {bad[:10]} outside [0, {num_labels}) in column '{spec.label_column}'."
            " Hidden test labels (-1, as in GLUE) cannot be trained or evaluated on; for a generic dataset set"
            " data.label_names to cover every class."
        )


# head_tail keeps this share of the token budget from the start of a long text and the rest from its end: Sun et
# al. 2019 ("How to Fine-Tune BERT for Text Classification?") found 128 head + 382 tail tokens best on IMDb.
HEAD_SHARE = 0.25


def head_and_tail(tokenizer, texts: list[str], max_length: int) -> list[str]:
    """Texts longer than ``max_length`` tokens cut to their head and tail (a quarter / three quarters of the budget).

    The cut is made on the text at token boundaries (the tokenizer's offsets), so the result tokenizes like any
    text and every tokenizer's special tokens are added as usual. Shorter texts are returned unchanged.
    """
    budget = max_length - tokenizer.num_special_tokens_to_add(pair=False)
    if budget < 4:
        return texts
    offsets = tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True, verbose=False)["offset_mapping"]
    head = max(1, int(budget * HEAD_SHARE))
    tail = budget - head - 1  # one token spare: the text may split differently at the seam
    return [
        text if len(spans) <= budget else text[: spans[head - 1][1]] + " " + text[spans[-tail][0] :]
        for text, spans in zip(texts, offsets)
    ]


def encode_texts(tokenizer, texts: list[str], max_length: int, truncation: str = "right", **kwargs):
    """Tokenize as training does: cut to ``max_length`` tokens from the right, or keeping head and tail."""
    if truncation == "head_tail":
        texts = head_and_tail(tokenizer, list(texts), max_length)
    return tokenizer(texts, truncation=True, max_length=max_length, **kwargs)


BUCKET_GROWTH = 1.2
"""Each padded length of a bf16 CPU batch is at most this many times the next shorter one (see
:func:`padding_lengths`)."""


def padding_lengths(max_length: int) -> list[int]:
    """The lengths a bf16 CPU batch is padded to: geometric from 8 tokens (x :data:`BUCKET_GROWTH`, multiples of 8
    above 64) up to ``max_length``; 12 lengths up to 64 tokens, 15 up to 128, 18 up to 256.

    Why buckets: oneDNN compiles and caches its bf16 kernels per input shape, so with one length per batch its
    cache grew by about 11 MB per new length, and the IMDb recipe's resident memory from 3.0 to 6.5 GB over 600
    steps (docs/results.md). Why geometric: a uniform multiple of ``max_length / 8`` pads a 10-token sentence
    (SST-2's median) to 16 or 32 tokens; a fixed ratio keeps the padding to a similar small share at every length.
    """
    lengths, n = [], 8
    while n < max_length:
        lengths.append(n)
        n = math.ceil(n * BUCKET_GROWTH) if n < 64 else 8 * math.ceil(n * BUCKET_GROWTH / 8)
    return lengths + [max_length]


def padded_length(longest: int, max_length: int, device_type: str, bf16: bool) -> int:
    """The length a batch whose longest text has ``longest`` tokens is padded to: the next of
    :func:`padding_lengths` for bf16 on a CPU (bounded shapes), a multiple of 8 on GPUs (tensor-core tiles), and
    ``longest`` itself for float32 on a CPU, where oneDNN's kernels do not depend on the shape and any padding is
    only work (``pad_to_multiple_of=8`` cost 23% more tokens on SST-2)."""
    if device_type != "cpu":
        return 8 * math.ceil(longest / 8)
    if not bf16:
        return longest
    return next((n for n in padding_lengths(max_length) if n >= longest), longest)


class PaddingCollator:
    """Dynamic padding of a list of tokenized rows to :func:`padded_length` of their longest."""

    def __init__(self, tokenizer, max_length: int, device_type: str, bf16: bool):
        self.tokenizer, self.max_length, self.device_type, self.bf16 = tokenizer, max_length, device_type, bf16

    def __call__(self, features: list[dict]) -> dict:
        from transformers.data.data_collator import pad_without_fast_tokenizer_warning

        longest = max(len(f["input_ids"]) for f in features)
        length = padded_length(longest, self.max_length, self.device_type, self.bf16)
        return pad_without_fast_tokenizer_warning(
            self.tokenizer, features, padding="max_length", max_length=length, return_tensors="pt"
        )


def padding_collator(tokenizer, max_length: int, device_type: str, mixed_precision: str = "no") -> PaddingCollator:
    """The collator of training and evaluation batches (``mixed_precision`` as the recipe's training field)."""
    return PaddingCollator(tokenizer, max_length, device_type, mixed_precision == "bf16")


def tokenize(
    ds: "datasets.Dataset", tokenizer, spec: DataSpec, max_length: int, truncation: str = "right"
) -> "datasets.Dataset":
    """Tokenize once (batched and cached by ``datasets``), keeping only model inputs, ``labels`` and ``length``."""

    def encode(batch: dict) -> dict:
        enc = encode_texts(tokenizer, batch[spec.text_column], max_length, truncation)
        enc["labels"] = batch[spec.label_column]
        enc["length"] = [len(ids) for ids in enc["input_ids"]]
        return enc

    return ds.map(encode, batched=True, remove_columns=ds.column_names, desc="Tokenizing")


class EpochSampler(Sampler[int]):
    """Shuffles with ``seed + epoch`` so the order is a pure function of (seed, epoch).

    That makes mid-epoch resume exact (skip the consumed batches of the same order) and gives every
    process of a distributed run the same permutation to shard. With ``group_by_length`` indices are
    shuffled, cut into mega-batches of 50 batches, and sorted by length inside each mega-batch, so a
    batch holds sequences of similar length (less padding) while the epoch stays random.
    """

    def __init__(self, lengths: Sequence[int], batch_size: int, seed: int, group_by_length: bool):
        self.lengths = list(lengths)
        self.batch_size = batch_size
        self.seed = seed
        self.group_by_length = group_by_length
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.lengths)

    def __iter__(self) -> Iterator[int]:
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        order = torch.randperm(len(self.lengths), generator=g).tolist()
        if not self.group_by_length:
            return iter(order)
        mega = self.batch_size * 50
        groups = [sorted(order[i : i + mega], key=lambda j: -self.lengths[j]) for i in range(0, len(order), mega)]
        batches = [grp[i : i + self.batch_size] for grp in groups for i in range(0, len(grp), self.batch_size)]
        # Shuffle whole batches so long batches are not always first in their mega-batch; the one short
        # batch goes last so the DataLoader's fixed-size slices stay aligned with these batches.
        perm = torch.randperm(len(batches), generator=g).tolist()
        perm.sort(key=lambda b: len(batches[b]) < self.batch_size)
        return iter([i for b in perm for i in batches[b]])


def steps_per_epoch(num_batches: int, accumulation: int) -> int:
    """Optimizer steps in one epoch (a trailing partial accumulation still steps)."""
    return math.ceil(num_batches / accumulation)
