"""The PEFT methods beyond LoRA / AdaLoRA (IA3, VeRA, prompt tuning, BitFit; DoRA, rsLoRA, PiSSA, OLoRA), layer-wise
learning rates, and the refusals (prefix tuning, LoftQ on CPU, options set for the wrong method).

Each method trains 8 steps of the tiny random BERT on the synthetic data, is saved (adapter-only where it is an
adapter), reloaded with plain peft to the accuracy the run measured, and merged (where the method allows) to the
adapter's logits, or refused with the reason.
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import torch

from lora_train.config import RecipeError, build_recipe
from lora_train.inference import RunError, evaluate_run, load_run
from lora_train.merge import merge_adapter
from lora_train.train import train
from tests.conftest import reload_accuracy, tiny_recipe
from tests.test_eval_predict_merge import logits_of

METHODS = {
    "ia3": {
        "method": "ia3",
        "target_modules": ["key", "value", "output.dense"],
        "feedforward_modules": ["output.dense"],
    },
    "prompt_tuning": {"method": "prompt_tuning", "num_virtual_tokens": 4},
    "prompt_tuning_text": {
        "method": "prompt_tuning",
        "num_virtual_tokens": 4,
        "prompt_init_text": "a good or bad film",
    },
    "vera": {"method": "vera", "r": 16},
    "bitfit": {"method": "bitfit"},
    "dora": {"use_dora": True},
    "rslora": {"use_rslora": True},
    "pissa": {"init_lora_weights": "pissa"},
    "olora": {"init_lora_weights": "olora"},
    "gaussian": {"init_lora_weights": "gaussian"},
}
"""peft sections (on top of tiny_recipe's LoRA r=4 on query, value) of every method tested end to end."""
ADAPTER_KEYS = {
    "ia3": "ia3_l",
    "prompt_tuning": "prompt_embeddings",
    "prompt_tuning_text": "prompt_embeddings",
    "dora": "lora_magnitude_vector",
    "vera": "vera_lambda",
}


def run(tmp_path: Path, tiny_bert_dir: Path, toy_data_dir: Path, peft: dict, **sections) -> tuple[Path, dict]:
    out = tmp_path / "run"
    training = {"max_steps": 8, "eval_steps": 0, "save_steps": 8, "logging_steps": 4, **sections.pop("training", {})}
    raw = tiny_recipe(tiny_bert_dir, toy_data_dir, out, peft=peft, training=training, **sections)
    return out, train(build_recipe(raw))


SLOW = ("gaussian", "prompt_tuning_text")
"""Variants of a path tested above them (init and prompt start only): behind -m slow to keep the default suite fast."""


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n in SLOW else n for n in METHODS])
def test_method_trains_saves_reloads_and_merges_or_refuses(name, tmp_path, tiny_bert_dir, toy_data_dir):
    out, metrics = run(tmp_path, tiny_bert_dir, toy_data_dir, METHODS[name])
    assert metrics["global_step"] == 8 and metrics["trainable_params"] > 0
    val = pd.read_parquet(toy_data_dir / "validation.parquet")
    from safetensors import safe_open

    if name == "bitfit":
        check_trained_tensors_run(out, tmp_path / "merged", metrics, lambda key: key.endswith(".bias"))
        return

    with safe_open(out / "adapter_model.safetensors", "pt") as f:
        keys = list(f.keys())
    assert "model.safetensors" not in {p.name for p in out.iterdir()}
    assert any(ADAPTER_KEYS.get(name, "lora_") in k for k in keys), keys
    assert reload_accuracy(out, list(val["text"]), val["label"].to_numpy(), 32) == pytest.approx(
        metrics["eval_accuracy"], abs=1e-9
    )
    if name.startswith("prompt_tuning"):
        with pytest.raises(RunError, match="nothing to merge"):
            merge_adapter(str(out), tmp_path / "merged")
        return
    from transformers import AutoModelForSequenceClassification

    merge_adapter(str(out), tmp_path / "merged")
    merged = AutoModelForSequenceClassification.from_pretrained(tmp_path / "merged")
    adapter = load_run(str(out), device="cpu")
    assert (logits_of(merged, adapter.tokenizer) - logits_of(adapter.model, adapter.tokenizer)).abs().max() < 1e-4


