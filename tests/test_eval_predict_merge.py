"""Using trained tiny adapters: the learning curve and card, scripts/eval.py, scripts/predict.py,
scripts/merge_adapter.py.

The adapters are trained here (tiny random BERT, synthetic data, 4 to 12 steps), with LoRA and
AdaLoRA in full precision and LoRA on an NF4 base (float32 and bfloat16 compute).
"""

from __future__ import annotations

import io
import json
import re
import shutil
from pathlib import Path

import pandas as pd
import pytest
import torch

from lora_train.config import build_recipe
from lora_train.inference import load_run, predict, read_run
from lora_train.train import train
from tests.conftest import script, tiny_recipe

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
TEXTS = ["the film was superb and fun", "a dull boring plot", "quite good actors", "this story is awful", "nice"]


def trained(tmp_path_factory, model_dir, data_dir, name: str, **sections) -> Path:
    out = tmp_path_factory.mktemp(name) / "run"
    base = {"training": {"max_steps": 12, "eval_steps": 4, "save_steps": 12, "logging_steps": 2}}
    for section, values in sections.items():
        base.setdefault(section, {}).update(values)
    train(build_recipe(tiny_recipe(model_dir, data_dir, out, **base)))
    return out


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, tiny_bert_dir, toy_data_dir) -> Path:
    return trained(tmp_path_factory, tiny_bert_dir, toy_data_dir, "lora")


@pytest.fixture(scope="module")
def adalora_run(tmp_path_factory, tiny_bert_dir, toy_data_dir) -> Path:
    return trained(
        tmp_path_factory, tiny_bert_dir, toy_data_dir, "adalora", peft={"method": "adalora", "init_r": 6, "target_r": 4}
    )


@pytest.fixture(scope="module", params=["float32", "bfloat16"])
def nf4_run(request, tmp_path_factory, tiny_bert_dir, toy_data_dir) -> Path:
    # A high learning rate, so the LoRA update moves the logits far more than bfloat16 rounding does (see lora_effect).
    return trained(
        tmp_path_factory,
        tiny_bert_dir,
        toy_data_dir,
        f"nf4_{request.param}",
        quantization={"method": "nf4", "compute_dtype": request.param},
        training={"max_steps": 4, "eval_steps": 0, "learning_rate": 0.05},
    )


@torch.no_grad()
def logits_of(model, tokenizer, texts=TEXTS) -> torch.Tensor:
    enc = tokenizer(texts, padding=True, truncation=True, max_length=32, return_tensors="pt")
    return model.eval()(**enc).logits.float()


# ---------------------------------------------------------------------------------------------
# What training leaves behind: learning curve and model card


