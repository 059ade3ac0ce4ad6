"""The user's own data (issue #23): one file, string labels, no validation split; the text column found; classes
from the whole training split; the carved validation split saved and reused; text pairs.

Data-level tests load real files through ``load_splits``; the runs train the tiny random BERT (no assets needed).
"""

from __future__ import annotations

import json
import random
from collections import Counter
from pathlib import Path

import pandas as pd
import pytest

from lora_train.config import DataConfig, build_recipe
from lora_train.data import CARVE_FILE, Carve, DataError, load_splits, resolve_spec, tokenize
from lora_train.train import train
from tests.conftest import HF_HUB, make_sentiment_rows, needs_shared, reset_accelerator_state, script, tiny_recipe

NAMES = {0: "negative", 1: "positive"}


def reviews(n: int = 300, seed: int = 1) -> pd.DataFrame:
    """The shape users have: a `text` column and string labels."""
    rows = make_sentiment_rows(n, seed)
    return pd.DataFrame({"text": [r["text"] for r in rows], "label": [NAMES[r["label"]] for r in rows]})


def load(path: Path, **fields):
    cfg = DataConfig(task=None, path=str(path), **fields)
    return load_splits(resolve_spec(cfg), cfg)


def write(frame: pd.DataFrame, path: Path) -> Path:
    suffix = path.suffix
    if suffix in (".csv", ".tsv"):
        frame.to_csv(path, index=False, sep="\t" if suffix == ".tsv" else ",")
    elif suffix in (".json", ".jsonl"):
        frame.to_json(path, orient="records", lines=True)
    else:
        frame.to_parquet(path)
    return path


def test_one_csv_with_string_labels_and_no_validation_split(tmp_path):
    frame = reviews(300)
    data = load(write(frame, tmp_path / "reviews.csv"))
    assert data.label_names == ["negative", "positive"] and data.spec.text_column == "text"
    assert (len(data.train), len(data.eval)) == (270, 30)  # 10% carved
    counts = Counter(frame["label"])
    carved = Counter(data.eval["label"])  # class ids in label_names order
    for i, name in enumerate(data.label_names):
        assert abs(carved[i] - 0.1 * counts[name]) < 1  # stratified
    rows = data.carve.eval_rows
    assert sorted(set(rows)) == rows and data.eval["text"] == [frame["text"][r] for r in rows]
    assert [NAMES[i] for i in data.eval["label"]] == [frame["label"][r] for r in rows]
    assert set(data.train["text"]) | set(data.eval["text"]) == set(frame["text"])
    assert load(tmp_path / "reviews.csv").carve == data.carve  # seeded: the same rows every time
    assert load(tmp_path / "reviews.csv", validation_fraction=0.2).carve.eval_rows != rows


@pytest.mark.parametrize("suffix", [".csv", ".tsv", ".json", ".jsonl", ".parquet"])
def test_every_file_type_is_the_training_split(tmp_path, suffix):
    frame = reviews(100).rename(columns={"text": "review"}).assign(stars=range(100))
    data = load(write(frame, tmp_path / f"my data{suffix}"))
    assert data.spec.text_column == "review" and data.label_names == ["negative", "positive"]
    assert len(data.train) + len(data.eval) == 100 and data.carve is not None


def test_a_folder_without_a_validation_file_is_carved_too_and_one_with_it_is_not(tmp_path):
    write(reviews(200), tmp_path / "train.csv")
    write(reviews(200), tmp_path / "test.csv")  # a test split is not a validation split
    assert (len(load(tmp_path).eval), load(tmp_path).carve is not None) == (20, True)
    write(reviews(50, seed=2), tmp_path / "validation.csv")
    data = load(tmp_path)
    assert (len(data.train), len(data.eval), data.carve) == (200, 50, None)
    with pytest.raises(DataError, match=r"one file, the training split, but data.eval_split = 'validation'"):
        load(tmp_path / "train.csv", eval_split="validation")


def test_label_names_set_the_order_and_a_label_they_lack_is_named(tmp_path):
    path = write(reviews(100), tmp_path / "r.csv")
    data = load(path, label_names=["positive", "negative"])
    positives = [t for t, lab in zip(data.train["text"], data.train["label"]) if lab == 0]
    assert set(positives) <= set(reviews(100).query("label == 'positive'")["text"])
    with pytest.raises(DataError, match=r"label\(s\) 'positive' in column 'label' are not in data.label_names"):
        load(path, label_names=["negative", "neutral"])


