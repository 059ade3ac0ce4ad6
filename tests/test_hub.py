"""Push and pull for real, against the local Hub stand-in (tests/hub_stand_in.py) on 127.0.0.1.

huggingface_hub reads HF_ENDPOINT and HF_HUB_OFFLINE when it is imported, so everything that talks to
the stand-in runs in a subprocess with HF_ENDPOINT pointed at it, HF_HUB_OFFLINE unset, a token in
HF_TOKEN, and a fresh Hub cache and HF_HOME (no token file, nothing cached from elsewhere).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lora_train.config import RecipeError, build_recipe
from tests.conftest import ROOT, tiny_recipe, write_recipe
from tests.hub_stand_in import HubStandIn

TOKEN = "hf_standInSecret0123456789abcdef"
TEXTS = ["the film was superb and fun", "a dull boring plot", "quite good actors", "this story is awful"]


@pytest.fixture
def hub():
    stand_in = HubStandIn(TOKEN)
    stand_in.start()
    yield stand_in
    stand_in.stop()


def hub_env(hub: HubStandIn, home: Path, token: bool = True) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE", "HF_TOKEN")
    }
    env.update(
        HF_ENDPOINT=hub.url,
        HF_HOME=str(home),
        HF_HUB_CACHE=str(home / "hub"),
        HF_HUB_DISABLE_TELEMETRY="1",
        PYTHONPATH=str(ROOT),
        NO_PROXY="127.0.0.1",
        no_proxy="127.0.0.1",
    )
    if token:
        env["HF_TOKEN"] = TOKEN
    return env


def run(args: list[str], env: dict[str, str], timeout: int = 300) -> subprocess.CompletedProcess:
    done = subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert TOKEN not in done.stdout + done.stderr, "the token was printed"
    return done


PULL = """
import json, sys, torch
from lora_train.startup import block_hub_kernels
block_hub_kernels()  # before peft, so bitsandbytes asks the Hub for no kernel (see below)
from lora_train.inference import load_run, predict
from huggingface_hub import ModelCard
from peft import AutoPeftModelForSequenceClassification
from transformers import AutoTokenizer

repo, texts = sys.argv[1], json.loads(sys.argv[2])
model = AutoPeftModelForSequenceClassification.from_pretrained(repo, id2label={0: "neg", 1: "pos"}).eval()
tokenizer = AutoTokenizer.from_pretrained(repo)
with torch.no_grad():
    logits = model(**tokenizer(texts, padding=True, return_tensors="pt")).logits
card = ModelCard.load(repo)
labels = [row["label"] for row in predict(load_run(repo, device="cpu"), texts)]
print(json.dumps({"logits": logits.tolist(), "card": card.data.to_dict(),
                  "eval_results": [[r.metric_type, r.metric_value] for r in card.data.eval_results],
                  "text": card.text, "labels": labels}))
