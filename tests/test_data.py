"""Task registry, data loading (Hub ids through the Hub cache, local directories, generic files), label checks,
batching."""

from __future__ import annotations

from collections import Counter

import pandas as pd
import pytest

from lora_train.config import DataConfig
from lora_train.data import (
    DataError,
    EpochSampler,
    config_file_patterns,
    encode_texts,
    load_splits,
    padded_length,
    padding_collator,
    padding_lengths,
    resolve_spec,
    tokenize,
)
from lora_train.tasks import TASKS
from tests.conftest import DATA, MINILM, needs_hub_data, needs_shared


def test_registry_describes_the_three_tasks():
    assert set(TASKS) == {"sst2", "imdb", "emotion"}
    assert TASKS["emotion"].label_names == ("sadness", "joy", "love", "anger", "fear", "surprise")
    assert TASKS["imdb"].eval_split == TASKS["sst2"].eval_split == "validation"


def test_spec_fills_nulls_from_the_task_and_keeps_overrides():
    spec = resolve_spec(DataConfig(task="sst2"))
    assert (spec.source, spec.config_name, spec.text_column, spec.eval_split) == (
        "nyu-mll/glue",
        "sst2",
        "sentence",
        "validation",
    )
    for task, legacy, canonical, config in (
        ("sst2", "glue", "nyu-mll/glue", "sst2"),
        ("imdb", "imdb", "stanfordnlp/imdb", "plain_text"),
        ("emotion", "emotion", "dair-ai/emotion", "split"),
    ):
        spec = resolve_spec(DataConfig(task=task, path=legacy))
        assert (spec.source, spec.config_name) == (canonical, config)
    local = resolve_spec(DataConfig(task="sst2", path="/data/sst2", eval_split="test"))
    assert local.source == "/data/sst2" and local.config_name is None and local.eval_split == "test"
    assert not resolve_spec(DataConfig(task="imdb")).eval_split_given  # IMDb has no validation split: carved


@needs_shared
@pytest.mark.parametrize("task,train_n,eval_n,classes", [("sst2", 67349, 872, 2), ("emotion", 16000, 2000, 6)])
def test_shared_layout_loads_as_is(task, train_n, eval_n, classes):
    cfg = DataConfig(task=task, path=str(DATA / task))
    spec = resolve_spec(cfg)
    data = load_splits(spec, cfg)
    train, evaluation = data
    assert (len(train), len(evaluation)) == (train_n, eval_n)
    assert len(data.label_names) == classes and data.carve is None


@needs_hub_data
@pytest.mark.parametrize(
    "task,path,config,train_n,eval_n,names",
    [
        ("sst2", "nyu-mll/glue", "sst2", 67349, 872, ["negative", "positive"]),
        ("sst2", "glue", None, 67349, 872, ["negative", "positive"]),  # the legacy short id and the task's config
        ("emotion", "dair-ai/emotion", None, 16000, 2000, ["sadness", "joy", "love", "anger", "fear", "surprise"]),
        (None, "stanfordnlp/imdb", "plain_text", 25000, 25000, ["neg", "pos"]),  # generic: names from its ClassLabel
    ],
)
def test_hub_ids_load_offline_from_the_hub_cache(task, path, config, train_n, eval_n, names):
    generic = {} if task else {"eval_split": "test", "text_column": "text"}
    cfg = DataConfig(task=task, path=path, config_name=config, **generic)
    spec = resolve_spec(cfg)
    data = load_splits(spec, cfg)
    assert (len(data.train), len(data.eval)) == (train_n, eval_n)
    assert data.label_names == names


def test_hub_dataset_missing_offline_says_what_to_do():
    cfg = DataConfig(task=None, path="lora-train-tests/no-such-dataset", text_column="text")
    with pytest.raises(
        DataError,
        match=r"dataset 'lora-train-tests/no-such-dataset' cannot be loaded: the dataset repo .* is not in the Hub"
        r" cache .*HF_HUB_OFFLINE=1 is set, so only the Hub cache is read\. Or set data.path to a local file",
    ):
        load_splits(resolve_spec(cfg), cfg)


@needs_hub_data
def test_hub_config_the_dataset_lacks_lists_its_configs():
    cfg = DataConfig(task="sst2", path="nyu-mll/glue", config_name="cola")
    with pytest.raises(DataError, match=r"no config 'cola'; its configs are \['sst2'\]"):
        load_splits(resolve_spec(cfg), cfg)


