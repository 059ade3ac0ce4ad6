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
from tests.conftest import reload_accuracy, reset_accelerator_state, tiny_recipe


@pytest.mark.parametrize("method,quant", [("lora", "none"), ("adalora", "none"), ("lora", "nf4"), ("adalora", "nf4")])
def test_tiny_bert_trains_and_saves_adapter_only(tmp_path, tiny_bert_dir, toy_data_dir, method, quant):
    out = tmp_path / "run"
    raw = tiny_recipe(
        tiny_bert_dir,
        toy_data_dir,
        out,
        peft={"method": method, "init_r": 6, "target_r": 4},
        quantization={"method": quant, "compute_dtype": "float32"},
    )
    metrics = train(build_recipe(raw))
    assert metrics["global_step"] == 64 and metrics["eval_samples"] == 128
    names = {p.name for p in out.iterdir()}
    assert {
        "adapter_model.safetensors",
        "adapter_config.json",
        "recipe.yaml",
        "metrics.json",
        "README.md",
        "tokenizer.json",
    } <= names
    assert "model.safetensors" not in names and not any(n.endswith(".bin") for n in names)
    from safetensors import safe_open

    with safe_open(out / "adapter_model.safetensors", "pt") as f:
        keys = list(f.keys())
    assert keys and all("lora_" in k or "classifier" in k or "pooler" in k for k in keys), keys
    import pandas as pd

    val = pd.read_parquet(toy_data_dir / "validation.parquet")
    metrics = json.loads((out / "metrics.json").read_text())
    assert reload_accuracy(out, list(val["text"]), val["label"].to_numpy(), 32) == pytest.approx(
        metrics["eval_accuracy"], abs=1e-9
    )
    from lora_train.inference import evaluate_run, load_run

    assert evaluate_run(load_run(str(out), merge=False))["accuracy"] == pytest.approx(
        metrics["eval_accuracy"], abs=1e-9
    )  # scripts/eval.py


def test_tiny_full_finetuning_learns(tmp_path, tiny_bert_dir, toy_data_dir):
    out = tmp_path / "full"
    raw = tiny_recipe(
        tiny_bert_dir, toy_data_dir, out, peft={"method": "full"}, training={"num_epochs": 4, "learning_rate": 1e-3}
    )
    metrics = train(build_recipe(raw))
    losses = [h["loss"] for h in json.loads((out / "history.json").read_text()) if "loss" in h]
    assert losses[-1] < 0.5 * losses[0]
    assert metrics["eval_accuracy"] > 0.9
    assert (out / "model.safetensors").exists()


def test_tiny_llama_decoder_classifier_gets_pad_token(tmp_path, tiny_llama_dir, toy_data_dir):
    out = tmp_path / "llama"
    raw = tiny_recipe(
        tiny_llama_dir, toy_data_dir, out, peft={"target_modules": ["q_proj", "v_proj"]}, training={"num_epochs": 1}
    )
    metrics = train(build_recipe(raw))
    assert metrics["global_step"] == 32
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert "score" in cfg["modules_to_save"]


def step_losses(run_dir) -> list[float]:
    history = json.loads((run_dir / "history.json").read_text())
    return [loss for entry in history if "step_losses" in entry for loss in entry["step_losses"]]