def test_an_eval_class_that_no_training_row_has_is_refused(tmp_path):
    write(reviews(100), tmp_path / "train.csv")
    write(pd.DataFrame({"text": ["meh", "fine"], "label": ["neutral", "positive"]}), tmp_path / "validation.csv")
    with pytest.raises(DataError, match=r"split 'validation': label\(s\) 'neutral' .* occur in no row of the training"):
        load(tmp_path)
    frame = reviews(100).assign(label=lambda f: (f["label"] == "positive").astype(int))
    write(frame, tmp_path / "train.csv")
    write(pd.DataFrame({"text": ["meh"], "label": [2]}), tmp_path / "validation.csv")
    with pytest.raises(DataError, match=r"split 'validation' has label\(s\) \[2\] .* that no row of the training"):
        load(tmp_path)


def test_the_text_column_is_found_when_unambiguous_and_else_the_choices_are_listed_as_are_single_classes(tmp_path):
    frame = reviews(60)
    data = load(write(frame.rename(columns={"text": "body"}), tmp_path / "a.csv"))
    assert data.spec.text_column == "body"  # the only string column besides the label
    two = frame.assign(title="a title")
    assert load(write(two, tmp_path / "b.csv")).spec.text_column == "text"  # the one with a text-like name
    ambiguous = frame.rename(columns={"text": "body"}).assign(title="a title")
    with pytest.raises(DataError, match=r"several text columns \['body', 'title'\] and data.text_column is null"):
        load(write(ambiguous, tmp_path / "c.csv"))
    one_class = frame.assign(label="positive")
    with pytest.raises(DataError, match=r"holds a single class \['positive'\] in column 'label'"):
        load(write(one_class, tmp_path / "one.csv"))
    numbers = pd.DataFrame({"x": range(20), "label": ["a", "b"] * 10})
    with pytest.raises(DataError, match=r"no text column: none of its columns \['x', 'label'\] holds strings"):
        load(write(numbers, tmp_path / "d.csv"))


def many_classes(n_classes: int, per_class: int, seed: int = 0) -> pd.DataFrame:
    rng = random.Random(seed)
    rows = [
        {"text": f"item {c} sample {i} {rng.random():.6f}", "label": c}
        for c in range(n_classes)
        for i in range(per_class)
    ]
    rng.shuffle(rows)
    return pd.DataFrame(rows)


@pytest.mark.parametrize("strings", [False, True])
def test_classes_come_from_the_whole_training_split_not_the_subset(tmp_path, strings):
    frame = many_classes(1000, 3)
    if strings:
        frame["label"] = frame["label"].map(lambda c: f"class_{c:04d}")
    data = load(write(frame, tmp_path / "thousand.csv"), max_train_samples=256)
    assert len(data.label_names) == 1000 and len(data.train) == 256
    assert len(set(data.train["label"])) == 256  # the subset covers as many classes as it has rows
    assert len(data.eval) == 300 and len(set(data.eval["label"])) == 300  # one carved row each from 300 classes
    assert all(Counter(data.eval["label"])[c] <= 1 for c in range(1000))  # every class keeps 2 training rows


def test_a_rare_class_survives_the_carve_and_a_small_subset(tmp_path):
    frame = reviews(298)
    frame = pd.concat([frame, pd.DataFrame({"text": ["wow", "meh"], "label": ["rare", "rare"]})], ignore_index=True)
    frame = frame.sample(frac=1, random_state=3).reset_index(drop=True)
    data = load(write(frame, tmp_path / "rare.csv"), max_train_samples=20)
    assert data.label_names == ["negative", "positive", "rare"]
    assert 2 in data.train["label"] and len(data.train) == 20


def test_the_subset_is_as_before_when_it_already_holds_every_class(tmp_path):
    frame = reviews(300).assign(label=lambda f: (f["label"] == "positive").astype(int))
    data = load(write(frame, tmp_path / "t.parquet"), max_train_samples=50)
    full = load(tmp_path / "t.parquet")
    assert data.train["text"] == full.train.shuffle(seed=0).select(range(50))["text"]


