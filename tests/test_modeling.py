"""Model building for every quantization x method, on the real checkpoint and on tiny random configs."""

from __future__ import annotations

import pytest
import torch

from lora_train.config import RecipeError, build_recipe
from lora_train.heads import head_linear_names
from lora_train.modeling import (
    apply_regime,
    check_target_modules,
    count_parameters,
    load_base_model,
    load_model_config,
    load_tokenizer,
    meta_model,
)
from tests.conftest import MINILM, needs_shared

COMBOS = [
    ("none", "lora"),
    ("none", "adalora"),
    ("nf4", "lora"),
    ("nf4", "adalora"),
    ("none", "head_only"),
    ("none", "full"),
]


def build(name_or_path: str, quant: str, method: str, targets: list[str]):
    recipe = build_recipe(
        {
            "model": {"name_or_path": str(name_or_path), "attn_implementation": "eager"},
            "quantization": {"method": quant, "compute_dtype": "float32"},
            "peft": {"method": method, "r": 8, "target_modules": targets, "init_r": 12, "target_r": 8},
        }
    )
    config = load_model_config(recipe, ["neg", "pos"])
    model, heads = load_base_model(recipe, config)
    return apply_regime(recipe, model, heads, total_steps=100), heads


def linear4bit_names(model) -> list[str]:
    return [n for n, m in model.named_modules() if type(m).__name__ == "Linear4bit"]


def check_built(model, heads: list[str], quant: str, method: str) -> None:
    count = count_parameters(model)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    if method == "full":
        assert count.trainable == count.total
    elif method == "head_only":
        assert trainable and all(any(h in n.split(".") for h in heads) for n in trainable)
    else:
        assert any("lora_A" in n for n in trainable) and any("classifier" in n for n in trainable)
        assert not any("lora" not in n and "modules_to_save" not in n for n in trainable)
        if method == "adalora":
            assert any("lora_E" in n for n in trainable)
    if quant == "nf4":
        quantized = linear4bit_names(model)
        assert quantized, "nothing was quantized"
        assert not any("classifier" in n or "pooler" in n for n in quantized), "head modules must stay out of NF4"
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([[2, 5, 6, 3]]), attention_mask=torch.ones(1, 4, dtype=torch.long)).logits
    assert logits.shape == (1, 2) and torch.isfinite(logits).all()


@pytest.mark.parametrize("quant,method", COMBOS)
def test_tiny_bert_builds_every_combination(tiny_bert_dir, quant, method):
    model, heads = build(tiny_bert_dir, quant, method, ["query", "value"])
    assert heads == ["classifier", "pooler"]  # the tiny checkpoint has no pooler: both are new and trained
    check_built(model, heads, quant, method)


@needs_shared
@pytest.mark.parametrize("quant,method", COMBOS)
def test_minilm_builds_every_combination(quant, method):
    model, heads = build(MINILM, quant, method, ["query", "value"])
    assert heads == ["classifier"]  # MiniLM ships a trained pooler: only the classifier is new
    check_built(model, heads, quant, method)
    if method == "lora":
        # r=8 on query and value of 6 layers (384 -> 384): 6 * 2 * 2 * 384 * 8, plus the 384 x 2 classifier.
        assert count_parameters(model).trainable == 6 * 2 * 2 * 384 * 8 + 384 * 2 + 2


def test_nf4_skip_list_uses_full_names_for_nested_heads(tiny_bert_dir):
    recipe = build_recipe({"model": {"name_or_path": str(tiny_bert_dir)}})
    assert head_linear_names(meta_model(load_model_config(recipe, ["a", "b"]))) == ["bert.pooler.dense", "classifier"]


def test_missing_target_module_lists_the_linear_layers(tiny_bert_dir):
    recipe = build_recipe(
        {"model": {"name_or_path": str(tiny_bert_dir)}, "peft": {"target_modules": ["query", "q_proj"]}}
    )
    with pytest.raises(
        RecipeError, match=r"\['q_proj'\] not found .* its Linear layers are: \['dense', 'key', 'query', 'value'\]"
    ):
        check_target_modules(recipe, meta_model(load_model_config(recipe)))


