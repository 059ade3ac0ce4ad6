"""Checkpoints that survive faults: exact resume, SIGKILL mid-run and mid-save, SIGTERM, non-finite loss.

"Exact" means bitwise on CPU: the same per-step losses (history.json ``step_losses``), the same evaluations
and the same final adapter tensors as the uninterrupted run, with dropout on and gradient accumulation.

The in-process tests resume from a checkpoint an uninterrupted run saved at step k: that directory is what an
interrupted run leaves behind (the run is identical up to k). The subprocess tests interrupt real
``scripts/train.py`` processes with real signals and resume them here, through the command line's code path.
"""

from __future__ import annotations

import json
import logging
import os
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from lora_train import checkpoint as ckpt
from lora_train.commands.train import main as train_main
from lora_train.config import RecipeError, build_recipe
from lora_train.data import EpochSampler
from lora_train.train import TrainingError, train
from tests.conftest import ROOT, tiny_recipe, write_recipe

# ---------------------------------------------------------------------------------------------
# Comparing two runs


def step_losses(run: Path) -> list[float]:
    """Every optimizer step's loss, in order (log windows may be cut differently by an interruption)."""
    history = json.loads((run / "history.json").read_text())
    return [loss for entry in history if "step_losses" in entry for loss in entry["step_losses"]]


def evaluations(run: Path) -> list[tuple]:
    history = json.loads((run / "history.json").read_text())
    return [(e["step"], e["eval_loss"], e["eval_accuracy"]) for e in history if "eval_loss" in e]


def adapter_config(run: Path) -> dict:
    """adapter_config.json; peft keeps target_modules in a set, written in each process's string-hash order."""
    config = json.loads((run / "adapter_config.json").read_text())
    config["target_modules"] = sorted(config["target_modules"])
    return config