def test_bf16_autocast_and_gradient_checkpointing_train_the_encoder(tmp_path, tiny_bert_dir, toy_data_dir):
    """Full fine-tuning of the tiny BERT (test_tiny_full_finetuning_learns's settings) three ways: float32; with
    gradient checkpointing (recomputation is exact, dropout masks included, so the per-step losses must equal
    float32's); with bf16 autocast (the losses must differ, or autocast was not on). All three must learn."""
    import numpy as np

    runs = {}
    for name, training in (
        ("fp32", {}),
        ("checkpointing", {"gradient_checkpointing": True}),
        ("bf16", {"mixed_precision": "bf16"}),
    ):
        raw = tiny_recipe(
            tiny_bert_dir,
            toy_data_dir,
            tmp_path / name,
            peft={"method": "full"},
            training={"num_epochs": 4, "learning_rate": 1e-3, **training},
        )
        train(build_recipe(raw))
        reset_accelerator_state()
        history = json.loads((tmp_path / name / "history.json").read_text())
        window_losses = [h["loss"] for h in history if "loss" in h]
        assert window_losses[-1] < 0.5 * window_losses[0], (name, window_losses)
        # Every window reports its padded share: fp32 CPU batches are padded to their longest text only, bf16
        # ones to the next bucket length (more padding, few shapes).
        windows = [h for h in history if "window_tokens" in h]
        for h in windows:
            assert h["padding_share"] == pytest.approx(1 - h["window_tokens"] / h["window_padded_tokens"])
        runs[name + "_padding"] = sum(h["window_padded_tokens"] for h in windows)
        runs[name] = np.array(step_losses(tmp_path / name))
    assert runs.pop("bf16_padding") > runs.pop("fp32_padding") == runs.pop("checkpointing_padding")
    np.testing.assert_allclose(runs["checkpointing"], runs["fp32"], atol=1e-5, rtol=0)
    assert np.abs(runs["bf16"] - runs["fp32"]).max() > 1e-3  # bf16 rounding shows: autocast was on


def test_gradient_checkpointing_is_on_for_every_regime_that_asks(tiny_bert_dir):
    """apply_regime turns activation checkpointing on for LoRA, QLoRA and full fine-tuning (so the equality above
    compares two different computations, not the same one twice)."""
    from lora_train.modeling import apply_regime, load_base_model, load_model_config

    for quant, method in (("none", "lora"), ("nf4", "lora"), ("none", "full")):
        recipe = build_recipe(
            {
                "model": {"name_or_path": str(tiny_bert_dir)},
                "peft": {"method": method},
                "quantization": {"method": quant, "compute_dtype": "float32"},
                "training": {"gradient_checkpointing": True},
            }
        )
        model, heads = load_base_model(recipe, load_model_config(recipe, ["neg", "pos"]))
        model = apply_regime(recipe, model, heads, 10)
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        assert base.is_gradient_checkpointing, (quant, method)


def test_nf4_run_does_not_depend_on_the_thread_count(tmp_path, tiny_bert_dir, toy_data_dir):
    """QLoRA on CPU with 1 and with 2 intra-op threads: bitwise the same step losses and evaluation, so a loaded
    machine (or another thread count) cannot move a run's result (tests/test_train_real.py relies on it)."""
    import torch

    results, before = {}, torch.get_num_threads()
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            out = tmp_path / f"threads_{threads}"
            raw = tiny_recipe(
                tiny_bert_dir,
                toy_data_dir,
                out,
                peft={"dropout": 0.1},
                quantization={"method": "nf4", "compute_dtype": "float32"},
                training={"max_steps": 8, "logging_steps": 1},
            )
            metrics = train(build_recipe(raw))
            history = json.loads((out / "history.json").read_text())
            results[threads] = (
                [loss for h in history for loss in h.get("step_losses", [])],
                metrics["eval_loss"],
                metrics["eval_accuracy"],
            )
    finally:
        torch.set_num_threads(before)
    assert len(results[1][0]) == 8 and results[1] == results[2]