def test_decoder_without_pad_token_gets_one(tiny_llama_dir):
    recipe = build_recipe(
        {"model": {"name_or_path": str(tiny_llama_dir)}, "peft": {"target_modules": ["q_proj", "v_proj"]}}
    )
    tokenizer = load_tokenizer(recipe)
    assert tokenizer.pad_token == tokenizer.eos_token == "[SEP]"
    config = load_model_config(recipe, ["neg", "pos"])
    config.pad_token_id = tokenizer.pad_token_id
    model, heads = load_base_model(recipe, config)
    assert heads == ["score"] and model.config.pad_token_id == tokenizer.pad_token_id
    peft_model = apply_regime(recipe, model, heads, 10)
    texts = ["good film", "a very bad film indeed"]
    batch = tokenizer(texts, padding=True, return_tensors="pt")
    assert batch["attention_mask"][0].sum() < batch["attention_mask"][1].sum()  # the first text is padded
    with torch.no_grad():
        padded = peft_model(**batch).logits
        alone = torch.cat([peft_model(**tokenizer([t], return_tensors="pt")).logits for t in texts])
    # The classifier reads the last real token, not a pad: padding must not change a text's logits.
    assert padded.shape == (2, 2) and torch.allclose(padded, alone, atol=1e-5), (padded, alone)
    assert not torch.allclose(alone[0], alone[1], atol=1e-3)  # and the two texts are told apart at all


def _attention_dropout_recipe(model_dir, value):
    return build_recipe({"model": {"name_or_path": str(model_dir), "attention_dropout": value}})


def test_attention_dropout_reaches_bert_and_llama_attention(tiny_bert_dir, tiny_llama_dir):
    bert_recipe = _attention_dropout_recipe(tiny_bert_dir, 0.25)
    bert, _ = load_base_model(bert_recipe, load_model_config(bert_recipe, ["neg", "pos"]))
    probs = [m.dropout.p for name, m in bert.named_modules() if name.endswith("attention.self")]
    assert probs and set(probs) == {0.25}
    llama_config = load_model_config(_attention_dropout_recipe(tiny_llama_dir, 0.0), ["neg", "pos"])
    assert llama_config.attention_dropout == 0.0
    kept = load_model_config(_attention_dropout_recipe(tiny_bert_dir, None))
    assert kept.attention_probs_dropout_prob == 0.1  # null keeps the checkpoint's


def test_attention_dropout_on_a_model_without_one_is_refused(tmp_path):
    from transformers import T5Config

    T5Config(d_model=16, num_layers=1, num_heads=2, d_kv=8, d_ff=32).save_pretrained(tmp_path)
    with pytest.raises(RecipeError, match="model.attention_dropout is set.*attention_probs_dropout_prob"):
        load_model_config(_attention_dropout_recipe(tmp_path, 0.0))


@pytest.mark.parametrize("value", [-0.1, 1.0])
def test_attention_dropout_out_of_range_is_refused(value):
    with pytest.raises(RecipeError, match=r"model.attention_dropout = .* must be in \[0, 1\)"):
        build_recipe({"model": {"attention_dropout": value}})


def test_loading_reports_only_weights_missing_outside_the_new_head(caplog):
    from lora_train.modeling import log_unexpected_loading

    head_only = {"missing_keys": ["classifier.weight", "classifier.bias"], "unexpected_keys": ["lm_head.weight"]}
    with caplog.at_level("WARNING", logger="lora_train.modeling"):
        log_unexpected_loading(head_only, ["classifier"])
        assert caplog.records == []
        stray = {"missing_keys": ["classifier.weight", "bert.encoder.layer.0.attention.self.query.weight"]}
        log_unexpected_loading({**stray, "unexpected_keys": []}, ["classifier"])
    [record] = caplog.records
    assert "1 weights were not in the checkpoint" in record.getMessage()
    assert "bert.encoder.layer.0.attention.self.query.weight" in record.getMessage()