def check_trained_tensors_run(out: Path, merged_dir: Path, metrics: dict, trained) -> None:
    """A BitFit / head_only run keeps only what it trained (``trained(key)`` or the head), in both its final and best/
    directories; it reloads onto its base to the accuracy it measured and merges into a standalone full model."""
    from safetensors.torch import load_file
    from transformers import AutoModelForSequenceClassification

    for directory in (out, out / "best"):
        names = {p.name for p in directory.iterdir()}
        assert "trained.safetensors" in names and not names & {"model.safetensors", "adapter_config.json"}, names
    tensors = load_file(out / "trained.safetensors")
    heads = ("classifier", "pooler")
    assert all(trained(key) or any(h in key.split(".") for h in heads) for key in tensors), sorted(tensors)
    assert any(key.startswith("classifier") for key in tensors)
    assert sum(t.numel() for t in tensors.values()) == metrics["trainable_params"]
    loaded = load_run(str(out), device="cpu")
    assert evaluate_run(loaded)["accuracy"] == pytest.approx(metrics["eval_accuracy"], abs=1e-9)
    merge_adapter(str(out), merged_dir)
    merged = AutoModelForSequenceClassification.from_pretrained(merged_dir)
    assert (logits_of(merged, loaded.tokenizer) - logits_of(loaded.model, loaded.tokenizer)).abs().max() < 1e-5


def test_head_only_keeps_only_the_head(tmp_path, tiny_bert_dir, toy_data_dir):
    out, metrics = run(tmp_path, tiny_bert_dir, toy_data_dir, {"method": "head_only"})
    check_trained_tensors_run(out, tmp_path / "merged", metrics, lambda key: False)


def test_trained_tensors_refuse_another_base(tmp_path, tiny_bert_dir, toy_data_dir):
    """Trained tensors applied to a base they do not fit (the recipe edited to name another model) are refused,
    naming the tensors, not loaded partly."""
    out, _ = run(tmp_path, tiny_bert_dir, toy_data_dir, {"method": "bitfit"})
    from safetensors.torch import load_file, save_file

    tensors = load_file(out / "trained.safetensors")
    key = next(k for k in tensors if k.endswith("classifier.weight"))
    tensors[key] = torch.zeros(tensors[key].shape[0], tensors[key].shape[1] + 1)
    save_file(tensors, out / "trained.safetensors")
    with pytest.raises(RunError, match=r"does not fit this base model: classifier.weight"):
        load_run(str(out), device="cpu")


def test_pissa_is_saved_as_a_plain_lora_of_the_original_base(tmp_path, tiny_bert_dir, toy_data_dir):
    """PiSSA moves the base's top singular directions into A, B; the saved adapter must still be exact on the
    untouched base: peft converts it to a rank-2r LoRA (r=4 -> 8), and reloading reproduces the final evaluation."""
    out, metrics = run(tmp_path, tiny_bert_dir, toy_data_dir, METHODS["pissa"])
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["r"] == 8 and config["init_lora_weights"] is True
    assert evaluate_run(load_run(str(out), device="cpu", merge=False))["loss"] == pytest.approx(
        metrics["eval_loss"], rel=1e-4
    )


def test_prefix_tuning_is_refused_before_any_work(tmp_path, tiny_bert_dir, toy_data_dir):
    with pytest.raises(RecipeError, match="past_key_values") as err:
        run(tmp_path, tiny_bert_dir, toy_data_dir, {"method": "prefix_tuning"})
    assert "prompt_tuning" in str(err.value) and not (tmp_path / "run" / "recipe.yaml").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="LoftQ runs on CUDA; the refusal is for CPU-only hosts")
def test_loftq_on_cpu_is_refused_with_the_reason(tmp_path, tiny_bert_dir, toy_data_dir):
    with pytest.raises(RecipeError, match="CUDA"):
        run(tmp_path, tiny_bert_dir, toy_data_dir, {"init_lora_weights": "loftq"}, quantization={"method": "nf4"})


