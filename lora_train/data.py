"""Loading, checking, tokenizing and batching text-classification data."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Iterator, Optional, Sequence

import torch
from torch.utils.data import Sampler

from lora_train.config import DataConfig, read_text_file
from lora_train.hub import lookup_error
from lora_train.tasks import TASKS, canonical_dataset_id

if TYPE_CHECKING:  # annotations only: datasets, pyarrow and numpy load when data does
    import datasets
    import numpy as np
    import pyarrow

DATA_FORMATS = {
    ".parquet": ("parquet", {}),
    ".csv": ("csv", {}),
    ".tsv": ("csv", {"delimiter": "\t"}),
    ".json": ("json", {}),
    ".jsonl": ("json", {}),
}
"""Data file suffixes and the ``datasets`` builder (with its options) that reads each."""
DATA_SUFFIXES = "/".join(s.lstrip(".") for s in DATA_FORMATS)
SUBSET_SEED = 0
"""Subsets (max_train_samples, max_eval_samples) and the carved validation split use this fixed seed, so that runs
with different training seeds see the same examples."""
TEXT_COLUMN_NAMES = ("text", "sentence", "review", "content")
"""Column names taken as the text column when data.text_column is null and the data has several string columns."""
CARVE_FILE = "data_split.json"
"""Saved with a run whose validation split was carved out of train: which rows, so eval and resume use them."""

logger = logging.getLogger("lora_train")


class DataError(ValueError):
    """The data cannot be used as the recipe says; the message says why and what would work."""


@dataclass
class DataSpec:
    """Resolved description of where the data is and which columns hold what."""

    source: str
    """Local directory or file, or Hub dataset id."""
    config_name: Optional[str]
    text_column: Optional[str]
    """None until :func:`load_splits` finds it in the data (the recipe and the task left it open)."""
    text_pair_column: Optional[str]
    label_column: str
    train_split: str
    eval_split: str
    eval_split_given: bool
    """The recipe named the eval split, so it must exist; otherwise a missing one is carved out of train."""
    label_names: Optional[list[str]]

    @property
    def text_columns(self) -> list[str]:
        """The text column, then the pair's second text column when there is one."""
        return [c for c in (self.text_column, self.text_pair_column) if c]


def resolve_spec(cfg: DataConfig) -> DataSpec:
    """Fill the recipe's nulls from the task registry."""
    task = TASKS.get(cfg.task) if cfg.task else None
    source = cfg.path or (task.hub_id if task else None)
    assert source is not None  # validate() guarantees it
    if not Path(source).expanduser().exists():
        source = canonical_dataset_id(source)
    return DataSpec(
        source=source,
        config_name=cfg.config_name or (task.hub_config if task and source == task.hub_id else None),
        text_column=cfg.text_column or (task.text_column if task else None),
        text_pair_column=cfg.text_pair_column,
        label_column=cfg.label_column or (task.label_column if task else "label"),
        train_split=cfg.train_split or (task.train_split if task else "train"),
        eval_split=cfg.eval_split or (task.eval_split if task else "validation"),
        eval_split_given=cfg.eval_split is not None,
        label_names=cfg.label_names or (list(task.label_names) if task else None),
    )


@dataclass
class Carve:
    """A validation split carved out of the training split: which rows, out of which data."""

    fraction: float
    seed: int
    train_rows: int
    """Rows of the whole training split it was carved from."""
    fingerprint: str
    """sha256 of that split's text and label values: a changed data file is noticed, not silently re-carved."""
    eval_rows: list[int]
    """Row numbers (from 0, in the training split's order) that became the validation split, ascending."""

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self))

    @classmethod
    def read(cls, path: Path) -> "Carve":
        try:
            return cls(**json.loads(read_text_file(path, "carve file")))
        except (ValueError, TypeError) as err:
            raise DataError(
                f"'{path}' is corrupt ({err}); it lists the validation rows carved out of train. Delete it to"
                " carve again (the same rows, if the data is unchanged)"
            ) from None


