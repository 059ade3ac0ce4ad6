"""End-to-end runs of tiny random models on synthetic data: always run, no assets needed.

A frozen random encoder carries little signal, so these tests check the code paths (every method x
quantization trains, saves adapter-only, reloads to equal logits); learning itself is asserted on the
real checkpoint in test_train_real.py and here with full fine-tuning.
"""

from __future__ import annotations

import json

import pytest
from lora_train.config import build_recipe
from lora_train.train import train
from tests.conftest import reload_accuracy, tiny_recipe


@pytest.mark.parametrize("method,quant", [("lora", "none"), ("adalora", "none"), ("lora", "nf4"), ("adalora", "nf4")])
def test_tiny_bert_trains_and_saves_adapter_only(tmp_path, tiny_bert_dir, toy_data_dir, method, quant):
    out = tmp_path / "run"
    raw = tiny_recipe(tiny_bert_dir, toy_data_dir, out, peft={"method": method, "init_r": 6, "target_r": 4},
                      quantization={"method": quant, "compute_dtype": "float32"})
    metrics = train(build_recipe(raw))
    assert metrics["global_step"] == 64 and metrics["eval_samples"] == 128
    names = {p.name for p in out.iterdir()}
    assert {"adapter_model.safetensors", "adapter_config.json", "recipe.yaml", "metrics.json", "README.md", "tokenizer.json"} <= names
    assert "model.safetensors" not in names and not any(n.endswith(".bin") for n in names)
    from safetensors import safe_open

    with safe_open(out / "adapter_model.safetensors", "pt") as f:
        keys = list(f.keys())
    assert keys and all("lora_" in k or "classifier" in k or "pooler" in k for k in keys), keys
    import pandas as pd

    val = pd.read_parquet(toy_data_dir / "validation.parquet")
    metrics = json.loads((out / "metrics.json").read_text())
    assert reload_accuracy(out, list(val["text"]), val["label"].to_numpy(), 32) == pytest.approx(metrics["eval_accuracy"], abs=1e-9)
    from lora_train.inference import evaluate_run, load_run

    assert evaluate_run(load_run(str(out)))["accuracy"] == pytest.approx(metrics["eval_accuracy"], abs=1e-9)  # scripts/eval.py


def test_tiny_full_finetuning_learns(tmp_path, tiny_bert_dir, toy_data_dir):
    out = tmp_path / "full"
    raw = tiny_recipe(tiny_bert_dir, toy_data_dir, out, peft={"method": "full"}, training={"num_epochs": 4, "learning_rate": 1e-3})
    metrics = train(build_recipe(raw))
    losses = [h["loss"] for h in json.loads((out / "history.json").read_text()) if "loss" in h]
    assert losses[-1] < 0.5 * losses[0]
    assert metrics["eval_accuracy"] > 0.9
    assert (out / "model.safetensors").exists()


def test_tiny_llama_decoder_classifier_gets_pad_token(tmp_path, tiny_llama_dir, toy_data_dir):
    out = tmp_path / "llama"
    raw = tiny_recipe(tiny_llama_dir, toy_data_dir, out, peft={"target_modules": ["q_proj", "v_proj"]},
                      training={"num_epochs": 1})
    metrics = train(build_recipe(raw))
    assert metrics["global_step"] == 32
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert "score" in cfg["modules_to_save"]


def test_nf4_run_does_not_depend_on_the_thread_count(tmp_path, tiny_bert_dir, toy_data_dir):
    """QLoRA on CPU with 1 and with 2 intra-op threads: bitwise the same step losses and evaluation, so a loaded
    machine (or another thread count) cannot move a run's result (tests/test_train_real.py relies on it)."""
    import torch

    results, before = {}, torch.get_num_threads()
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            out = tmp_path / f"threads_{threads}"
            raw = tiny_recipe(tiny_bert_dir, toy_data_dir, out, peft={"dropout": 0.1},
                              quantization={"method": "nf4", "compute_dtype": "float32"},
                              training={"max_steps": 8, "logging_steps": 1})
            metrics = train(build_recipe(raw))
            history = json.loads((out / "history.json").read_text())
            results[threads] = ([loss for h in history for loss in h.get("step_losses", [])],
                                metrics["eval_loss"], metrics["eval_accuracy"])
    finally:
        torch.set_num_threads(before)
    assert len(results[1][0]) == 8 and results[1] == results[2]
