"""The adapter server (lora_train/serving), started for real on 127.0.0.1 and spoken to over HTTP.

Adapters are trained here in seconds (tiny random BERTs, synthetic data, 4 steps): two 2-class adapters and a
3-class one over one base with a pooler (so the head is the ``classifier`` Linear and peft can mix them in one
batch), one adapter of another base, BitFit and head-only runs (only the tensors they trained, served beside the
LoRA adapters) and a full fine-tuning run (a whole model, not an adapter).
"""

from __future__ import annotations

import contextlib
import io
import itertools
import json
import os
import random
import shutil
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Optional

import httpx
import pytest
import torch

from lora_train.commands.predict import main as predict_main
from lora_train.config import build_recipe
from lora_train.data import padding_lengths
from lora_train.inference import load_run, predict
from lora_train.serving.access import Access
from lora_train.serving.app import Limits, create_app
from lora_train.serving.batcher import MicroBatcher
from lora_train.serving.registry import AdapterRegistry, ServingError, length_buckets, read_adapter
from lora_train.serving.replicas import ReplicatedRegistry
from lora_train.serving.server import build_parser, read_all, registry_for
from lora_train.serving.server import main as serve_main
from lora_train.train import train
from tests.conftest import reset_accelerator_state, save_tiny_bert, tiny_recipe

TEXTS = ["the film was superb and fun", "a dull boring plot", "quite good actors", "this story is awful", "nice"]
LONG_TEXT = " ".join(["the movie was very good and the plot quite fun"] * 8)  # > 32 tokens: cut at max_length 32
MAX_TEXTS = 8
TOKEN = "test-admin-token-0123456789"
ADMIN = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture(scope="module")
def pooled_bert_dir(tmp_path_factory) -> Path:
    """A tiny random BERT saved with its pooler: the adapters' only new head is the ``classifier`` Linear."""
    return save_tiny_bert(tmp_path_factory.mktemp("pooled_bert"), with_pooler=True, seed=1)


def train_tiny(root: Path, name: str, model_dir: Path, data_dir: Path, labels=("neg", "pos"), **sections) -> Path:
    out = root / name
    base = {"training": {"max_steps": 4, "eval_steps": 0, "save_steps": 0, "logging_steps": 2}}
    for section, values in sections.items():
        base.setdefault(section, {}).update(values)
    recipe = tiny_recipe(model_dir, data_dir, out, **base)
    recipe["data"]["label_names"] = list(labels)
    reset_accelerator_state()  # each run creates its Accelerator with its own mixed precision
    train(build_recipe(recipe))
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory, pooled_bert_dir, tiny_bert_dir, toy_data_dir) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("serving_runs")
    return {
        "sentiment": train_tiny(root, "sentiment", pooled_bert_dir, toy_data_dir),
        "sentiment_b": train_tiny(
            root, "sentiment_b", pooled_bert_dir, toy_data_dir, training={"seed": 7, "learning_rate": 2e-2}
        ),
        "three": train_tiny(root, "three", pooled_bert_dir, toy_data_dir, labels=("neg", "mixed", "pos")),
        "other_base": train_tiny(root, "other_base", tiny_bert_dir, toy_data_dir),
        "head_only": train_tiny(root, "head_only", pooled_bert_dir, toy_data_dir, peft={"method": "head_only"}),
        "bitfit": train_tiny(
            root, "bitfit", pooled_bert_dir, toy_data_dir, labels=("neg", "mixed", "pos"), peft={"method": "bitfit"}
        ),
        "bitfit_bf16": train_tiny(
            root,
            "bitfit_bf16",
            pooled_bert_dir,
            toy_data_dir,
            peft={"method": "bitfit"},
            training={"mixed_precision": "bf16"},
        ),
        "full": train_tiny(root, "full", pooled_bert_dir, toy_data_dir, peft={"method": "full"}),
        "lora_bias": train_tiny(root, "lora_bias", pooled_bert_dir, toy_data_dir, peft={"bias": "all"}),
        "bf16": train_tiny(root, "bf16", pooled_bert_dir, toy_data_dir, training={"mixed_precision": "bf16"}),
        "bf16_three": train_tiny(
            root,
            "bf16_three",
            pooled_bert_dir,
            toy_data_dir,
            labels=("neg", "mixed", "pos"),
            training={"mixed_precision": "bf16", "seed": 3, "learning_rate": 2e-2},
        ),
        # BERT's pooler trained with the head, as the CPU recipes do
        "pooled": train_tiny(
            root, "pooled", pooled_bert_dir, toy_data_dir, peft={"modules_to_save": ["pooler", "classifier"]}
        ),
    }


@pytest.fixture(scope="module")
def reference(runs) -> dict[str, torch.Tensor]:
    """Each adapter's probabilities on TEXTS + [LONG_TEXT], from lora_train.inference alone (one model per run)."""
    expected = {}
    for name in ("sentiment", "sentiment_b", "three", "pooled", "bf16"):
        rows = predict(load_run(str(runs[name]), device="cpu"), TEXTS + [LONG_TEXT])
        expected[name] = torch.tensor([list(row["probabilities"].values()) for row in rows])
    for name in ("bitfit", "head_only", "bitfit_bf16"):  # from scripts/predict.py's own main
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            assert predict_main([str(runs[name]), *TEXTS, LONG_TEXT, "--json", "--device", "cpu"]) == 0
        rows = [json.loads(line) for line in out.getvalue().splitlines()]
        expected[name] = torch.tensor([list(row["probabilities"].values()) for row in rows])
    return expected


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


APPS: dict[str, object] = {}
"""The app behind each URL :func:`serving` yields."""


