"""The catalogue of bad inputs: each one fails before any heavy work, with a message naming the field, file,
row or line, what is wrong and what is valid, and exit status 2.

Every case runs a real command-line entry point (``lora_train.commands.train.main``, or ``main`` of scripts/predict.py,
eval.py, merge_adapter.py) on a model directory that has a config and a tokenizer but a corrupt weights file (the
run of the predict / eval / merge cases names that model as its base): a case that got as far as loading weights
would fail with a different message (``test_the_corrupt_model_fails_only_at_weight_loading`` shows which), so
passing proves each error came before any weights were read. In-process cases are also timed (loosely).

docs/bad_inputs.md is this table rendered; regenerate it with ``python -m tests.test_bad_inputs``.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import pandas as pd
import pytest
import torch
from safetensors.torch import save as save_safetensors

from lora_train.commands.train import main as train_main
from lora_train.config import build_recipe
from lora_train.train import train
from tests.conftest import ROOT, script, tiny_recipe, write_recipe


@dataclass
class Context:
    """What a case needs: a scratch directory, the corrupt-weights model, the toy data, a finished run, and a copy
    of that run whose base model is the corrupt-weights one."""

    tmp: Path
    model_dir: Path
    data_dir: Path
    finished_run: Path
    run: Path

    def recipe(self, name: str = "recipe", **sections) -> Path:
        return write_recipe(
            self.tmp / f"{name}.yaml", tiny_recipe(self.model_dir, self.data_dir, self.tmp / "out", **sections)
        )

    def data(self, name: str, **splits: pd.DataFrame) -> Path:
        directory = self.tmp / name
        directory.mkdir()
        for split in ("train", "validation"):
            frame = splits.get(split, pd.read_parquet(self.data_dir / f"{split}.parquet"))
            frame.to_parquet(directory / f"{split}.parquet")
        return directory


@dataclass
class Case:
    """``make(ctx)`` returns the command-line arguments; ``expected`` must all appear in the error output."""

    input: str
    """The bad input, as the docs table names it."""
    make: Callable[[Context], list[str]]
    expected: list[str]
    entry: str = "train"
    """train (scripts/train.py), or the script whose ``main`` gets the arguments: predict, eval, merge_adapter,
    push_to_hub."""
    subprocess_setup: str = ""
    """Python run before the entry point in a fresh interpreter (for cases that change the environment)."""
    status: int = 2


def _malformed_yaml(ctx: Context) -> list[str]:
    lines = ctx.recipe().read_text().splitlines()
    at = next(i for i, line in enumerate(lines) if line.strip().startswith("seed:"))
    lines[at] += ": 1"  # "seed: 0: 1"
    (ctx.tmp / "malformed.yaml").write_text("\n".join(lines) + "\n")
    assert at + 1 == 26  # the line number the message must give
    return [str(ctx.tmp / "malformed.yaml")]


def _typo_in_file(ctx: Context) -> list[str]:
    path = ctx.recipe()
    path.write_text(path.read_text().replace("learning_rate:", "lerning_rate:"))
    return [str(path)]


def _labels_out_of_range(ctx: Context) -> list[str]:
    train_rows = pd.read_parquet(ctx.data_dir / "train.parquet")
    train_rows.loc[[3, 7], "label"] = [2, 5]
    return [str(ctx.recipe()), f"data.path={ctx.data('bad_labels', train=train_rows)}"]


def _empty_split(ctx: Context) -> list[str]:
    empty = pd.read_parquet(ctx.data_dir / "validation.parquet").iloc[:0]
    return [str(ctx.recipe()), f"data.path={ctx.data('empty_split', validation=empty)}"]


def _output_dir_under_a_file(ctx: Context) -> list[str]:
    (ctx.tmp / "a_file").write_text("not a directory\n")
    return [str(ctx.recipe()), f"output.output_dir={ctx.tmp / 'a_file' / 'run'}"]


def _output_dir_in_sysfs(ctx: Context) -> list[str]:
    # Tests run as root, for whom permission bits deny nothing; sysfs refuses new entries even to root.
    if not Path("/sys/kernel").is_dir():
        pytest.skip("no sysfs here")
    return [str(ctx.recipe()), "output.output_dir=/sys/lora_train_unwritable_run"]


def _resume_other_recipe(ctx: Context) -> list[str]:
    checkpoint = ctx.finished_run / "checkpoints" / "step-00000004"
    path = ctx.recipe(
        peft={"method": "adalora", "r": 16, "target_modules": ["query", "key"]},
        training={"resume_from_checkpoint": str(checkpoint)},
    )
    return [str(path)]


def _resume_damaged_checkpoint(ctx: Context) -> list[str]:
    """A copy of the finished run's step-4 checkpoint with its optimizer file cut short by 100 bytes."""
    checkpoint = ctx.tmp / "out" / "checkpoints" / "step-00000004"
    shutil.copytree(ctx.finished_run / "checkpoints" / "step-00000004", checkpoint)
    optimizer = checkpoint / "optimizer.safetensors"
    os.truncate(optimizer, optimizer.stat().st_size - 100)
    return [str(ctx.recipe(training={"resume_from_checkpoint": str(checkpoint)}))]