@dataclass
class TaskData:
    """The training and evaluation splits, checked, labels as class ids 0..K-1, with the class names.

    Unpacks as ``train, eval``.
    """

    spec: DataSpec
    """With the text column found."""
    train: "datasets.Dataset"
    eval: "datasets.Dataset"
    label_names: list[str]
    """From the recipe, the task, or the whole training split (before any subset)."""
    carve: Optional[Carve] = None
    """Set when the validation split was carved out of train."""

    @property
    def num_labels(self) -> int:
        return len(self.label_names)

    def __iter__(self) -> Iterator["datasets.Dataset"]:
        return iter((self.train, self.eval))


def _local_files(directory: Path) -> dict[str, str]:
    files: dict[str, str] = {}
    for path in sorted(directory.iterdir()):
        if path.suffix in DATA_FORMATS and path.stem not in files:
            files[path.stem] = str(path)
    return files


def load_splits(spec: DataSpec, cfg: DataConfig, carve: Optional[Carve] = None, for_training: bool = True) -> TaskData:
    """Load and check the train and eval splits, map string labels to class ids, carve a validation split out of
    train when the data has none (``carve``: the rows a run already carved), then take the subsets.

    ``for_training`` warns about classes without training examples (evaluation only reads train for the carve).
    """
    spec, train, evaluation = _checked_splits(spec, carve)
    label_names, train, evaluation = _labelled(spec, train, evaluation, for_training)
    carved = evaluation is None
    if carved:
        carve, train, evaluation = _carved(spec, train, carve, cfg.validation_fraction)
    train, evaluation = _subsets(spec, train, evaluation, cfg, label_names, for_training)
    return TaskData(spec, train, evaluation, label_names, carve if carved else None)


def _checked_splits(
    spec: DataSpec, carve: Optional[Carve]
) -> tuple[DataSpec, "datasets.Dataset", Optional["datasets.Dataset"]]:
    """The spec with its text column found, the training split and the eval split (None when the data has none),
    their columns checked; a run's carve is refused when the data has gained an eval split since."""
    dd, origin = _load_raw(spec)
    train = dd[spec.train_split]
    spec = dataclasses.replace(spec, text_column=spec.text_column or find_text_column(train, spec))
    _check_columns(train, spec, spec.train_split, origin[spec.train_split])
    if spec.eval_split not in dd:
        return spec, train, None
    evaluation = dd[spec.eval_split]
    _check_columns(evaluation, spec, spec.eval_split, origin[spec.eval_split])
    if carve is not None:
        raise DataError(
            f"the run carved its validation rows out of '{spec.train_split}' ({CARVE_FILE}), but the data now"
            f" has a '{spec.eval_split}' split; evaluate that split with --split {spec.eval_split}, or train anew"
        )
    return spec, train, evaluation


def _labelled(
    spec: DataSpec, train: "datasets.Dataset", evaluation: Optional["datasets.Dataset"], for_training: bool
) -> tuple[list[str], "datasets.Dataset", Optional["datasets.Dataset"]]:
    """The class names, and both splits with their labels as class ids 0..K-1, checked."""
    label_names = class_names(train, evaluation, spec)
    if len(label_names) < 2:
        raise DataError(
            f"split '{spec.train_split}' holds a single class {label_names} in column '{spec.label_column}': a"
            " classifier needs at least two. Check data.label_column, or add examples of the other classes"
        )
    train = _as_class_ids(train, spec.label_column, label_names)
    if evaluation is not None:
        evaluation = _as_class_ids(evaluation, spec.label_column, label_names)
    check_labels(train, spec, len(label_names), spec.train_split)
    if evaluation is not None:
        check_eval_labels(evaluation, spec, label_names)
    if for_training:
        _warn_untrained_classes(train, spec, label_names, "training split")
    return label_names, train, evaluation


def _carved(
    spec: DataSpec, train: "datasets.Dataset", carve: Optional[Carve], fraction: float
) -> tuple[Carve, "datasets.Dataset", "datasets.Dataset"]:
    """The carve (the run's own, checked against the data, or a new one of ``fraction``) and the training and
    validation splits it makes of ``train``."""
    carve = _checked_carve(carve, train, spec) or carve_rows(train, spec, fraction)
    train, evaluation = _apply_carve(train, carve)
    logger.info(
        "no '%s' split in the data: carved %.0f%% of '%s' out as validation (stratified by label, seed %d):"
        " train %d rows, validation %d rows; the rows are saved with the run (%s)",
        spec.eval_split,
        100 * carve.fraction,
        spec.train_split,
        carve.seed,
        len(train),
        len(evaluation),
        CARVE_FILE,
    )
    return carve, train, evaluation