@contextlib.contextmanager
def serving(registry: AdapterRegistry, access: Access, limits: Optional[Limits] = None, max_wait_s: float = 0.05):
    """The real app under uvicorn on 127.0.0.1 (a free port) over ``registry``; yields its URL."""
    import uvicorn

    # A long wait makes requests sent together share a batch even on a loaded CI machine.
    batcher = MicroBatcher(registry.runners(), max_batch_texts=64, max_wait_s=max_wait_s)
    batcher.start()
    app = create_app(registry, batcher, limits or Limits(), access)
    port = free_port()
    config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", limit_concurrency=64)
    uv = uvicorn.Server(config)
    thread = threading.Thread(target=uv.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not uv.started:
        assert time.monotonic() < deadline and thread.is_alive(), "server did not start"
        time.sleep(0.05)
    url = f"http://127.0.0.1:{port}"
    APPS[url] = app
    try:
        yield url
    finally:
        APPS.pop(url, None)
        uv.should_exit = True
        thread.join(timeout=10)
        batcher.stop()


@pytest.fixture(scope="module")
def server(runs):
    """Serving sentiment and three, loads on with the admin token, from the runs' directory (the adapter root)."""
    registry = AdapterRegistry("cpu")
    for name in ("sentiment", "three"):
        registry.attach(read_adapter(str(runs[name])))
    access = Access(admin_token=TOKEN, adapter_root=runs["sentiment"].parent)
    with serving(registry, access, Limits(max_texts=MAX_TEXTS, max_body_bytes=4096)) as url:
        yield url


def classify(url: str, adapter: str, texts: list) -> httpx.Response:
    return httpx.post(f"{url}/v1/classify", json={"adapter": adapter, "texts": texts}, timeout=60)


def probabilities(response: httpx.Response) -> torch.Tensor:
    assert response.status_code == 200, response.text
    return torch.tensor([list(p["probabilities"].values()) for p in response.json()["predictions"]])


def test_classify_matches_the_run_loaded_alone(server, reference, runs):
    for name, labels in (("sentiment", ["neg", "pos"]), ("three", ["neg", "mixed", "pos"])):
        response = classify(server, name, TEXTS + [LONG_TEXT])
        body = response.json()
        assert body["adapter"] == name
        torch.testing.assert_close(probabilities(response), reference[name], atol=1e-5, rtol=0)
        for prediction in body["predictions"]:
            assert list(prediction["probabilities"]) == labels
            assert prediction["label"] == max(prediction["probabilities"], key=prediction["probabilities"].get)
            assert prediction["probability"] == prediction["probabilities"][prediction["label"]]
        assert [p["truncated"] for p in body["predictions"]] == [False] * len(TEXTS) + [True]


def test_requests_for_different_adapters_share_batches(server, reference):
    before = httpx.get(f"{server}/healthz").json()
    jobs = [("sentiment" if i % 2 else "three", TEXTS[i % len(TEXTS) :][:2]) for i in range(24)]
    with ThreadPoolExecutor(max_workers=24) as pool:
        responses = list(pool.map(lambda job: classify(server, *job), jobs))
    for (name, texts), response in zip(jobs, responses, strict=True):
        start = TEXTS.index(texts[0])
        torch.testing.assert_close(
            probabilities(response), reference[name][start : start + len(texts)], atol=1e-5, rtol=0
        )
    after = httpx.get(f"{server}/healthz").json()
    assert after["requests"] - before["requests"] == 24
    assert after["batches"] - before["batches"] < 24  # some requests shared a forward
    assert after["busy_s"] > before["busy_s"]  # the worker's time in batches is counted


def test_fan_out_request_answers_every_adapter_from_one_batch(server, reference):
    """One text, several adapters: the same probabilities as one request per adapter, from one worker batch."""
    before = httpx.get(f"{server}/healthz").json()
    response = httpx.post(
        f"{server}/v1/classify", json={"adapters": ["three", "sentiment"], "texts": TEXTS[:3]}, timeout=60
    )
    after = httpx.get(f"{server}/healthz").json()
    assert response.status_code == 200, response.text
    results = response.json()["results"]
    assert [r["adapter"] for r in results] == ["three", "sentiment"]
    for result in results:
        served = torch.tensor([list(p["probabilities"].values()) for p in result["predictions"]])
        torch.testing.assert_close(served, reference[result["adapter"]][:3], atol=1e-5, rtol=0)
    assert (after["requests"] - before["requests"], after["batches"] - before["batches"]) == (2, 1)


@pytest.mark.parametrize("how, forwards", [("grouped", 2), ("peft", 2), ("alone", 4)])
def test_shared_and_per_adapter_forwards_agree(runs, reference, how, forwards):
    """The rows of a shared forward get what their adapter alone gives (predict.py): grouped (the default where the
    LoRA layers allow, lora_train/serving/grouped.py) and peft's mixed batch (2- and 3-class heads in one forward
    either way), and one forward per adapter; also for an adapter that trained BERT's pooler (served with its head
    narrowed to ``pooler.dense``, so it shares forwards too). These are the GPU's forwards (the CPU merges plain
    LoRA, lora_train/merged.py); the CPU runs them here with merging off."""
    registry = AdapterRegistry("cpu", mix=how == "peft", group=how == "grouped", merge=False)
    adapters = [read_adapter(str(runs[name])) for name in ("pooled", "sentiment", "three", "sentiment_b")]
    for adapter in adapters:
        registry.attach(adapter)
    assert all(adapter.mix_key and adapter.groupable for adapter in adapters)
    assert "pooler.dense" in registry.model.peft_config["pooled"].modules_to_save
    requests = [(a.name, a.encode(TEXTS)[0]) for a in adapters] * 2
    calls = []
    hook = registry.model.register_forward_hook(lambda *_: calls.append(1))
    registry.forward_cost_tokens = 10**6  # no split by text length: the heads alone decide
    served = registry.classify(requests)
    hook.remove()
    assert len(calls) == forwards  # shared: pooled's heads, then the other three
    for (name, _), got in zip(requests, served, strict=True):
        torch.testing.assert_close(got, reference[name][: len(TEXTS)], atol=1e-5, rtol=0)


def test_a_grouped_bf16_forward_gives_each_row_its_adapter_alone_result(runs):
    """Under bf16 autocast every rounding counts: a grouped forward of a 2-class and a 3-class adapter equals one
    forward per adapter over the same texts (so the same padded length) to the bit."""
    registry = AdapterRegistry("cpu", forward_cost_tokens=10**6, merge=False)
    adapters = [read_adapter(str(runs[name])) for name in ("bf16", "bf16_three")]
    for adapter in adapters:
        registry.attach(adapter)
    requests = [(a.name, a.encode(TEXTS)[0]) for a in adapters]
    assert registry._group_of(adapters[0]) == registry._group_of(adapters[1])
    grouped = registry.classify(requests)
    one_grouped = [registry.classify([request])[0] for request in requests]  # one adapter, still grouped
    registry.group = False
    alone = registry.classify(requests)  # peft's own forward, one adapter at a time (set_adapter)
    for got, one, single in zip(grouped, one_grouped, alone, strict=True):
        torch.testing.assert_close(got, single, atol=0, rtol=0)
        torch.testing.assert_close(one, single, atol=0, rtol=0)


def test_merged_adapters_answer_as_predict_to_the_bit_and_as_the_unmerged_forward_up_to_rounding(runs):
    """On a CPU the server and predict.py merge plain LoRA into copies of the base's weights (lora_train/merged.py):
    under bf16 the server's rows equal predict.py's to the bit (same texts, so the same padded length), for a 2- and
    a 3-class adapter in one worker batch; the merged forward differs from training's unmerged one (eval.py) by
    rounding alone; in float32 it is the unmerged forward to 1e-5 (a wrong merge, e.g. without the scaling, fails)."""
    from peft import PeftModel

    registry = AdapterRegistry("cpu", forward_cost_tokens=10**6)
    adapters = [read_adapter(str(runs[name])) for name in ("bf16", "bf16_three")]
    for adapter in adapters:
        registry.attach(adapter)
    assert registry._peft_model() is None and not any(adapter.is_peft for adapter in adapters)
    served = registry.classify([(a.name, a.encode(TEXTS)[0]) for a in adapters])
    for adapter, got in zip(adapters, served, strict=True):
        merged = load_run(str(runs[adapter.name]), device="cpu")
        unmerged = load_run(str(runs[adapter.name]), device="cpu", merge=False)
        assert not isinstance(merged.model, PeftModel) and isinstance(unmerged.model, PeftModel)
        expected = torch.tensor([list(r["probabilities"].values()) for r in predict(merged, TEXTS)])
        torch.testing.assert_close(got, expected, atol=0, rtol=0)
        training = torch.tensor([list(r["probabilities"].values()) for r in predict(unmerged, TEXTS)])
        torch.testing.assert_close(expected, training, atol=4e-3, rtol=0)
    for name in ("sentiment", "three", "pooled"):  # float32; "pooled" also trained BERT's pooler
        merged, unmerged = (load_run(str(runs[name]), device="cpu", merge=merge) for merge in (True, False))
        assert not isinstance(merged.model, PeftModel)
        got = torch.tensor([list(r["probabilities"].values()) for r in predict(merged, TEXTS)])
        expected = torch.tensor([list(r["probabilities"].values()) for r in predict(unmerged, TEXTS)])
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


def test_merged_forwards_run_the_real_tokens_only_in_one_forward_as_predict(runs):
    """A merging server's forward of one adapter skips the padding (lora_train.modeling.packed_tokens): texts of very
    different lengths run as one forward whose products see only their real tokens, not split by length, and answer
    as predict.py over the same texts; an unmerged (grouped) forward keeps the padded batch."""
    texts = [LONG_TEXT, *TEXTS]
    rows = {}
    for merge in (True, False):
        registry = AdapterRegistry("cpu", merge=merge)
        registry.attach(read_adapter(str(runs["bf16"])))
        features, _ = registry.get("bf16").encode(texts)
        real = sum(len(f["input_ids"]) for f in features)
        base = registry.model.get_base_model() if registry._peft_model() else registry.model
        dense = base.bert.encoder.layer[0].intermediate.dense
        seen = []
        hook = dense.register_forward_hook(lambda m, args, out, seen=seen: seen.append(args[0].shape[:-1]))
        [served] = registry.classify([("bf16", features)])
        hook.remove()
        rows[merge] = seen
        expected = predict(load_run(str(runs["bf16"]), device="cpu", merge=merge), texts)
        torch.testing.assert_close(served, torch.tensor([list(r["probabilities"].values()) for r in expected]))
    assert len(rows[True]) == 1 and len(rows[True][0]) == 1  # one forward, over packed token rows
    assert real <= rows[True][0][0] < len(texts) * 32  # the real tokens (up to a bf16 bucket), not 6 x 32 padded
    assert all(len(shape) == 2 for shape in rows[False])  # (texts, positions): the padded batch


def test_no_merge_serves_the_unmerged_forward_as_predict_no_merge(runs):
    """``lora-serve --no-merge`` (every worker's registry) keeps LoRA adapters in the PeftModel, grouped in shared
    forwards, and answers as ``predict.py --no-merge``; under bf16, bit for bit over the same texts."""
    assert registry_for(build_parser().parse_args(["x", "--device", "cpu"])).primary.merge  # the CPU's default
    registry = registry_for(build_parser().parse_args(["x", "--no-merge", "--workers", "2", "--device", "cpu"]))
    for name in ("bf16", "bf16_three"):
        registry.attach(read_adapter(str(runs[name])))
    assert all(replica.get(name).groupable for replica in registry.replicas for name in ("bf16", "bf16_three"))
    for name in ("bf16", "bf16_three"):
        [served] = registry.replicas[1].classify([(name, registry.get(name).encode(TEXTS)[0])])
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            assert predict_main([str(runs[name]), *TEXTS, "--json", "--device", "cpu", "--no-merge"]) == 0
        rows = [json.loads(line) for line in out.getvalue().splitlines()]
        expected = torch.tensor([list(row["probabilities"].values()) for row in rows])
        torch.testing.assert_close(served, expected, atol=0, rtol=0)


def test_only_plain_lora_merges(runs, pooled_bert_dir):
    """DoRA, a LoRA bias, an adapter that trained the base's biases and AdaLoRA keep the unmerged forward: their
    update is not one weight per layer, or reaches past the Linear weights."""
    from peft import AdaLoraConfig, LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForSequenceClassification

    from lora_train.merged import mergeable

    def built(config) -> bool:
        model = AutoModelForSequenceClassification.from_pretrained(pooled_bert_dir)
        return mergeable(get_peft_model(model, config), "default")

    targets = {"target_modules": ["query", "value"], "modules_to_save": ["classifier"]}
    assert built(LoraConfig(r=2, **targets))
    assert not built(LoraConfig(r=2, use_dora=True, **targets))
    assert not built(LoraConfig(r=2, lora_bias=True, **targets))
    assert not built(LoraConfig(r=2, bias="all", **targets))
    assert not built(AdaLoraConfig(r=2, total_step=10, **targets))
    assert isinstance(load_run(str(runs["lora_bias"]), device="cpu").model, PeftModel)


def test_adalora_adapters_are_served_one_forward_each(tmp_path, pooled_bert_dir, toy_data_dir):
    """peft cannot mix AdaLoRA adapters: each runs alone (set_adapter) and gives its own run's probabilities."""
    registry = AdapterRegistry("cpu")
    runs = {}
    for name, seed in (("ada_a", 1), ("ada_b", 2)):
        runs[name] = train_tiny(
            tmp_path, name, pooled_bert_dir, toy_data_dir, peft={"method": "adalora"}, training={"seed": seed}
        )
        registry.attach(read_adapter(str(runs[name])))
    assert [registry.get(name).mix_key for name in runs] == [None, None]
    requests = [(name, registry.get(name).encode(TEXTS)[0]) for name in runs] * 2
    for (name, _), served in zip(requests, registry.classify(requests), strict=True):
        alone = predict(load_run(str(runs[name]), device="cpu"), TEXTS)
        torch.testing.assert_close(served, torch.tensor([list(r["probabilities"].values()) for r in alone]))


def served_alone_and_together(registry: AdapterRegistry, names: list[str], reference) -> None:
    """Each adapter's texts classified in one worker batch with every other adapter's, twice over: each gets its own
    run's probabilities, and the base model's parameters are as they were."""
    before = {key: value.clone() for key, value in registry.model.state_dict().items()}
    requests = [(name, registry.get(name).encode(TEXTS + [LONG_TEXT])[0]) for name in names] * 2
    for (name, _), served in zip(requests, registry.classify(requests), strict=True):
        torch.testing.assert_close(served, reference[name], atol=1e-5, rtol=0)
    after = registry.model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


@pytest.mark.parametrize("merge", [True, False])
def test_bitfit_and_head_only_runs_are_served_beside_lora_adapters(runs, reference, merge):
    """A BitFit run (3 classes, on a base loaded for a 2-class adapter) and a head-only run share the server with LoRA
    adapters, one with BERT's pooler as a head, merged (the CPU's default) or in the PeftModel; each answers as
    scripts/predict.py does. The last LoRA adapter unloads (the base is unwrapped) and a LoRA adapter loads after."""
    registry = AdapterRegistry("cpu", merge=merge)
    for name in ("sentiment", "bitfit", "pooled", "head_only", "three"):
        registry.attach(read_adapter(str(runs[name])))
    listing = {a["name"]: a for a in registry.describe()}
    assert listing["bitfit"]["peft_type"] == "BITFIT" and listing["head_only"]["peft_type"] == "HEAD_ONLY"
    assert listing["sentiment"]["peft_type"] == "LORA" and listing["bitfit"]["labels"] == ["neg", "mixed", "pos"]
    assert registry.get("bitfit").mix_key is None and registry.get("sentiment").is_peft is not merge
    assert (registry.get("sentiment").mix_key is not None) is not merge
    served_alone_and_together(registry, ["sentiment", "bitfit", "pooled", "head_only", "three"], reference)
    for name in ("bitfit", "pooled", "three", "sentiment"):
        registry.detach(registry.mark_unloading(name).name)
    assert registry._peft_model() is None
    served_alone_and_together(registry, ["head_only"], reference)
    registry.attach(read_adapter(str(runs["sentiment"])))
    served_alone_and_together(registry, ["sentiment", "head_only"], reference)


def test_a_server_started_with_trained_tensor_runs_takes_lora_adapters_after(runs, reference):
    """The base loaded for a 3-class BitFit run becomes a PeftModel at the first LoRA adapter (2 classes), and every
    run keeps its own answers; under bf16 autocast too, where the base's Linears are stored in bf16."""
    registry = AdapterRegistry("cpu")
    for name in ("bitfit", "head_only"):
        registry.attach(read_adapter(str(runs[name])))
    served_alone_and_together(registry, ["bitfit", "head_only"], reference)
    for name in ("sentiment", "three"):
        registry.attach(read_adapter(str(runs[name])))
    served_alone_and_together(registry, ["bitfit", "sentiment", "head_only", "three"], reference)

    bf16 = AdapterRegistry("cpu")
    for name in ("bitfit_bf16", "bf16"):
        bf16.attach(read_adapter(str(runs[name])))
    assert bf16._base_model.classifier.weight.dtype == torch.bfloat16  # the base's own head, stored in bf16
    served_alone_and_together(bf16, ["bitfit_bf16", "bf16"], reference)
    with pytest.raises(ServingError, match="was trained on .* autocast bf16"):
        bf16.attach(read_adapter(str(runs["bitfit"])))  # float32-trained: another base, as for LoRA adapters


def test_an_adapter_that_trained_the_base_biases_is_served_alone(runs, reference):
    """peft loads a bias='all' LoRA adapter's biases into the shared base: beside it a head-only run (or another
    LoRA adapter) would answer with those biases (a head-only run was 0.024 off in probability), so it is refused
    beside anything, and anything beside it."""
    registry = AdapterRegistry("cpu")
    registry.attach(read_adapter(str(runs["head_only"])))
    with pytest.raises(ServingError, match="'lora_bias' trained the base model's biases \\(peft bias = 'all'\\)"):
        registry.attach(read_adapter(str(runs["lora_bias"])))
    alone = AdapterRegistry("cpu")
    alone.attach(read_adapter(str(runs["lora_bias"])))
    for other in ("head_only", "sentiment"):
        with pytest.raises(ServingError, match="serve it from a server of its own, or retrain it with peft.bias=none"):
            alone.attach(read_adapter(str(runs[other])))
    served = alone.classify([("lora_bias", alone.get("lora_bias").encode(TEXTS)[0])])[0]
    expected = predict(load_run(str(runs["lora_bias"]), device="cpu"), TEXTS)
    torch.testing.assert_close(served, torch.tensor([list(r["probabilities"].values()) for r in expected]))


def test_a_first_lora_adapter_that_fails_to_load_leaves_the_trained_tensor_runs_serving(runs, reference, tmp_path):
    """A LoRA adapter whose weights do not load, hot-loaded onto a server of BitFit / head-only runs, is removed
    with the peft wrapping it started; the runs answer as before, and a good adapter loads after it."""
    from safetensors.torch import load_file, save_file

    broken = tmp_path / "broken_lora"
    shutil.copytree(runs["sentiment"], broken)
    tensors = load_file(broken / "adapter_model.safetensors")
    name = next(key for key in tensors if "lora_A" in key)
    tensors[name] = torch.zeros(tensors[name].shape[0] + 1, tensors[name].shape[1])  # another rank than the config's
    save_file(tensors, broken / "adapter_model.safetensors")
    registry = AdapterRegistry("cpu")
    for run in ("bitfit", "head_only"):
        registry.attach(read_adapter(str(runs[run])))
    with pytest.raises(ServingError, match="(?s)cannot load adapter 'broken_lora'.*size mismatch"):
        registry.attach(read_adapter(str(broken)))
    assert registry.model is registry._base_model and registry.names() == ["bitfit", "head_only"]
    served_alone_and_together(registry, ["bitfit", "head_only"], reference)
    registry.attach(read_adapter(str(runs["sentiment"])))
    served_alone_and_together(registry, ["bitfit", "sentiment", "head_only"], reference)


def test_trained_tensors_of_another_base_are_refused_naming_them(runs, tmp_path):
    """A run whose trained.safetensors does not fit the base its recipe names is refused at load, naming the tensor."""
    from safetensors.torch import load_file, save_file

    broken = tmp_path / "broken"
    shutil.copytree(runs["head_only"], broken)
    tensors = load_file(broken / "trained.safetensors")
    tensors["bert.encoder.layer.0.output.dense.bias"] = torch.zeros(7)
    tensors["bert.encoder.layer.9.output.dense.bias"] = torch.zeros(64)
    save_file(tensors, broken / "trained.safetensors")
    registry = AdapterRegistry("cpu")
    registry.attach(read_adapter(str(runs["sentiment"])))
    with pytest.raises(ServingError) as refused:
        registry.attach(read_adapter(str(broken)))
    assert refused.value.status == 400
    assert "bert.encoder.layer.0.output.dense.bias (7,) (model: (64,))" in refused.value.message
    assert "bert.encoder.layer.9.output.dense.bias (64,) (absent)" in refused.value.message
    assert registry.names() == ["sentiment"]


def test_length_buckets_split_where_padding_costs_more_than_a_forward():
    def cost(buckets, lengths, per_forward):
        return sum(per_forward + len(b) * max(lengths[i] for i in b) for b in buckets)

    sentences_and_reviews = [25, 256, 20, 30, 256, 8, 40, 11, 16, 23]
    assert [sorted(b) for b in length_buckets(sentences_and_reviews, 128)] == [[0, 2, 3, 5, 6, 7, 8, 9], [1, 4]]
    assert length_buckets([30] * 8, 128) == [list(range(8))]
    assert len(length_buckets(sentences_and_reviews, 10**6)) == 1  # forwards dearer than any padding
    assert length_buckets([], 128) == []
    rng = random.Random(0)
    for _ in range(200):  # the least cost over every split of the sorted lengths into runs
        lengths = [rng.randint(1, 300) for _ in range(rng.randint(1, 8))]
        per_forward = rng.choice([0, 16, 128, 1024])
        buckets = length_buckets(lengths, per_forward)
        assert sorted(i for b in buckets for i in b) == list(range(len(lengths)))
        order = sorted(range(len(lengths)), key=lengths.__getitem__)
        splits = (
            [order[a:b] for a, b in zip((0, *cuts), (*cuts, len(order)))]
            for k in range(len(order))
            for cuts in itertools.combinations(range(1, len(order)), k)
        )
        assert cost(buckets, lengths, per_forward) == min(cost(s, lengths, per_forward) for s in splits)


def test_list_health_ready_schema_and_page(server, runs):
    listing = httpx.get(f"{server}/v1/adapters").json()
    assert [a["name"] for a in listing] == ["sentiment", "three"]
    three = next(a for a in listing if a["name"] == "three")
    metrics = json.loads((runs["three"] / "metrics.json").read_text())
    assert three["labels"] == ["neg", "mixed", "pos"] and three["task"] == "custom" and three["peft_type"] == "LORA"
    assert three["metrics"]["eval_accuracy"] == metrics["eval_accuracy"]
    assert "pooled_bert" in three["base_model"] and "quantization none" in three["base_model"]
    assert httpx.get(f"{server}/v1/adapters/three").json() == three
    assert httpx.get(f"{server}/healthz").json()["status"] == "ok"
    assert httpx.get(f"{server}/readyz").json() == {"ready": True, "adapters": ["sentiment", "three"]}
    schema = httpx.get(f"{server}/openapi.json").json()
    assert {"/v1/classify", "/v1/adapters", "/v1/adapters/{name}", "/healthz", "/readyz"} <= set(schema["paths"])
    page = httpx.get(server)
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert '<select id="adapter"' in page.text and "/v1/classify" in page.text
    assert "src=" not in page.text and "https://" not in page.text  # no CDN: works offline


def test_hot_load_and_unload(server, runs, reference):
    response = httpx.post(
        f"{server}/v1/adapters", json={"source": "sentiment_b", "name": "late"}, headers=ADMIN, timeout=60
    )
    assert response.status_code == 201, response.text
    assert response.json()["name"] == "late" and response.json()["source"] == "sentiment_b"
    torch.testing.assert_close(
        probabilities(classify(server, "late", TEXTS)), reference["sentiment_b"][: len(TEXTS)], atol=1e-5, rtol=0
    )
    assert "late" in httpx.get(f"{server}/readyz").json()["adapters"]
    assert httpx.delete(f"{server}/v1/adapters/late", headers=ADMIN, timeout=60).json() == {"unloaded": "late"}
    gone = classify(server, "late", TEXTS)
    assert gone.status_code == 404 and "'late' is not loaded" in gone.json()["detail"]
    assert httpx.delete(f"{server}/v1/adapters/late", headers=ADMIN).status_code == 404
    torch.testing.assert_close(
        probabilities(classify(server, "sentiment", TEXTS)), reference["sentiment"][: len(TEXTS)], atol=1e-5, rtol=0
    )


def test_hot_load_of_bitfit_and_head_only_runs(server, runs, reference):
    """BitFit and head-only runs load while serving, answer like scripts/predict.py alone and in a fan-out request
    beside a LoRA adapter, and unload."""
    for source in ("bitfit", "head_only"):
        response = httpx.post(f"{server}/v1/adapters", json={"source": source}, headers=ADMIN, timeout=60)
        assert response.status_code == 201, response.text
        assert response.json()["peft_type"] == source.upper()
        torch.testing.assert_close(probabilities(classify(server, source, TEXTS)), reference[source][: len(TEXTS)])
    fan_out = httpx.post(
        f"{server}/v1/classify", json={"adapters": ["bitfit", "sentiment", "head_only"], "texts": TEXTS[:2]}, timeout=60
    )
    assert fan_out.status_code == 200, fan_out.text
    for result in fan_out.json()["results"]:
        served = torch.tensor([list(p["probabilities"].values()) for p in result["predictions"]])
        torch.testing.assert_close(served, reference[result["adapter"]][:2], atol=1e-5, rtol=0)
    for source in ("bitfit", "head_only"):
        assert httpx.delete(f"{server}/v1/adapters/{source}", headers=ADMIN, timeout=60).json() == {"unloaded": source}
    assert [a["name"] for a in httpx.get(f"{server}/v1/adapters").json()] == ["sentiment", "three"]


def test_unload_while_requests_are_in_flight(server, runs, reference):
    assert (
        httpx.post(
            f"{server}/v1/adapters", json={"source": "sentiment_b", "name": "busy"}, headers=ADMIN, timeout=60
        ).status_code
        == 201
    )
    with ThreadPoolExecutor(max_workers=17) as pool:
        requests = [pool.submit(classify, server, "busy", TEXTS) for _ in range(16)]
        time.sleep(0.02)
        unload = pool.submit(httpx.delete, f"{server}/v1/adapters/busy", headers=ADMIN, timeout=60)
        statuses = []
        for future in requests:
            response = future.result()
            statuses.append(response.status_code)
            if response.status_code == 200:  # finished with the adapter's own weights
                torch.testing.assert_close(
                    probabilities(response), reference["sentiment_b"][: len(TEXTS)], atol=1e-5, rtol=0
                )
            else:  # or a clean 404 that says why
                assert response.status_code == 404 and "busy" in response.json()["detail"]
        assert unload.result().status_code == 200
    assert 200 in statuses
    assert httpx.get(f"{server}/healthz").json()["status"] == "ok"
    assert classify(server, "sentiment", TEXTS).status_code == 200


def test_the_last_adapter_cannot_be_unloaded(runs):
    registry = AdapterRegistry("cpu")
    registry.attach(read_adapter(str(runs["sentiment"])))
    with pytest.raises(ServingError, match="'sentiment' is the last loaded adapter; load another before unloading it"):
        registry.mark_unloading("sentiment")
    assert registry.names() == ["sentiment"]


@pytest.mark.parametrize(
    "body, status, message",
    [
        (
            {"adapter": "nope", "texts": ["a"]},
            404,
            "adapter 'nope' is not loaded; loaded adapters: ['sentiment', 'three']",
        ),
        ({"adapter": "sentiment", "texts": []}, 422, "at least 1 item"),
        ({"adapter": "sentiment", "texts": [""]}, 422, "text must not be empty or whitespace only"),
        ({"adapter": "sentiment", "texts": ["ok", "  \n"]}, 422, "text must not be empty or whitespace only"),
        (
            {"adapter": "sentiment", "texts": ["x"] * (MAX_TEXTS + 1)},
            413,
            f"9 texts in one request; at most {MAX_TEXTS}",
        ),
        ({"adapter": "sentiment", "texts": ["good " * 1000]}, 413, "request body over 4096 bytes"),
        ({"adapter": "sentiment", "texts": "good"}, 422, "Input should be a valid list"),
        ({"adapter": "sentiment", "texts": [1, 2]}, 422, "Input should be a valid string"),
        ({"adapter": 3, "texts": ["good"]}, 422, "Input should be a valid string"),
        ({"texts": ["good"]}, 422, "give either adapter (one name) or adapters (a list of names)"),
        ({"adapter": "three", "adapters": ["sentiment"], "texts": ["good"]}, 422, "not both or neither"),
        ({"adapters": ["three", "three"], "texts": ["good"]}, 422, "name an adapter twice"),
        ({"adapters": [], "texts": ["good"]}, 422, "at least 1 item"),
        ({"adapters": ["three", "nope"], "texts": ["good"]}, 404, "adapter 'nope' is not loaded"),
        ({"adapters": ["three", "sentiment"], "texts": ["x"] * 5}, 413, "5 texts x 2 adapters in one request"),
        ({"adapter": "sentiment", "texts": ["good"], "top_k": 2}, 422, "Extra inputs are not permitted"),
    ],
)
def test_bad_classify_requests_get_clear_errors(server, body, status, message):
    response = httpx.post(f"{server}/v1/classify", json=body, timeout=60)
    assert response.status_code == status
    assert message in json.dumps(response.json()["detail"])


def test_malformed_json_and_bad_loads_get_clear_errors(server, runs, tmp_path):
    bad_json = httpx.post(
        f"{server}/v1/classify",
        content=b'{"adapter": "sentiment", "texts": [',
        headers={"content-type": "application/json"},
    )
    assert bad_json.status_code == 422 and "JSON decode error" in bad_json.text

    def load(source, name=None):
        return httpx.post(f"{server}/v1/adapters", json={"source": source, "name": name}, headers=ADMIN, timeout=60)

    root = runs["sentiment"].parent
    (root / "not_a_run").mkdir(exist_ok=True)
    not_a_run = load("not_a_run")
    assert (
        not_a_run.status_code == 400
        and "'not_a_run' is not a lora_train run: it lacks ['recipe.yaml', 'labels.json']" in not_a_run.text
    )
    full = load("full")
    assert full.status_code == 400 and "holds a full model (every weight trained" in full.json()["detail"]
    assert "classify with it through scripts/predict.py" in full.json()["detail"]
    missing = load("nowhere")
    assert missing.status_code == 400 and "must be a run directory under the server's adapter root" in missing.text
    other = load("other_base").json()["detail"]
    assert "was trained on" in other and "tiny_bert" in other and "pooled_bert" in other  # names both bases
    assert str(root) not in other and str(tmp_path.parent.parent) not in other  # no server paths
    taken = load("sentiment_b", "three")
    assert taken.status_code == 409 and "an adapter named 'three' is already loaded" in taken.text
    assert load("sentiment_b", "bad.name").status_code == 422
    module_name = load("sentiment_b", "classifier")
    assert module_name.status_code == 422 and "is also the name of a module of the base model" in module_name.text
    assert [a["name"] for a in httpx.get(f"{server}/v1/adapters").json()] == ["sentiment", "three"]
    assert classify(server, "sentiment", TEXTS).status_code == 200  # still serving


def test_command_line_refuses_adapters_of_different_bases(runs, capsys):
    assert serve_main([str(runs["sentiment"]), str(runs["other_base"]), "--port", str(free_port())]) == 2
    err = capsys.readouterr().err
    assert "one server holds one base model" in err and "tiny_bert" in err and "pooled_bert" in err
    assert build_parser().parse_args(["run"]).host == "127.0.0.1"  # loopback unless asked
    # BitFit / head-only runs go beside LoRA adapters of their base, in any order
    runs_in_order = [str(runs[name]) for name in ("bitfit", "sentiment", "head_only", "three")]
    assert [a.name for a in read_all(runs_in_order)] == ["bitfit", "sentiment", "head_only", "three"]


def test_load_test_table_names_the_causes_of_errors():
    from lora_lab.serve_bench import SetupResult, markdown_table

    ok = SetupResult("unbatched", 1, 100, 0, {}, 10.0, 50.0, 90.0, 1.0, 0.8, 80.0, 600.0, 610.0)
    causes = {"503 queue full": 2, "422 blank text": 1}
    failing = SetupResult("batched", 1, 90, 3, causes, 9.0, 60, 99, 4.0, 0.55, 61.25, 650, 660)
    table = markdown_table([ok, failing])
    assert "| batched | 1 | 9.0 | 60 | 99 | 90 (3) | 4.0 | 61.2 | 55% | 650 | 660 |" in table
    assert table.endswith("Errors:\n- batched: 2 x 503 queue full\n- batched: 1 x 422 blank text")
    assert "Errors" not in markdown_table([ok])


def test_forward_costs_time_each_adapter_alone_and_batched(runs):
    from lora_lab.serve_bench import forward_cost_table, forward_costs

    names = ["sentiment", "three"]
    rows = forward_costs([str(runs[n]) for n in names], names, texts_per_adapter=8, batch_size=4, repeats=1)
    assert [r["adapter"] for r in rows] == names
    for r in rows:
        assert r["ms_per_text_alone"] > 0 and r["ms_per_text_batched"] > 0 and r["mean_tokens"] > 1
        assert r["bound"] == pytest.approx(r["ms_per_text_alone"] / r["ms_per_text_batched"])
    table = forward_cost_table(rows, batch_size=4).splitlines()
    assert "4 per forward" in table[0] and len(table) == 2 + len(names)
    assert table[3].startswith(f"| three | {rows[1]['threads']} | {rows[1]['mean_tokens']:.0f} |")


def test_each_adapter_serves_in_its_training_precision_with_few_padded_lengths(runs):
    """A bf16-trained adapter is served under bf16 autocast, as predict and eval score it; batches are padded to
    the bf16 CPU padding lengths, so a long-running server compiles few oneDNN kernels."""
    registry = AdapterRegistry("cpu")
    adapter = read_adapter(str(runs["bf16"]))
    registry.attach(adapter)
    assert adapter.recipe.training.mixed_precision == "bf16"
    widths: list[int] = []
    registry.model.register_forward_pre_hook(
        lambda _, args, kwargs: widths.append(kwargs["input_ids"].shape[1]), with_kwargs=True
    )
    texts = TEXTS + [LONG_TEXT]
    [served] = registry.classify([("bf16", adapter.encode(texts)[0])])
    expected = predict(load_run(str(runs["bf16"]), device="cpu"), texts)
    torch.testing.assert_close(
        served, torch.tensor([list(r["probabilities"].values()) for r in expected]), atol=4e-3, rtol=0
    )
    assert widths and all(w in padding_lengths(adapter.max_length) for w in widths)

    # The base's weights and the adapter's merged ones are stored in bf16 once, not cast at every forward; so the
    # server holds one precision.
    assert registry.model.bert.encoder.layer[0].attention.self.query.weight.dtype == torch.bfloat16
    assert adapter.trained["bert.encoder.layer.0.attention.self.query.weight"].dtype == torch.bfloat16
    with pytest.raises(ServingError, match="autocast no.*autocast bf16") as refused:
        registry.check_can_attach(read_adapter(str(runs["sentiment"])))
    assert refused.value.status == 409


def test_frozen_linears_stored_in_the_autocast_dtype_give_the_same_logits(runs):
    """Autocast casts float32 weights at every forward; storing the frozen base weights in its dtype once must give
    bit-identical outputs, and leave the adapter's own layers (LoRA, head) as they were; storing those too (the
    server, and load_run for predict and eval) must again give bit-identical outputs."""
    from peft import PeftModel

    from lora_train.inference import load_base_for_run, store_frozen_linears_in

    run = load_run(str(runs["bf16"]), device="cpu")
    assert store_frozen_linears_in(run.model, torch.bfloat16) == 0  # load_run did it already
    base = load_base_for_run(run.recipe, run.label_names, run.tokenizer, torch.device("cpu"))
    run.model = PeftModel.from_pretrained(base, runs["bf16"]).eval()
    batch = run.tokenizer(TEXTS + [LONG_TEXT], padding=True, truncation=True, max_length=32, return_tensors="pt")
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        before = run.model(**batch).logits
        assert store_frozen_linears_in(run.model, torch.bfloat16) > 0
        after = run.model(**batch).logits
    assert torch.equal(before, after)
    dtypes = {name: p.dtype for name, p in run.model.named_parameters()}
    assert all(dtypes[n] == torch.float32 for n in dtypes if "lora_" in n or "modules_to_save" in n)
    assert any(d == torch.bfloat16 for n, d in dtypes.items() if n.endswith("base_layer.weight"))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert store_frozen_linears_in(run.model, torch.bfloat16, adapters_too=True) > 0
        assert torch.equal(run.model(**batch).logits, before)
    assert {p.dtype for n, p in run.model.named_parameters() if "lora_" in n} == {torch.bfloat16}


def test_concurrent_encodes_keep_the_adapters_truncation(runs):
    """HTTP handlers tokenize in a thread pool; a fast tokenizer's truncation settings are shared state, so without
    the adapter's tokenizer lock a text could come back uncut and fail its whole batch."""
    adapter = read_adapter(str(runs["sentiment"]))
    very_long = " ".join([LONG_TEXT] * 10)

    def longest(i: int) -> int:
        features, truncated = adapter.encode([very_long, TEXTS[i % len(TEXTS)]])
        assert truncated == [True, False]
        return max(len(f["input_ids"]) for f in features)

    with ThreadPoolExecutor(max_workers=8) as pool:
        assert max(pool.map(longest, range(400))) <= adapter.max_length


# ---------------------------------------------------------------------------------------------
# Safe to expose: every route is safe for any caller that reaches the port (docs/serving.md, Security model)


def plant_leftovers(directory: Path) -> dict[Path, str]:
    """Folders named like the leftovers of an interrupted replace, beside and inside ``directory``, with a file
    each; returns what they hold so a test can check that they survive."""
    planted = {}
    for folder in (
        directory.parent / f".{directory.name}.old-123",
        directory.parent / ".photos.old-1",
        directory / ".best.old-7",
        directory / ".x.old-1",
    ):
        folder.mkdir(parents=True)
        (folder / "keep.txt").write_text(str(folder))
        planted[folder / "keep.txt"] = str(folder)
    return planted


def test_a_refused_source_leaves_the_filesystem_as_it_was(server, runs, tmp_path):
    """Before: POST /v1/adapters {"source": ".../data"} deleted the sibling .data.old-123/ and renamed
    .photos.old-1 to photos while answering 400. Now nothing is renamed or deleted, by the route or the reader."""
    data = tmp_path / "some" / "data"
    data.mkdir(parents=True)
    planted = plant_leftovers(data)
    inside_root = runs["sentiment"].parent / "data_like"
    inside_root.mkdir()
    planted |= plant_leftovers(inside_root)
    before = sorted(str(p) for p in tmp_path.rglob("*")) + sorted(str(p) for p in inside_root.parent.rglob("*"))
    for source in (str(data), str(data / "best"), str(tmp_path / "some" / "photos"), "data_like", "data_like/best"):
        response = httpx.post(f"{server}/v1/adapters", json={"source": source}, headers=ADMIN, timeout=60)
        assert response.status_code == 400, response.text
        with pytest.raises(ServingError):
            read_adapter(source if source.startswith("/") else str(inside_root.parent / source))
    after = sorted(str(p) for p in tmp_path.rglob("*")) + sorted(str(p) for p in inside_root.parent.rglob("*"))
    assert after == before
    assert {path: path.read_text() for path in planted} == planted


def test_hot_load_and_unload_need_the_admin_token(server, runs):
    body = {"source": "sentiment_b", "name": "intruder"}
    for headers in ({}, {"Authorization": "Bearer wrong-token-0123456789"}, {"Authorization": TOKEN}):
        refused = httpx.post(f"{server}/v1/adapters", json=body, headers=headers, timeout=60)
        assert refused.status_code == 401 and refused.headers["www-authenticate"] == "Bearer"
        assert "Authorization: Bearer TOKEN" in refused.json()["detail"]
        assert httpx.delete(f"{server}/v1/adapters/three", headers=headers).status_code == 401
    assert [a["name"] for a in httpx.get(f"{server}/v1/adapters").json()] == ["sentiment", "three"]


def test_hot_load_and_unload_are_off_without_a_token(runs):
    registry = AdapterRegistry("cpu")
    for name in ("sentiment", "three"):
        registry.attach(read_adapter(str(runs[name])))
    with serving(registry, Access()) as url:
        off = httpx.post(f"{url}/v1/adapters", json={"source": str(runs["sentiment_b"])}, headers=ADMIN)
        assert off.status_code == 403 and "--admin-token-file" in off.json()["detail"]
        assert httpx.delete(f"{url}/v1/adapters/three", headers=ADMIN).status_code == 403
        assert registry.names() == ["sentiment", "three"]
        assert classify(url, "three", TEXTS).status_code == 200


def test_hot_load_reads_only_under_the_adapter_root(server, runs, tmp_path):
    root = runs["sentiment"].parent
    outside = tmp_path / "outside_run"
    shutil.copytree(runs["sentiment_b"], outside)  # a real run, but outside the root
    (root / "escape").symlink_to(tmp_path)  # a link out of the root
    (root / "link_inside").symlink_to(root / "sentiment_b")  # a link that stays inside: fine
    refusals = set()
    for source in (
        str(outside),  # exists, absolute
        str(tmp_path / "missing"),  # does not exist
        str(runs["sentiment_b"]),  # absolute, even though it is under the root
        "../" + runs["sentiment_b"].name,
        "sentiment_b/../sentiment_b",
        "escape/outside_run",
        "~/x",
        "user/some-repo",  # a Hub id: the Hub is off
        ".",
    ):
        response = httpx.post(f"{server}/v1/adapters", json={"source": source}, headers=ADMIN, timeout=60)
        assert response.status_code == 400, (source, response.text)
        refusals.add(response.json()["detail"])
    # One message whether the path exists or not; it says what is allowed.
    assert len(refusals) == 1, refusals
    assert "under the server's adapter root" in refusals.pop()
    inside = httpx.post(
        f"{server}/v1/adapters", json={"source": "link_inside", "name": "linked"}, headers=ADMIN, timeout=60
    )
    assert inside.status_code == 201, inside.text
    assert httpx.delete(f"{server}/v1/adapters/linked", headers=ADMIN).status_code == 200


def test_the_host_header_must_be_an_allowed_name(server):
    """DNS rebinding: a page elsewhere that reaches 127.0.0.1 sends its own host name."""
    port = server.rsplit(":", 1)[1]
    for host in ("attacker.example", f"attacker.example:{port}", "127.0.0.1.attacker.example", ""):
        listing = httpx.get(f"{server}/v1/adapters", headers={"Host": host})
        assert listing.status_code == 400 and "Host header not allowed" in listing.text
        unload = httpx.delete(f"{server}/v1/adapters/three", headers={"Host": host, **ADMIN})
        assert unload.status_code == 400
        assert httpx.get(server, headers={"Host": host}).status_code == 400  # the page too
    for host in (f"127.0.0.1:{port}", "localhost", f"LOCALHOST:{port}", f"[::1]:{port}"):
        assert httpx.get(f"{server}/v1/adapters", headers={"Host": host}).status_code == 200, host
    assert [a["name"] for a in httpx.get(f"{server}/v1/adapters").json()] == ["sentiment", "three"]


def test_the_listing_shows_no_server_paths(server, runs):
    listing = httpx.get(f"{server}/v1/adapters").text
    assert str(runs["sentiment"].parent.parent.parent) not in listing  # pytest's base temp, above every path used
    assert [a["source"] for a in json.loads(listing)] == ["sentiment", "three"]


def test_an_adapter_with_more_positions_than_the_model_is_refused_at_load(server, runs):
    """Before: an adapter whose recipe said max_length: 100000 loaded (201), and its long text failed the forwards
    it shared with other clients' requests."""
    root = runs["sentiment"].parent
    shutil.copytree(runs["sentiment_b"], root / "too_long")
    recipe = root / "too_long" / "recipe.yaml"
    recipe.write_text(recipe.read_text().replace("max_length: 32", "max_length: 100000"))
    assert "max_length: 100000" in recipe.read_text()
    response = httpx.post(f"{server}/v1/adapters", json={"source": "too_long"}, headers=ADMIN, timeout=60)
    assert response.status_code == 422, response.text
    assert "data.max_length = 100000" in response.text and "64 positions" in response.text
    assert [a["name"] for a in httpx.get(f"{server}/v1/adapters").json()] == ["sentiment", "three"]


def test_a_request_that_fails_its_batch_fails_alone(runs, reference):
    """Three requests share a forward; one carries more tokens than the model has positions (what an adapter with
    too large a max_length produced). Only that one gets the 500; the others get their own probabilities."""
    registry = AdapterRegistry("cpu")
    adapters = {name: read_adapter(str(runs[name])) for name in ("sentiment", "three", "sentiment_b")}
    for adapter in adapters.values():
        registry.attach(adapter)
    good = {name: adapters[name].encode(TEXTS[:2])[0] for name in ("three", "sentiment_b")}
    first, *words, last = adapters["sentiment"].encode(["nice"])[0][0]["input_ids"]
    ids = [first, *words * 200, last]
    too_long = [{"input_ids": ids, "token_type_ids": [0] * len(ids), "attention_mask": [1] * len(ids)}]
    assert len(ids) > registry.max_positions
    batcher = MicroBatcher(registry.classify, max_batch_texts=64, max_wait_s=1.0)
    futures = [batcher.submit("sentiment", too_long), *(batcher.submit(name, good[name]) for name in good)]
    batcher.start()  # all three queued first: they share one batch
    try:
        with pytest.raises(ServingError, match="inference failed") as failed:
            futures[0].result(timeout=60)
        assert failed.value.status == 500
        for name, future in zip(good, futures[1:], strict=True):
            torch.testing.assert_close(future.result(timeout=60), reference[name][:2], atol=1e-5, rtol=0)
    finally:
        batcher.stop()
    assert (batcher.stats.batches, batcher.stats.requests) == (1, 3)  # they did share the batch


def test_valid_json_requests_take_the_fast_path_and_get_the_route_s_answer_to_the_byte(server):
    """ClassifyFastPath answers a valid JSON request before FastAPI's route, with the route's answer to the byte. A
    body opening with a byte-order mark, which Python's JSON parser takes and pydantic's does not, goes on to the
    route: the two answers of each body are compared."""
    stats = APPS[server].state.fast_path
    bodies = [
        {"adapter": "three", "texts": TEXTS[:3]},
        {"adapters": ["three", "sentiment"], "texts": TEXTS[:2]},
        {"adapter": "nope", "texts": ["a"]},
        {"adapter": "sentiment", "texts": ["x"] * (MAX_TEXTS + 1)},
    ]
    types = ["application/json", "application/json; charset=utf-8", "application/x+json", "Application/JSON"]
    for body, json_type in zip(bodies, types, strict=True):
        raw = json.dumps(body).encode()
        before = stats.answered
        fast = httpx.post(f"{server}/v1/classify", content=raw, headers={"content-type": json_type}, timeout=60)
        assert stats.answered == before + 1
        route = httpx.post(
            f"{server}/v1/classify", content=b"\xef\xbb\xbf" + raw, headers={"content-type": json_type}, timeout=60
        )
        assert stats.answered == before + 1
        assert fast.status_code in (200, 404, 413)
        assert (fast.status_code, fast.headers["content-type"], fast.content) == (
            route.status_code,
            route.headers["content-type"],
            route.content,
        )
    untyped = httpx.post(f"{server}/v1/classify", content=json.dumps(bodies[0]).encode(), timeout=60)
    assert untyped.status_code == 422 and stats.answered == before + 1  # FastAPI's rule: JSON only when typed so


def test_a_short_request_waits_for_a_busy_tokenizer_off_the_event_loop(runs, reference):
    """A short request is tokenized on the event loop's thread only where its adapter's tokenizer is free: while
    another thread holds it (a long request's encode in the thread pool, a batch's padding on the worker), the
    request waits in the pool, and the server goes on answering."""
    registry = AdapterRegistry("cpu")
    registry.attach(read_adapter(str(runs["sentiment"])))
    with serving(registry, Access()) as url, ThreadPoolExecutor(max_workers=1) as pool:
        with registry.get("sentiment").tokenizer_lock:
            pending = pool.submit(classify, url, "sentiment", TEXTS[:2])
            time.sleep(0.5)
            assert httpx.get(f"{url}/healthz", timeout=5).status_code == 200  # the event loop is not held
            assert not pending.done()
        torch.testing.assert_close(
            probabilities(pending.result(timeout=60)), reference["sentiment"][:2], atol=1e-5, rtol=0
        )


def test_text_or_source_that_is_not_unicode_is_a_client_error(server):
    lone = httpx.post(
        f"{server}/v1/classify",
        content=b'{"adapter": "sentiment", "texts": ["fine", "\\ud800"]}',
        headers={"content-type": "application/json"},
    )
    assert lone.status_code == 422 and "lone surrogate" in lone.text and "'\\\\ud800'" in lone.text
    source = httpx.post(
        f"{server}/v1/adapters",
        content=b'{"source": "/tmp/\\ud800"}',
        headers={"content-type": "application/json", **ADMIN},
    )
    assert source.status_code == 422 and "unicode" in source.text.lower()
    assert classify(server, "sentiment", TEXTS).status_code == 200


def test_command_line_kernel_cache_bounds_both_caches_before_the_model_loads(runs, monkeypatch, capsys):
    from lora_train.serving.server import DEFAULT_KERNEL_CACHE
    from lora_train.startup import KERNEL_CACHE_VARIABLES

    def cleared() -> None:
        for name in KERNEL_CACHE_VARIABLES:
            monkeypatch.setenv(name, "unset")  # records the variable as it was, to put it back afterwards
            monkeypatch.delenv(name)

    def settings() -> list[Optional[str]]:
        return [os.environ.get(name) for name in KERNEL_CACHE_VARIABLES]

    two_bases = [str(runs["sentiment"]), str(runs["other_base"])]  # refused after the caches are set, before a model
    cleared()
    assert serve_main([str(runs["sentiment"]), "--kernel-cache", "0", "--port", str(free_port())]) == 2
    assert "--kernel-cache must be > 0" in capsys.readouterr().err
    assert settings() == [None, None]
    assert serve_main(two_bases) == 2
    assert settings() == [str(DEFAULT_KERNEL_CACHE)] * 2
    cleared()
    assert serve_main([*two_bases, "--kernel-cache", "16"]) == 2
    assert settings() == ["16", "16"]
    cleared()
    monkeypatch.setenv(KERNEL_CACHE_VARIABLES[0], "512")  # the operator's own choice is kept without the flag
    assert serve_main(two_bases) == 2
    assert settings() == ["512", None]
    assert serve_main([*two_bases, "--kernel-cache", "32"]) == 2  # and the flag wins over it
    assert settings() == ["32", "32"]


RSS_MB = """
import re
rss = lambda: int(re.search(r"VmRSS:\\s+(\\d+)", open("/proc/self/status").read()).group(1)) / 1024
"""
"""The resident memory of the process, in MB: for the scripts below, which print how much theirs grew."""


def rss_growth_mb(script: str, *args: str, **run) -> float:
    """Run ``RSS_MB + script`` with ``args`` in a fresh interpreter; the growth in MB it printed last."""
    done = subprocess.run(
        [sys.executable, "-c", RSS_MB + script, *args], capture_output=True, text=True, check=True, **run
    )
    return float(done.stdout.split()[-1])


KERNEL_SHAPES = """
import sys, torch
from lora_train.startup import bound_kernel_caches
if sys.argv[1] != "default":
    bound_kernel_caches(int(sys.argv[1]))
torch.set_num_threads(1)
weight = torch.randn(1536, 384).to(torch.bfloat16)
with torch.inference_mode():
    torch.nn.functional.gelu(torch.nn.functional.linear(torch.randn(8, 384).to(torch.bfloat16), weight))
    before = rss()
    for rows in range(1, 61):  # 60 shapes: 60 products and 60 GELUs for oneDNN to compile
        torch.nn.functional.gelu(torch.nn.functional.linear(torch.randn(rows, 384, dtype=torch.bfloat16), weight))
print(rss() - before)
"""


@pytest.mark.skipif(
    not torch.backends.mkldnn.is_available() or not torch.ops.mkldnn._is_mkldnn_bf16_supported(),
    reason="no oneDNN bf16 kernels on this CPU, so no kernel caches to bound",
)
def test_bounded_kernel_caches_hold_less_memory_across_shapes():
    """Each cache alone kept the kernels (oneDNN's bounded: +0.4 MB a shape); both bounded, the growth goes."""
    from lora_train.startup import KERNEL_CACHE_VARIABLES

    env = {name: value for name, value in os.environ.items() if name not in KERNEL_CACHE_VARIABLES}
    grown = {capacity: rss_growth_mb(KERNEL_SHAPES, capacity, timeout=300, env=env) for capacity in ("default", "4")}
    assert grown["default"] > 15, grown  # 60 x (0.3 to 0.7) MB measured with the caches at 1024
    assert grown["4"] < grown["default"] / 3, grown


FRAGMENTED_HEAP = """
import sys, time
from lora_train.serving.batcher import MicroBatcher
kept = []
def run_batch(jobs):  # in the worker's thread (its own malloc arena): 160 MB, a 64th of it kept, the rest freed
    blocks = [bytearray(65536) for _ in range(2560)]
    kept.extend(blocks[::64])
    return [None for _ in jobs]
interval = None if sys.argv[1] == "none" else float(sys.argv[1])
batcher = MicroBatcher(run_batch, max_wait_s=0, heap_release_interval_s=interval)
batcher.start()
before = rss()
time.sleep(interval or 0)  # the release is due at the batch's end
batcher.submit("a", [{"input_ids": [1]}]).result(timeout=60)
time.sleep(0.2)  # the worker releases after setting the result
print(rss() - before)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="malloc_trim is glibc's (Linux)")
def test_workers_hand_freed_heap_memory_back_to_the_os():
    """glibc kept the 157 MB a batch freed between the blocks it kept; released, the growth is what is kept (2.5 MB)
    and under 20 MB in all (1.4 MB measured)."""
    grown = {interval: rss_growth_mb(FRAGMENTED_HEAP, interval, timeout=120) for interval in ("none", "0.1")}
    assert grown["none"] > 120, grown  # without the release the freed blocks stay resident
    assert grown["0.1"] < 20, grown


def test_command_line_says_what_a_valid_adapter_name_is(runs, capsys):
    """Before: '<b>x</b>=RUN' became one path and the error said it was neither a run directory nor a Hub id."""
    assert serve_main([f"<b>x</b>={runs['sentiment']}", "--port", str(free_port())]) == 2
    err = capsys.readouterr().err
    assert "adapter name '<b>x</b>' is not valid: use 1 to 64 letters, digits, '_' or '-'" in err
    assert "neither an existing run directory" not in err


def test_command_line_access_options(tmp_path, monkeypatch, capsys):
    from lora_train.serving.access import ADMIN_TOKEN_ENV
    from lora_train.serving.server import access_for

    parser = build_parser()
    monkeypatch.delenv(ADMIN_TOKEN_ENV, raising=False)
    assert access_for(parser.parse_args(["run"])).admin_token is None  # off by default
    short = tmp_path / "short"
    short.write_text("abc\n")
    with pytest.raises(ServingError, match="16 or more characters"):
        access_for(parser.parse_args(["run", "--admin-token-file", str(short)]))
    with pytest.raises(ServingError, match="which are off without an admin token"):
        access_for(parser.parse_args(["run", "--adapter-root", str(tmp_path)]))
    good = tmp_path / "token"
    good.write_text(TOKEN + "\n")
    access = access_for(
        parser.parse_args(
            ["run", "--admin-token-file", str(good), "--adapter-root", str(tmp_path), "--host", "::1"]
            + ["--allowed-host", "serve.example"]
        )
    )
    assert access.admin_token == TOKEN and access.adapter_root == tmp_path and not access.allow_hub
    assert access.allowed_hosts == {"localhost", "127.0.0.1", "[::1]", "serve.example"}
    assert TOKEN not in repr(access)
    monkeypatch.setenv(ADMIN_TOKEN_ENV, TOKEN)
    assert access_for(parser.parse_args(["run", "--allow-hub"])).admin_token == TOKEN
    assert os.environ[ADMIN_TOKEN_ENV] == TOKEN


def test_plain_server_baseline_answers_like_predict(runs, reference):
    """The load test's baseline (each adapter merged into its own base copy, one forward per request) serves the
    same probabilities as predict.py, so the ratio compares servers doing the same work."""
    from fastapi.testclient import TestClient

    from lora_lab.plain_server import build_app

    app = build_app([f"sentiment={runs['sentiment']}", f"three={runs['three']}"])
    with TestClient(app) as client:
        for name in ("sentiment", "three"):
            response = client.post("/v1/classify", json={"adapter": name, "texts": TEXTS + [LONG_TEXT]})
            served = torch.tensor([list(p["probabilities"].values()) for p in response.json()["predictions"]])
            torch.testing.assert_close(served, reference[name], atol=1e-5, rtol=0)
        assert client.post("/v1/classify", json={"adapter": "nope", "texts": ["x"]}).status_code == 404
        assert client.get("/healthz").json()["requests"] == 2


def test_load_test_compares_our_server_with_the_plain_one_in_one_run(runs):
    from lora_lab.serve_bench import markdown_table, run_bench, summary

    names = ["sentiment", "three"]
    logged: list[str] = []
    results = run_bench(
        [str(runs[n]) for n in names],
        names,
        setups=("batched", "plain"),
        clients=4,
        warmup_s=0.5,
        duration_s=2.0,
        texts_per_adapter=8,
        server_args=["--threads", "1"],
        log=logged.append,
        repeats=2,
    )
    assert [r.setup for r in results] == ["batched", "plain"]
    # Interleaved: the second repeat starts with the other setup.
    assert [line.split(":")[0] for line in logged if line.startswith("[")] == [
        "[0] batched",
        "[0] plain",
        "[1] plain",
        "[1] batched",
    ]
    for r in results:
        assert r.requests > 0 and r.errors == 0 and r.requests_per_s > 0 and r.rss_mb > 100
    assert results[1].texts_per_batch == 1.0 and results[1].processes == 1
    assert "batched / plain server requests/s" in summary(results)
    assert "| plain | 1 |" in markdown_table(results)


def test_median_result_takes_each_figure_s_median_and_sums_the_counts():
    from lora_lab.serve_bench import SetupResult, median_result

    runs = [
        SetupResult("plain", 1, 100, 1, {"500 x": 1}, 10.0, 50.0, 90.0, 1.0, 0.8, 80.0, 600.0, 610.0),
        SetupResult("plain", 1, 300, 0, {}, 30.0, 40.0, 70.0, 1.0, 0.9, 70.0, 620.0, 640.0),
        SetupResult("plain", 1, 200, 2, {"500 x": 2}, 20.0, 60.0, 80.0, 1.0, 0.7, 90.0, 610.0, 630.0),
    ]
    m = median_result(runs)
    assert (m.requests, m.errors, m.error_causes) == (600, 3, {"500 x": 3})
    assert (m.requests_per_s, m.p50_ms, m.p99_ms, m.rss_mb, m.peak_rss_mb) == (20.0, 50.0, 80.0, 610.0, 630.0)


def test_fan_out_load_and_adapter_scaling(runs):
    """--fan-out: one fan-out request against one request per adapter, on one real server; --scale: the same runs
    loaded again under new names."""
    from lora_lab.serve_bench import fan_out, fan_out_table, scaled

    names = ["sentiment", "three"]
    rows = fan_out([str(runs[n]) for n in names], names, clients=2, warmup_s=0.5, duration_s=1.5, texts_per_adapter=8)
    assert [r["mode"] for r in rows] == ["one fan-out request", "separate requests"]
    for r in rows:
        assert r["adapters"] == 2 and r["fan_outs_per_s"] > 0 and r["p99_ms"] >= r["p50_ms"] > 0 and r["rss_mb"] > 100
    assert fan_out_table(rows).count("\n") == 3
    assert scaled(["a", "b"], ["x", "y"], 5) == (["a", "b", "a", "b", "a"], ["x_0", "y_1", "x_2", "y_3", "x_4"])
    assert scaled(["a", "b"], ["x", "y"], 1) == (["a"], ["x"])


# Several model workers (lora-serve --workers N): replicas sharing every tensor, forwards side by side, and model
# changes that wait for the other workers' batches (lora_train/serving/replicas.py, batcher.py).


def test_replicas_hold_one_copy_of_every_tensor(runs):
    registry = ReplicatedRegistry("cpu", replicas=3)
    for name in ("sentiment", "three"):
        registry.attach(read_adapter(str(runs[name])))
    first = dict(registry.primary.model.named_parameters(remove_duplicate=False))
    for replica in registry.replicas[1:]:
        assert replica.model is not registry.primary.model
        others = dict(replica.model.named_parameters(remove_duplicate=False))
        assert others.keys() == first.keys()
        assert all(others[name] is first[name] for name in first)  # no tensor of its own
        assert replica.names() == ["sentiment", "three"]
    registry.mark_unloading("three")
    registry.detach("three")
    assert [replica.names() for replica in registry.replicas] == [["sentiment"]] * 3


def answer_concurrently(url: str, jobs: list[tuple[str, list[str]]], reference: dict[str, torch.Tensor]) -> None:
    """Send ``(adapter, texts of TEXTS)`` requests 16 at a time; each must get its adapter's own probabilities."""
    with ThreadPoolExecutor(max_workers=16) as pool:
        responses = list(pool.map(lambda job: classify(url, *job), jobs))
    for (name, texts), response in zip(jobs, responses, strict=True):
        start = TEXTS.index(texts[0])
        expected = reference[name][start : start + len(texts)]
        torch.testing.assert_close(probabilities(response), expected, atol=1e-5, rtol=0)


def test_two_workers_answer_like_predict_and_hot_changes_reach_both(runs, reference):
    registry = ReplicatedRegistry("cpu", replicas=2)
    for name in ("sentiment", "three"):
        registry.attach(read_adapter(str(runs[name])))
    access = Access(admin_token=TOKEN, adapter_root=runs["sentiment"].parent)
    with serving(registry, access, max_wait_s=0.01) as url:
        answer_concurrently(
            url, [("sentiment" if i % 2 else "three", TEXTS[i % len(TEXTS) :][:2]) for i in range(32)], reference
        )
        loaded = httpx.post(f"{url}/v1/adapters", json={"source": "sentiment_b", "name": "late"}, headers=ADMIN)
        assert loaded.status_code == 201, loaded.text
        with ThreadPoolExecutor(max_workers=8) as pool:  # whichever worker takes them has the new adapter
            late = list(pool.map(lambda _: classify(url, "late", TEXTS), range(8)))
        for response in late:
            torch.testing.assert_close(
                probabilities(response), reference["sentiment_b"][: len(TEXTS)], atol=1e-5, rtol=0
            )
        assert httpx.delete(f"{url}/v1/adapters/late", headers=ADMIN, timeout=60).status_code == 200
        assert [replica.names() for replica in registry.replicas] == [["sentiment", "three"]] * 2
        assert httpx.get(f"{url}/healthz").json()["status"] == "ok"


def test_two_workers_serve_bitfit_and_head_only_runs_beside_lora_adapters(runs, reference):
    """Each worker swaps a run's tensors into its own modules (over the shared weights), so concurrent forwards of
    BitFit, head-only and LoRA texts on two workers each answer as scripts/predict.py does, also after a LoRA
    adapter is hot-loaded onto a base that two trained-tensor runs loaded."""
    registry = ReplicatedRegistry("cpu", replicas=2)
    for name in ("bitfit", "head_only"):
        registry.attach(read_adapter(str(runs[name])))
    access = Access(admin_token=TOKEN, adapter_root=runs["sentiment"].parent)
    with serving(registry, access, max_wait_s=0.01) as url:
        loaded = httpx.post(f"{url}/v1/adapters", json={"source": "sentiment"}, headers=ADMIN, timeout=60)
        assert loaded.status_code == 201, loaded.text
        names = ["bitfit", "sentiment", "head_only"]
        answer_concurrently(url, [(names[i % 3], TEXTS[i % len(TEXTS) :][:2]) for i in range(36)], reference)
    first = dict(registry.primary.model.named_parameters(remove_duplicate=False))
    second = dict(registry.replicas[1].model.named_parameters(remove_duplicate=False))
    assert second.keys() == first.keys() and all(second[n] is first[n] for n in first)  # one copy of the weights


def test_a_model_change_waits_for_running_batches_and_holds_back_later_ones():
    """Two workers; a change queued between jobs runs when no batch runs, after the jobs queued before it started,
    and before any job queued after it."""
    events: list[tuple[str, str, float]] = []
    lock = threading.Lock()

    def runner():
        def run(requests):
            with lock:
                events.append(("start", requests[0][0], time.monotonic()))
            time.sleep(0.2)
            with lock:
                events.append(("end", requests[0][0], time.monotonic()))
            return [None] * len(requests)

        return run

    batcher = MicroBatcher([runner(), runner()], max_batch_texts=1, max_wait_s=0)
    before = [batcher.submit(f"before{i}", [{}]) for i in range(2)]
    change = batcher.call(lambda: events.append(("change", "", time.monotonic())))
    after = [batcher.submit(f"after{i}", [{}]) for i in range(2)]
    batcher.start()
    try:
        for future in [*before, change, *after]:
            future.result(timeout=30)
    finally:
        batcher.stop()
    assert batcher.workers == 2
    moment = next(t for kind, _, t in events if kind == "change")
    ends = {name: t for kind, name, t in events if kind == "end"}
    starts = {name: t for kind, name, t in events if kind == "start"}
    assert max(starts["before0"], starts["before1"]) < moment  # both ran side by side before it...
    assert min(ends["before0"], ends["before1"]) > max(starts["before0"], starts["before1"])
    assert max(ends["before0"], ends["before1"]) <= moment  # ...and were done when it ran
    assert min(starts["after0"], starts["after1"]) >= moment


@pytest.mark.parametrize(
    "flag, message",
    [
        (["--server-workers", "0"], "--server-workers must be > 0"),
        (["--server-threads", "-1"], "--server-threads must be > 0"),
        (["--scale", "0"], "--scale counts must be > 0"),
        (["--server-kernel-cache", "0"], "--server-kernel-cache must be > 0"),
    ],
)
def test_load_test_refuses_counts_below_one_before_any_work(flag, message, capsys):
    """0 workers or threads once meant the server's default silently."""
    from lora_lab.commands.serve_bench import main as bench_main

    with pytest.raises(SystemExit) as stopped:
        bench_main(["not/a/run", *flag])
    assert stopped.value.code == 2 and message in capsys.readouterr().err
