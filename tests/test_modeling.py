"""Model building for every quantization x method, on the real checkpoint and on tiny random configs."""

from __future__ import annotations

import pytest
import torch

from lora_train.config import RecipeError, build_recipe
from lora_train.heads import head_linear_names
from lora_train.modeling import (
    BERT_FAMILY_CLASSIFIERS,
    apply_regime,
    check_target_modules,
    count_parameters,
    last_layer_at_first_position,
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


def tiny_first_position_classifier(class_name: str, attn: str, attention_dropout: float = 0.0) -> torch.nn.Module:
    """A randomly initialised 2-layer model of ``class_name`` (dropout off unless asked, so train-mode gradients
    compare)."""
    import transformers

    config = getattr(transformers, class_name.replace("ForSequenceClassification", "Config"))(
        vocab_size=50,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=128,
        max_position_embeddings=64,
        num_labels=3,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=attention_dropout,
        classifier_dropout=0.0,
    )
    config._attn_implementation = attn
    torch.manual_seed(0)
    return getattr(transformers, class_name)(config)


@pytest.mark.parametrize("checkpointing", [False, True])
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("class_name", sorted(BERT_FAMILY_CLASSIFIERS))
def test_last_layer_at_the_first_position_gives_the_full_layers_logits_and_gradients(class_name, attn, checkpointing):
    import copy

    full = tiny_first_position_classifier(class_name, attn)
    fast = copy.deepcopy(full)
    assert last_layer_at_first_position(fast)
    assert last_layer_at_first_position(fast)  # a second call leaves it as it is
    positions = []
    layers = fast.get_submodule(BERT_FAMILY_CLASSIFIERS[class_name]).layer
    layers[-1].register_forward_hook(lambda module, args, out: positions.append(out.shape[1]))
    ids = torch.randint(5, 50, (3, 9))
    mask = torch.ones_like(ids)
    mask[1, 5:] = mask[2, 3:] = 0  # padded rows: the first position must not attend to their padding
    labels = torch.tensor([0, 2, 1])
    grads = []
    for model in (full, fast):
        model.train()
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        out = model(input_ids=ids, attention_mask=mask, labels=labels)
        out.loss.backward()
        grads.append((out.logits.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}))
    assert positions == [1]
    torch.testing.assert_close(grads[1][0], grads[0][0], rtol=1e-5, atol=1e-6)
    assert grads[1][1].keys() == grads[0][1].keys()
    for name, grad in grads[0][1].items():
        torch.testing.assert_close(grads[1][1][name], grad, rtol=1e-4, atol=1e-6, msg=name)
    with torch.no_grad():  # evaluation keeps the full layer unless asked, then gives the same logits
        for in_evaluation, expected in ((False, 9), (True, 1)):
            last_layer_at_first_position(fast, in_evaluation=in_evaluation)
            logits = fast.eval()(input_ids=ids, attention_mask=mask).logits
            torch.testing.assert_close(logits, grads[0][0], atol=1e-5, rtol=1e-5)
            assert positions[-1] == expected


