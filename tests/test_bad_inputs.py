"""The catalogue of bad inputs: each one fails before any heavy work, with a message naming the field, what is
wrong and what is valid.

Every case runs the real command-line entry point (``lora_train.cli.train_main``) on a recipe whose model
directory has a config and a tokenizer but a corrupt weights file: a case that got as far as loading weights
would fail with a different message (``test_the_corrupt_model_fails_only_at_weight_loading`` shows which), so
passing proves each error came before any weights were read. In-process cases are also timed (loosely).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pandas as pd
import pytest

from lora_train.cli import train_main
from lora_train.config import build_recipe
from lora_train.train import train
from tests.conftest import ROOT, tiny_recipe, write_recipe


@dataclass
class Context:
    """What a case needs: a scratch directory, the corrupt-weights model, the toy data, a finished run."""

    tmp: Path
    model_dir: Path
    data_dir: Path
    finished_run: Path

    def recipe(self, name: str = "recipe", **sections) -> Path:
        return write_recipe(self.tmp / f"{name}.yaml", tiny_recipe(self.model_dir, self.data_dir, self.tmp / "out", **sections))

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

    make: Callable[[Context], list[str]]
    expected: list[str]
    subprocess_setup: str = ""
    """Python run before the entry point in a fresh interpreter (for cases that change the environment)."""
    marks: list = field(default_factory=list)


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
    path = ctx.recipe(peft={"method": "adalora", "r": 16, "target_modules": ["query", "key"]},
                      training={"resume_from_checkpoint": str(checkpoint)})
    return [str(path)]


def _no_safetensors(ctx: Context) -> list[str]:
    directory = ctx.tmp / "pickled_model"
    shutil.copytree(ctx.model_dir, directory)
    (directory / "model.safetensors").rename(directory / "pytorch_model.bin")
    return [str(ctx.recipe()), f"model.name_or_path={directory}"]


def _overrides(*overrides: str) -> Callable[[Context], list[str]]:
    return lambda ctx: [str(ctx.recipe()), *(o.format(tmp=ctx.tmp, run=ctx.finished_run) for o in overrides)]


CASES = {
    "malformed_yaml": Case(_malformed_yaml, ["malformed YAML at line 26, column 10: mapping values are not allowed here"]),
    "unknown_key_in_file": Case(_typo_in_file, ["unknown field 'training.lerning_rate' (did you mean 'learning_rate'?)"]),
    "unknown_key_override": Case(_overrides("training.lerning_rate=1e-3"),
                                 ["unknown field 'training.lerning_rate' (did you mean 'learning_rate'?)"]),
    "unknown_section": Case(_overrides("trainig.seed=1"), ["unknown section 'trainig'", "(did you mean 'training'?)"]),
    "wrong_type": Case(_overrides("training.per_device_train_batch_size=sixteen"),
                       ["training.per_device_train_batch_size = 'sixteen' is invalid: expected an integer"]),
    "wrong_type_bool": Case(_overrides("training.gradient_checkpointing=maybe"),
                            ["training.gradient_checkpointing = 'maybe' is invalid: expected true/false"]),
    "rank_zero": Case(_overrides("peft.r=0"), ["peft.r = 0 must be a positive integer"]),
    "learning_rate_zero": Case(_overrides("training.learning_rate=0"), ["training.learning_rate = 0.0 must be > 0"]),
    "learning_rate_negative": Case(_overrides("training.learning_rate=-1e-4"), ["training.learning_rate = -0.0001 must be > 0"]),
    "dropout_one": Case(_overrides("peft.dropout=1.0"), ["peft.dropout = 1.0 must be in [0, 1)"]),
    "dropout_negative": Case(_overrides("peft.dropout=-0.1"), ["peft.dropout = -0.1 must be in [0, 1)"]),
    "adalora_target_above_init": Case(_overrides("peft.method=adalora", "peft.init_r=4", "peft.target_r=8"),
                                      ["peft.target_r = 8 must be in (0, init_r = 4]"]),
    "unknown_task": Case(_overrides("data.task=sst3"), ["data.task = 'sst3' is not a built-in task (did you mean 'sst2'?)",
                                                       "valid: sst2, imdb, emotion"]),
    "model_not_found_offline": Case(_overrides("model.name_or_path=nobody/no-such-model"),
                                    ["model.name_or_path = 'nobody/no-such-model' cannot be loaded", "HF_HUB_OFFLINE=1 is set"]),
    "model_without_safetensors": Case(_no_safetensors, ["holds no .safetensors weights (only ['pytorch_model.bin'])",
                                                        "pickle checkpoints are never loaded"]),
    "dataset_not_found_offline": Case(_overrides("data.path=nobody/no-such-dataset"),
                                      ["cannot load dataset 'nobody/no-such-dataset'", "HF_HUB_OFFLINE=1 is set",
                                       "point data.path at a local directory"]),
    "data_dir_missing": Case(_overrides("data.path={tmp}/no/such/dir"), ["data.path '", "no/such/dir' does not exist"]),
    "missing_text_column": Case(_overrides("data.text_column=sentence"),
                                ["split 'train' has no text column 'sentence'; its columns are ['text', 'label'].",
                                 "Set data.text_column to one of them."]),
    "missing_label_column": Case(_overrides("data.label_column=target"),
                                 ["split 'train' has no label column 'target'", "Set data.label_column"]),
    "labels_outside_num_labels": Case(_labels_out_of_range, ["split 'train' has label(s) [2, 5] outside [0, 2) in column 'label'",
                                                             "data.label_names"]),
    "empty_split": Case(_empty_split, ["split(s) validation (", "hold no rows"]),
    "max_length_beyond_model": Case(_overrides("data.max_length=512"), ["data.max_length = 512 exceeds", "limit of 64 positions"]),
    "target_module_missing": Case(_overrides("peft.target_modules=[q_proj,v_proj]"),
                                  ["peft.target_modules ['q_proj', 'v_proj'] not found in", "its Linear layers are: [", "'query'"]),
    "nf4_without_bitsandbytes": Case(_overrides("quantization.method=nf4"),
                                     ["quantization.method = 'nf4' needs bitsandbytes 4-bit kernels that run on",
                                      "quantization.method=none"],
                                     subprocess_setup="import sys; sys.modules['bitsandbytes'] = None  # not importable"),
    "output_dir_holds_another_run": Case(_overrides("output.output_dir={run}"),
                                         ["already holds a run. Resume it with training.resume_from_checkpoint=latest",
                                          "output.overwrite_output_dir=true"]),
    "output_dir_under_a_file": Case(_output_dir_under_a_file, ["is not a writable directory (Not a directory"]),
    "output_dir_read_only_fs": Case(_output_dir_in_sysfs, ["'/sys/lora_train_unwritable_run' is not a writable directory"]),
    "resume_from_other_recipe": Case(_resume_other_recipe, [
        "cannot resume from a checkpoint of a different recipe:",
        "model.name_or_path: checkpoint has",
        "peft.method: checkpoint has 'lora', recipe has 'adalora'",
        "peft.r: checkpoint has 4, recipe has 16",
        "peft.target_modules: checkpoint has ['query', 'value'], recipe has ['query', 'key']",
    ]),
    "resume_from_non_checkpoint": Case(_overrides("training.resume_from_checkpoint={tmp}"),
                                       ["is not a complete checkpoint directory", "'latest'"]),
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


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_fails_fast_with_a_clear_message(name, tmp_path, corrupt_model_dir, toy_data_dir, finished_run, capsys):
    case = CASES[name]
    argv = case.make(Context(tmp_path, corrupt_model_dir, toy_data_dir, finished_run))
    if case.subprocess_setup:
        program = f"{case.subprocess_setup}\nfrom lora_train.cli import train_main\nsys.exit(train_main(sys.argv[1:]))"
        done = subprocess.run([sys.executable, "-c", program, *argv], cwd=ROOT, env=dict(os.environ),
                              capture_output=True, text=True, timeout=300)
        code, err = done.returncode, done.stderr
    else:
        start = time.perf_counter()
        try:
            code = train_main(argv)
        except SystemExit as exit_:  # recipe errors exit from argument parsing
            code = exit_.code
        elapsed = time.perf_counter() - start
        err = capsys.readouterr().err
        assert elapsed < 5, f"{name} took {elapsed:.1f}s to fail"
    assert code == 2, err[-3000:]
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