def _no_safetensors(ctx: Context) -> list[str]:
    directory = ctx.tmp / "pickled_model"
    shutil.copytree(ctx.model_dir, directory)
    (directory / "model.safetensors").rename(directory / "pytorch_model.bin")
    return [str(ctx.recipe()), f"model.name_or_path={directory}"]


def _overrides(*overrides: str) -> Callable[[Context], list[str]]:
    return lambda ctx: [str(ctx.recipe()), *(o.format(tmp=ctx.tmp, run=ctx.finished_run) for o in overrides)]


def _recipe_edited(old: str, new: str, name: str = "edited") -> Callable[[Context], list[str]]:
    def make(ctx: Context) -> list[str]:
        text = ctx.recipe().read_text()
        assert old in text
        path = ctx.tmp / f"{name}.yaml"
        path.write_text(text.replace(old, new, 1))
        return [str(path)]

    return make


def _second_training_section(ctx: Context) -> list[str]:
    path = ctx.recipe()
    lines = path.read_text().splitlines()
    assert lines.index("training:") + 1 == 20 and len(lines) == 29  # the line numbers the message must give
    path.write_text("\n".join(lines + ["training:", "  learning_rate: 5.0", "  num_epochs: 40"]) + "\n")
    return [str(path)]


def _recipe_file(name: str, content: bytes) -> Callable[[Context], list[str]]:
    def make(ctx: Context) -> list[str]:
        (ctx.tmp / name).write_bytes(content)
        return [str(ctx.tmp / name)]

    return make


def _output_dir_not_a_run(ctx: Context) -> list[str]:
    project = ctx.tmp / "project"
    project.mkdir()
    (project / "README.md").write_text("# my project\n")
    return [str(ctx.recipe()), f"output.output_dir={project}"]


def _rows_edited(column: str, rows: list[int], values: list, split: str = "train") -> Callable[[Context], list[str]]:
    def make(ctx: Context) -> list[str]:
        frame = pd.read_parquet(ctx.data_dir / f"{split}.parquet")
        frame[column] = frame[column].astype(object)
        for row, value in zip(rows, values):
            frame.at[row, column] = value
        return [str(ctx.recipe()), f"data.path={ctx.data('edited', **{split: frame})}"]

    return make


def _string_labels(ctx: Context) -> list[str]:
    """Class names as labels, one of them missing from the recipe's data.label_names [neg, pos]."""
    names = {0: "neg", 1: "pos"}
    splits = {
        s: pd.read_parquet(ctx.data_dir / f"{s}.parquet").assign(label=lambda f: f["label"].map(names))
        for s in ("train", "validation")
    }
    splits["train"].at[5, "label"] = "positive"
    return [str(ctx.recipe()), f"data.path={ctx.data('string_labels', **splits)}"]


def _eval_class_not_in_train(ctx: Context) -> list[str]:
    names = {0: "negative", 1: "positive"}
    splits = {
        s: pd.read_parquet(ctx.data_dir / f"{s}.parquet").assign(label=lambda f: f["label"].map(names))
        for s in ("train", "validation")
    }
    splits["validation"].at[2, "label"] = "neutral"
    return [str(ctx.recipe()), f"data.path={ctx.data('eval_class', **splits)}", "data.label_names=null"]


