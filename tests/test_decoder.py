"""Decoder classifiers on the real llama2c stories260K checkpoint: pad token, last-token pooling under left / right
padding, and the QLoRA recipe's path (NF4 + double quant, bf16 autocast, gradient checkpointing) learning."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from lora_train.config import RecipeError, build_recipe, load_recipe, recipe_to_yaml
from lora_train.modeling import load_base_model, load_model_config, load_tokenizer
from lora_train.train import train
from tests.conftest import (
    HF_HUB,
    ROOT,
    make_story_rows,
    reload_accuracy,
    reset_accelerator_state,
    write_splits,
)

LLAMA2C = "local/llama2c-stories260K"
needs_llama2c = pytest.mark.skipif(
    not (HF_HUB / "models--local--llama2c-stories260K").is_dir(),
    reason="needs the real llama2c checkpoint in ../shared/hf-hub",
)
POOLING_TOL = 1e-4
"""Absolute tolerance on logits of order 10 (~1e-5 relative): left padding shifts every RoPE position by the same
amount, which leaves attention scores unchanged up to float32 rounding (measured differences ~2e-5)."""

TEXTS = [
    "Once upon a time there was a little girl named Lily.",
    "bad",
    "The dog ran to the park. </s>",
    "She was happy and played with her big red ball all day long in the sun.",
]


def llama2c_classifier(num_labels: int = 2, pooling: str = "last"):
    """The real llama2c as a sequence classifier, with the pad token the training run would choose, and a large
    random ``score`` head so that pooling the wrong position would show in the logits."""
    model_section = {"name_or_path": LLAMA2C, "pooling": pooling}
    recipe = build_recipe({"model": model_section, "peft": {"target_modules": ["q_proj", "v_proj"]}})
    tokenizer = load_tokenizer(recipe)
    config = load_model_config(recipe, [str(i) for i in range(num_labels)])
    config.pad_token_id = tokenizer.pad_token_id
    model, heads = load_base_model(recipe, config)
    torch.manual_seed(0)
    torch.nn.init.normal_(model.score.weight, std=1.0)
    return model.eval(), tokenizer, heads


@needs_llama2c
def test_llama2c_pads_with_unk_which_its_byte_fallback_tokenizer_never_emits():
    model, tokenizer, heads = llama2c_classifier()
    assert (
        tokenizer.pad_token == tokenizer.unk_token == "<unk>" and tokenizer.pad_token_id == 0 != tokenizer.eos_token_id
    )
    assert model.config.pad_token_id == 0 and heads == ["score"]
    ids = tokenizer(TEXTS + ["ünïcödé ✓ 日本"])["input_ids"]
    assert all(0 not in row for row in ids)  # byte fallback: no text encodes to the pad token


@needs_llama2c
@pytest.mark.parametrize("pooling", ["last", "mean"])
def test_llama2c_pooling_is_the_same_with_left_padding_right_padding_and_one_at_a_time(pooling):
    model, tokenizer, _ = llama2c_classifier(pooling=pooling)
    with torch.no_grad():
        alone = torch.cat([model(**tokenizer([text], return_tensors="pt")).logits for text in TEXTS])
        batched = {}
        for side in ("left", "right"):
            tokenizer.padding_side = side
            batch = tokenizer(TEXTS, padding=True, return_tensors="pt")
            assert (batch["attention_mask"] == 0).any()  # really padded
            batched[side] = model(**batch).logits
    assert alone.abs().max() > 1.0  # the check is not vacuous: logits are large and differ per text
    assert (alone[0] - alone[1]).abs().max() > 0.1
    for side, logits in batched.items():
        torch.testing.assert_close(logits, alone, atol=POOLING_TOL, rtol=0, msg=f"{side} padding")


@needs_llama2c
def test_mean_pooling_scores_the_mean_of_the_tokens_hidden_states():
    """model.pooling=mean: the logits are the head applied to the mean hidden state of the text's tokens (padding
    excluded), not the last token's; a padded batch gives each text what it gets alone."""
    mean_model, tokenizer, _ = llama2c_classifier(pooling="mean")
    last_model, _, _ = llama2c_classifier(pooling="last")
    tokenizer.padding_side = "right"
    batch = tokenizer(TEXTS, padding=True, return_tensors="pt")
    with torch.no_grad():
        pooled = mean_model(**batch).logits
        for i, text in enumerate(TEXTS):
            alone = tokenizer([text], return_tensors="pt")
            hidden = last_model.model(**alone).last_hidden_state[0]  # the hook-free backbone: per-token states
            torch.testing.assert_close(pooled[i], last_model.score(hidden.mean(0)), atol=POOLING_TOL, rtol=0)
        assert (pooled - last_model(**batch).logits).abs().max() > 0.1  # mean is not last-token pooling


def test_mean_pooling_is_refused_for_an_encoder_with_a_cls_pooler(tmp_path, tiny_bert_dir, toy_data_dir):
    from tests.conftest import tiny_recipe

    raw = tiny_recipe(tiny_bert_dir, toy_data_dir, tmp_path / "run", model={"pooling": "mean"})
    with pytest.raises(RecipeError, match="model.pooling = 'mean' applies to decoder classifiers"):
        train(build_recipe(raw))
    assert not (tmp_path / "run" / "recipe.yaml").exists()