def test_config_file_patterns_come_from_the_dataset_card(tmp_path):
    card = tmp_path / "README.md"
    card.write_text(
        "---\nconfigs:\n- config_name: a\n  data_files:\n  - split: train\n    path: a/train-*\n"
        "  - split: test\n    path: [a/test-*, extra/test-*]\n- config_name: b\n  data_files: b/*.csv\n"
        "  default: true\n---\n# card\n"
    )
    assert config_file_patterns(card, "x/y", "a") == ["a/train-*", "a/test-*", "extra/test-*"]
    assert config_file_patterns(card, "x/y", None) == ["b/*.csv"]
    with pytest.raises(DataError, match=r"no config 'c'; its configs are \['a', 'b'\]"):
        config_file_patterns(card, "x/y", "c")
    card.write_text("# a card without a YAML header\n")
    assert config_file_patterns(card, "x/y", None) is None  # no configs declared: the whole repo is needed


@needs_shared
def test_imdb_validation_is_carved_stratified_and_deterministic():
    cfg = DataConfig(task="imdb", path=str(DATA / "imdb"), validation_fraction=0.1)
    spec = resolve_spec(cfg)
    train, evaluation = load_splits(spec, cfg)
    assert (len(train), len(evaluation)) == (22500, 2500)
    assert Counter(evaluation["label"]) == {0: 1250, 1: 1250}
    _, again = load_splits(spec, cfg)
    assert again["text"][:20] == evaluation["text"][:20]
    assert len(set(evaluation["text"]) & set(train["text"])) <= 96  # only IMDb's own duplicated reviews (96 in train)


@needs_shared
def test_hidden_test_labels_are_refused_with_advice():
    cfg = DataConfig(task="sst2", path=str(DATA / "sst2"), eval_split="test")
    with pytest.raises(DataError, match=r"split 'test' has label\(s\) \[-1\] outside \[0, 2\).*Hidden test labels"):
        load_splits(resolve_spec(cfg), cfg)


def test_generic_csv_with_missing_column_names_the_columns(tmp_path):
    pd.DataFrame({"review": ["good", "bad"], "label": [1, 0]}).to_csv(tmp_path / "train.csv", index=False)
    pd.DataFrame({"review": ["fine"], "label": [1]}).to_csv(tmp_path / "validation.csv", index=False)
    cfg = DataConfig(task=None, path=str(tmp_path), text_column="text")
    with pytest.raises(DataError, match=r"no text column 'text'; its columns are \['review', 'label'\]"):
        load_splits(resolve_spec(cfg), cfg)


def test_generic_data_without_label_names_counts_classes(tmp_path):
    pd.DataFrame({"text": list("abcd"), "label": [0, 2, 1, 2]}).to_json(
        tmp_path / "train.jsonl", orient="records", lines=True
    )
    pd.DataFrame({"text": ["e"], "label": [1]}).to_json(tmp_path / "validation.jsonl", orient="records", lines=True)
    cfg = DataConfig(task=None, path=str(tmp_path), text_column="text")
    assert load_splits(resolve_spec(cfg), cfg).label_names == ["LABEL_0", "LABEL_1", "LABEL_2"]


def test_missing_split_file_the_recipe_names_lists_what_exists(tmp_path):
    pd.DataFrame({"text": ["a"], "label": [0]}).to_parquet(tmp_path / "train.parquet")
    cfg = DataConfig(task=None, path=str(tmp_path), text_column="text", eval_split="validation")
    with pytest.raises(DataError, match=r"no file for split\(s\) \['validation'\]; found \['train'\]"):
        load_splits(resolve_spec(cfg), cfg)


def test_subsets_are_fixed_across_training_seeds(toy_data_dir):
    cfg = DataConfig(task=None, path=str(toy_data_dir), text_column="text", max_train_samples=50)
    a, _ = load_splits(resolve_spec(cfg), cfg)
    b, _ = load_splits(resolve_spec(cfg), cfg)
    assert len(a) == 50 and a["text"] == b["text"]


def test_epoch_sampler_is_a_seeded_permutation_with_length_grouping():
    lengths = [i % 37 for i in range(1000)]
    plain = EpochSampler(lengths, 16, seed=3, group_by_length=False)
    grouped = EpochSampler(lengths, 16, seed=3, group_by_length=True)
    for sampler in (plain, grouped):
        first = list(sampler)
        assert sorted(first) == list(range(1000))
        assert list(sampler) == first  # same (seed, epoch) -> same order: exact resume and DDP sharding rely on it
        sampler.set_epoch(1)
        assert list(sampler) != first
    grouped.set_epoch(0)
    order = list(grouped)
    spread = lambda idx: max(lengths[i] for i in idx) - min(lengths[i] for i in idx)  # noqa: E731
    grouped_spread = sum(spread(order[i : i + 16]) for i in range(0, 992, 16))
    plain_order = list(EpochSampler(lengths, 16, seed=3, group_by_length=False))
    plain_spread = sum(spread(plain_order[i : i + 16]) for i in range(0, 992, 16))
    assert grouped_spread < 0.3 * plain_spread