def _subsets(
    spec: DataSpec,
    train: "datasets.Dataset",
    evaluation: "datasets.Dataset",
    cfg: DataConfig,
    label_names: list[str],
    for_training: bool,
) -> tuple["datasets.Dataset", "datasets.Dataset"]:
    """The ``data.max_train_samples`` / ``max_eval_samples`` subsets (the training one holding every class it can);
    an empty split is refused."""
    whole = len(train)
    train = _subset_covering_classes(train, cfg.max_train_samples, spec.label_column)
    if len(train) < whole:
        logger.info(
            "training subset (data.max_train_samples): %d of %d rows, holding %d of the %d classes",
            len(train),
            whole,
            len(set(label_ids(train, spec.label_column).tolist())),
            len(label_names),
        )
    evaluation = _subset(evaluation, cfg.max_eval_samples)
    if for_training and cfg.max_train_samples is not None:
        _warn_untrained_classes(train, spec, label_names, f"{len(train)}-row training subset (max_train_samples)")
    for name, split in (("train", train), ("eval", evaluation)):
        if len(split) == 0:
            raise DataError(f"the {name} split is empty; check data.{name}_split and data.max_{name}_samples")
    return train, evaluation


def _load_raw(spec: DataSpec) -> tuple["datasets.DatasetDict", dict[str, str]]:
    """The splits the run needs (train, and eval when the data has it or the recipe names it), and the file or
    dataset each came from."""
    import datasets

    local = Path(spec.source).expanduser()
    origin = {split: spec.source for split in (spec.train_split, spec.eval_split)}
    if local.exists():
        if local.is_file() and local.suffix not in DATA_FORMATS:
            raise DataError(
                f"data.path '{local}' is a {local.suffix or 'suffix-less'} file; give one .csv, .tsv, .json, .jsonl"
                f" or .parquet file (the training split), or a directory of {{split}}.{DATA_SUFFIXES.replace('/', '|')}"
                " files"
            )
        files = _local_files(local) if local.is_dir() else {spec.train_split: str(local)}
        if not files:
            raise DataError(f"data.path '{local}' holds no {DATA_SUFFIXES} files named after their split")
        formats = {Path(f).suffix.replace(".jsonl", ".json") for f in files.values()}
        if len(formats) != 1:
            raise DataError(f"data.path '{local}' mixes file types {sorted(formats)}; use one format")
        if local.is_file() and spec.eval_split_given and spec.eval_split != spec.train_split:
            raise DataError(
                f"data.path '{local}' is one file, the training split, but data.eval_split = '{spec.eval_split}'"
                " names another: leave data.eval_split null to carve data.validation_fraction out of the file, or"
                f" give a directory holding {spec.train_split} and {spec.eval_split} files"
            )
        wanted = [spec.train_split] + ([spec.eval_split] if spec.eval_split in files or spec.eval_split_given else [])
        missing = [s for s in wanted if s not in files]
        if missing:
            raise DataError(
                f"data.path '{local}' has no file for split(s) {missing}; found {sorted(files)}."
                " Set data.train_split / data.eval_split to one of those, or give one file as data.path (the"
                " training split; a validation split is then carved out of it)"
            )
        empty = [f"{s} ({files[s]})" for s in wanted if not _readable_rows(Path(files[s]))]
        if empty:
            raise DataError(
                f"data.path '{local}': split(s) {', '.join(empty)} hold no rows; every split used needs examples"
            )
        origin.update((s, files[s]) for s in wanted)
        builder, options = DATA_FORMATS[Path(files[spec.train_split]).suffix]
        try:
            dd = datasets.load_dataset(builder, data_files={s: files[s] for s in wanted}, **options)
        except Exception as err:  # noqa: BLE001 - parser errors of pandas / pyarrow, of many types
            cause = err.__cause__ or err
            raise DataError(
                f"cannot read the data files {[files[s] for s in wanted]}: {type(cause).__name__}: {cause}."
                " Check that each file is complete and well-formed"
            ) from None
        return dd, origin
    if _looks_local(spec.source):
        raise DataError(
            f"data.path '{spec.source}' does not exist (resolved to '{local.resolve()}'). Give a local .csv, .tsv,"
            f" .json, .jsonl or .parquet file, a directory of {{split}}.{DATA_SUFFIXES.replace('/', '|')} files, or"
            " a Hub dataset id such as user/name"
        )
    dd = load_hub_dataset(spec.source, spec.config_name)
    missing = [
        s
        for s in (spec.train_split, spec.eval_split)
        if s not in dd and (s != spec.eval_split or spec.eval_split_given)
    ]
    if missing:
        raise DataError(f"dataset '{spec.source}' has no split(s) {missing}; it has {list(dd)}")
    return dd, origin