@pytest.mark.parametrize("method", ["lora", "bitfit"])
def test_frozen_weights_kept_in_the_autocast_dtype_train_bit_for_bit(tmp_path, tiny_bert_dir, toy_data_dir, method):
    """Under bf16 autocast the training loop keeps frozen Linear weights in bf16, where autocast would cast them at
    every step, and LoRA layers' inputs in bf16, where peft would cast them to float32 for autocast to cast back
    (``build_trainable``): a step's loss and every trainable gradient equal those of the model without either to
    the bit (dropout off), and what trains (LoRA, the head, BitFit's biases inside frozen Linears) stays float32."""
    import torch
    from accelerate import Accelerator

    from lora_train.build import build_classifier, load_task_data
    from lora_train.modeling import keep_lora_inputs_uncast, load_tokenizer, store_frozen_linears_in
    from lora_train.train import build_trainable

    raw = tiny_recipe(tiny_bert_dir, toy_data_dir, tmp_path / "run", training={"mixed_precision": "bf16"})
    raw["peft"]["method"] = method
    recipe = build_recipe(raw)
    tokenizer = load_tokenizer(recipe)
    batch = tokenizer(["a good film", "a dull, lifeless mess of a film"], padding=True, return_tensors="pt")
    results = []
    for store in (False, True):
        torch.manual_seed(0)
        model = build_classifier(recipe, ["neg", "pos"], tokenizer, None, 10).eval()
        if store:
            assert store_frozen_linears_in(model, torch.bfloat16) > 0
            assert keep_lora_inputs_uncast(model) == (4 if method == "lora" else 0)  # query and value of 2 layers
            trainable = [p for p in model.parameters() if p.requires_grad]
            assert trainable and all(p.dtype == torch.float32 for p in trainable)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(**batch, labels=torch.tensor([1, 0])).loss
        loss.backward()
        results.append((loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}))
    (loss_cast, grads_cast), (loss_stored, grads_stored) = results
    assert torch.equal(loss_cast, loss_stored) and grads_cast.keys() == grads_stored.keys()
    assert all(torch.equal(grads_cast[name], grads_stored[name]) for name in grads_cast)

    reset_accelerator_state()
    accelerator = Accelerator(cpu=True, mixed_precision="bf16")
    model = build_trainable(recipe, load_task_data(recipe), tokenizer, accelerator, 10)[0]
    queries = [
        p for n, p in model.named_parameters() if n.endswith(("self.query.weight", "self.query.base_layer.weight"))
    ]
    assert queries and all(p.dtype == torch.bfloat16 for p in queries)
    assert all(p.dtype == torch.float32 for p in model.parameters() if p.requires_grad)
    assert not any(getattr(m, "cast_input_dtype_enabled", False) for m in model.modules())
    reset_accelerator_state()


def test_evaluation_runs_longest_first_with_the_same_metrics(tmp_path, tiny_bert_dir, toy_data_dir):
    """Evaluation batches hold texts of similar lengths, longest first (less padding, the peak memory at once), and
    give the metrics of the data's own order (float32: the same accuracy, the loss up to summation order)."""
    import torch
    from accelerate import Accelerator
    from torch.utils.data import DataLoader

    from lora_train.build import build_classifier, load_task_data
    from lora_train.metrics import evaluate
    from lora_train.modeling import load_tokenizer
    from lora_train.train import make_loaders

    raw = tiny_recipe(tiny_bert_dir, toy_data_dir, tmp_path / "run", training={"per_device_eval_batch_size": 16})
    recipe = build_recipe(raw)
    tokenizer, data = load_tokenizer(recipe), load_task_data(recipe)
    reset_accelerator_state()
    accelerator = Accelerator(cpu=True)
    _, ordered = make_loaders(recipe, data, tokenizer, accelerator)
    as_stored = DataLoader(ordered.dataset, batch_size=16, collate_fn=ordered.collate_fn)
    widths = [batch["input_ids"].shape[1] for batch in ordered]
    assert widths == sorted(widths, reverse=True) and len(set(widths)) > 1
    padded = [sum(batch["input_ids"].numel() for batch in loader) for loader in (ordered, as_stored)]
    assert padded[0] < padded[1]
    torch.manual_seed(0)
    model = build_classifier(recipe, data.label_names, tokenizer, None, 10)
    first, second = (evaluate(model, loader, accelerator, 2, data.label_names) for loader in (ordered, as_stored))
    assert first["accuracy"] == second["accuracy"] and first["num_samples"] == second["num_samples"] == 128
    assert first["loss"] == pytest.approx(second["loss"], abs=1e-6)
    reset_accelerator_state()