def assert_same_run(reference: Path, resumed: Path) -> None:
    """Bitwise: losses, evaluations, final adapter tensors and config, best-adapter bookkeeping."""
    expected = step_losses(reference)
    assert len(expected) == json.loads((reference / "metrics.json").read_text())["global_step"]
    assert step_losses(resumed) == expected
    assert evaluations(resumed) == evaluations(reference)
    a, b = load_file(reference / "adapter_model.safetensors"), load_file(resumed / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    assert [k for k in a if not torch.equal(a[k], b[k])] == []
    assert adapter_config(resumed) == adapter_config(reference)
    ma, mb = (json.loads((run / "metrics.json").read_text()) for run in (reference, resumed))
    assert (mb["best_step"], mb["best_eval_accuracy"], mb["eval_loss"]) == (
        ma["best_step"],
        ma["best_eval_accuracy"],
        ma["eval_loss"],
    )


# ---------------------------------------------------------------------------------------------
# In process: every method, mid-epoch in both epochs, accumulation 3, dropout on


@pytest.mark.parametrize("method,quant", [("lora", "none"), ("adalora", "none"), ("lora", "nf4")])
def test_resume_mid_epoch_is_bitwise_exact(tmp_path, tiny_bert_dir, toy_data_dir, method, quant):
    # 32 batches per epoch, 3 per optimizer step -> 11 steps per epoch (the last one of 2 batches), 22 in all.
    # AdaLoRA fixes its budget at step 22 - tfinal = 18, so resuming at 20 needs the saved rank pattern.
    sections = dict(
        peft={"method": method, "dropout": 0.1, "init_r": 6, "target_r": 4, "tinit": 2, "tfinal": 4, "deltaT": 2},
        quantization={"method": quant, "compute_dtype": "float32"},
        training={
            "gradient_accumulation_steps": 3,
            "save_steps": 5,
            "eval_steps": 7,
            "logging_steps": 2,
            "keep_last": 10,
        },
    )
    reference = tmp_path / "reference"
    train(build_recipe(tiny_recipe(tiny_bert_dir, toy_data_dir, reference, **sections)))
    saved = sorted(p.name for p in (reference / "checkpoints").iterdir())
    assert saved == ["step-00000005", "step-00000010", "step-00000015", "step-00000020"]

    for step, (epoch, batch) in ((5, (0, 15)), (20, (1, 27))):
        resumed = tmp_path / f"resumed-{step}"
        shutil.copytree(
            reference / "checkpoints" / ckpt.checkpoint_name(step), resumed / "checkpoints" / ckpt.checkpoint_name(step)
        )
        loop = json.loads((resumed / "checkpoints" / ckpt.checkpoint_name(step) / "state.json").read_text())["loop"]
        assert (loop["epoch"], loop["batches_in_epoch"]) == (epoch, batch)  # mid-epoch, on an accumulation boundary
        sections["training"]["resume_from_checkpoint"] = "latest"
        metrics = train(build_recipe(tiny_recipe(tiny_bert_dir, toy_data_dir, resumed, **sections)))
        assert metrics["resumed_from_step"] == step
        assert_same_run(reference, resumed)


def test_every_epoch_draws_its_own_order(tmp_path, tiny_bert_dir, toy_data_dir, monkeypatch):
    """The data order is a function of (seed, epoch): epoch 2 must not replay epoch 1's order.

    Accelerate's loader sets the sampler's epoch from its own counter at every iteration start; the loop
    must keep that counter on the loop's epoch (it breaks out at the epoch end, before Accelerate counts).
    """
    epochs = []
    original = EpochSampler.__iter__

    def recording_iter(self):
        epochs.append(self.epoch)
        return original(self)

    monkeypatch.setattr(EpochSampler, "__iter__", recording_iter)
    train(build_recipe(tiny_recipe(tiny_bert_dir, toy_data_dir, tmp_path / "run", training={"num_epochs": 3})))
    assert epochs == [0, 1, 2]


def test_incomplete_or_damaged_checkpoints_are_named_and_skipped(tmp_path, tiny_bert_dir, toy_data_dir, caplog):
    out = tmp_path / "run"
    raw = tiny_recipe(tiny_bert_dir, toy_data_dir, out, training={"num_epochs": 1, "save_steps": 8, "keep_last": 5})
    train(build_recipe(raw))
    root = out / "checkpoints"
    # A directory with the name of a newer checkpoint but no COMPLETE marker (e.g. copied half-way).
    shutil.copytree(root / "step-00000032", root / "step-00000040")
    (root / "step-00000040" / ckpt.COMPLETE_MARKER).unlink()
    # The newest complete one truncated (a copy or a disk that lost its tail), the next one altered in place.
    optimizer = root / "step-00000032" / "optimizer.safetensors"
    size = optimizer.stat().st_size
    os.truncate(optimizer, size - 100)
    trainable = root / "step-00000024" / "trainable.safetensors"
    data = bytearray(trainable.read_bytes())
    data[-5] ^= 0xFF  # one byte of a tensor: sizes and header still fine, only the sha256 tells
    trainable.write_bytes(bytes(data))

    logger = logging.getLogger("lora_train.checkpoint")
    logger.addHandler(caplog.handler)  # train() reconfigured the root logger, dropping pytest's handler
    try:
        assert ckpt.resolve_resume("latest", root) == root / "step-00000016"
    finally:
        logger.removeHandler(caplog.handler)
    assert "skipping incomplete checkpoint" in caplog.text and "step-00000040" in caplog.text
    assert (
        f"checkpoint {root / 'step-00000032'} is damaged and skipped: {optimizer} is truncated or corrupt:"
        f" {size - 100} bytes, {size} were written"
    ) in caplog.text
    assert f"{trainable} is corrupt: its sha256 differs from the one written with the checkpoint" in caplog.text
    assert (
        f"resuming from {root / 'step-00000016'}, the newest intact checkpoint, instead of {root / 'step-00000032'}"
    ) in caplog.text
    with pytest.raises(Exception, match="not a complete checkpoint directory"):
        ckpt.resolve_resume(str(root / "step-00000040"), root)
    with pytest.raises(RecipeError) as err:  # a damaged checkpoint given by path: refused, naming the one to pass
        ckpt.resolve_resume(str(root / "step-00000032"), root)
    assert f"is damaged: {optimizer} is truncated or corrupt" in str(
        err.value
    ) and f"pass training.resume_from_checkpoint={root / 'step-00000016'}" in str(err.value)

    # The command line resumes from the newest intact checkpoint, and the run finishes.
    recipe = write_recipe(tmp_path / "recipe.yaml", raw)
    assert train_main([str(recipe), "training.resume_from_checkpoint=latest"]) == 0
    assert json.loads((out / "metrics.json").read_text())["resumed_from_step"] == 16
    for step in (16, 24, 32):  # the resumed run rewrote the damaged ones
        assert ckpt.verify_checkpoint(root / ckpt.checkpoint_name(step)) is None


def test_overwrite_discards_the_old_runs_checkpoints(tmp_path, tiny_bert_dir, toy_data_dir):
    """After overwrite_output_dir, 'latest' must never pick up a checkpoint of the run that was overwritten."""
    out = tmp_path / "run"
    train(build_recipe(tiny_recipe(tiny_bert_dir, toy_data_dir, out, training={"save_steps": 40, "keep_last": 5})))
    assert (out / "checkpoints" / "step-00000040").is_dir()
    raw = tiny_recipe(
        tiny_bert_dir,
        toy_data_dir,
        out,
        training={"num_epochs": 1, "save_steps": 8, "keep_last": 5},
        output={"overwrite_output_dir": True},
    )
    train(build_recipe(raw))
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == [f"step-{s:08d}" for s in (8, 16, 24, 32)]


# ---------------------------------------------------------------------------------------------
# Real processes, real signals

# 32 steps: 2 epochs of 32 batches, 2 per optimizer step; a checkpoint every 4 steps, the newest 2 kept.
PROCESS_SECTIONS = dict(
    peft={"dropout": 0.1},
    training={"gradient_accumulation_steps": 2, "save_steps": 4, "eval_steps": 8, "logging_steps": 4, "keep_last": 2},
)


class Run:
    """``scripts/train.py`` in a subprocess, its output in a log file (a pipe could fill up and block it)."""

    def __init__(self, recipe: Path, *overrides: str, env: dict[str, str] | None = None):
        self.out = Path(yaml.safe_load(recipe.read_text())["output"]["output_dir"])
        self.log_path = recipe.parent / f"{recipe.stem}-{time.monotonic_ns()}.log"
        with open(self.log_path, "w") as log:
            self.proc = subprocess.Popen(
                [sys.executable, str(ROOT / "scripts" / "train.py"), str(recipe), *overrides],
                cwd=ROOT,
                env={**os.environ, **(env or {})},
                stdout=log,
                stderr=subprocess.STDOUT,
            )

    @property
    def log(self) -> str:
        return self.log_path.read_text()

    def wait_for(self, what: str, condition, timeout: float = 300) -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            if self.proc.poll() is not None:
                raise AssertionError(f"run exited ({self.proc.returncode}) before {what}:\n{self.log[-3000:]}")
            if time.monotonic() > deadline:
                self.proc.kill()
                raise AssertionError(f"timed out waiting for {what}:\n{self.log[-3000:]}")
            time.sleep(0.01)

    def finish(self, timeout: float = 300) -> int:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            raise


def process_recipe(tmp: Path, name: str, model_dir: Path, data_dir: Path, **sections) -> Path:
    raw = tiny_recipe(model_dir, data_dir, tmp / name, **PROCESS_SECTIONS)
    for section, values in sections.items():
        raw[section].update(values)
    return write_recipe(tmp / f"{name}.yaml", raw)


def complete(out: Path, step: int):
    """A complete checkpoint at ``step`` or later: keep_last deletes older ones, so under load a poll waiting for
    exactly one step's can miss it."""

    def done() -> bool:
        markers = (out / "checkpoints").glob(f"step-*/{ckpt.COMPLETE_MARKER}")
        return any(marker.parent.name >= ckpt.checkpoint_name(step) for marker in markers)  # zero-padded names

    return done


def resume(recipe: Path) -> int:
    """Resume in this process, through the command line's code path; return the step it resumed from."""
    assert train_main([str(recipe), "training.resume_from_checkpoint=latest"]) == 0
    out = Path(yaml.safe_load(recipe.read_text())["output"]["output_dir"])
    return json.loads((out / "metrics.json").read_text())["resumed_from_step"]


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory, tiny_bert_dir, toy_data_dir) -> Path:
    """The uninterrupted run every interrupted one is compared with."""
    recipe = process_recipe(tmp_path_factory.mktemp("reference"), "run", tiny_bert_dir, toy_data_dir)
    assert train_main([str(recipe)]) == 0
    out = Path(yaml.safe_load(recipe.read_text())["output"]["output_dir"])
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-00000028", "step-00000032"]  # keep_last
    return out