def load_hub_dataset(dataset_id: str, config_name: Optional[str]) -> "datasets.DatasetDict":
    """A Hub dataset by id and config, through the Hub cache: online it downloads only that config's files,
    offline (``HF_HUB_OFFLINE=1``) it reads the cache, also a read-only one.

    ``datasets.load_dataset(id, config)`` does not read the Hub cache when offline; resolving the snapshot with
    huggingface_hub first and loading that local folder works in both cases.
    """
    import datasets
    from huggingface_hub import snapshot_download

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
            f"{lookup_error(f'dataset {dataset_id!r}', dataset_id, err, repo_type='dataset')}."
            " Or set data.path to a local file or a directory of {split}.parquet|csv|json|jsonl files."
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
    return source.startswith((".", "/", "~")) or source.count("/") > 1 or Path(source).suffix in DATA_FORMATS


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
    return len(lines) > (1 if path.suffix in (".csv", ".tsv") else 0)  # a CSV header alone is no data


def _is_text(values: "pyarrow.ChunkedArray") -> bool:
    import pyarrow as pa

    return pa.types.is_string(values.type) or pa.types.is_large_string(values.type)


def find_text_column(ds: "datasets.Dataset", spec: DataSpec) -> str:
    """The text column when the recipe leaves it open: the one string column besides the label (and pair) column,
    else the one named text, sentence, review or content; otherwise an error lists the string columns."""
    taken = {spec.label_column, spec.text_pair_column}
    strings = [c for c in ds.column_names if c not in taken and _is_text(ds.data.column(c))]
    named = [c for c in strings if c.lower() in TEXT_COLUMN_NAMES]
    if len(strings) == 1 or len(named) == 1:
        return strings[0] if len(strings) == 1 else named[0]
    if not strings:
        raise DataError(
            f"split '{spec.train_split}' has no text column: none of its columns {ds.column_names} holds strings"
            f"{' (besides the label column)' if spec.label_column in ds.column_names else ''}. Set data.text_column"
        )
    raise DataError(
        f"split '{spec.train_split}' has several text columns {strings} and data.text_column is null: set"
        f" data.text_column to the one to classify (and data.text_pair_column to a second one for sentence pairs)"
    )


def _check_columns(ds: "datasets.Dataset", spec: DataSpec, split: str, origin: str) -> None:
    """The text (and pair) and label columns exist, hold texts and class ids or names, and no row lacks either."""
    roles = [("text", c) for c in spec.text_columns] + [("label", spec.label_column)]
    for role, column in roles:
        if column not in ds.column_names:
            field_name = "text_pair_column" if column == spec.text_pair_column else f"{role}_column"
            raise DataError(
                f"split '{split}' has no {role} column '{column}'; its columns are {ds.column_names}."
                f" Set data.{field_name} to one of them."
            )
    for role, column in roles:
        empty = _null_rows(ds.data.column(column))
        if len(empty):
            shown = ", ".join(str(i) for i in empty[:10]) + (", ..." if len(empty) > 10 else "")
            raise DataError(
                f"split '{split}': {role} column '{column}' is empty (null or NaN) in {len(empty)} row(s):"
                f" rows {shown} of {origin} (counting from 0); drop or fill those rows"
            )
    for column in spec.text_columns:
        values = ds.data.column(column)
        if not _is_text(values):
            raise DataError(
                f"split '{split}': text column '{column}' holds {values.type} values, not text."
                " Set data.text_column to the column that holds the texts"
            )
    _check_label_type(ds.data.column(spec.label_column), spec, split)