def assert_curves_drawn(png: bytes) -> None:
    """Two panels side by side: the training (blue) and evaluation (orange) losses on the left, accuracy (green)
    and macro-F1 (red) on the right; each colour's lines and markers cover many pixels, and only in its own panel."""
    import numpy as np
    from matplotlib.colors import to_rgb
    from PIL import Image

    image = np.asarray(Image.open(io.BytesIO(png)).convert("RGB")).astype(int)
    height, width, _ = image.shape
    assert 2 * height < width  # the 10 x 4 inch figure
    halves = {"left": image[:, : width // 2], "right": image[:, width // 2 :]}
    for colour, panel in (("tab:blue", "left"), ("tab:orange", "left"), ("tab:green", "right"), ("tab:red", "right")):
        rgb = np.array(to_rgb(colour)) * 255
        pixels = {side: int((np.abs(half - rgb).max(-1) < 12).sum()) for side, half in halves.items()}
        other = "right" if panel == "left" else "left"
        assert pixels[panel] > 150 and pixels[other] == 0, (colour, pixels)


def test_run_has_learning_curve_and_true_card(lora_run, capsys):
    from huggingface_hub import ModelCard

    png = (lora_run / "learning_curve.png").read_bytes()
    assert png.startswith(PNG_MAGIC)
    assert_curves_drawn(png)
    metrics = json.loads((lora_run / "metrics.json").read_text())
    card = ModelCard.load(lora_run / "README.md")
    data = card.data.to_dict()
    assert data["library_name"] == "peft" and data["pipeline_tag"] == "text-classification"
    assert data["base_model"] == read_run(lora_run)[0].model.name_or_path
    results = {r.metric_type: r.metric_value for r in card.data.eval_results}
    assert results == {"accuracy": round(metrics["eval_accuracy"], 4), "f1": round(metrics["eval_macro_f1"], 4)}
    text = card.text
    assert "![learning curve" in text and "(learning_curve.png)" in text
    assert metrics["hardware"] in text and "AutoPeftModelForSequenceClassification" in text
    assert f"{metrics['trainable_params']:,} of {metrics['total_params']:,}" in text
    assert "peak resident memory of the process" in text
    assert not (lora_run / "best" / "learning_curve.png").exists()  # best/ has no history, its card no plot
    snippet = text.split("```python\n", 1)[1].split("```", 1)[0].replace("PATH_TO_THIS_DIRECTORY", str(lora_run))
    exec(snippet, {})  # the usage snippet runs as written and prints a class name of this task
    assert capsys.readouterr().out.split()[0] in ("neg", "pos")
    assert "learning_curve" not in (lora_run / "best" / "README.md").read_text()


# ---------------------------------------------------------------------------------------------
# eval


def test_eval_reproduces_training_metrics_and_draws_confusion_matrix(lora_run, tmp_path, capsys):
    out = tmp_path / "eval"
    assert script("eval").main([str(lora_run), "--output-dir", str(out)]) == 0
    report = json.loads((out / "eval_validation.json").read_text())
    metrics = json.loads((lora_run / "metrics.json").read_text())
    assert report["num_samples"] == metrics["eval_samples"] == 128
    assert report["accuracy"] == pytest.approx(metrics["eval_accuracy"], abs=1e-12)
    assert report["macro_f1"] == pytest.approx(metrics["eval_macro_f1"], abs=1e-12)
    assert report["confusion_matrix"] == metrics["confusion_matrix"]
    assert set(report["per_class"]) == {"neg", "pos"}
    assert (out / "confusion_matrix_validation.png").read_bytes().startswith(PNG_MAGIC)
    assert "accuracy" in capsys.readouterr().out

    assert script("eval").main([str(lora_run), "--split", "test", "--max-samples", "50", "--output-dir", str(out)]) == 0
    assert json.loads((out / "eval_test.json").read_text())["num_samples"] == 50


def test_eval_on_nf4_adapter_uses_nf4_base(nf4_run):
    run = load_run(str(nf4_run), device="cpu")
    assert any(type(m).__name__ == "Linear4bit" for m in run.model.modules())
    from lora_train.inference import evaluate_run

    report = evaluate_run(run)
    assert report["accuracy"] == pytest.approx(
        json.loads((nf4_run / "metrics.json").read_text())["eval_accuracy"], abs=1e-12
    )


def test_eval_of_a_bf16_run_reproduces_its_metrics(tmp_path_factory, tiny_bert_dir, toy_data_dir):
    """A run trained under CPU bf16 autocast is evaluated under it again: the same loss, not an fp32 one."""
    from lora_train.inference import evaluate_run

    bf16_run = trained(tmp_path_factory, tiny_bert_dir, toy_data_dir, "bf16", training={"mixed_precision": "bf16"})
    metrics = json.loads((bf16_run / "metrics.json").read_text())
    report = evaluate_run(load_run(str(bf16_run), device="cpu", merge=False))  # as scripts/eval.py loads it
    assert report["loss"] == pytest.approx(metrics["eval_loss"], abs=1e-6)  # batches of 64 here, 128 in training
    assert report["accuracy"] == pytest.approx(metrics["eval_accuracy"], abs=1e-12)


def test_eval_refuses_bad_input_clearly(tmp_path, lora_run, capsys):
    assert script("eval").main([str(tmp_path)]) == 2
    assert "is not a lora_train run" in capsys.readouterr().err
    assert script("eval").main([str(lora_run), "--split", "nope"]) == 2
    assert "no file for split(s) ['nope']" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# predict


def test_predict_from_arguments_files_and_stdin_agree_with_the_model(lora_run, tmp_path, capsys, monkeypatch):
    from peft import AutoPeftModelForSequenceClassification
    from transformers import AutoTokenizer

    reference = AutoPeftModelForSequenceClassification.from_pretrained(lora_run, id2label={0: "neg", 1: "pos"})
    probs = torch.softmax(logits_of(reference, AutoTokenizer.from_pretrained(lora_run)), -1)
    expected = [(["neg", "pos"][int(p.argmax())], float(p.max())) for p in probs]

    predict = script("predict").main
    assert predict([str(lora_run), *TEXTS, "--batch-size", "2"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [(line.split("\t")[0], line.split("\t")[2]) for line in lines] == [
        (label, t) for (label, _), t in zip(expected, TEXTS)
    ]
    assert [float(line.split("\t")[1]) for line in lines] == pytest.approx([p for _, p in expected], abs=1e-4)

    (tmp_path / "in.txt").write_text("\n".join(TEXTS) + "\n\n")
    (tmp_path / "in.jsonl").write_text("\n".join(json.dumps({"review": t, "id": i}) for i, t in enumerate(TEXTS)))
    pd.DataFrame({"id": range(len(TEXTS)), "review": TEXTS}).to_csv(tmp_path / "in.csv", index=False)
    outputs = []
    for args in (
        ["--file", str(tmp_path / "in.txt")],
        ["--file", str(tmp_path / "in.jsonl"), "--text-column", "review"],
        ["--file", str(tmp_path / "in.csv"), "--text-column", "review"],
        [],
    ):
        monkeypatch.setattr("sys.stdin", io.StringIO("\n".join(TEXTS) + "\n"))
        assert predict([str(lora_run), "--json", "--batch-size", "3", *args]) == 0
        outputs.append([json.loads(line) for line in capsys.readouterr().out.splitlines()])
    for rows in outputs:
        assert [(r["text"], r["label"]) for r in rows] == [(t, label) for t, (label, _) in zip(TEXTS, expected)]
        assert all(abs(sum(r["probabilities"].values()) - 1) < 1e-5 for r in rows)


def test_eval_and_predict_show_progress_with_rate_and_time_left(lora_run, tmp_path, capsys):
    # stderr is captured here, not a terminal: the bars print a line when they start and end (and every 20 s),
    # not one per batch or per result.
    assert script("eval").main([str(lora_run), "--batch-size", "16", "--output-dir", str(tmp_path / "eval")]) == 0
    captured = capsys.readouterr()
    bars = captured.err.splitlines()
    assert any(bar.startswith("eval:") and "/8 [" in bar and "batch/s]" in bar for bar in bars), bars[-3:]
    assert len([bar for bar in bars if bar.startswith("eval:")]) <= 3, bars
    assert re.search(r"accuracy [0-9.]+ .* \| [0-9.]+ texts/s", captured.out)
    report = json.loads((tmp_path / "eval" / "eval_validation.json").read_text())
    assert report["texts_per_s"] == pytest.approx(report["num_samples"] / report["seconds"])

    (tmp_path / "in.txt").write_text("\n".join(TEXTS * 20) + "\n")
    assert script("predict").main([str(lora_run), "--file", str(tmp_path / "in.txt"), "--batch-size", "8"]) == 0
    captured = capsys.readouterr()
    assert len(captured.out.splitlines()) == 100  # results alone on stdout, the bar on stderr
    bars = captured.err.splitlines()
    assert any(bar.startswith("predict: 100%") and "100/100 [" in bar and "text/s]" in bar for bar in bars), bars[-3:]
    assert any("<" in bar and "predict:" in bar for bar in bars)  # elapsed<remaining: the time left is shown
    mine = [bar for bar in bars if bar.startswith("predict")]
    assert len(mine) <= 3, bars  # 13 batches, 100 results: a start line, an end line and the rate
    assert re.fullmatch(r"predict: 100 texts in [0-9.]+ s, [0-9.]+ texts/s", mine[-1])


def test_predict_refuses_bad_input_before_loading(lora_run, tmp_path, capsys):
    (tmp_path / "in.tsv").write_text("a\tb\n")
    assert script("predict").main([str(lora_run), "--file", str(tmp_path / "in.tsv")]) == 2
    assert "unsupported type '.tsv'" in capsys.readouterr().err
    (tmp_path / "in.csv").write_text("id,body\n1,nice\n")
    assert script("predict").main([str(lora_run), "--file", str(tmp_path / "in.csv")]) == 2
    assert "no text field 'text' (found ['body', 'id'])" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# merge


def merged_vs_adapter(run: Path, out: Path) -> tuple[float, torch.nn.Module]:
    """Max |logit difference| between the merged standalone model and the adapter on its training base."""
    from transformers import AutoModelForSequenceClassification

    assert script("merge_adapter").main([str(run), str(out)]) == 0
    names = {p.name for p in out.iterdir()}
    assert "model.safetensors" in names and not any(n.startswith("adapter_") for n in names)
    merged = AutoModelForSequenceClassification.from_pretrained(out)  # transformers alone, no peft
    assert merged.config.id2label == {0: "neg", 1: "pos"}
    adapter = load_run(str(run), device="cpu", merge=False)  # the adapter as trained, unmerged
    return (
        logits_of(merged, adapter.tokenizer) - logits_of(adapter.model, adapter.tokenizer)
    ).abs().max().item(), merged


# Rounding of one merged weight: float32 sums, or bfloat16 (8 significant bits) plus the bf16 LoRA product.
ROUNDING = {"float32": (1e-6, 1e-7), "bfloat16": (2**-7, 1e-3)}  # (relative, absolute)


@torch.no_grad()
def assert_merged_weights(run: Path, merged: torch.nn.Module, dtype: str) -> None:
    """Every adapted Linear of the merged model holds its training base weight (dequantized NF4, or the full-precision
    weight) plus scaling x B @ A, to one rounding of ``dtype``; and that update moves most of those weights by more
    than ten such roundings, so a merge that dropped or mis-scaled it fails. (Weights, not logits: the tiny random
    BERT's logits hardly depend on its input, so the update moves them by only ~1e-3, less than bfloat16 rounding.)"""
    import bitsandbytes.functional as bnbf
    from peft.tuners.lora import LoraLayer

    relative, absolute = ROUNDING[dtype]
    merged_layers = dict(merged.named_modules())
    adapter = load_run(str(run), device="cpu", merge=False).model
    checked = 0
    for name, layer in adapter.named_modules():
        if not isinstance(layer, LoraLayer):
            continue
        weight = layer.base_layer.weight
        base = bnbf.dequantize_4bit(weight.data, weight.quant_state) if hasattr(weight, "quant_state") else weight
        delta = layer.get_delta_weight("default").float()
        expected = base.float() + delta
        tolerance = relative * expected.abs() + absolute
        got = merged_layers[name.removeprefix("base_model.model.")].weight.float()
        assert ((got - expected).abs() <= tolerance).all(), (name, (got - expected).abs().max())
        assert (delta.abs() > 10 * tolerance).float().mean() > 0.5, (name, delta.abs().median())
        checked += 1
    assert checked == 4  # query and value of 2 layers


@pytest.mark.parametrize("which", ["lora_run", "adalora_run"])
def test_merge_full_precision_equals_adapter(which, request, tmp_path):
    run = request.getfixturevalue(which)
    deviation, merged = merged_vs_adapter(run, tmp_path / "merged")
    print(f"{which}: max |merged - adapter| logit = {deviation:.3g}")
    assert merged.dtype == torch.float32
    assert deviation < 1e-6  # measured: 3e-8 (LoRA), 7e-9 (AdaLoRA)
    assert_merged_weights(run, merged, "float32")


def test_merged_model_carries_the_task_labels_to_pipeline_and_auto_classes(lora_run, tmp_path):
    """transformers reads class names only from a config.json; an adapter-only directory has none (its base's
    LABEL_i names show), so the standalone merged model is the one that carries them."""
    from transformers import AutoModelForSequenceClassification, pipeline

    assert script("merge_adapter").main([str(lora_run), str(tmp_path / "merged")]) == 0
    model = AutoModelForSequenceClassification.from_pretrained(tmp_path / "merged")
    assert model.config.id2label == {0: "neg", 1: "pos"} and model.config.label2id == {"neg": 0, "pos": 1}
    predictions = pipeline("text-classification", model=str(tmp_path / "merged"), device="cpu")(TEXTS)
    adapter = load_run(str(lora_run), device="cpu")
    assert [p["label"] for p in predictions] == [row["label"] for row in predict(adapter, TEXTS)]
    loaded = pipeline("text-classification", model=adapter.model, tokenizer=adapter.tokenizer, device="cpu")(TEXTS)
    assert [p["label"] for p in loaded] == [p["label"] for p in predictions]  # the adapter as load_run builds it


def test_merge_nf4_into_dequantized_base(nf4_run, tmp_path):
    deviation, merged = merged_vs_adapter(nf4_run, tmp_path / "merged")
    dtype = read_run(nf4_run)[0].quantization.compute_dtype
    print(f"NF4 ({dtype} compute): max |merged - adapter on NF4 base| logit = {deviation:.3g}")
    assert merged.dtype == getattr(torch, dtype)
    assert json.loads((tmp_path / "merged" / "merge.json").read_text())["trained_on"] == "nf4"
    # float32: the same dequantized weights, summed once instead of per forward (measured 0 to 3e-8);
    # bfloat16: every layer in bf16 (measured 3.5e-3 on logits of magnitude 0.7).
    assert deviation < (1e-6 if dtype == "float32" else 1e-2)
    assert_merged_weights(nf4_run, merged, dtype)


def test_merge_refuses_non_empty_output(lora_run, tmp_path, capsys):
    (tmp_path / "x").write_text("keep me")
    assert script("merge_adapter").main([str(lora_run), str(tmp_path)]) == 2
    assert "is not empty" in capsys.readouterr().err


def snapshot(directory: Path) -> dict[str, tuple[int, int]]:
    """Every path under ``directory`` with its size and modification time."""
    return {str(p.relative_to(directory)): (p.stat().st_size, p.stat().st_mtime_ns) for p in directory.rglob("*")}


def test_merge_refuses_an_output_in_the_run_before_loading(lora_run, tmp_path, capsys):
    """Before: merge_adapter.py RUN RUN --overwrite wrote model.safetensors and config.json into the run, rewrote its
    tokenizer_config.json, then failed with shutil.SameFileError. Now refused before anything is loaded or written."""
    run = tmp_path / "run"
    shutil.copytree(lora_run, run, ignore=shutil.ignore_patterns("checkpoints"))
    before = snapshot(run)
    for source, out in (
        (run, run),
        (run, run / "best"),
        (run, run / "merged"),
        (run / "best", run),
        (run / "best", run / "best"),
        (run / "best", run / "best" / "x" / ".."),
    ):
        assert script("merge_adapter").main([str(source), str(out), "--overwrite"]) == 2
        err = capsys.readouterr().err
        assert "is the run" in err and "Give a directory outside the run" in err and "Traceback" not in err, err
    assert snapshot(run) == before


def test_eval_names_an_unusable_output_directory_before_evaluating(lora_run, tmp_path, capsys):
    """Before: eval.py on a read-only run evaluated everything, then failed with a traceback writing RUN/eval.
    (As root, permission bits do not stop a write; RUN/eval being a file takes the same path.)"""
    run = tmp_path / "run"
    shutil.copytree(lora_run, run, ignore=shutil.ignore_patterns("checkpoints", "eval"))
    (run / "eval").write_text("not a directory")
    assert script("eval").main([str(run)]) == 2
    err = capsys.readouterr().err
    assert f"the default output directory '{run / 'eval'}' is a file, not a directory" in err
    assert "--output-dir DIR" in err and "Traceback" not in err
    assert script("eval").main([str(tmp_path / "nothing_here")]) == 2  # not a run: named before any mkdir
    assert "neither an existing run directory" in capsys.readouterr().err
    assert not (tmp_path / "nothing_here").exists()


def test_eval_predict_merge_name_a_damaged_adapter_file(lora_run, tmp_path, capsys):
    """A truncated or garbled adapter is named before any model is loaded, by all three scripts."""
    run = tmp_path / "run"
    shutil.copytree(lora_run, run, ignore=shutil.ignore_patterns("checkpoints"))
    adapter = run / "adapter_model.safetensors"
    good = adapter.read_bytes()
    half = len(good) // 2
    truncated = (
        good[:half],
        (f"{adapter} is truncated or corrupt: its tensors need {len(good)} bytes, the file has {half}"),
    )
    garbled = (good[:8] + b"\0" * 16 + good[24:], f"{adapter} is corrupt: its safetensors header is not valid")
    for damage, message in (truncated, garbled):
        adapter.write_bytes(damage)
        for name, args in (("eval", []), ("predict", ["nice"]), ("merge_adapter", [str(tmp_path / "merged")])):
            assert script(name).main([str(run), *args]) == 2
            err = capsys.readouterr().err
            assert message in err and "Traceback" not in err, (name, err)
