"""Recipe parsing, overrides, typing and validation."""

from __future__ import annotations

import subprocess
import sys

import pytest

from lora_train.config import RecipeError, build_recipe, fields_help, load_recipe, parse_override
from tests.conftest import ROOT

RECIPES = sorted((ROOT / "recipes").rglob("*.yaml"))


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: str(p.relative_to(ROOT / "recipes")))
def test_every_shipped_recipe_is_valid(path):
    recipe = load_recipe(path)
    assert recipe.model.trust_remote_code is False
    assert recipe.output.output_dir.startswith("runs/")


def test_required_recipes_are_shipped():
    names = {p.name for p in (ROOT / "recipes").glob("*.yaml")}
    for task in ("sst2", "imdb", "emotion"):
        for method in ("lora", "qlora", "adalora"):
            assert f"{task}_{method}.yaml" in names


def test_overrides_are_typed_by_the_schema():
    recipe = build_recipe(
        {"training": {"learning_rate": 1e-3}},
        [
            "training.learning_rate=1e-4",
            "peft.r=16",
            "output.output_dir=runs/x",
            "peft.target_modules=[query,key]",
            "data.max_train_samples=null",
            "training.num_epochs=2",
            "quantization.method=nf4",
        ],
    )
    assert recipe.training.learning_rate == pytest.approx(1e-4)  # "1e-4" is a YAML string; the schema makes it a float
    assert recipe.peft.r == 16 and recipe.output.output_dir == "runs/x"
    assert recipe.peft.target_modules == ["query", "key"]
    assert recipe.training.num_epochs == 2.0 and isinstance(recipe.training.num_epochs, float)
    assert recipe.quantization.method == "nf4"


def test_all_linear_is_accepted_for_target_modules():
    assert build_recipe({"peft": {"target_modules": "all-linear"}}).peft.target_modules == "all-linear"


def test_every_problem_is_reported_at_once():
    with pytest.raises(RecipeError) as info:
        build_recipe(
            {
                "training": {"lerning_rate": 1e-3, "per_device_train_batch_size": "big"},
                "peft": {"r": 0, "dropout": 1.0},
                "modle": {},
            },
        )
    text = str(info.value)
    assert "unknown field 'training.lerning_rate' (did you mean 'learning_rate'?)" in text
    assert "training.per_device_train_batch_size = 'big' is invalid: expected an integer" in text
    assert "peft.r = 0 must be a positive integer" in text
    assert "peft.dropout = 1.0 must be in [0, 1)" in text
    assert "unknown section 'modle' (did you mean 'model'?)" in text
    assert len(info.value.problems) == 5


@pytest.mark.parametrize(
    "override,message",
    [
        ("training.learning_rate=0", "training.learning_rate = 0.0 must be > 0"),
        (
            "peft.method=prefix",
            "peft.method = 'prefix' is invalid: expected one of 'lora', 'adalora', 'ia3', 'prompt_tuning',",
        ),
        ("data.task=sst3", "data.task = 'sst3' is not a built-in task (did you mean 'sst2'?)"),
        ("training.warmup_ratio=1.5", "training.warmup_ratio = 1.5 must be in [0, 1)"),
        (
            "model.trust_remote_code=yes please",
            "model.trust_remote_code = 'yes please' is invalid: expected true/false",
        ),
        ("output.report_to=[mlflow]", "output.report_to: unknown tracker 'mlflow'"),
        ("output.push_to_hub=true", "output.hub_model_id must be 'user/name'"),
        ("trainingx.seed=1", "unknown section 'trainingx' in override 'trainingx.seed=1' (did you mean 'training'?)"),
        ("seed=1", "override key 'seed' must be section.field"),
        ("training.seed", "override 'training.seed' is not of the form section.field=value"),
    ],
)
def test_bad_values_name_the_field_and_what_is_valid(override, message):
    with pytest.raises(RecipeError) as info:
        build_recipe({}, [override])
    assert message in str(info.value)


