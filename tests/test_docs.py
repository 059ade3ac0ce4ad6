"""The README and docs/ name only files that exist: every recipe, script, example, Accelerate config and page."""

from __future__ import annotations

import re

from tests.conftest import ROOT

PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
NAMED_PATH = re.compile(
    r"(?<![\w/.-])((?:recipes|scripts|examples|accelerate_configs|docs)/[\w./-]*\.(?:yaml|py|md|csv|sbatch|png|json))"
)
"""A path from the project root to a file of one of these kinds, as the pages write it (in commands, links, tables).
Placeholders (`recipes/cpu/NAME.yaml`) and patterns (`recipes/*_qlora.yaml`, `{lora,qlora}`) do not match."""


def named_paths() -> dict[str, list[str]]:
    """Every path the pages name, with the pages that name it."""
    named: dict[str, list[str]] = {}
    for page in PAGES:
        for path in dict.fromkeys(NAMED_PATH.findall(page.read_text())):  # each path once per page, in order
            if not re.search(r"/[A-Z_]+\.\w+$", path):  # NAME.yaml, RECIPE.yaml: placeholders
                named.setdefault(path, []).append(page.relative_to(ROOT).as_posix())
    return named


def test_every_path_the_docs_name_exists():
    named = named_paths()
    assert "recipes/cpu/sst2_lora.yaml" in named and "scripts/train.py" in named  # the pattern finds them
    missing = {path: pages for path, pages in named.items() if not (ROOT / path).exists()}
    assert not missing, f"named in the docs but not in the project: {missing}"
