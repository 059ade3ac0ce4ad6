"""The benchmark machinery on a tiny model and a few steps: jobs run in subprocesses, results add up, reports
are written. No timing is asserted (speed is measured with scripts/benchmark.py, see docs/performance.md)."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from lora_lab.benchmark import (
    CONTENDERS,
    MEMORY_VARIANTS,
    Settings,
    _job_recipe,
    interleaved_order,
    run_benchmark,
    run_memory,
    weight_memory,
)
from lora_train.config import build_recipe
from lora_train.train import train
from tests.conftest import reload_accuracy, tiny_recipe


def assert_summary_adds_up(report: dict, reference: str) -> None:
    """Each run's rates are its own counts over its own time, and each speedup is the reference's median samples/s
    over the contender's (a speedup that were always 1, or a median of the wrong runs, fails here)."""
    for run in report["runs"]:
        assert run["seconds"] > 0
        assert run["samples_per_s"] == pytest.approx(run["samples"] / run["seconds"])
        assert run["tokens_per_s"] == pytest.approx(run["tokens"] / run["seconds"])
        assert run["step_time_ms"] == pytest.approx(1000 * run["seconds"] / run["steps"])
        assert 0 <= run["padding_share"] < 1 and run["process_s"] > run["seconds"]
        assert run["padding_share"] == pytest.approx(1 - run["tokens"] / run["padded_tokens"])
        bound = report["compute_bound"]
        assert run["bound_fraction"] == pytest.approx(
            run["padded_tokens"] * bound["flops_per_token"] / run["seconds"] / (bound["peak_gflops"] * 1e9)
        )
        assert 0 < run["bound_fraction"] < 1
    summary = report["summary"]
    for name, row in summary.items():
        mine = sorted(r["samples_per_s"] for r in report["runs"] if r["contender"] == name)
        assert row["runs"] == len(mine) and row["samples_per_s_range"] == [mine[0], mine[-1]]
        assert row["samples_per_s"] == pytest.approx((mine[(len(mine) - 1) // 2] + mine[len(mine) // 2]) / 2)
        assert row["speedup"] == pytest.approx(summary[reference]["samples_per_s"] / row["samples_per_s"])
        assert row["process_speedup"] == pytest.approx(row["process_s"] / summary[reference]["process_s"])


def test_interleaved_order_rotates_and_runs_everyone_each_repeat():
    order = interleaved_order(["a", "b", "c"], 3)
    assert [n for _, n in order] == ["a", "b", "c", "b", "c", "a", "c", "a", "b"]
    assert [r for r, _ in order] == [0, 0, 0, 1, 1, 1, 2, 2, 2]


def test_settings_refuse_impossible_measurements():
    with pytest.raises(ValueError, match="measured steps"):
        Settings(measure_steps=0).check()
    with pytest.raises(ValueError, match="epochs"):
        Settings(epochs=0).check()


def test_three_contenders_measure_the_same_steps_and_data(tmp_path, tiny_bert_dir, toy_data_dir):
    recipe = build_recipe(
        tiny_recipe(tiny_bert_dir, toy_data_dir, tmp_path / "unused", data={"max_length": 32, "max_train_samples": 256})
    )
    settings = Settings(warmup_steps=2, measure_steps=4, repeats=1, threads=1)
    report = run_benchmark(recipe, settings, tmp_path / "bench", log=lambda _: None)

    runs = {r["contender"]: r for r in report["runs"]}
    assert set(runs) == set(CONTENDERS)
    for run in runs.values():
        assert run["steps"] == 4 and run["samples"] == 4 * 16  # the same 4 steps of 16 samples were timed
        assert run["torch_threads"] == 1
        assert run["peak_memory_mb"] > 300  # MB: a process with torch and transformers loaded, not bytes or GB
    # Our loop says where its seconds before the first step went (seconds since the process started, per phase).
    marks = runs["ours"]["startup_seconds"]
    assert list(marks) == ["imports_s", "accelerate_s", "data_s", "model_s", "first_step_s"]
    assert 0 < marks["imports_s"] <= marks["data_s"] <= marks["model_s"] <= marks["first_step_s"]
    assert marks["first_step_s"] < runs["ours"]["process_s"]
    # All three train the same LoRA model.
    assert len({(r["trainable_params"], r["total_params"]) for r in runs.values()}) == 1
    # Padding to max_length does not change the count of real (non-pad) tokens, and they are fewer than 32 per sample.
    for run in runs.values():
        assert 4 * 16 * 3 < run["tokens"] < 4 * 16 * 32
    # ... but their padding: the tutorial pads every text to 32 tokens, dynamic padding to the batch's longest.
    assert runs["trainer_max_length"]["padding_share"] == pytest.approx(
        1 - runs["trainer_max_length"]["tokens"] / (64 * 32)
    )
    assert runs["trainer_dynamic"]["padding_share"] < runs["trainer_max_length"]["padding_share"]
    summary = report["summary"]
    assert_summary_adds_up(report, "ours")
    # The tiny BERT: 2 layers of 4 64x64 attention and 2 64x128 feed-forward Linears (tests/conftest.py), x 4 FLOPs.
    assert report["compute_bound"]["flops_per_token"] == 4 * 2 * (4 * 64 * 64 + 2 * 64 * 128)
    assert report["compute_bound"]["dtype"] == "float32" and report["compute_bound"]["peak_gflops"] > 1
    saved = json.loads((tmp_path / "bench" / "results.json").read_text())
    assert saved["summary"] == summary and saved["machine"]["threads"] == 1
    markdown = (tmp_path / "bench" / "results.md").read_text()
    assert "padding=max_length" in markdown and "group_by_length" in markdown


def test_epochs_mode_reports_accuracy_on_the_whole_eval_split(tmp_path, tiny_bert_dir, toy_data_dir):
    recipe = build_recipe(tiny_recipe(tiny_bert_dir, toy_data_dir, tmp_path / "unused", data={"max_train_samples": 64}))
    settings = Settings(repeats=2, threads=1, epochs=1, seed_per_repeat=True)
    report = run_benchmark(recipe, settings, tmp_path / "bench", ("ours", "trainer_dynamic"), log=lambda _: None)
    for run in report["runs"]:
        assert run["steps"] == 4 and run["samples"] == 64
        assert run["eval_accuracy"] * 128 == round(run["eval_accuracy"] * 128)  # a share of the 128 validation rows
        job = json.loads((tmp_path / "bench" / "runs" / f"{run['repeat']}-{run['contender']}" / "job.json").read_text())
        assert job["recipe"]["training"]["seed"] == run["seed"] == recipe.training.seed + run["repeat"]
    for name, row in report["summary"].items():
        accuracies = [r["eval_accuracy"] for r in report["runs"] if r["contender"] == name]
        assert row["eval_accuracy_mean"] == pytest.approx(sum(accuracies) / 2)
    assert "mean ± std" in (tmp_path / "bench" / "results.md").read_text()
    # Our reported accuracy is what the job's own recipe trains to, measured on the whole validation split by a user
    # reloading the adapter (the job's run directory is temporary, so train it again: the run is deterministic).
    first = next(r for r in report["runs"] if r["contender"] == "ours" and r["repeat"] == 0)
    job = json.loads((tmp_path / "bench" / "runs" / "0-ours" / "job.json").read_text())
    again = train(_job_recipe(job, tmp_path / "again"))
    val = pd.read_parquet(toy_data_dir / "validation.parquet")
    reloaded = reload_accuracy(tmp_path / "again", list(val["text"]), val["label"].to_numpy(), 32)
    assert first["eval_accuracy"] == again["eval_accuracy"] == reloaded and again["eval_samples"] == len(val)


def test_nf4_weights_are_about_a_quarter_of_bf16(tiny_bert_dir, toy_data_dir, tmp_path):
    """On the tiny BERT, whose Linear layers are 64 wide (bitsandbytes' CPU minimum)."""
    from lora_train.modeling import apply_regime, load_base_model, load_model_config

    raw = tiny_recipe(tiny_bert_dir, toy_data_dir, tmp_path, quantization={"compute_dtype": "float32"})
    sizes = {}
    for name, overrides in MEMORY_VARIANTS.items():
        recipe = build_recipe(raw, overrides)
        model, heads = load_base_model(recipe, load_model_config(recipe, ["neg", "pos"]))
        sizes[name] = weight_memory(apply_regime(recipe, model, heads, 10))["linear_weight_bytes"]
    assert sizes["fp32"] == 2 * sizes["bf16"]
    # 4 bits per weight plus one float32 absmax per 64 weights (0.28x), less with double quantization.
    assert sizes["nf4"] / sizes["bf16"] == pytest.approx(0.28, abs=0.02)
    # Double quantization stores absmax in 8 bits, but each layer also carries a 256-entry float32 code: on 64x64
    # layers that outweighs the saving (on MiniLM's 384-wide layers it is a saving: docs/performance.md).
    assert sizes["nf4_double_quant"] != sizes["nf4"]
    assert 0.25 < sizes["nf4_double_quant"] / sizes["bf16"] < 0.5


def test_memory_mode_writes_its_table(tmp_path, tiny_bert_dir, toy_data_dir):
    raw = tiny_recipe(tiny_bert_dir, toy_data_dir, tmp_path / "unused", quantization={"compute_dtype": "float32"})
    report = run_memory(
        build_recipe(raw),
        Settings(warmup_steps=1, measure_steps=2, threads=1),
        tmp_path / "mem",
        ("nf4_double_quant",),
        log=lambda _: None,
    )
    (row,) = report["rows"]
    assert 0 < row["linear_weight_bytes"] < row["weight_bytes"] and row["peak_memory_mb"] > 0
    assert "nf4_double_quant" in (tmp_path / "mem" / "results.md").read_text()


def test_fast_dropout_drops_p_and_keeps_the_mean():
    import torch

    from lora_train.modeling import FastDropout, use_fast_dropout

    torch.manual_seed(0)
    drop = FastDropout(0.1)
    x = torch.ones(1000, 1000, requires_grad=True)
    y = drop(x)
    kept = y != 0
    assert kept.float().mean().item() == pytest.approx(0.9, abs=0.002)
    assert y.mean().item() == pytest.approx(1.0, abs=0.003)
    y.sum().backward()
    assert torch.equal(x.grad != 0, kept)  # gradients flow exactly through the kept elements
    drop.eval()
    assert drop(x) is x
    # the recipe allows any p < 1: one that rounds to 1 on the 1/65536 grid still keeps some and stays finite
    nearly_all = FastDropout(0.999995)(torch.ones(1 << 20))
    assert nearly_all.isfinite().all() and 0 < (nearly_all != 0).sum().item() < 100
    model = torch.nn.Sequential(
        torch.nn.Linear(4, 4), torch.nn.Dropout(0.2), torch.nn.Sequential(torch.nn.Dropout(0.3))
    )
    assert use_fast_dropout(model) == 2
    assert [type(m).__name__ for m in model.modules()].count("FastDropout") == 2 and model[2][0].p == 0.3


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_fast_dropout_is_bit_for_bit_the_product_with_its_mask(dtype):
    """The uint8 mask is a speed change only: output and gradient equal autograd's for ``x * keep * scale`` with a
    bool mask of the same draws, in either dtype."""
    import torch

    from lora_train.modeling import FastDropout

    x = torch.randn(32, 22, 384).to(getattr(torch, dtype)).requires_grad_()
    grad = torch.randn_like(x)
    torch.manual_seed(3)
    y = FastDropout(0.1)(x)
    y.backward(grad)

    torch.manual_seed(3)  # the same draws, as the mask was made before
    dropped = round(0.1 * 65536)
    bits = torch.empty((x.numel() + 3) // 4, dtype=torch.int64).random_(-(2**63), None)
    keep = bits.view(torch.int16)[: x.numel()].view(x.shape) >= dropped - 32768
    x2 = x.detach().clone().requires_grad_()
    expected = x2 * keep * (65536 / (65536 - dropped))
    expected.backward(grad)
    assert y.dtype == x.dtype and torch.equal(y, expected)
    assert torch.equal(x.grad, x2.grad)
    assert 0.09 < 1 - keep.float().mean().item() < 0.11


def test_lever_ablation_times_a_bare_loop_with_and_without_each_lever(tmp_path, tiny_bert_dir, toy_data_dir):
    recipe = build_recipe(tiny_recipe(tiny_bert_dir, toy_data_dir, tmp_path / "unused", peft={"dropout": 0.1}))
    report = run_benchmark(
        recipe,
        Settings(warmup_steps=1, measure_steps=3, repeats=1, threads=1),
        tmp_path / "levers",
        ("plain", "all"),
        log=lambda _: None,
        reference="all",
    )
    assert {r["contender"] for r in report["runs"]} == {"plain", "all"}
    assert all(r["steps"] == 3 and r["samples"] == 3 * 16 for r in report["runs"])
    assert_summary_adds_up(report, "all")
    plain, levers_on = sorted(report["runs"], key=lambda r: r["contender"] != "plain")
    assert plain["tokens"] == levers_on["tokens"]  # both loops timed the same batches
    assert "FastDropout" in (tmp_path / "levers" / "results.md").read_text()