@pytest.mark.parametrize("variant", ["eager", "sdpa", "sdpa+bf16 autocast", "sdpa+full last layer"])
@pytest.mark.parametrize("class_name", sorted(BERT_FAMILY_CLASSIFIERS))
def test_packed_inference_runs_the_real_tokens_only_with_the_padded_forwards_logits(class_name, variant):
    """Within packed_tokens, an encoder made to pack runs its products on the real tokens alone (the rows a Linear
    sees) and gives the padded forward's logits; outside it, in training, without padding or with left padding it
    runs transformers' forward."""
    from lora_train.modeling import pack_padded_tokens, packed_tokens

    model = tiny_first_position_classifier(class_name, variant.split("+")[0]).eval()
    if "full last layer" not in variant:
        last_layer_at_first_position(model, in_evaluation=True)
    assert pack_padded_tokens(model) and pack_padded_tokens(model)  # idempotent
    rows = []
    layers = model.get_submodule(BERT_FAMILY_CLASSIFIERS[class_name]).layer
    layers[0].intermediate.dense.register_forward_hook(lambda m, args, out: rows.append(args[0].shape[:-1]))
    ids = torch.randint(5, 50, (3, 9), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, 5:] = mask[2, 2:] = 0  # 9 + 5 + 2 = 16 real tokens of 27
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled="autocast" in variant)
    with torch.no_grad(), autocast:
        padded = model(input_ids=ids, attention_mask=mask).logits
        with packed_tokens():
            packed = model(input_ids=ids, attention_mask=mask).logits
            assert rows[-1] == ((18,) if "autocast" in variant else (16,))  # bf16: rows padded to a bucket
            model(input_ids=ids)  # no padding: nothing to skip
            assert rows[-1] == (3, 9)
            model(input_ids=ids, attention_mask=torch.flip(mask, dims=[1]))  # left padding: the first is padding
            assert rows[-1] == (3, 9)
    assert rows[0] == (3, 9)
    # equal to the bit on the AMD EPYC of 2026-12-06; bf16 kernels may block their rows by the row count elsewhere
    close = dict(rtol=1.6e-2, atol=1e-5) if "autocast" in variant else dict(rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(packed, padded, **close)
    with packed_tokens():
        model.train()(input_ids=ids, attention_mask=mask)
    assert rows[-1] == (3, 9)  # training takes transformers' forward


def train_step_outputs(model: torch.nn.Module, seed: int = 0, autocast: bool = False) -> tuple:
    """Logits and parameter gradients of one training forward + backward over padded rows, from ``seed``."""
    ids = torch.randint(5, 50, (3, 9), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, 5:] = mask[2, 3:] = 0
    model.train().zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        out = model(input_ids=ids, attention_mask=mask, labels=torch.tensor([0, 2, 1]))
    out.loss.backward()
    return out.logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("variant", ["eager", "sdpa", "sdpa+checkpointing", "sdpa+bf16 autocast"])
@pytest.mark.parametrize("class_name", sorted(BERT_FAMILY_CLASSIFIERS))
def test_fast_dropout_attention_is_eager_attention_with_fastdropouts_mask(class_name, variant, monkeypatch):
    """In training, the rewritten self-attention is transformers' eager attention with a FastDropout on the
    probabilities: the same logits and gradients from the same random draws (with checkpointing too, which must
    replay the masks), and the model's own forward in evaluation."""
    import copy

    from lora_train.modeling import FastDropout, use_fast_dropout

    original = tiny_first_position_classifier(class_name, variant.split("+")[0], attention_dropout=0.3)
    fast, reference = copy.deepcopy(original), copy.deepcopy(original)
    use_fast_dropout(fast)
    attention = [m for m in fast.modules() if type(m).__name__.endswith("SelfAttention")]
    assert len(attention) == 2 and all(type(m).__name__.startswith("FastDropout") for m in attention)
    if "checkpointing" in variant:
        fast.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    # the reference: eager attention whose functional dropout draws FastDropout's mask
    reference.config._attn_implementation = "eager"
    monkeypatch.setattr(
        torch.nn.functional, "dropout", lambda x, p=0.5, training=True, inplace=False: FastDropout(p).train(training)(x)
    )
    autocast = "autocast" in variant
    logits, grads = train_step_outputs(fast, autocast=autocast)
    expected_logits, expected_grads = train_step_outputs(reference, autocast=autocast)
    different_draws, _ = train_step_outputs(fast, seed=1, autocast=autocast)
    assert not torch.allclose(different_draws, logits)  # the dropout is on
    # under autocast, bf16 rounding: eager may add a bf16 mask where an SDPA mask is converted to a float32 one
    close = dict(rtol=1.6e-2, atol=2e-4) if autocast else dict(rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(logits, expected_logits, **close)
    assert grads.keys() == expected_grads.keys()
    for name, grad in expected_grads.items():
        torch.testing.assert_close(grads[name], grad, **close, msg=lambda m, name=name: f"{name}: {m}")
    with torch.no_grad():  # evaluation: transformers' own attention, bit for bit
        ids = torch.randint(5, 50, (2, 7))
        assert torch.equal(fast.eval()(input_ids=ids).logits, original.eval()(input_ids=ids).logits)


def test_fast_dropout_attention_in_the_first_position_layer_replays_under_checkpointing():
    """The last layer at the first position drops out its one query's probabilities the same way; checkpointing's
    recomputation draws the same masks, so the gradients are those of the run without it."""
    import copy

    from lora_train.modeling import use_fast_dropout

    model = tiny_first_position_classifier("BertForSequenceClassification", "sdpa", attention_dropout=0.3)
    last_layer_at_first_position(model)
    use_fast_dropout(model)
    checkpointed = copy.deepcopy(model)
    checkpointed.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    logits, grads = train_step_outputs(model)
    again_logits, again_grads = train_step_outputs(checkpointed)
    assert torch.equal(logits, again_logits)
    assert all(torch.equal(again_grads[name], grad) for name, grad in grads.items())
    assert not torch.allclose(train_step_outputs(model, seed=1)[0], logits)


@pytest.mark.parametrize("variant", ["float32", "float32+checkpointing", "bf16 autocast", "bf16 model"])
def test_fused_lora_layers_train_as_pefts_layers(variant):
    """A LoRA layer's fused forward and backward (one autograd Function) give peft's logits and gradients from the
    same dropout draws; evaluation is peft's own forward, bit for bit."""
    import copy

    from peft import LoraConfig, TaskType, get_peft_model

    from lora_train.modeling import keep_lora_inputs_uncast, store_frozen_linears_in, use_fast_dropout, use_fused_lora

    base = tiny_first_position_classifier("BertForSequenceClassification", "sdpa")
    if variant == "bf16 model":  # peft keeps the adapters in float32 and computes them there: its forward is kept
        base = base.to(torch.bfloat16)
    config = LoraConfig(
        task_type=TaskType.SEQ_CLS, r=4, lora_alpha=8, lora_dropout=0.2, target_modules=["query", "value", "dense"]
    )
    model = get_peft_model(base, config)
    for name, param in model.named_parameters():
        if "lora_B" in name:  # peft starts B at zero, where A's gradient would be zero too
            torch.nn.init.normal_(param, std=0.2)
    use_fast_dropout(model)
    autocast = "autocast" in variant
    if autocast:  # as training sets a bf16 run up
        keep_lora_inputs_uncast(model)
        store_frozen_linears_in(model, torch.bfloat16)
    fused = copy.deepcopy(model)
    assert use_fused_lora(fused) == 2 * 2 + 2 * 3 + 1  # query, value, three dense layers per layer, the pooler
    if "checkpointing" in variant:
        fused.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        fused.enable_input_require_grads()
    logits, grads = train_step_outputs(fused, autocast=autocast)
    expected_logits, expected_grads = train_step_outputs(model, autocast=autocast)
    assert not torch.allclose(train_step_outputs(fused, seed=1, autocast=autocast)[0], logits)  # dropout is on
    # bf16: a few units of its last place, through three products of other rounding order
    close = dict(rtol=5e-2, atol=5e-3) if autocast else dict(rtol=1e-4, atol=1e-6)
    if variant == "bf16 model":
        close = dict(rtol=0, atol=0)
    torch.testing.assert_close(logits, expected_logits, **close)
    assert grads.keys() == expected_grads.keys() and any("lora_A" in name for name in grads)
    for name, grad in expected_grads.items():
        torch.testing.assert_close(grads[name], grad, **close, msg=lambda m, name=name: f"{name}: {m}")
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        ids = torch.randint(5, 50, (2, 7))
        assert torch.equal(fused.eval()(input_ids=ids).logits, model.eval()(input_ids=ids).logits)


@pytest.mark.parametrize("change", ["flash_attention_2", "no layers"])
def test_untested_attention_and_layerless_encoders_keep_the_full_model(change):
    model = tiny_first_position_classifier("BertForSequenceClassification", "sdpa")
    if change == "no layers":
        model.bert.encoder.layer = torch.nn.ModuleList()
    else:
        model.config._attn_implementation = change  # only the name: the test needs no flash-attn installed
    classes = [type(m) for m in model.modules()]
    assert not last_layer_at_first_position(model)
    assert [type(m) for m in model.modules()] == classes


def test_classifiers_outside_the_table_keep_their_last_layer(tiny_llama_dir):
    from transformers import AutoModelForSequenceClassification

    from lora_train.modeling import use_fast_dropout

    model = AutoModelForSequenceClassification.from_pretrained(tiny_llama_dir, num_labels=2)
    classes = [type(m) for m in model.modules()]
    assert not last_layer_at_first_position(model)
    use_fast_dropout(model)  # no nn.Dropout to swap, and its attention is not the BERT family's
    assert [type(m) for m in model.modules()] == classes


def test_a_cached_forward_takes_the_full_last_layer():
    """A cache (a BERT decoder's, or a prefix) holds every position's keys and values: the layer runs in full."""
    import copy

    full = tiny_first_position_classifier("BertForSequenceClassification", "sdpa")
    full.config.is_decoder = True
    fast = copy.deepcopy(full)
    last_layer_at_first_position(fast, in_evaluation=True)
    positions = []
    fast.bert.encoder.layer[-1].register_forward_hook(lambda module, args, out: positions.append(out.shape[1]))
    ids = torch.randint(5, 50, (2, 7))
    with torch.no_grad():
        logits = [m.eval()(input_ids=ids, use_cache=True).logits for m in (full, fast)]
    assert positions == [7]
    torch.testing.assert_close(logits[1], logits[0])


def test_a_subclass_of_the_first_position_layer_still_falls_back_to_the_full_layer():
    """FSDP2 turns a module's class into a subclass of it; the fallback must reach the original layer, not loop."""
    full = tiny_first_position_classifier("BertForSequenceClassification", "sdpa")
    last_layer_at_first_position(full)
    layer = full.bert.encoder.layer[-1]
    layer.__class__ = type(f"FSDP{type(layer).__name__}", (type(layer),), {})
    ids = torch.randint(5, 50, (2, 7))
    with torch.no_grad():
        assert full.eval()(input_ids=ids).logits.shape == (2, 3)  # evaluation: the full layer's forward
