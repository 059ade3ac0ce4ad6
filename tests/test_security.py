"""Safety: a run writes weights only as safetensors, the package never unpickles, and a Hub token planted in
the environment of a real run appears in none of its files or logs."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from safetensors import safe_open

from tests.conftest import ROOT, tiny_recipe, write_recipe

FAKE_TOKEN = "hf_lOrAtRaInFaKeToKeN0123456789abcdefXYZ"
PICKLE_SUFFIXES = {".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt", ".joblib", ".npy", ".npz"}
WRITTEN_SUFFIXES = {".safetensors", ".json", ".yaml", ".yml", ".md", ".png", ".txt", ""}
"""What a run directory may hold: weights, JSON / YAML / Markdown / text, the learning-curve plot, the COMPLETE
marker, tensorboard hparams; tensorboard event files are matched by name."""


def looks_pickled(path: Path) -> bool:
    """A raw pickle (protocol 2-5 header ... STOP) or a torch.save zip (which holds a data.pkl)."""
    data = path.read_bytes()
    if len(data) > 2 and data[0] == 0x80 and 2 <= data[1] <= 5 and data.rstrip().endswith(b"."):
        return True
    return zipfile.is_zipfile(path) and any(name.endswith(".pkl") for name in zipfile.ZipFile(path).namelist())


@pytest.fixture(scope="module")
def token_run(tmp_path_factory, tiny_bert_dir, toy_data_dir) -> tuple[Path, Path, str]:
    """A real run (checkpoints, best adapter, tensorboard) with a Hub token in its environment."""
    tmp = tmp_path_factory.mktemp("token_run")
    out, datasets_cache = tmp / "run", tmp / "datasets_cache"
    raw = tiny_recipe(
        tiny_bert_dir,
        toy_data_dir,
        out,
        training={"num_epochs": 1, "save_steps": 8, "eval_steps": 16},
        output={"report_to": ["tensorboard"]},
    )
    recipe = write_recipe(tmp / "recipe.yaml", raw)
    env = {
        **os.environ,
        "HF_TOKEN": FAKE_TOKEN,
        "HUGGING_FACE_HUB_TOKEN": FAKE_TOKEN,
        "HF_DATASETS_CACHE": str(datasets_cache),
    }
    done = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "train.py"), str(recipe)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    log = done.stdout + done.stderr
    assert done.returncode == 0, log[-3000:]
    return out, datasets_cache, log


def test_token_is_never_logged_or_written(token_run):
    out, datasets_cache, log = token_run
    assert "saved checkpoint" in log  # the log is the real one, not an empty capture
    assert FAKE_TOKEN not in log
    written = [p for root in (out, datasets_cache) for p in root.rglob("*") if p.is_file()]
    assert len(written) > 20 and any("tfevents" in p.name for p in written)
    leaking = [str(p) for p in written if FAKE_TOKEN.encode() in p.read_bytes()]
    assert leaking == []


def test_run_writes_weights_only_as_safetensors(token_run):
    out, _, _ = token_run
    files = [p for p in out.rglob("*") if p.is_file()]
    assert [p for p in files if p.suffix in PICKLE_SUFFIXES or looks_pickled(p)] == []
    unexpected = [p for p in files if p.suffix not in WRITTEN_SUFFIXES and "tfevents" not in p.name]
    assert unexpected == []
    weights = [p for p in files if p.suffix == ".safetensors"]
    # final adapter, best adapter, and per checkpoint: trainable weights, optimizer and RNG state
    expected = {"adapter_model.safetensors", "trainable.safetensors", "optimizer.safetensors", "rng-rank0.safetensors"}
    assert expected <= {p.name for p in weights}
    for path in weights:
        with safe_open(path, "pt") as f:
            assert list(f.keys())


FORBIDDEN_MODULES = {"pickle", "cPickle", "_pickle", "dill", "cloudpickle", "joblib", "marshal", "shelve"}
FORBIDDEN_KEYWORDS = {
    ("weights_only", False),
    ("allow_pickle", True),
    ("safe_serialization", False),
    ("use_safetensors", False),
    ("trust_remote_code", True),
}


def unsafe_calls(source: str) -> list[str]:
    """Pickle-based loading in Python source: imports of pickle-like modules, torch.load / pickle.load calls,
    and keyword arguments that switch safe loading or saving off."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [f"import {a.name}" for a in node.names if a.name.split(".")[0] in FORBIDDEN_MODULES]
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in FORBIDDEN_MODULES:
            found.append(f"from {node.module} import ...")
        elif isinstance(node, ast.Call):
            func = node.func
            if (
                isinstance(func, ast.Attribute)
                and func.attr in ("load", "loads", "Unpickler")
                and isinstance(func.value, ast.Name)
                and func.value.id in FORBIDDEN_MODULES | {"torch"}
            ):
                found.append(f"{func.value.id}.{func.attr}()")
            found += [
                f"{k.arg}={k.value.value!r}"
                for k in node.keywords
                if isinstance(k.value, ast.Constant) and (k.arg, k.value.value) in FORBIDDEN_KEYWORDS
            ]
    return found


def test_the_scanner_sees_unsafe_loading():
    assert unsafe_calls("import torch\nstate = torch.load(path)\n") == ["torch.load()"]
    assert unsafe_calls("import pickle\npickle.loads(b)\n") == ["import pickle", "pickle.loads()"]
    assert unsafe_calls("m = M.from_pretrained(p, trust_remote_code=True, use_safetensors=False)\n") == [
        "trust_remote_code=True",
        "use_safetensors=False",
    ]


def test_package_never_unpickles():
    sources = sorted((ROOT / "lora_train").rglob("*.py")) + sorted((ROOT / "scripts").glob("*.py"))
    assert len(sources) > 10
    found = {str(p.relative_to(ROOT)): hits for p in sources if (hits := unsafe_calls(p.read_text()))}
    assert found == {}