def test_a_saved_carve_is_reused_and_a_changed_file_is_noticed(tmp_path):
    path = write(reviews(200), tmp_path / "r.csv")
    first = load(path)
    saved = tmp_path / CARVE_FILE
    saved.write_text(first.carve.to_json())
    cfg = DataConfig(task=None, path=str(path), validation_fraction=0.3)  # a saved carve wins over a new fraction
    again = load_splits(resolve_spec(cfg), cfg, Carve.read(saved))
    assert again.eval["text"] == first.eval["text"] and again.train["text"] == first.train["text"]
    write(reviews(200, seed=9), path)  # other rows, as many
    with pytest.raises(DataError, match=r"data of 'train' changed since the run carved its validation split"):
        load_splits(resolve_spec(cfg), cfg, Carve.read(saved))
    saved.write_text('{"fraction": 0.1')
    with pytest.raises(DataError, match=r"is corrupt .* Delete it to carve again"):
        Carve.read(saved)


def test_a_text_pair_column_is_the_tokenizers_pair(tmp_path, tiny_bert_dir):
    from transformers import AutoTokenizer

    frame = pd.DataFrame(
        {
            "premise": ["the film was good"] * 20,
            "hypothesis": ["it was bad", "it was good"] * 10,
            "label": ["no", "yes"] * 10,
        }
    )
    data = load(write(frame, tmp_path / "nli.csv"), text_column="premise", text_pair_column="hypothesis")
    tok = AutoTokenizer.from_pretrained(tiny_bert_dir)
    ds = tokenize(data.train, tok, data.spec, max_length=32)
    premise, hypothesis = data.train[0]["premise"], data.train[0]["hypothesis"]
    assert ds[0]["input_ids"] == tok(premise, hypothesis)["input_ids"] != tok(premise)["input_ids"]
    assert tok.decode(ds[0]["input_ids"], skip_special_tokens=True) == f"{premise} {hypothesis}"


def test_one_csv_with_string_labels_trains_evaluates_and_predicts_names(tmp_path, tiny_bert_dir):
    """The plumbing on the tiny random model (learning is shown on the real one: test_own_csv_recipe_*)."""
    import contextlib
    import io

    from lora_train.inference import evaluate_run, load_run, predict

    frame = pd.DataFrame([{"text": r["text"], "label": NAMES[r["label"]]} for r in make_sentiment_rows(400, 5)])
    path = write(frame, tmp_path / "reviews.csv")
    out = tmp_path / "run"
    raw = tiny_recipe(tiny_bert_dir, path, out, training={"max_steps": 4})
    raw["data"].update(text_column=None, label_names=None)
    metrics = train(build_recipe(raw))
    assert metrics["eval_samples"] == 40 and metrics["label_names"] == ["negative", "positive"]
    assert json.loads((out / "labels.json").read_text())["id2label"] == {"0": "negative", "1": "positive"}
    carve = json.loads((out / CARVE_FILE).read_text())
    assert len(carve["eval_rows"]) == 40 and carve["train_rows"] == 400
    assert "text_column: text" in (out / "recipe.yaml").read_text()  # the column found, written down
    assert "labels: negative, positive" in (out / "README.md").read_text()
    run = load_run(str(out))
    assert evaluate_run(run)["accuracy"] == pytest.approx(metrics["eval_accuracy"], abs=1e-9)  # the carved rows
    texts = ["the film was superb and fun", "a dull boring plot"]
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        assert script("predict").main([str(out), *texts]) == 0
    printed = [line.split("\t")[0] for line in buffer.getvalue().splitlines()]
    assert printed == [row["label"] for row in predict(run, texts)] and set(printed) <= {"negative", "positive"}


def test_a_thousand_class_run_has_every_class(tmp_path, tiny_bert_dir):
    path = write(many_classes(1000, 3), tmp_path / "thousand.parquet")
    out = tmp_path / "run"
    raw = tiny_recipe(tiny_bert_dir, path, out, training={"max_steps": 2, "per_device_eval_batch_size": 128})
    raw["data"].update(text_column=None, label_names=None, max_train_samples=256)
    metrics = train(build_recipe(raw))
    id2label = json.loads((out / "labels.json").read_text())["id2label"]
    assert len(id2label) == 1000 and id2label["999"] == "LABEL_999"
    assert len(metrics["per_class"]) == 1000 and metrics["eval_samples"] == 300