@needs_shared
def test_tokenize_truncates_and_collator_pads_dynamically():
    from transformers import AutoTokenizer, DataCollatorWithPadding

    tok = AutoTokenizer.from_pretrained(MINILM)
    cfg = DataConfig(task="sst2", path=str(DATA / "sst2"), max_train_samples=64)
    spec = resolve_spec(cfg)
    train, _ = load_splits(spec, cfg)
    ds = tokenize(train, tok, spec, max_length=16)
    assert set(ds.column_names) == {"input_ids", "token_type_ids", "attention_mask", "labels", "length"}
    assert max(ds["length"]) <= 16
    rows = [ds[i] for i in range(8)]
    for row in rows:
        row.pop("length")
    batch = DataCollatorWithPadding(tok)(rows)
    assert batch["input_ids"].shape[1] == max(sum(r["attention_mask"]) for r in rows)
    batch8 = DataCollatorWithPadding(tok, pad_to_multiple_of=8)(rows)
    assert batch8["input_ids"].shape[1] % 8 == 0
    longest = max(sum(r["attention_mask"]) for r in rows)
    assert padding_collator(tok, 16, "cpu")(rows)["input_ids"].shape[1] == longest  # fp32 on a CPU: no rounding
    padded = padding_collator(tok, 16, "cuda")(rows)["input_ids"].shape[1]
    assert padded % 8 == 0 and longest <= padded < longest + 8
    bucketed = padding_collator(tok, 16, "cpu", "bf16")(rows)
    assert bucketed["input_ids"].shape[1] in padding_lengths(16) and bucketed["input_ids"].shape[1] >= longest
    assert bucketed["labels"].tolist() == [r["labels"] for r in rows]


def test_bf16_cpu_batches_take_few_padded_lengths_with_little_padding():
    # oneDNN caches bf16 kernels per input shape: a bounded set of lengths bounds its memory (docs/results.md);
    # geometric buckets keep the padding of any length under a fifth, where a multiple of max_length / 8 padded
    # a 10-token sentence to 16 or 32 tokens.
    for max_length in (16, 64, 100, 128, 256, 512, 4096):
        lengths = padding_lengths(max_length)
        assert lengths == sorted(set(lengths)) and lengths[-1] == max_length and len(lengths) <= 40, lengths
        padded = [padded_length(n, max_length, "cpu", bf16=True) for n in range(1, max_length + 1)]
        assert set(padded) == set(lengths[: len(set(padded))])
        assert all(n <= p and (p <= 8 or p <= 1.2 * n + 8) for n, p in zip(range(1, max_length + 1), padded))
    assert len(padding_lengths(64)) == 12 and len(padding_lengths(128)) == 15 and len(padding_lengths(256)) == 18
    assert padded_length(10, 64, "cpu", bf16=True) == 10 and padded_length(11, 64, "cpu", bf16=True) == 12
    assert padded_length(11, 64, "cpu", bf16=False) == 11 and padded_length(11, 64, "cuda", bf16=True) == 16


def _head_tail_check(tok, max_length: int) -> None:
    words = [f"w{i}" for i in range(400)]
    text = " ".join(words)
    ids = encode_texts(tok, [text, "w1 w2"], max_length, "head_tail")["input_ids"]
    assert max_length - 1 <= len(ids[0]) <= max_length
    decoded = tok.decode(ids[0], skip_special_tokens=True).replace(" ", "")
    # The start and the end of the text survive; the middle is gone.
    assert decoded.startswith("w0w1w2") and decoded.endswith("w398w399") and "w200" not in decoded
    assert ids[1] == tok(["w1 w2"])["input_ids"][0]  # short texts are untouched
    right = encode_texts(tok, [text], max_length)["input_ids"][0]
    assert not tok.decode(right, skip_special_tokens=True).replace(" ", "").endswith("w399")


def test_head_tail_truncation_keeps_start_and_end(tiny_bert_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_bert_dir)
    tok.add_tokens([f"w{i}" for i in range(400)])  # a word-level vocabulary: one token per word
    _head_tail_check(tok, max_length=24)


@needs_shared
@pytest.mark.parametrize("model", [MINILM, "local/llama2c-stories260K"])
def test_head_tail_truncation_with_real_tokenizers(model):
    from transformers import AutoTokenizer

    _head_tail_check(AutoTokenizer.from_pretrained(model), max_length=64)