def _several_text_columns(ctx: Context) -> list[str]:
    splits = {
        s: pd.read_parquet(ctx.data_dir / f"{s}.parquet").rename(columns={"text": "body"}).assign(title="a title")
        for s in ("train", "validation")
    }
    return [str(ctx.recipe()), f"data.path={ctx.data('two_texts', **splits)}", "data.text_column=null"]


def _one_file_and_an_eval_split(ctx: Context) -> list[str]:
    pd.read_parquet(ctx.data_dir / "train.parquet").to_csv(ctx.tmp / "reviews.csv", index=False)
    return [str(ctx.recipe()), f"data.path={ctx.tmp / 'reviews.csv'}", "data.eval_split=validation"]


def _data_files(kind: str) -> Callable[[Context], list[str]]:
    """A data directory whose train file is broken in one way (validation stays readable)."""

    def make(ctx: Context) -> list[str]:
        directory = ctx.tmp / kind
        directory.mkdir()
        train_rows = pd.read_parquet(ctx.data_dir / "train.parquet")
        validation = pd.read_parquet(ctx.data_dir / "validation.parquet")
        if kind == "latin1_csv":
            train_rows.at[1, "text"] = "a café film"
            train_rows.to_csv(directory / "train.csv", index=False, encoding="latin-1")
            validation.to_csv(directory / "validation.csv", index=False)
        elif kind == "malformed_jsonl":
            lines = train_rows.to_json(orient="records", lines=True).splitlines()
            lines[2] = lines[2].replace('"label"', "'label'")
            (directory / "train.jsonl").write_text("\n".join(lines) + "\n")
            validation.to_json(directory / "validation.jsonl", orient="records", lines=True)
        else:
            train_rows.to_parquet(directory / "train.parquet")
            validation.to_parquet(directory / "validation.parquet")
            data = (directory / "train.parquet").read_bytes()
            garbled = data[:4] + bytes(range(256)) * 8 + data[-8:]  # magic bytes right, the rest noise
            broken = data[: len(data) // 2] if kind == "truncated_parquet" else garbled
            (directory / "train.parquet").write_bytes(broken)
        return [str(ctx.recipe()), f"data.path={directory}"]

    return make


def _data_path_of_unknown_type(ctx: Context) -> list[str]:
    (ctx.tmp / "reviews.txt").write_text("a good film\n")
    return [str(ctx.recipe()), f"data.path={ctx.tmp / 'reviews.txt'}"]


def _model_without_tokenizer(ctx: Context) -> list[str]:
    directory = ctx.tmp / "no_tokenizer"
    directory.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(ctx.model_dir / name, directory)
    return [str(ctx.recipe()), f"model.name_or_path={directory}"]


def _predict_file(name: str, content: bytes) -> Callable[[Context], list[str]]:
    def make(ctx: Context) -> list[str]:
        (ctx.tmp / name).write_bytes(content)
        return [str(ctx.run), "--file", str(ctx.tmp / name)]

    return make


def _run_with(name: str, content: Optional[bytes]) -> Callable[[Context], list[str]]:
    """A copy of the run with one file replaced (``None``: the tokenizer files removed)."""

    def make(ctx: Context) -> list[str]:
        run = ctx.tmp / "run"
        shutil.copytree(ctx.run, run)
        if content is None:
            for path in run.glob("tokenizer*"):
                path.unlink()
        else:
            (run / name).write_bytes(content)
        return [str(run), "a fine film"]

    return make


def _push_with_corrupt_metrics(ctx: Context) -> list[str]:
    run = ctx.tmp / "run"
    shutil.copytree(ctx.run, run)
    (run / "metrics.json").write_text('{"eval_accuracy": 0.5,')
    return [str(run), "user/model"]


def _csv_with_a_ragged_row(ctx: Context) -> list[str]:
    directory = ctx.tmp / "ragged"
    directory.mkdir()
    pd.read_parquet(ctx.data_dir / "validation.parquet").to_csv(directory / "validation.csv", index=False)
    lines = pd.read_parquet(ctx.data_dir / "train.parquet").to_csv(index=False).splitlines()
    lines[5] += ",1,extra"
    (directory / "train.csv").write_text("\n".join(lines) + "\n")
    return [str(ctx.recipe()), f"data.path={directory}"]


def _merge_into_a_file(ctx: Context) -> list[str]:
    (ctx.tmp / "merged").write_text("a file\n")
    return [str(ctx.run), str(ctx.tmp / "merged")]


def _eval_output_into_a_file(ctx: Context) -> list[str]:
    (ctx.tmp / "report").write_text("a file\n")
    return [str(ctx.run), "--output-dir", str(ctx.tmp / "report")]


JSONL_BAD_LINE_3 = b'{"text": "a good film"}\n{"text": "dull"}\n{"text": "fine",}\n{"text": "great"}\n'
FIX_DATA = "drop or fill those rows"
TRUNCATED_SAFETENSORS = save_safetensors({"weight": torch.zeros(4)})[:-8]  # 88 bytes written, the last 8 lost

CASES = {
    "malformed_yaml": Case(
        "recipe: malformed YAML",
        _malformed_yaml,
        ["malformed YAML at line 26, column 10: mapping values are not allowed here"],
    ),
    "duplicate_section": Case(
        "recipe: a second `training:` section",
        _second_training_section,
        ["duplicate key 'training' at line 30 (first at line 20)"],
    ),
    "duplicate_field": Case(
        "recipe: `r: 4` then `r: 64`",
        _recipe_edited("  r: 4\n", "  r: 4\n  r: 64\n"),
        ["duplicate key 'r' at line 7 (first at line 6)", "keep one of them"],
    ),
    "empty_recipe": Case(
        "recipe: empty file (or only comments)",
        _recipe_file("empty.yaml", b"# nothing yet\n"),
        ["empty.yaml' is empty", "recipes/"],
    ),
    "recipe_is_a_directory": Case(
        "recipe: a directory", lambda ctx: [str(ctx.tmp)], ["recipe '", "is a directory, not a file"]
    ),
    "recipe_not_utf8": Case(
        "recipe: not UTF-8",
        _recipe_file("latin1.yaml", b"model:\n  name_or_path: caf\xe9\n"),
        ["latin1.yaml' is not UTF-8 text (byte 0xe9 at line 2)"],
    ),
    "unknown_key_in_file": Case(
        "recipe: unknown field",
        _typo_in_file,
        ["unknown field 'training.lerning_rate' (did you mean 'learning_rate'?)"],
    ),
    "unknown_key_override": Case(
        "override: unknown field",
        _overrides("training.lerning_rate=1e-3"),
        ["unknown field 'training.lerning_rate' (did you mean 'learning_rate'?)"],
    ),
    "unknown_section": Case(
        "override: unknown section",
        _overrides("trainig.seed=1"),
        ["unknown section 'trainig'", "(did you mean 'training'?)"],
    ),
    "wrong_type": Case(
        "wrong type",
        _overrides("training.per_device_train_batch_size=sixteen"),
        ["training.per_device_train_batch_size = 'sixteen' is invalid: expected an integer"],
    ),
    "wrong_type_bool": Case(
        "wrong type (boolean)",
        _overrides("training.gradient_checkpointing=maybe"),
        ["training.gradient_checkpointing = 'maybe' is invalid: expected true/false"],
    ),
    "rank_zero": Case("out of range: rank", _overrides("peft.r=0"), ["peft.r = 0 must be a positive integer"]),
    "learning_rate_zero": Case(
        "out of range: learning rate 0",
        _overrides("training.learning_rate=0"),
        ["training.learning_rate = 0.0 must be > 0"],
    ),
    "learning_rate_negative": Case(
        "out of range: negative learning rate",
        _overrides("training.learning_rate=-1e-4"),
        ["training.learning_rate = -0.0001 must be > 0"],
    ),
    "dropout_one": Case(
        "out of range: dropout 1", _overrides("peft.dropout=1.0"), ["peft.dropout = 1.0 must be in [0, 1)"]
    ),
    "dropout_negative": Case(
        "out of range: negative dropout", _overrides("peft.dropout=-0.1"), ["peft.dropout = -0.1 must be in [0, 1)"]
    ),
    "adalora_target_above_init": Case(
        "AdaLoRA target rank above initial rank",
        _overrides("peft.method=adalora", "peft.init_r=4", "peft.target_r=8"),
        ["peft.target_r = 8 must be in (0, init_r = 4]"],
    ),
    "unknown_task": Case(
        "unknown task",
        _overrides("data.task=sst3"),
        ["data.task = 'sst3' is not a built-in task (did you mean 'sst2'?)", "valid: sst2, imdb, emotion"],
    ),
    "model_not_found_offline": Case(
        "model not found (offline)",
        _overrides("model.name_or_path=nobody/no-such-model"),
        ["model.name_or_path = 'nobody/no-such-model' cannot be loaded", "HF_HUB_OFFLINE=1 is set"],
    ),
    "model_without_safetensors": Case(
        "model without safetensors weights",
        _no_safetensors,
        ["holds no .safetensors weights (only ['pytorch_model.bin'])", "pickle checkpoints are never loaded"],
    ),
    "model_without_tokenizer": Case(
        "model directory without tokenizer files",
        _model_without_tokenizer,
        ["cannot load a tokenizer from model.name_or_path", "no_tokenizer"],
    ),
    "dataset_not_found_offline": Case(
        "dataset not found (offline)",
        _overrides("data.path=nobody/no-such-dataset"),
        [
            "dataset 'nobody/no-such-dataset' cannot be loaded",
            "the dataset repo 'nobody/no-such-dataset' is not in the Hub cache",
            "HF_HUB_OFFLINE=1 is set",
            "set data.path to a local file or a directory",
        ],
    ),
    "data_dir_missing": Case(
        "data directory missing",
        _overrides("data.path={tmp}/no/such/dir"),
        ["data.path '", "no/such/dir' does not exist"],
    ),
    "data_path_unknown_type": Case(
        "data.path a file of another type",
        _data_path_of_unknown_type,
        ["reviews.txt' is a .txt file", ".csv, .tsv, .json, .jsonl or .parquet file"],
    ),
    "csv_not_utf8": Case(
        "data: CSV file not UTF-8",
        _data_files("latin1_csv"),
        ["train.csv' is not UTF-8 text (byte 0xe9 at line 3)", "re-save it as UTF-8"],
    ),
    "jsonl_malformed_line": Case(
        "data: JSONL file with a malformed line",
        _data_files("malformed_jsonl"),
        ["train.jsonl', line 3 is not valid JSON (Expecting property name"],
    ),
    "parquet_truncated": Case(
        "data: truncated parquet file",
        _data_files("truncated_parquet"),
        ["train.parquet' cannot be read as parquet", "truncated or corrupt"],
    ),
    "parquet_garbled": Case(
        "data: garbled parquet file",
        _data_files("garbled_parquet"),
        ["train.parquet' cannot be read as parquet", "truncated or corrupt"],
    ),
    "csv_ragged_row": Case(
        "data: CSV file with a malformed row",
        _csv_with_a_ragged_row,
        [
            "cannot read the data files",
            "train.csv",
            "Expected 2 fields in line 6, saw 4",
            "Check that each file is complete and well-formed",
        ],
    ),
    "missing_text_column": Case(
        "data: no such text column",
        _overrides("data.text_column=sentence"),
        [
            "split 'train' has no text column 'sentence'; its columns are ['text', 'label'].",
            "Set data.text_column to one of them.",
        ],
    ),
    "missing_label_column": Case(
        "data: no such label column",
        _overrides("data.label_column=target"),
        ["split 'train' has no label column 'target'", "Set data.label_column"],
    ),
    "text_column_not_text": Case(
        "data: text column that is not text",
        _overrides("data.text_column=label"),
        [
            "split 'train': text column 'label' holds int64 values, not text",
            "Set data.text_column to the column that holds the texts",
        ],
    ),
    "null_texts": Case(
        "data: null or NaN texts",
        _rows_edited("text", [3, 7], [None, float("nan")]),
        ["split 'train': text column 'text' is empty (null or NaN) in 2 row(s): rows 3, 7", FIX_DATA],
    ),
    "string_labels": Case(
        "data: a string label not in data.label_names",
        _string_labels,
        ["split 'train': label(s) 'positive' in column 'label' are not in data.label_names ['neg', 'pos']"],
    ),
    "eval_class_not_in_train": Case(
        "data: an eval class no training row has",
        _eval_class_not_in_train,
        [
            "split 'validation': label(s) 'neutral' in column 'label' occur in no row of the training split 'train'",
            "the model could never predict them",
        ],
    ),
    "several_text_columns": Case(
        "data: several text columns, none chosen",
        _several_text_columns,
        ["several text columns ['body', 'title'] and data.text_column is null", "set data.text_column"],
    ),
    "one_file_and_an_eval_split": Case(
        "data.path one file, data.eval_split set",
        _one_file_and_an_eval_split,
        [
            "reviews.csv' is one file, the training split, but data.eval_split = 'validation'",
            "leave data.eval_split null",
        ],
    ),
    "float_labels": Case(
        "data: float labels",
        _rows_edited("label", [5], [0.5]),
        [
            "split 'train': label column 'label' holds non-integer values (e.g. 0.5 in row 5)",
            "labels must be class names or integer class ids",
        ],
    ),
    "nan_labels": Case(
        "data: null or NaN labels",
        _rows_edited("label", [4, 9], [float("nan"), None]),
        ["split 'train': label column 'label' is empty (null or NaN) in 2 row(s): rows 4, 9", FIX_DATA],
    ),
    "labels_outside_num_labels": Case(
        "data: labels outside num_labels",
        _labels_out_of_range,
        ["split 'train' has label(s) [2, 5] outside [0, 2) in column 'label'", "data.label_names"],
    ),
    "empty_split": Case("data: empty split", _empty_split, ["split(s) validation (", "hold no rows"]),
    "max_length_beyond_model": Case(
        "data.max_length beyond the model",
        _overrides("data.max_length=512"),
        ["data.max_length = 512 exceeds", "limit of 64 positions"],
    ),
    "target_module_missing": Case(
        "target module not in the model",
        _overrides("peft.target_modules=[q_proj,v_proj]"),
        ["peft.target_modules ['q_proj', 'v_proj'] not found in", "its Linear layers are: [", "'query'"],
    ),
    "nf4_without_bitsandbytes": Case(
        "NF4 without working bitsandbytes",
        _overrides("quantization.method=nf4"),
        ["quantization.method = 'nf4' needs bitsandbytes 4-bit kernels that run on", "quantization.method=none"],
        subprocess_setup="import sys; sys.modules['bitsandbytes'] = None  # not importable",
    ),
    "output_dir_empty": Case(
        "`output.output_dir=` (empty)",
        _overrides("output.output_dir="),
        ["output.output_dir is empty", "would write into the current directory"],
    ),
    "output_dir_not_a_run": Case(
        "output_dir a non-empty directory that is not a run",
        _output_dir_not_a_run,
        ["is not empty (README.md) and holds no run", "output.overwrite_output_dir=true"],
    ),
    "output_dir_holds_another_run": Case(
        "output_dir holds another run",
        _overrides("output.output_dir={run}"),
        [
            "already holds a run. Resume it with training.resume_from_checkpoint=latest",
            "output.overwrite_output_dir=true",
        ],
    ),
    "output_dir_under_a_file": Case(
        "output_dir under a file", _output_dir_under_a_file, ["is not a writable directory (Not a directory"]
    ),
    "output_dir_read_only_fs": Case(
        "output_dir not writable",
        _output_dir_in_sysfs,
        ["'/sys/lora_train_unwritable_run' is not a writable directory"],
    ),
    "resume_from_other_recipe": Case(
        "resume from a checkpoint of another recipe",
        _resume_other_recipe,
        [
            "cannot resume from a checkpoint of a different recipe:",
            "model.name_or_path: checkpoint has",
            "peft.method: checkpoint has 'lora', recipe has 'adalora'",
            "peft.r: checkpoint has 4, recipe has 16",
            "peft.target_modules: checkpoint has ['query', 'value'], recipe has ['query', 'key']",
        ],
    ),
    "resume_from_non_checkpoint": Case(
        "resume path not a checkpoint",
        _overrides("training.resume_from_checkpoint={tmp}"),
        ["is not a complete checkpoint directory", "'latest'"],
    ),
    "resume_from_damaged_checkpoint": Case(
        "resume from a truncated or corrupt checkpoint",
        _resume_damaged_checkpoint,
        [
            "step-00000004/optimizer.safetensors is truncated or corrupt:",
            "were written; no other checkpoint there is intact",
        ],
    ),
    "predict_input_not_utf8": Case(
        "predict: input file not UTF-8",
        _predict_file("in.txt", b"a good film\ncaf\xe9 bad\n"),
        ["in.txt' is not UTF-8 text (byte 0xe9 at line 2)", "re-save it as UTF-8"],
        entry="predict",
    ),
    "predict_jsonl_malformed_line": Case(
        "predict: JSONL input with a malformed line",
        _predict_file("in.jsonl", JSONL_BAD_LINE_3),
        ["in.jsonl, line 3: not valid JSON (Expecting property name"],
        entry="predict",
    ),
    "predict_later_record_without_text": Case(
        "predict: a later record without the text field",
        _predict_file("in.jsonl", b'{"text": "good"}\n{"text": "bad"}\n{"review": "fine"}\n'),
        ["in.jsonl, line 3: no text field 'text' (found ['review'])"],
        entry="predict",
    ),
    "predict_input_is_a_directory": Case(
        "predict: --file a directory",
        lambda ctx: [str(ctx.run), "--file", str(ctx.tmp)],
        ["is a directory, not a file"],
        entry="predict",
    ),
    "run_labels_json_corrupt": Case(
        "run: labels.json corrupt",
        _run_with("labels.json", b'{"id2label": {"0": "neg",'),
        ["labels.json' is corrupt", "not valid JSON"],
        entry="predict",
    ),
    "run_recipe_duplicate_key": Case(
        "run: recipe.yaml with a duplicate key",
        _run_with("recipe.yaml", b"peft:\n  r: 4\npeft:\n  r: 8\n"),
        ["duplicate key 'peft' at line 3 (first at line 1)"],
        entry="predict",
    ),
    "run_adapter_truncated": Case(
        "run: adapter_model.safetensors truncated",
        _run_with("adapter_model.safetensors", TRUNCATED_SAFETENSORS),
        [
            "adapter_model.safetensors is truncated or corrupt: its tensors need 88 bytes, the file has 80",
            "use the run's best/ adapter",
        ],
        entry="predict",
    ),
    "run_without_tokenizer": Case(
        "run: tokenizer files missing",
        _run_with("", None),
        ["cannot load the tokenizer of run", "tokenizer.json"],
        entry="predict",
    ),
    "push_run_with_corrupt_metrics": Case(
        "push: the run's metrics.json corrupt",
        _push_with_corrupt_metrics,
        ["cannot build the model card of", "metrics.json' is corrupt: not valid JSON"],
        entry="push_to_hub",
    ),
    "merge_into_a_file": Case(
        "merge: output path is a file",
        _merge_into_a_file,
        ["output directory '", "merged' is a file"],
        entry="merge_adapter",
    ),
    "eval_output_into_a_file": Case(
        "eval: --output-dir is a file", _eval_output_into_a_file, ["--output-dir '", "report' is a file"], entry="eval"
    ),
}


@pytest.fixture(scope="module")
def corrupt_model_dir(tiny_bert_dir, tmp_path_factory) -> Path:
    """The tiny BERT's config and tokenizer with a weights file that cannot be read."""
    directory = tmp_path_factory.mktemp("corrupt_model")
    for path in tiny_bert_dir.iterdir():
        if path.suffix != ".safetensors":
            shutil.copy(path, directory)
    (directory / "model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{broken}")
    return directory


@pytest.fixture(scope="module")
def finished_run(tiny_bert_dir, toy_data_dir, tmp_path_factory) -> Path:
    """A short real run with a checkpoint at step 4."""
    out = tmp_path_factory.mktemp("finished") / "run"
    train(build_recipe(tiny_recipe(tiny_bert_dir, toy_data_dir, out, training={"max_steps": 4, "save_steps": 4})))
    return out


@pytest.fixture(scope="module")
def corrupt_run(finished_run, corrupt_model_dir, tmp_path_factory) -> Path:
    """The finished run, its recipe naming the corrupt-weights model as base: predict / eval / merge cases that got
    as far as loading the base weights would fail there."""
    run = tmp_path_factory.mktemp("corrupt_run") / "run"
    shutil.copytree(finished_run, run, ignore=shutil.ignore_patterns("checkpoints", "best"))
    recipe = run / "recipe.yaml"
    base_line = next(line for line in recipe.read_text().splitlines() if line.startswith("  name_or_path: "))
    recipe.write_text(recipe.read_text().replace(base_line, f"  name_or_path: {corrupt_model_dir}"))
    return run


def run_entry(case: Case, argv: list[str], capsys) -> tuple[int, str]:
    """Run the case's entry point on ``argv``: exit status and standard error."""
    if case.subprocess_setup:
        program = f"{case.subprocess_setup}\nfrom lora_train.commands.train import main\nsys.exit(main(sys.argv[1:]))"
        done = subprocess.run(
            [sys.executable, "-c", program, *argv],
            cwd=ROOT,
            env=dict(os.environ),
            capture_output=True,
            text=True,
            timeout=300,
        )
        return done.returncode, done.stderr
    main = train_main if case.entry == "train" else script(case.entry).main
    start = time.perf_counter()
    try:
        code = main(argv)
    except SystemExit as exit_:  # recipe errors exit from argument parsing
        code = exit_.code
    elapsed = time.perf_counter() - start
    err = capsys.readouterr().err
    assert elapsed < 5, f"took {elapsed:.1f}s to fail"
    return code, err


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_fails_fast_with_a_clear_message(
    name, tmp_path, corrupt_model_dir, toy_data_dir, finished_run, corrupt_run, capsys
):
    case = CASES[name]
    argv = case.make(Context(tmp_path, corrupt_model_dir, toy_data_dir, finished_run, corrupt_run))
    code, err = run_entry(case, argv, capsys)
    assert code == case.status, err[-3000:]
    missing = [text for text in case.expected if text not in err]
    assert not missing, f"{missing} not in:\n{err[-3000:]}"
    assert "Traceback" not in err


def test_the_corrupt_model_fails_only_at_weight_loading(tmp_path, corrupt_model_dir, toy_data_dir):
    """The control for the cases above: a valid recipe on the same model gets past every check and then fails
    on reading the weights, with an error none of the cases expects."""
    raw = tiny_recipe(corrupt_model_dir, toy_data_dir, tmp_path / "out")
    with pytest.raises(Exception) as info:
        train(build_recipe(raw))
    assert "safetensors" in f"{type(info.value).__name__}: {info.value}".lower() or "header" in str(info.value).lower()
    assert not any(text in str(info.value) for case in CASES.values() for text in case.expected)


def test_predict_reads_a_csv_with_a_byte_order_mark(tmp_path):
    """Excel's "CSV UTF-8" starts with a byte-order mark; training reads such files, so prediction must too."""
    from lora_train.inference import read_texts

    (tmp_path / "in.csv").write_bytes("text,id\na café film,1\ndull,2\n".encode("utf-8-sig"))
    assert list(read_texts(str(tmp_path / "in.csv"))) == ["a café film", "dull"]


SCRIPTS = {
    "train": "scripts/train.py",
    "predict": "scripts/predict.py",
    "eval": "scripts/eval.py",
    "merge_adapter": "scripts/merge_adapter.py",
    "push_to_hub": "scripts/push_to_hub.py",
}


def catalogue_markdown() -> str:
    """docs/bad_inputs.md: every case of the catalogue as a table row."""
    lines = [
        "# Bad inputs",
        "",
        "<!-- generated by `python -m tests.test_bad_inputs` from its CASES; tests/test_bad_inputs.py checks it -->",
        "",
        "Each bad input below is refused with one message (the parts the test asserts are shown, joined by ` … `)",
        "before any model weights are loaded, without a traceback. Status 2 is the exit status of the script.",
        "",
        "| script | input | message | exit status |",
        "|---|---|---|---|",
    ]
    for case in CASES.values():
        message = " … ".join(f"`{text.strip()}`" for text in case.expected).replace("|", "\\|")
        shown_input = case.input.replace("|", "\\|")
        lines.append(f"| {SCRIPTS[case.entry]} | {shown_input} | {message} | {case.status} |")
    return "\n".join(lines) + "\n"


DOCS_TABLE = ROOT / "docs" / "bad_inputs.md"


def test_docs_table_is_the_catalogue():
    assert DOCS_TABLE.read_text() == catalogue_markdown(), "regenerate it: python -m tests.test_bad_inputs"


if __name__ == "__main__":
    DOCS_TABLE.write_text(catalogue_markdown())
    print(f"wrote {DOCS_TABLE} ({len(CASES)} cases)")