def test_sigkill_mid_run_then_resume_is_exact(tmp_path, tiny_bert_dir, toy_data_dir, reference_run):
    recipe = process_recipe(tmp_path, "run", tiny_bert_dir, toy_data_dir)
    run = Run(recipe)
    run.wait_for("a checkpoint at step 8 or later", complete(run.out, 8))
    run.proc.send_signal(signal.SIGKILL)
    assert run.finish() == -signal.SIGKILL
    assert not (run.out / "metrics.json").exists()  # it really died before the end
    assert resume(recipe) >= 8
    assert_same_run(reference_run, run.out)


def test_sigkill_mid_save_keeps_the_previous_checkpoint_and_resume_is_exact(
    tmp_path, tiny_bert_dir, toy_data_dir, reference_run
):
    recipe = process_recipe(tmp_path, "run", tiny_bert_dir, toy_data_dir)
    # The test hook makes the save of step 20 (mid-epoch 1) pause after writing weights and optimizer state.
    run = Run(recipe, env={ckpt.PAUSE_IN_SAVE_ENV: "step-00000020"})
    root = run.out / "checkpoints"
    run.wait_for("the save of step 20 to start", lambda: any(root.glob(".step-00000020.tmp-*/optimizer.safetensors")))
    run.proc.send_signal(signal.SIGKILL)
    assert run.finish() == -signal.SIGKILL
    assert sorted(p.name for p in root.iterdir() if not p.name.startswith(".")) == ["step-00000012", "step-00000016"]
    assert len(list(root.glob(".step-00000020.tmp-*"))) == 1  # the half-written save, under a name 'latest' ignores
    assert ckpt.resolve_resume("latest", root) == root / "step-00000016"
    assert load_file(root / "step-00000016" / "trainable.safetensors")  # the previous checkpoint is intact

    assert resume(recipe) == 16
    assert not list(root.glob(".step-*"))  # leftovers of the interrupted save are cleaned up
    assert_same_run(reference_run, run.out)