@pytest.mark.parametrize(
    "raw,message",
    [
        ({"peft": {"method": "ia3", "use_dora": True}}, "peft.use_dora = True does not apply to peft.method = 'ia3'"),
        ({"peft": {"method": "lora", "num_virtual_tokens": 8}}, "peft.num_virtual_tokens = 8 does not apply"),
        ({"peft": {"method": "prompt_tuning", "feedforward_modules": ["output.dense"]}}, "peft.feedforward_modules"),
        (
            {"peft": {"method": "lora"}, "training": {"layer_lr_decay": 0.8}},
            "training.layer_lr_decay = 0.8 does not apply",
        ),
        ({"peft": {"init_lora_weights": "loftq"}}, "set quantization.method=nf4"),
        ({"peft": {"init_lora_weights": "pissa"}, "quantization": {"method": "nf4"}}, "a frozen NF4 base cannot hold"),
        ({"peft": {"init_lora_weights": "olora", "use_dora": True}}, "use one of the two"),
        ({"peft": {"init_lora_weights": False}}, "random, non-zero update"),
        ({"peft": {"init_lora_weights": "svd"}}, "expected true/false or one of 'gaussian'"),
        (
            {"peft": {"method": "ia3", "target_modules": ["key"], "feedforward_modules": ["output.dense"]}},
            "subset of peft.target_modules",
        ),
        ({"peft": {"method": "prompt_tuning", "num_virtual_tokens": 0}}, "peft.num_virtual_tokens = 0 must be > 0"),
        (
            {"peft": {"method": "full"}, "training": {"layer_lr_decay": 1.5}},
            r"training.layer_lr_decay = 1.5 must be in \(0, 1\]",
        ),
        ({"peft": {"method": "bitfit"}, "quantization": {"method": "nf4"}}, "must be lora or adalora, not 'bitfit'"),
    ],
)
def test_method_options_are_validated(raw, message):
    with pytest.raises(RecipeError, match=message):
        build_recipe(raw)


def test_layer_lr_decay_gives_each_depth_its_rate(tiny_bert_dir):
    """Head at lr, top layer (1 of 0..1) at lr * d, layer 0 at lr * d^2, embeddings at lr * d^3."""
    from transformers import AutoModelForSequenceClassification

    from lora_train.optim import param_groups

    model = AutoModelForSequenceClassification.from_pretrained(tiny_bert_dir, num_labels=2)
    groups = param_groups(model, 0.01, 1.0, 0.5)
    rate = {id(p): g["lr"] for g in groups for p in g["params"]}
    named = dict(model.named_parameters())
    assert rate[id(named["classifier.weight"])] == 1.0 and rate[id(named["bert.pooler.dense.weight"])] == 1.0
    assert rate[id(named["bert.encoder.layer.1.attention.self.query.weight"])] == 0.5
    assert rate[id(named["bert.encoder.layer.0.output.dense.bias"])] == 0.25
    assert rate[id(named["bert.embeddings.word_embeddings.weight"])] == 0.125
    assert groups[0]["lr"] == 1.0 and sum(len(g["params"]) for g in groups) == len(named)
    no_decay = {id(p) for g in groups if g["weight_decay"] == 0.0 for p in g["params"]}
    assert id(named["bert.embeddings.LayerNorm.weight"]) in no_decay and id(named["classifier.weight"]) not in no_decay


def test_full_finetuning_with_layer_lr_decay_trains(tmp_path, tiny_bert_dir, toy_data_dir):
    out, metrics = run(
        tmp_path,
        tiny_bert_dir,
        toy_data_dir,
        {"method": "full"},
        training={"layer_lr_decay": 0.5, "learning_rate": 1e-3, "logging_steps": 1},
    )
    history = json.loads((out / "history.json").read_text())
    first = history[0]  # the head's (first group's) rate is the one logged: 1e-3, decayed linearly over 8 steps
    assert first["learning_rate"] == pytest.approx(1e-3 * (8 - first["step"]) / 8)
    assert (out / "model.safetensors").exists() and metrics["global_step"] == 8


def test_reload_check_reports_reload_plain_peft_and_merge(tmp_path, tiny_bert_dir, toy_data_dir):
    """The study tool that re-checks finished runs (lora_lab.reload_check) on a real tiny run."""
    from lora_lab.reload_check import check_run, table

    out, metrics = run(tmp_path, tiny_bert_dir, toy_data_dir, METHODS["ia3"])
    row = check_run(out)
    assert row["reloaded"] == pytest.approx(metrics["eval_accuracy"], abs=1e-9) and row["method"] == "ia3"
    assert row["plain_peft_max_diff"] < 1e-5 and "merged" in row
    assert f"| run | ia3 | {metrics['eval_accuracy']:.4f} |" in table([row])
