"""A JSON Schema of the recipe, generated from the typed schema in :mod:`lora_train.config`.

Editors with a YAML language server validate and complete a recipe as it is typed when it starts with
``# yaml-language-server: $schema=recipe.schema.json`` (a path relative to the recipe, or the file's URL). The file
``recipes/recipe.schema.json`` is written by ``python -m lora_train.recipe_schema``; a test keeps it equal to the
code. Value ranges and cross-field rules stay in :func:`lora_train.config.validate` (run by every program).
"""

from __future__ import annotations

import dataclasses
import json
import sys
import types
import typing
from pathlib import Path
from typing import Any, Literal, Union

from lora_train.config import SECTIONS, Recipe

SCHEMA_FILE = Path(__file__).resolve().parent.parent / "recipes" / "recipe.schema.json"
_JSON_TYPES = {bool: "boolean", int: "integer", float: "number", str: "string"}


def type_schema(tp: Any) -> dict[str, Any]:
    """The JSON Schema of one schema type (``Literal``, ``Optional`` / unions, lists and scalars)."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Literal:
        return {"enum": list(args)}
    if origin in (Union, types.UnionType):
        return {"anyOf": [{"type": "null"} if a is type(None) else type_schema(a) for a in args]}
    if origin is list:
        return {"type": "array", "items": type_schema(args[0])}
    return {"type": _JSON_TYPES[tp]}


def _default(spec: dataclasses.Field) -> Any:
    return spec.default_factory() if spec.default is dataclasses.MISSING else spec.default  # type: ignore[misc]


def section_schema(cls: type) -> dict[str, Any]:
    """One recipe section: its fields with type, default and help text; no other keys."""
    hints = typing.get_type_hints(cls)
    properties = {
        f.name: {**type_schema(hints[f.name]), "default": _default(f), "description": f.metadata["help"]}
        for f in dataclasses.fields(cls)
    }
    return {
        "type": ["object", "null"],
        "description": cls.__doc__,
        "properties": properties,
        "additionalProperties": False,
    }


def recipe_schema() -> dict[str, Any]:
    """The whole recipe's JSON Schema (draft 2020-12)."""
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "title": "lora_train recipe",
        "description": Recipe.__doc__,
        "type": "object",
        "properties": {section: section_schema(cls) for section, cls in SECTIONS.items()},
        "additionalProperties": False,
    }


def schema_text() -> str:
    return json.dumps(recipe_schema(), indent=1) + "\n"


def main() -> int:
    """Write recipes/recipe.schema.json (run after changing the schema; tests/test_recipe_schema.py checks it)."""
    SCHEMA_FILE.write_text(schema_text())
    print(f"wrote {SCHEMA_FILE}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
