"""A failed Hub or cache lookup names what is missing (the repo, the revision or a file) and where it looked,
instead of the Hub libraries' "couldn't connect" that sends an offline user after their network."""

from __future__ import annotations

from pathlib import Path

import pytest
from huggingface_hub import constants

from lora_train.config import RecipeError, load_recipe
from lora_train.hub import cache_problem
from lora_train.inference import RunError, resolve_run
from lora_train.modeling import load_model_config
from tests.conftest import ROOT, needs_shared

COMMIT = "c9745ed1d9f207416be6d2e6f8de32d1f16199bf"


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    """A Hub cache in the Hub's own layout holding one model at one revision."""
    snapshot = tmp_path / "models--org--model" / "snapshots" / COMMIT
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text("{}")
    (tmp_path / "models--org--model" / "refs").mkdir()
    (tmp_path / "models--org--model" / "refs" / "main").write_text(COMMIT)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    return tmp_path


def test_the_cache_names_the_missing_repo_revision_or_file(cache):
    assert cache_problem("org/model") is None and cache_problem("org/model", COMMIT, filename="config.json") is None
    assert cache_problem("org/other") == (
        f"the model repo 'org/other' is not in the Hub cache {cache} (it holds the models org/model)"
    )
    assert cache_problem("org/model", "v2") == (
        f"revision 'v2' of 'org/model' is not in the Hub cache {cache / 'models--org--model'} (cached revisions:"
        f" main ({COMMIT[:12]})); use one of those (model.revision) or download that revision"
    )
    assert cache_problem("org/model", filename="tokenizer.json") == (
        f"'org/model' at revision 'main' has no file tokenizer.json in the Hub cache"
        f" {cache / 'models--org--model' / 'snapshots' / COMMIT}"
    )
    assert cache_problem("org/other", repo_type="dataset").endswith("(it holds no datasets)")
    assert cache_problem("not a repo id") is None


@needs_shared
def test_a_model_cached_under_another_revision_is_reported_as_such(monkeypatch):
    """Before: 'cannot be loaded: We couldn't connect to https://huggingface.co ... Check your internet
    connection'."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    recipe = load_recipe(ROOT / "recipes" / "cpu" / "sst2_lora.yaml", ["model.revision=v9"])
    with pytest.raises(RecipeError) as refused:
        load_model_config(recipe)
    message = str(refused.value)
    assert "(revision 'v9') cannot be loaded: revision 'v9' of 'sentence-transformers/all-MiniLM-L6-v2'" in message
    assert f"cached revisions: main ({COMMIT[:12]})" in message and "couldn't connect" not in message
    with pytest.raises(RunError, match="the model repo 'someone/missing-run' is not in the Hub cache"):
        resolve_run("someone/missing-run")