def test_file_size_limit_during_a_save_names_both_checkpoints_exits_3_and_resume_is_exact(
    tmp_path, tiny_bert_dir, toy_data_dir, reference_run
):
    """A real EFBIG: the process runs under RLIMIT_FSIZE (SIGXFSZ ignored, as Python does), so writing the step-32
    optimizer file fails the way a full disk fails a write; the step-28 checkpoint (where it resumed) is kept."""
    recipe = process_recipe(tmp_path, "run", tiny_bert_dir, toy_data_dir)
    root = tmp_path / "run" / "checkpoints"
    shutil.copytree(reference_run / "checkpoints" / "step-00000028", root / "step-00000028")
    limit = 40_000
    files = reference_run / "checkpoints" / "step-00000032"
    assert (files / "trainable.safetensors").stat().st_size < limit < (files / "optimizer.safetensors").stat().st_size

    def limited() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    command = [
        sys.executable,
        str(ROOT / "scripts" / "train.py"),
        str(recipe),
        "training.resume_from_checkpoint=latest",
    ]
    proc = subprocess.run(
        command, cwd=ROOT, capture_output=True, text=True, timeout=300, preexec_fn=limited, check=False
    )
    assert proc.returncode == ckpt.SAVE_FAILED_EXIT_STATUS == 3, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    [line] = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert line == (
        f"error: could not write checkpoint {root / 'step-00000032'} (File too large); kept"
        f" {root / 'step-00000028'}. Free space (or raise the file-size limit, ulimit -f), then resume with"
        " training.resume_from_checkpoint=latest"
    )
    assert sorted(p.name for p in root.iterdir()) == ["step-00000028"]  # the failed save left nothing behind

    assert resume(recipe) == 28
    assert_same_run(reference_run, tmp_path / "run")