def test_resume_evaluates_the_rows_carved_at_the_start(tmp_path, tiny_bert_dir):
    path = write(reviews(200), tmp_path / "reviews.csv")
    out = tmp_path / "run"
    raw = tiny_recipe(tiny_bert_dir, path, out, training={"max_steps": 2, "save_steps": 2})
    raw["data"].update(text_column=None, label_names=None)
    train(build_recipe(raw))
    first = json.loads((out / CARVE_FILE).read_text())
    reset_accelerator_state()
    raw["training"].update(max_steps=3, resume_from_checkpoint="latest")
    raw["data"].update(validation_fraction=0.3)  # not a resume key: the saved carve wins over it
    metrics = train(build_recipe(raw))
    assert metrics["resumed_from_step"] == 2 and metrics["eval_samples"] == 20
    assert json.loads((out / CARVE_FILE).read_text()) == first


@needs_shared
def test_own_csv_recipe_trains_from_a_fresh_clone_and_predicts_names(tmp_path):
    """The README quickstart on examples/own_data: the recipe as committed, from a copy of the project with only the
    Hub cache beside it, then predict by label name."""
    import os
    import subprocess
    import sys

    from tests.test_fresh_clone import copy_of_the_project

    project = tmp_path / "lora_train"
    copy_of_the_project(project)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(HF_HUB), "PYTHONPATH": str(project)}
    env["HF_DATASETS_CACHE"] = str(tmp_path / "datasets-cache")
    command = [sys.executable, "scripts/train.py", "recipes/cpu/own_csv_lora.yaml"]
    proc = subprocess.run(command, cwd=project, env=env, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "carved 10% of 'train' out as validation (stratified by label, seed 0): train 360 rows, validation 40" in (
        proc.stderr
    )
    run = project / "runs" / "own_csv_lora"
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["eval_samples"] == 40 and metrics["eval_accuracy"] >= 0.8  # 205 / 400 negative: chance is ~0.51
    texts = ["Arrived broken, a waste of money.", "Works great, highly recommend."]
    proc = subprocess.run(
        [sys.executable, "scripts/predict.py", "runs/own_csv_lora", *texts],
        cwd=project,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert [line.split("\t")[0] for line in proc.stdout.splitlines()] == ["negative", "positive"]


def test_a_text_pair_run_trains_evaluates_and_predicts_pairs_from_a_file(tmp_path, tiny_bert_dir, capsys):
    from lora_train.inference import evaluate_run, load_run

    rng = random.Random(0)
    words = ["good", "bad", "fine", "awful"]
    rows = [{"premise": f"the film was {a}", "hypothesis": f"it was {b}"} for a in words for b in words]
    frame = pd.DataFrame(
        [r | {"label": "same" if r["premise"][13:] == r["hypothesis"][7:] else "other"} for r in rows * 8]
    )
    frame = frame.sample(frac=1, random_state=rng.randint(0, 99)).reset_index(drop=True)
    out = tmp_path / "run"
    raw = tiny_recipe(tiny_bert_dir, write(frame, tmp_path / "pairs.jsonl"), out, training={"max_steps": 2})
    raw["data"].update(text_column="premise", text_pair_column="hypothesis", label_names=None)
    metrics = train(build_recipe(raw))
    assert metrics["label_names"] == ["other", "same"]
    assert evaluate_run(load_run(str(out), merge=False))["accuracy"] == pytest.approx(
        metrics["eval_accuracy"], abs=1e-9
    )
    predict = script("predict")
    frame.head(3).to_csv(tmp_path / "in.csv", index=False)
    assert predict.main([str(out), "--file", str(tmp_path / "in.csv")]) == 0
    lines = [line.split("\t") for line in capsys.readouterr().out.splitlines()]
    assert [line[2:] for line in lines] == frame.head(3)[["premise", "hypothesis"]].values.tolist()
    assert {line[0] for line in lines} <= {"other", "same"}
    assert predict.main([str(out), "a single text"]) == 2
    assert "classifies text pairs (data.text_pair_column = 'hypothesis')" in capsys.readouterr().err