def test_adalora_ranks_and_nf4_regimes_are_cross_checked():
    with pytest.raises(RecipeError, match=r"peft.target_r = 16 must be in \(0, init_r = 12\]"):
        build_recipe({"peft": {"method": "adalora", "init_r": 12, "target_r": 16}})
    with pytest.raises(RecipeError, match="peft.method must be lora or adalora, not 'full'"):
        build_recipe({"peft": {"method": "full"}, "quantization": {"method": "nf4"}})


def test_generic_dataset_needs_a_path_and_text_column():
    with pytest.raises(RecipeError) as info:
        build_recipe({"data": {"task": None}})
    assert "data.path must name" in str(info.value) and "data.text_column must be set" in str(info.value)


def test_malformed_yaml_reports_its_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  name_or_path: x\ntraining:\n  learning_rate: [1e-4\n  seed: 3\n")
    with pytest.raises(RecipeError, match=r"malformed YAML at line \d+"):
        load_recipe(bad)


def test_parse_override_reads_yaml_scalars():
    assert parse_override("peft.r=8") == ("peft", "r", 8)
    assert parse_override("data.task=null") == ("data", "task", None)
    assert parse_override("model.revision=") == ("model", "revision", "")
    assert parse_override("training.gradient_checkpointing=true") == ("training", "gradient_checkpointing", True)


def test_yes_no_on_off_stay_strings(tmp_path):
    """YAML 1.1 reads `no` as False, which made `training.mixed_precision=no` an invalid value."""
    assert parse_override("training.mixed_precision=no") == ("training", "mixed_precision", "no")
    assert build_recipe({}, ["training.mixed_precision=no"]).training.mixed_precision == "no"
    recipe = tmp_path / "r.yaml"
    recipe.write_text("training:\n  mixed_precision: no\n")
    assert load_recipe(recipe).training.mixed_precision == "no"


def test_help_lists_every_field_with_its_default():
    text = fields_help()
    assert "training.learning_rate = 0.0005" in text
    assert "peft.target_modules = [query, value]" in text
    assert text.count("\n      ") >= 60


def test_cli_fails_fast_on_a_typo_without_importing_torch():
    """The recipe is checked before torch and transformers are imported (the error costs milliseconds)."""
    code = (
        "import sys; from lora_train.commands.train import main as train_main\n"
        "try:\n    train_main(['recipes/cpu/sst2_lora.yaml', 'training.lerning_rate=1'])\n"
        "except SystemExit as e:\n    print('exit', e.code, 'torch' in sys.modules)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert "exit 2 False" in result.stdout
    assert "did you mean 'learning_rate'" in result.stderr


def test_scripts_help_lists_recipe_fields():
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "train.py"), "--help"], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0
    assert "quantization.double_quant" in result.stdout and "training.resume_from_checkpoint" in result.stdout


RECIPE_REFERENCE = ROOT / "docs" / "recipe_reference.md"


def recipe_reference_markdown() -> str:
    """docs/recipe_reference.md: every recipe field of the schema, its default, type and meaning."""
    from lora_train.config import fields_markdown

    return "\n".join(
        [
            "# Recipe reference",
            "",
            "<!-- generated by `python -m tests.test_config` from lora_train/config.py;"
            " tests/test_config.py checks it -->",
            "",
            "Every field of a recipe YAML, its default, its type and its meaning (also printed by"
            " `python scripts/train.py --help`). Override any of them on the command line as `section.field=value`,"
            " e.g. `python scripts/train.py recipes/cpu/sst2_lora.yaml training.learning_rate=2e-4 peft.r=16`.",
            "",
            fields_markdown().strip(),
            "",
        ]
    )


def test_recipe_reference_is_the_schema():
    assert RECIPE_REFERENCE.read_text() == recipe_reference_markdown(), "regenerate it: python -m tests.test_config"


if __name__ == "__main__":
    RECIPE_REFERENCE.write_text(recipe_reference_markdown())
    print(f"wrote {RECIPE_REFERENCE}")
