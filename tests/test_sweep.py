"""Sweep machinery: grid expansion with tied axes, validation before work, a tiny real grid end to end."""

from __future__ import annotations

import csv
import json

import pytest

from lora_lab import sweep
from lora_lab.commands import sweep as sweep_command
from lora_lab.studies import comparison_table, frozen_features, over_seeds, pareto_front, rank_arms
from lora_train.config import RecipeError
from tests.conftest import tiny_recipe, write_recipe


def test_lists_expand_to_the_product_and_tied_axes_follow():
    runs = sweep.expand_grid(["peft.r=1,2,4", "peft.alpha=2*peft.r", "training.seed=0,1"])
    assert len(runs) == 6
    assert [(r["peft.r"], r["peft.alpha"]) for r in runs[::2]] == [("1", "2"), ("2", "4"), ("4", "8")]
    assert list(runs[0]) == ["peft.r", "peft.alpha", "training.seed"]
    assert sweep.expand_grid(["peft.r=8,16", "peft.alpha=0.5*peft.r"])[1]["peft.alpha"] == "8"
    assert sweep.expand_grid(["peft.r=4", "peft.alpha=peft.r"]) == [{"peft.r": "4", "peft.alpha": "4"}]
    assert sweep.expand_grid(["peft.alpha=16"]) == [{"peft.alpha": "16"}]


def test_commas_inside_brackets_do_not_split():
    runs = sweep.expand_grid(["peft.target_modules=[query,value],[query,key,value]"])
    assert [r["peft.target_modules"] for r in runs] == ["[query,value]", "[query,key,value]"]
    assert sweep.run_name(runs[1]) == "target_modules-query-key-value"
    assert (
        sweep.run_name({"peft.method": "lora", "quantization.method": "nf4"})
        == "peft.method-lora_quantization.method-nf4"
    )


def test_long_run_names_are_cut_and_stay_unique():
    """Names past the file-system limit (255 bytes) are cut and end in a hash of the full name."""
    long = {f"training.field_{i}": "x" * 20 for i in range(12)}
    other = {**long, "training.field_11": "y" * 20}
    name, other_name = sweep.run_name(long), sweep.run_name(other)
    assert len(name) == sweep.MAX_NAME and name.startswith("field_0-xxxx") and name != other_name


@pytest.mark.parametrize(
    "specs,message",
    [
        (["peft.alpha=2*peft.r"], "not a list axis of the same grid"),
        (["peft.r=1,,2"], "malformed"),
        (["peft.target_modules=[query,value"], "malformed"),
        (["r=1,2"], "must be section.field"),
        (["peft.r"], "not of the form"),
        (["peft.r=1", "peft.r=2"], "given twice"),
        (["peft.method=lora,full", "peft.alpha=2*peft.method"], "needs numeric values"),
    ],
)
def test_bad_grids_are_refused_with_the_reason(specs, message):
    with pytest.raises(RecipeError, match=message):
        sweep.expand_grid(specs)


def test_arms_sharing_a_run_train_it_once(tmp_path):
    runs = sweep.plan(
        {"scaled": ["peft.r=4,8", "peft.alpha=2*peft.r"], "fixed": ["peft.r=4,8", "peft.alpha=16"]}, tmp_path
    )
    assert [r.name for r in runs] == ["r-4_alpha-8", "r-8_alpha-16", "r-4_alpha-16", "r-8_alpha-16"]
    assert len(sweep.unique(runs)) == 3
    study_runs = sweep.plan(rank_arms(3), tmp_path)
    assert len(sweep.unique(study_runs)) == 3 * (3 + 6) + 3 * 5  # the alpha=16, r=8 run is the alpha=2r one


def test_every_run_is_validated_before_any_trains(tmp_path, tiny_bert_dir, toy_data_dir):
    recipe = write_recipe(tmp_path / "r.yaml", tiny_recipe(tiny_bert_dir, toy_data_dir, tmp_path / "unused"))
    runs = sweep.plan({"main": ["peft.r=4,0", "peft.dropout=0.1,1.5"]}, tmp_path / "sweep")
    with pytest.raises(RecipeError) as err:
        sweep.run_sweep(recipe, runs)
    text = str(err.value)
    assert "run r-0_dropout-0.1: peft.r = 0 must be a positive integer" in text and "peft.dropout = 1.5" in text
    assert not (tmp_path / "sweep").exists()


def test_aggregate_means_and_sample_std_over_seeds():
    rows = [
        {"run": f"s{s}", "arm": "a", "peft.r": "8", "training.seed": str(s), "eval_accuracy": acc}
        for s, acc in enumerate((0.80, 0.82, 0.84))
    ]
    rows.append({"run": "x", "arm": "a", "peft.r": "16", "training.seed": "0", "eval_accuracy": 0.9})
    agg = sweep.aggregate(rows, "training.seed", ["eval_accuracy"])
    assert [(a["peft.r"], a["n"]) for a in agg] == [("8", 3), ("16", 1)]
    assert agg[0]["eval_accuracy"] == pytest.approx(0.82) and agg[0]["eval_accuracy_std"] == pytest.approx(0.02)
    assert agg[1]["eval_accuracy_std"] == 0.0