def _null_rows(values: "pyarrow.ChunkedArray") -> "np.ndarray":
    """Row numbers of the missing values (null, or NaN in a float column)."""
    import numpy as np
    import pyarrow.compute as pc

    return np.flatnonzero(pc.is_null(values, nan_is_null=True).to_numpy(zero_copy_only=False))


def _check_label_type(values: "pyarrow.ChunkedArray", spec: DataSpec, split: str) -> None:
    """Labels are integer class ids or class names (strings); floats and anything else are refused with the fix."""
    import numpy as np
    import pyarrow as pa

    column = spec.label_column
    if pa.types.is_integer(values.type) or _is_text(values):
        return
    if pa.types.is_floating(values.type):
        numbers = values.to_numpy()
        fractional = np.flatnonzero(numbers != np.round(numbers))
        row = int(fractional[0]) if len(fractional) else 0
        kind = "non-integer" if len(fractional) else "floating-point"
        raise DataError(
            f"split '{split}': label column '{column}' holds {kind} values (e.g. {numbers[row]} in row"
            f" {row}); labels must be class names or integer class ids: convert the column"
        )
    raise DataError(
        f"split '{split}': label column '{column}' holds {values.type} values; labels must be class names"
        " (strings) or integer class ids 0..K-1"
    )


def class_names(train: "datasets.Dataset", evaluation: Optional["datasets.Dataset"], spec: DataSpec) -> list[str]:
    """Class names, from the whole training split: the recipe's / task's; for string labels the sorted distinct
    labels; else the dataset's ClassLabel; else LABEL_i up to the highest id.

    String labels that the given names lack are refused, naming them, in either split; so are string labels
    of the eval split that no training row has (a model without that class could never predict it).
    """
    import datasets
    import pyarrow.compute as pc

    column = spec.label_column
    values = train.data.column(column)
    if evaluation is not None and _is_text(values) != _is_text(evaluation.data.column(column)):
        kinds = {
            s: str(d.data.column(column).type) for s, d in ((spec.train_split, train), (spec.eval_split, evaluation))
        }
        raise DataError(
            f"label column '{column}' holds {kinds[spec.train_split]} in split '{spec.train_split}' but"
            f" {kinds[spec.eval_split]} in '{spec.eval_split}'; use class names (or ids) in both"
        )
    if not _is_text(values):
        if spec.label_names:
            return list(spec.label_names)
        feature = train.features[column]
        if isinstance(feature, datasets.ClassLabel):
            return list(feature.names)
        return [f"LABEL_{i}" for i in range(max(int(pc.max(values).as_py()), 0) + 1)]
    found = sorted(pc.unique(values).to_pylist())
    names = list(spec.label_names) if spec.label_names else found
    splits = [(spec.train_split, values)] + (
        [] if evaluation is None else [(spec.eval_split, evaluation.data.column(column))]
    )
    for split, labels in splits:
        unknown = sorted(set(pc.unique(labels).to_pylist()) - set(names))
        if not unknown:
            continue
        shown = ", ".join(repr(u) for u in unknown[:10]) + (
            f" and {len(unknown) - 10} more" if len(unknown) > 10 else ""
        )
        if spec.label_names:
            raise DataError(
                f"split '{split}': label(s) {shown} in column '{column}' are not in data.label_names {names};"
                " add them there (the order gives the class ids), or fix the data"
            )
        raise DataError(
            f"split '{split}': label(s) {shown} in column '{column}' occur in no row of the training split"
            f" '{spec.train_split}', whose classes are {_shown(names)}: the model could never predict them. Add"
            " training examples of them, or list every class in data.label_names"
        )
    return names


def _shown(names: Sequence[str], limit: int = 10) -> str:
    return str(list(names)) if len(names) <= limit else f"{list(names[:limit])} ... ({len(names)} in all)"


def _as_class_ids(ds: "datasets.Dataset", column: str, names: list[str]) -> "datasets.Dataset":
    """String labels mapped to their position in ``names`` (a ClassLabel column that keeps the names); integer
    labels as they are."""
    import datasets

    if not _is_text(ds.data.column(column)):
        return ds
    return ds.cast_column(column, datasets.ClassLabel(names=names))


