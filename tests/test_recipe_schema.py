"""recipes/recipe.schema.json (the JSON Schema editors validate recipes with) is generated from the typed schema and
kept equal to it."""

from __future__ import annotations

import json

from lora_train.config import load_yaml_text
from lora_train.methods import METHODS
from lora_train.recipe_schema import SCHEMA_FILE, recipe_schema, schema_text
from tests.conftest import ROOT


def test_schema_file_is_generated_from_the_code():
    assert SCHEMA_FILE.read_text() == schema_text(), "regenerate it: python -m lora_train.recipe_schema"


def test_schema_lists_every_method_of_the_table_and_the_pooling_options():
    properties = recipe_schema()["properties"]
    assert properties["peft"]["properties"]["method"]["enum"] == list(METHODS)
    assert properties["model"]["properties"]["pooling"]["enum"] == ["last", "mean"]
    assert json.loads(SCHEMA_FILE.read_text())["properties"]["peft"]["additionalProperties"] is False


def test_every_shipped_recipe_uses_only_fields_the_schema_declares():
    properties = recipe_schema()["properties"]
    for path in sorted((ROOT / "recipes").rglob("*.yaml")):
        for section, values in load_yaml_text(path.read_text()).items():
            assert section in properties, path
            assert set(values or {}) <= set(properties[section]["properties"]), path


def test_every_shipped_recipe_names_the_schema_for_editors():
    """Each recipe's first line points editors' YAML language server at the schema file, by a path that resolves."""
    for path in sorted((ROOT / "recipes").rglob("*.yaml")):
        first = path.read_text().splitlines()[0]
        prefix = "# yaml-language-server: $schema="
        assert first.startswith(prefix), f"{path}: first line should be {prefix}<relative path to recipe.schema.json>"
        assert (path.parent / first[len(prefix) :]).resolve() == SCHEMA_FILE, path