"""


def local_logits(run_dir: Path) -> torch.Tensor:
    from peft import AutoPeftModelForSequenceClassification
    from transformers import AutoTokenizer

    model = AutoPeftModelForSequenceClassification.from_pretrained(run_dir, id2label={0: "neg", 1: "pos"}).eval()
    with torch.no_grad():
        return model(**AutoTokenizer.from_pretrained(run_dir)(TEXTS, padding=True, return_tensors="pt")).logits


def test_push_at_end_of_training_and_pull_back_through_the_hub_api(hub, tmp_path, tiny_bert_dir, toy_data_dir):
    out = tmp_path / "run"
    recipe = write_recipe(
        tmp_path / "recipe.yaml",
        tiny_recipe(
            tiny_bert_dir,
            toy_data_dir,
            out,
            training={"max_steps": 4, "eval_steps": 2, "save_steps": 2, "logging_steps": 1},
            output={"push_to_hub": True, "hub_model_id": "user/tiny-sentiment", "push_checkpoints": True},
        ),
    )
    trained = run(["scripts/train.py", str(recipe)], hub_env(hub, tmp_path / "home_train"))
    assert trained.returncode == 0, trained.stderr[-3000:]

    repo = hub.repos["user/tiny-sentiment"]
    assert repo.private  # output.hub_private defaults to true
    messages = [c.message for c in repo.commits]
    assert messages == [
        "initial commit",
        "lora_train: adapter at step 2",
        "lora_train: adapter at step 4",
        "lora_train: final adapter, step 4",
    ], messages
    files = set(repo.head.files)
    assert {
        "adapter_model.safetensors",
        "adapter_config.json",
        "README.md",
        "tokenizer.json",
        "tokenizer_config.json",
        "learning_curve.png",
        "recipe.yaml",
        "labels.json",
        "metrics.json",
        "history.json",
    } <= files
    assert not any("/" in f for f in files), "checkpoints/, best/ or logs were pushed"
    assert repo.head.files["adapter_model.safetensors"] == (out / "adapter_model.safetensors").read_bytes()
    assert not any(TOKEN.encode() in content for commit in repo.commits for content in commit.files.values())
    assert hub.unhandled() == []

    pulled = run(["-c", PULL, "user/tiny-sentiment", json.dumps(TEXTS)], hub_env(hub, tmp_path / "home_pull"))
    assert pulled.returncode == 0, pulled.stderr[-3000:]
    result = json.loads(pulled.stdout.strip().splitlines()[-1])
    expected = local_logits(out)
    assert torch.allclose(torch.tensor(result["logits"]), expected, atol=1e-6), (result["logits"], expected)
    assert result["labels"] == [["neg", "pos"][i] for i in expected.argmax(-1).tolist()]

    metrics = json.loads((out / "metrics.json").read_text())
    card = result["card"]
    assert card["library_name"] == "peft" and card["pipeline_tag"] == "text-classification"
    assert card["base_model"] == str(tiny_bert_dir) and "lora" in card["tags"]
    assert card["model-index"][0]["results"][0]["dataset"]["split"] == "validation"
    assert sorted(result["eval_results"]) == sorted(
        [["accuracy", round(metrics["eval_accuracy"], 4)], ["f1", round(metrics["eval_macro_f1"], 4)]]
    )
    assert 'from_pretrained("user/tiny-sentiment"' in result["text"] and "(learning_curve.png)" in result["text"]
    assert hub.unhandled() == []
    assert {
        "POST create",
        "POST validate-yaml",
        "POST preupload",
        "POST commit",
        "GET repo-info",
        "GET tree",
        "HEAD resolve",
        "GET resolve",
    } <= hub.routes(), hub.routes()

    # An existing run, pushed by the script to another repo: the card now names that repo.
    pushed = run(["scripts/push_to_hub.py", str(out), "user/copy", "--public"], hub_env(hub, tmp_path / "home_push"))
    assert pushed.returncode == 0, pushed.stderr[-3000:]
    copy = hub.repos["user/copy"]
    assert not copy.private and set(copy.head.files) == files
    assert b'from_pretrained("user/copy"' in copy.head.files["README.md"]
    assert copy.head.files["adapter_model.safetensors"] == repo.head.files["adapter_model.safetensors"]

    no_token = run(
        ["scripts/push_to_hub.py", str(out), "user/other"], hub_env(hub, tmp_path / "home_none", token=False)
    )
    assert no_token.returncode == 2 and "no Hugging Face token found" in no_token.stderr
    assert "user/other" not in hub.repos


def test_push_to_hub_offline_is_refused_before_any_work(tmp_path, tiny_bert_dir, toy_data_dir):
    from lora_train.hub import pusher_for

    recipe = build_recipe(
        tiny_recipe(
            tiny_bert_dir, toy_data_dir, tmp_path / "run", output={"push_to_hub": True, "hub_model_id": "user/x"}
        )
    )
    with pytest.raises(RecipeError, match="HF_HUB_OFFLINE=1 is set"):
        pusher_for(recipe)  # conftest runs the suite offline
    with pytest.raises(RecipeError, match="output.push_checkpoints is true but output.push_to_hub is false"):
        build_recipe(tiny_recipe(tiny_bert_dir, toy_data_dir, tmp_path / "run", output={"push_checkpoints": True}))


def test_the_kernel_guard_keeps_bitsandbytes_from_fetching_a_hub_kernel(hub, tmp_path):
    """peft imports bitsandbytes for every run, and on CPUs with AVX512-BF16 bitsandbytes' CPU backend asks the Hub
    for a compiled kernel (kernels-community/quantization-bitsandbytes) when the ``kernels`` package is installed, as
    transformers >= 5.25 does. After ``block_hub_kernels()`` (lora_train/startup.py, the first call of every program)
    nothing reaches the Hub. The bare
    ``import peft`` is the control: it does ask, on the CPUs where bitsandbytes looks for the kernel at all."""
    guarded = run(
        ["-c", "from lora_train.startup import block_hub_kernels; block_hub_kernels(); import peft"],
        hub_env(hub, tmp_path / "guarded"),
    )
    assert guarded.returncode == 0, guarded.stderr[-3000:]
    assert hub.log == [] and "kernels-community" not in guarded.stderr

    bare = run(
        [
            "-c",
            "import importlib.util, peft; from bitsandbytes.functional import has_avx512bf16;"
            "print(has_avx512bf16() and importlib.util.find_spec('kernels') is not None)",
        ],
        hub_env(hub, tmp_path / "bare"),
    )
    assert bare.returncode == 0, bare.stderr[-3000:]
    if bare.stdout.split()[-1] == "True":
        assert any("kernels-community" in path for _, path, _ in hub.log), hub.log