@pytest.mark.parametrize("deliveries", [1, 2], ids=["once", "twice-as-a-launcher-forwards-it"])
def test_sigterm_saves_a_checkpoint_exits_0_and_resume_is_exact(
    tmp_path, tiny_bert_dir, toy_data_dir, reference_run, deliveries
):
    """Under Slurm + torchrun a worker gets the same SIGTERM twice (from Slurm and from its agent): still one
    checkpoint and a clean exit, not the 'second signal stops at once' path."""
    recipe = process_recipe(tmp_path, "run", tiny_bert_dir, toy_data_dir)
    run = Run(recipe)
    run.wait_for("a checkpoint at step 12 or later", complete(run.out, 12))
    for _ in range(deliveries):
        run.proc.send_signal(signal.SIGTERM)
        time.sleep(0.05)
    assert run.finish() == 0, run.log[-3000:]
    log = run.log
    assert "SIGTERM received" in log and "stopped by SIGTERM at step" in log
    stopped_at = int(log.split("stopped by SIGTERM at step ")[1].split(";")[0])
    assert 12 <= stopped_at < 32
    assert (run.out / "checkpoints" / ckpt.checkpoint_name(stopped_at) / ckpt.COMPLETE_MARKER).exists()
    assert not (run.out / "metrics.json").exists() and not (run.out / "adapter_model.safetensors").exists()
    assert resume(recipe) == stopped_at
    assert_same_run(reference_run, run.out)


def test_nan_loss_stops_naming_the_step_and_keeps_the_last_good_checkpoint(
    tmp_path, tiny_bert_dir, toy_data_dir, capsys
):
    # A learning rate of 1e30 makes Adam's first update ~1e30 per weight: the second forward overflows to NaN.
    recipe = process_recipe(
        tmp_path,
        "run",
        tiny_bert_dir,
        toy_data_dir,
        training={"learning_rate": 1e30, "save_steps": 1, "logging_steps": 1, "gradient_accumulation_steps": 1},
    )
    assert train_main([str(recipe)]) == 1
    err = capsys.readouterr().err
    root = tmp_path / "run" / "checkpoints"
    assert (
        "error: loss became nan at optimizer step 2; stopping."
        f" The last good checkpoint is kept: {root / 'step-00000001'}." in err
    )
    assert sorted(p.name for p in root.iterdir()) == ["step-00000001"]
    assert all(torch.isfinite(t).all() for t in load_file(root / "step-00000001" / "trainable.safetensors").values())
    assert not (tmp_path / "run" / "adapter_model.safetensors").exists()


def test_non_finite_parameters_are_never_checkpointed(tmp_path, tiny_bert_dir, toy_data_dir):
    """An update can overflow the weights while the loss that produced it was finite: that state is not saved."""
    out = tmp_path / "run"
    # AdamW first scales weights by 1 - learning_rate * weight_decay = -1e40: past float32's range, so the weights
    # become inf in the step-1 update, after the step-1 loss was computed (finite) from the initial weights.
    raw = tiny_recipe(
        tiny_bert_dir,
        toy_data_dir,
        out,
        training={"learning_rate": 1e30, "weight_decay": 1e10, "save_steps": 1, "logging_steps": 1},
    )
    with pytest.raises(
        TrainingError,
        match=r"parameters \[.*\] became non-finite at optimizer step 1; stopping without"
        r" saving. No checkpoint had been saved yet.",
    ):
        train(build_recipe(raw))
    assert ckpt.list_checkpoints(out / "checkpoints") == [] and not list((out / "checkpoints").glob(".step-*"))


def test_a_kill_between_the_two_renames_of_best_is_undone(tmp_path):
    from safetensors.torch import save

    from lora_train.inference import resolve_run

    def adapter(version: int) -> bytes:  # a real (tiny) safetensors file: eval / predict / merge check its header
        return save({"version": torch.tensor([version])})

    def version(run: Path) -> int:
        return int(load_file(run / "adapter_model.safetensors")["version"])

    best = tmp_path / "run" / "best"
    files = {"recipe.yaml": b"model: {}\n", "labels.json": b"[]", "adapter_model.safetensors": adapter(1)}
    ckpt.atomic_directory(best, lambda d: [(d / name).write_bytes(data) for name, data in files.items()])
    # What a SIGKILL between atomic_directory's renames leaves: the published best/ moved aside, no best/.
    os.replace(best, best.with_name(".best.old-4242"))
    assert not best.exists()
    assert resolve_run(str(best)) == best  # eval / predict / merge open it as if nothing happened
    assert version(best) == 1

    os.replace(best, best.with_name(".best.old-4242"))
    (best.with_name(".best.old-17")).mkdir()  # an older leftover: deleted, never restored over the newer copy
    os.utime(best.with_name(".best.old-17"), (0, 0))
    ckpt.atomic_directory(best, lambda d: (d / "adapter_model.safetensors").write_bytes(adapter(2)))
    assert version(best) == 2
    assert sorted(p.name for p in best.parent.iterdir()) == ["best"]