def label_ids(ds: "datasets.Dataset", column: str) -> "np.ndarray":
    """The class ids of ``ds`` as one array (read column-wise: ``with_format("numpy")[column]`` goes row by row)."""
    return ds.select_columns([column]).with_format("numpy")[:][column]


def check_labels(ds: "datasets.Dataset", spec: DataSpec, num_labels: int, split: str) -> None:
    """Refuse labels outside [0, num_labels) with the offending values named."""
    labels = torch.as_tensor(label_ids(ds, spec.label_column))
    bad = labels[(labels < 0) | (labels >= num_labels)].unique().tolist()
    if bad:
        raise DataError(
            f"split '{split}' has label(s) {bad[:10]} outside [0, {num_labels}) in column '{spec.label_column}'."
            " Hidden test labels (-1, as in GLUE) cannot be trained or evaluated on; for a generic dataset set"
            " data.label_names to cover every class."
        )


def check_eval_labels(ds: "datasets.Dataset", spec: DataSpec, label_names: list[str]) -> None:
    """Eval class ids must be classes of the model: ids past the last class are ones no training row has."""
    labels = torch.as_tensor(label_ids(ds, spec.label_column))
    unseen = labels[labels >= len(label_names)].unique().tolist()
    if unseen and not spec.label_names and labels.min() >= 0:
        raise DataError(
            f"split '{spec.eval_split}' has label(s) {unseen[:10]} in column '{spec.label_column}' that no row of"
            f" the training split '{spec.train_split}' has (its classes are 0..{len(label_names) - 1}): the"
            " model could never predict them. Add training examples of them, or name every class in"
            " data.label_names"
        )
    check_labels(ds, spec, len(label_names), spec.eval_split)


def _warn_untrained_classes(ds: "datasets.Dataset", spec: DataSpec, label_names: list[str], what: str) -> None:
    """Say which classes of the model have no example in ``ds``: it has them, but cannot learn them from it."""
    import numpy as np

    counts = np.bincount(label_ids(ds, spec.label_column), minlength=len(label_names))
    absent = [label_names[i] for i in np.flatnonzero(counts == 0)]
    if absent:
        logger.warning(
            "%d of the %d classes have no example in the %s: %s. The model keeps all %d classes but learns"
            " nothing about these",
            len(absent),
            len(label_names),
            what,
            _shown(absent),
            len(label_names),
        )


# ---------------------------------------------------------------------------------------------
# The carved validation split and the subsets


def data_fingerprint(ds: "datasets.Dataset", spec: DataSpec) -> str:
    """sha256 of the text (and pair) and label values of ``ds``, in row order."""
    digest = hashlib.sha256()
    for column in spec.text_columns + [spec.label_column]:
        digest.update(column.encode() + b"\x1e")
        for value in ds.data.column(column).to_pylist():
            digest.update(str(value).encode() + b"\x1f")
    return digest.hexdigest()


def carve_rows(train: "datasets.Dataset", spec: DataSpec, fraction: float, seed: int = SUBSET_SEED) -> Carve:
    """Choose ``fraction`` of the rows of ``train`` as a validation split, stratified by label and seeded.

    Each class gives its share (largest remainders, ties broken at random, fill the rounding); a class keeps at
    least one training row, so a class with one row stays in train and the model sees every class.
    """
    import numpy as np

    labels = label_ids(train, spec.label_column)
    rng = np.random.default_rng(seed)
    classes, counts = np.unique(labels, return_counts=True)
    quota = counts * fraction
    take = np.minimum(np.floor(quota).astype(int), counts - 1)
    room = counts - 1 - take
    target = min(max(1, round(fraction * len(labels))), int((counts - 1).sum()))
    order = np.lexsort((rng.random(len(classes)), -(quota - np.floor(quota))))  # largest remainder first
    for i in order:
        if take.sum() >= target:
            break
        if room[i] > 0:
            take[i] += 1
            room[i] -= 1
    rows = []
    for cls, n in zip(classes, take):
        members = np.flatnonzero(labels == cls)
        rows.extend(rng.permutation(members)[:n].tolist())
    if not rows:
        raise DataError(
            f"cannot carve a validation split out of '{spec.train_split}' ({len(labels)} rows): every class has"
            " a single row, which training needs. Add rows, or give a validation split (data.eval_split)"
        )
    return Carve(fraction, seed, len(labels), data_fingerprint(train, spec), sorted(int(r) for r in rows))