def test_study_tables_give_mean_and_std_over_seeds_per_arm():
    def row(arm, seed, acc, f1, seconds):
        return {
            "run": f"{arm}-{seed}",
            "arm": arm,
            **({"training.seed": str(seed)} if seed is not None else {}),
            "eval_accuracy": acc,
            "eval_macro_f1": f1,
            "train_seconds": seconds,
            "train_samples_per_s": 10.0,
            "peak_memory_mb": 1000.0,
            "trainable_params": 770,
            "wall_seconds": None,
        }

    rows = [row("features", None, 0.6, 0.5, 9.0)] + [
        row("lora", s, acc, 0.7, 100.0 + s) for s, acc in enumerate((0.80, 0.84))
    ]
    arms = over_seeds(rows)
    assert [(a["arm"], a["n"]) for a in arms] == [("features", 1), ("lora", 2)]
    table = comparison_table(arms, lambda a: a["arm"]).splitlines()
    assert table[2].startswith("| features | 1 | 60.0 | 50.0 | 9 |")
    assert table[3].startswith("| lora | 2 | 82.0 ± 2.8 | 70.0 ± 0.0 | 100 ± 1 |")


def test_pareto_front_keeps_only_undominated_points():
    points = [(100, 0.80), (1000, 0.79), (10, 0.70), (1000, 0.85), (50, 0.70), (1e6, 0.84)]
    assert pareto_front(points) == [(10, 0.70), (100, 0.80), (1000, 0.85)]


def test_tiny_grid_end_to_end_then_resumes(tmp_path, tiny_bert_dir, toy_data_dir):
    """Real LoRA runs of a tiny BERT, each in its own process and directory, a failing run, and the tables."""
    recipe = write_recipe(
        tmp_path / "r.yaml",
        tiny_recipe(tiny_bert_dir, toy_data_dir, tmp_path / "unused", training={"num_epochs": 1, "save_steps": 1000}),
    )
    out = tmp_path / "sweep"
    # "nonexistent" is not a module of this model: that run fails at its model check, the others still run.
    argv = [
        str(recipe),
        "peft.r=2,4",
        "peft.alpha=2*peft.r",
        "--grid",
        "peft.target_modules=[nonexistent]",
        "--out",
        str(out),
        "--aggregate-over",
        "peft.target_modules",
    ]
    assert sweep_command.main(argv) == 1
    assert "not found" in (out / "logs" / "target_modules-nonexistent.log").read_text()
    assert not (out / "target_modules-nonexistent" / "metrics.json").exists()
    for r in (2, 4):
        run_dir = out / f"r-{r}_alpha-{2 * r}"
        config = json.loads((run_dir / "adapter_config.json").read_text())
        assert (config["r"], config["lora_alpha"]) == (r, 2 * r)
        assert json.loads((run_dir / "metrics.json").read_text())["global_step"] == 32
        assert json.loads((run_dir / "sweep_run.json").read_text())["wall_seconds"] > 0
        assert (out / "logs" / f"{run_dir.name}.log").exists()
    with open(out / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert [(row["run"], row["state"]) for row in rows] == [
        ("r-2_alpha-4", "complete"),
        ("r-4_alpha-8", "complete"),
        ("target_modules-nonexistent", "failed"),
    ]
    rows = rows[:2]
    assert [(row["peft.r"], row["peft.alpha"]) for row in rows] == [("2", "4"), ("4", "8")]
    assert int(rows[1]["trainable_params"]) - int(rows[0]["trainable_params"]) == 2 * 2 * (
        2 * 64 * 2
    )  # 2 layers x q,v x (A+B) x 2 more ranks
    for row in rows:  # the table reports each run's own metrics and logged rates, not placeholders
        metrics = json.loads((out / row["run"] / "metrics.json").read_text())
        history = json.loads((out / row["run"] / "history.json").read_text())
        rates = [h["samples_per_s"] for h in history if "samples_per_s" in h]
        assert float(row["eval_accuracy"]) == pytest.approx(metrics["eval_accuracy"], abs=1e-12)
        assert float(row["train_samples_per_s"]) == pytest.approx(sum(rates) / len(rates))
    assert "| run | state | arm | peft.r | peft.alpha | eval_accuracy |" in (out / "results.md").read_text()
    summary = list(csv.DictReader(open(out / "summary.csv")))
    assert [(row["peft.r"], row["n"]) for row in summary] == [("2", "1"), ("4", "1")]

    stamp = (out / "r-2_alpha-4" / "metrics.json").stat().st_mtime_ns
    assert sweep_command.main(argv[:3] + argv[5:]) == 0  # the same grid without the failing arm: all skipped
    assert (out / "r-2_alpha-4" / "metrics.json").stat().st_mtime_ns == stamp


def test_frozen_features_baseline_on_a_tiny_model(tmp_path, tiny_bert_dir, toy_data_dir):
    recipe = write_recipe(tmp_path / "r.yaml", tiny_recipe(tiny_bert_dir, toy_data_dir, tmp_path / "unused"))
    metrics = frozen_features(str(recipe), tmp_path / "features")
    assert metrics["trainable_params"] == 64 + 1  # binary LogisticRegression on 64-d mean-pooled features
    assert metrics["eval_samples"] == 128 and metrics["train_examples"] == 512
    assert 0.5 < metrics["eval_accuracy"] <= 1.0 and metrics["peak_memory_mb"] > 0
    assert json.loads((tmp_path / "features" / "metrics.json").read_text())["eval_macro_f1"] == metrics["eval_macro_f1"]


@pytest.mark.parametrize("name", ["rank", "regimes", "quant", "peft_methods", "seed_comparisons"])
def test_every_study_plans_valid_runs(name, tmp_path):
    """Each study's arms are valid overrides of its recipe (checked before any run trains), with usable names."""
    from lora_lab.studies import STUDIES

    study = STUDIES[name]
    runs = sweep.plan(study.arms(study.seeds), tmp_path)
    sweep.validate_runs(study.recipe, sweep.unique(runs))
    assert runs and all(len(run.name) <= sweep.MAX_NAME for run in runs)