@needs_llama2c
def test_a_text_ending_in_eos_is_pooled_at_its_eos_token():
    """With pad = EOS (the former choice) the trailing </s> would be taken for padding and skipped."""
    model, tokenizer, _ = llama2c_classifier()
    with_eos, without = (
        tokenizer([text], return_tensors="pt") for text in ("The dog ran to the park. </s>", "The dog ran to the park.")
    )
    assert with_eos["input_ids"][0, -1] == tokenizer.eos_token_id
    with torch.no_grad():
        pooled = model(**with_eos).logits
        hidden = model.model(**with_eos).last_hidden_state[:, -1]
        assert not torch.allclose(pooled, model(**without).logits)
    torch.testing.assert_close(pooled, model.score(hidden))


# ---------------------------------------------------------------------------------------------
# Training on a task the toy can learn: the label is a feeling word in the middle of a short story


@pytest.fixture(scope="module")
def story_data(tmp_path_factory) -> Path:
    return write_splits(tmp_path_factory.mktemp("stories"), make_story_rows, (192, 64, 64))


def story_recipe(data: Path, out: Path, *overrides: str):
    """recipes/cpu/sst2_qlora_llama.yaml on the story task (``overrides`` change it further)."""
    return load_recipe(
        ROOT / "recipes" / "cpu" / "sst2_qlora_llama.yaml",
        [
            "data.task=null",
            f"data.path={data}",
            "data.text_column=text",
            "data.label_names=[sad,happy]",
            "data.max_train_samples=null",
            "data.max_length=64",
            "training.num_epochs=2",
            "training.logging_steps=1",
            "training.per_device_train_batch_size=16",
            "training.gradient_accumulation_steps=1",
            f"output.output_dir={out}",
            "output.report_to=[]",
            *overrides,
        ],
    )


def step_losses(run_dir: Path) -> list[float]:
    history = json.loads((run_dir / "history.json").read_text())
    return [loss for entry in history if "step_losses" in entry for loss in entry["step_losses"]]


@needs_llama2c
@pytest.mark.parametrize(
    "variant",
    [
        "gpu_recipe_path",
        "lora_fp32",
        "adalora_fp32",
    ],
)
def test_qlora_recipe_path_learns_a_story_task(tmp_path, story_data, variant):
    """The GPU QLoRA recipe's path (NF4 + double quant, bf16 compute, bf16 autocast, gradient checkpointing, LoRA on
    q/k/v/o, score head) on real llama2c weights learns, saves the score head, and reloads with plain
    AutoPeftModelForSequenceClassification to the same accuracy; so do float32 LoRA and AdaLoRA on the decoder."""
    out = tmp_path / variant
    overrides = {
        "gpu_recipe_path": [
            "model.dtype=bfloat16",
            "quantization.compute_dtype=bfloat16",
            "training.mixed_precision=bf16",
        ],
        "lora_fp32": ["quantization.method=none", "training.gradient_checkpointing=false"],
        "adalora_fp32": ["quantization.method=none", "peft.method=adalora", "training.learning_rate=1e-2"],
    }[variant]
    recipe = story_recipe(story_data, out, *overrides)
    metrics = train(recipe)

    losses = step_losses(out)
    assert sum(losses[-3:]) / 3 < 0.5 * sum(losses[:3]) / 3, losses
    # AdaLoRA prunes from init_r with an orthogonality penalty: 24 steps take it to 0.84 (measured), LoRA to 1.0.
    assert metrics["eval_accuracy"] >= (0.75 if variant == "adalora_fp32" else 0.9), metrics["eval_accuracy"]
    from safetensors import safe_open

    with safe_open(out / "adapter_model.safetensors", "pt") as f:
        keys = list(f.keys())
    assert any("score" in k for k in keys) and all("lora_" in k or "score" in k for k in keys), keys
    assert "score" in json.loads((out / "adapter_config.json").read_text())["modules_to_save"]
    val = pd.read_parquet(story_data / "validation.parquet")
    reloaded = reload_accuracy(out, list(val["text"]), val["label"].to_numpy(), recipe.data.max_length)
    assert reloaded == pytest.approx(metrics["eval_accuracy"], abs=1e-9)


@needs_llama2c
def test_two_process_ddp_qlora_on_the_decoder(tmp_path, story_data):
    """2 CPU processes x 8 (torchrun, gloo) train the NF4 decoder like 1 process x 16: same per-step losses."""
    from tests.test_distributed import STEP_LOSS_TOL, torchrun

    one = story_recipe(story_data, tmp_path / "one", "training.num_epochs=1", "peft.dropout=0.0")
    train(one)
    reset_accelerator_state()
    recipe_file = tmp_path / "recipe.yaml"
    recipe_file.write_text(recipe_to_yaml(one))
    proc = torchrun(recipe_file, f"output.output_dir={tmp_path / 'two'}", "training.per_device_train_batch_size=8")
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads((tmp_path / "two" / "metrics.json").read_text())
    assert metrics["num_processes"] == 2 and metrics["global_batch_size"] == 16
    assert metrics["train_samples_per_process"] == [96, 96]
    np.testing.assert_allclose(step_losses(tmp_path / "two"), step_losses(tmp_path / "one"), atol=STEP_LOSS_TOL, rtol=0)