def _checked_carve(carve: Optional[Carve], train: "datasets.Dataset", spec: DataSpec) -> Optional[Carve]:
    """A run's saved carve, once the training split is the one it was carved from."""
    if carve is None:
        return None
    if carve.train_rows != len(train) or carve.fingerprint != data_fingerprint(train, spec):
        raise DataError(
            f"the data of '{spec.train_split}' changed since the run carved its validation split ({CARVE_FILE}:"
            f" {carve.train_rows} rows, sha256 {carve.fingerprint[:12]}; now {len(train)} rows, sha256"
            f" {data_fingerprint(train, spec)[:12]}). Restore the data the run used, or train a new run"
        )
    return carve


def _apply_carve(train: "datasets.Dataset", carve: Carve) -> tuple["datasets.Dataset", "datasets.Dataset"]:
    """The remaining training rows (in their order) and the carved validation rows."""
    import numpy as np

    keep = np.ones(len(train), dtype=bool)
    keep[carve.eval_rows] = False
    return train.select(np.flatnonzero(keep)).flatten_indices(), train.select(carve.eval_rows).flatten_indices()


def _subset(ds: "datasets.Dataset", n: Optional[int]) -> "datasets.Dataset":
    if n is None or n >= len(ds):
        return ds
    return ds.shuffle(seed=SUBSET_SEED).select(range(n)).flatten_indices()


def _subset_covering_classes(ds: "datasets.Dataset", n: Optional[int], column: str) -> "datasets.Dataset":
    """A fixed random subset of ``n`` rows (as :func:`_subset`) that holds every class of ``ds`` it has room for:
    a class the random draw missed replaces a row of the most frequent class, so a rare class is not lost."""
    import numpy as np

    if n is None or n >= len(ds):
        return ds
    order = np.random.default_rng(SUBSET_SEED).permutation(len(ds))  # Dataset.shuffle(seed)'s order
    labels = label_ids(ds, column)
    chosen = list(order[:n])
    counts = Counter(labels[chosen].tolist())
    firsts = {}
    for row in order[n:]:
        firsts.setdefault(int(labels[row]), int(row))
    for cls, row in sorted(firsts.items(), key=lambda item: item[1]):
        if cls in counts:
            continue
        common, count = counts.most_common(1)[0]
        if count < 2:
            break  # one row per class already
        at = max(i for i, r in enumerate(chosen) if labels[r] == common)
        chosen[at] = row
        counts[common] -= 1
        counts[cls] = 1
    return ds.select(chosen).flatten_indices()


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


def encode_texts(
    tokenizer, texts: list[str], max_length: int, truncation: str = "right", pairs: Optional[list[str]] = None, **kwargs
):
    """Tokenize as training does: cut to ``max_length`` tokens from the right, or keeping head and tail; with
    ``pairs``, each text and its pair as one input (the longer of the two is cut first)."""
    if pairs is not None:
        return tokenizer(list(texts), list(pairs), truncation=True, max_length=max_length, **kwargs)
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
        pairs = batch[spec.text_pair_column] if spec.text_pair_column else None
        enc = encode_texts(tokenizer, batch[spec.text_column], max_length, truncation, pairs)
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


def longest_first(lengths: Sequence[int]) -> list[int]:
    """Evaluation order: the indices of ``lengths`` by decreasing length (ties in their order), so each batch holds
    texts of similar lengths and is padded little (a batch is padded to its longest), and the longest batch, the
    one that needs the most memory, comes first. Metrics are sums over the examples, so the order does not change
    them beyond rounding."""
    return sorted(range(len(lengths)), key=lambda i: -lengths[i])


def steps_per_epoch(num_batches: int, accumulation: int) -> int:
    """Optimizer steps in one epoch (a trailing partial accumulation still steps)."""
    return math.ceil(num_batches / accumulation)
