"""Real multi-process CPU runs of the tiny recipe (torchrun, accelerate launch + DeepSpeed) and the launch checks.

The 2-process runs are compared with a 1-process run of the same global batch (16 = 2 x 8 = 1 x 16): the
sampler gives both the same epoch order and DDP averages the two halves' gradients, so with dropout off
(peft.dropout = 0 and a copy of the tiny BERT with hidden/attention dropout 0) the loss trajectories must
agree to float32 rounding. Tolerance: 1e-5 absolute per step loss (measured: ~1e-7).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import psutil
import pytest
import torch
from safetensors.torch import load_file

from lora_train import checkpoint as ckpt
from lora_train.config import RecipeError, build_recipe
from lora_train.distributed import CPU_LAUNCH, ENGINE_FORMAT, Launch, check_resume_launch, launch_problems
from lora_train.machine import native_bf16
from lora_train.run_lock import LOCK_FILE
from lora_train.train import fp16_on_gpus_without_bf16, train
from tests.conftest import ROOT, reload_logits, tiny_recipe, write_recipe

STEP_LOSS_TOL = 1e-5
TRAIN_ROWS, STEPS = 256, 16  # one epoch at global batch 16
EVAL_ROWS = 127  # odd: the last evaluation batch is padded on one of the 2 processes
needs_cpu_host = pytest.mark.skipif(
    torch.cuda.is_available(), reason="CPU launches; on a GPU host these would use the GPUs"
)


# ---------------------------------------------------------------------------------------------
# Fixtures and helpers


@pytest.fixture(scope="module")
def bert_no_dropout(tiny_bert_dir, tmp_path_factory) -> Path:
    """The tiny BERT with hidden and attention dropout off, so a run is a deterministic function of its batches."""
    directory = tmp_path_factory.mktemp("bert_no_dropout") / "model"
    shutil.copytree(tiny_bert_dir, directory)
    config = json.loads((directory / "config.json").read_text())
    config.update(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    (directory / "config.json").write_text(json.dumps(config))
    return directory


@pytest.fixture(scope="module")
def uneven_data(toy_data_dir, tmp_path_factory) -> Path:
    """256 training rows of the toy data (16 steps of 16) and a 127-row validation split (uneven over 2 processes)."""
    directory = tmp_path_factory.mktemp("uneven_data")
    pd.read_parquet(toy_data_dir / "train.parquet").head(TRAIN_ROWS).to_parquet(directory / "train.parquet")
    pd.read_parquet(toy_data_dir / "validation.parquet").head(EVAL_ROWS).to_parquet(directory / "validation.parquet")
    return directory


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


OFFLINE = {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def launch(command: list[str], env: dict[str, str], timeout: int = 420) -> subprocess.CompletedProcess:
    """Run a launcher from the project root, offline, and return its completed process."""
    full_env = {**os.environ, **OFFLINE, **env}
    return subprocess.run(command, cwd=ROOT, env=full_env, capture_output=True, text=True, timeout=timeout)


def torchrun(recipe: Path, *overrides: str) -> subprocess.CompletedProcess:
    """The documented CPU data-parallel command: ACCELERATE_USE_CPU=true torchrun --nproc_per_node 2 ..."""
    return launch(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node",
            "2",
            "scripts/train.py",
            str(recipe),
            *overrides,
        ],
        {"ACCELERATE_USE_CPU": "true"},
    )


def accelerate_command(config: str, recipe: Path, *overrides: str, extra: tuple[str, ...] = ()) -> list[str]:
    accelerate = [sys.executable, "-m", "accelerate.commands.launch"]
    return [
        *accelerate,
        *(["--config_file", f"accelerate_configs/{config}"] if config else []),
        *extra,
        "--num_processes",
        "2",
        "--main_process_port",
        str(free_port()),
        "scripts/train.py",
        str(recipe),
        *overrides,
    ]


def accelerate_launch(
    config: str, recipe: Path, *overrides: str, extra: tuple[str, ...] = ()
) -> subprocess.CompletedProcess:
    return launch(accelerate_command(config, recipe, *overrides, extra=extra), {})


def kill_with_children(proc: subprocess.Popen) -> None:
    """SIGKILL a launcher and every process under it (torchrun starts each worker in a session of its own)."""
    processes = [*psutil.Process(proc.pid).children(recursive=True), psutil.Process(proc.pid)]
    for process in processes:
        process.send_signal(signal.SIGKILL)
    psutil.wait_procs(processes, timeout=60)
    proc.wait(60)


def wait_until(condition, proc: subprocess.Popen, log: Path, timeout: float = 420) -> None:
    """Poll ``condition`` while ``proc`` runs; fail with its log if it exits or the time runs out first."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert proc.poll() is None, f"exited ({proc.returncode}) too early:\n{log.read_text()[-3000:]}"
        assert time.monotonic() < deadline, f"timed out:\n{log.read_text()[-3000:]}"
        time.sleep(0.05)


def step_losses(run_dir: Path) -> list[float]:
    history = json.loads((run_dir / "history.json").read_text())
    return [loss for entry in history if "step_losses" in entry for loss in entry["step_losses"]]


def printed_metrics(stdout: str) -> list[dict]:
    """The metrics JSON documents the CLI printed (one per process that printed)."""
    decoder, found, i = json.JSONDecoder(), [], 0
    while (start := stdout.find("{\n", i)) != -1:
        obj, i = decoder.raw_decode(stdout, start)
        found.append(obj)
    return found


def one_process_eval(run_dir: Path, data_dir: Path) -> dict[str, float]:
    """Accuracy, macro-F1 and mean loss of the saved adapter, evaluated in this single process."""
    from sklearn.metrics import f1_score

    val = pd.read_parquet(data_dir / "validation.parquet")
    logits = torch.from_numpy(reload_logits(run_dir, list(val["text"]), max_length=32))
    labels = torch.tensor(val["label"].to_numpy())
    preds = logits.argmax(-1).numpy()
    return {
        "accuracy": float((preds == labels.numpy()).mean()),
        "macro_f1": float(f1_score(labels.numpy(), preds, average="macro")),
        "loss": float(torch.nn.functional.cross_entropy(logits, labels)),
        "n": len(val),
    }


def recipe_for(model: Path, data: Path, out: Path, per_device: int, quant: str = "none", **training) -> dict:
    return tiny_recipe(
        model,
        data,
        out,
        quantization={"method": quant, "compute_dtype": "float32"},
        training={
            "num_epochs": 1,
            "per_device_train_batch_size": per_device,
            "per_device_eval_batch_size": 32,
            **training,
        },
    )


@pytest.fixture(scope="module")
def one_process_runs(bert_no_dropout, uneven_data, tmp_path_factory) -> dict[str, Path]:
    """1-process references with the global batch of the 2-process runs (16), LoRA and QLoRA,
    trained in this process."""
    runs = {}
    for quant in ("none", "nf4"):
        out = tmp_path_factory.mktemp(f"one_process_{quant}") / "run"
        train(build_recipe(recipe_for(bert_no_dropout, uneven_data, out, per_device=16, quant=quant)))
        runs[quant] = out
    return runs


def assert_same_trajectory(run: Path, reference: Path) -> None:
    ours, ref = step_losses(run), step_losses(reference)
    assert len(ours) == len(ref) == STEPS
    assert np.max(np.abs(np.subtract(ours, ref))) < STEP_LOSS_TOL, (ours[:4], ref[:4])


def assert_one_checkpoint_and_adapter(out: Path, steps: tuple[int, ...] = (STEPS,)) -> None:
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == [f"step-{s:08d}" for s in steps]
    # No temporary or half-written files left by any process; the run lock's file stays by design (lora_train.run_lock).
    assert [p.relative_to(out).as_posix() for p in out.rglob(".*")] == [LOCK_FILE]
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("adapter_model.safetensors")) == [
        "adapter_model.safetensors",
        "best/adapter_model.safetensors",
    ]


# ---------------------------------------------------------------------------------------------
# Real 2-process runs


@needs_cpu_host
@pytest.mark.parametrize("quant", ["none", "nf4"])
def test_two_processes_train_like_one_with_the_same_global_batch(
    tmp_path, bert_no_dropout, uneven_data, one_process_runs, quant
):
    out = tmp_path / "two"
    recipe = write_recipe(
        tmp_path / "recipe.yaml", recipe_for(bert_no_dropout, uneven_data, out, per_device=8, quant=quant)
    )
    proc = torchrun(recipe)
    assert proc.returncode == 0, proc.stderr[-3000:]

    # Main process only: one metrics report, one "final" log line; the other rank printed nothing.
    [metrics] = printed_metrics(proc.stdout)
    assert proc.stderr.count("INFO lora_train: final:") == 1
    assert metrics["num_processes"] == 2 and metrics["global_batch_size"] == 16
    assert "global batch 16 (= 8 per device x 1 accumulation x 2" in proc.stderr
    assert metrics["train_samples_per_process"] == [TRAIN_ROWS // 2] * 2  # both ranks trained on their half

    assert_same_trajectory(out, one_process_runs[quant])
    assert_one_checkpoint_and_adapter(out)
    assert {p.name for p in (out / "checkpoints" / f"step-{STEPS:08d}").iterdir()} >= {
        "trainable.safetensors",
        "state.json",
        "COMPLETE",
    }

    # Exact evaluation: every row once, the same figures as evaluating the saved adapter in one process.
    reference = one_process_eval(out, uneven_data)
    assert metrics["eval_samples"] == reference["n"] == EVAL_ROWS
    assert metrics["eval_accuracy"] == reference["accuracy"]
    assert metrics["eval_macro_f1"] == pytest.approx(reference["macro_f1"], abs=1e-12)
    assert metrics["eval_loss"] == pytest.approx(reference["loss"], abs=1e-5)


@needs_cpu_host
def test_deepspeed_zero2_killed_mid_save_keeps_the_previous_checkpoint_and_resumes(
    tmp_path, bert_no_dropout, uneven_data, one_process_runs
):
    """ZeRO-2 over gloo: every process SIGKILLed inside the save of step 12 (test hook: all shards written, nothing
    published); step 8 is intact, and the resumed run has the 1-process trajectory with per-rank optimizer shards."""
    out = tmp_path / "zero2"
    raw = recipe_for(bert_no_dropout, uneven_data, out, per_device=8, save_steps=STEPS // 4)
    recipe = write_recipe(tmp_path / "recipe.yaml", raw)
    root, log = out / "checkpoints", tmp_path / "killed.log"
    with open(log, "w") as handle:
        killed = subprocess.Popen(
            accelerate_command("deepspeed_zero2.yaml", recipe),
            cwd=ROOT,
            stdout=handle,
            stderr=subprocess.STDOUT,
            env={**os.environ, **OFFLINE, ckpt.PAUSE_IN_SAVE_ENV: "step-00000012"},
        )
    try:
        wait_until(lambda: len(list(root.glob(".step-00000012.tmp-*/**/*optim_states.pt"))) == 2, killed, log)
    finally:
        kill_with_children(killed)  # the launcher and both training processes, as a machine failure would
    assert sorted(p.name for p in root.iterdir() if not p.name.startswith(".")) == ["step-00000004", "step-00000008"]
    assert ckpt.verify_checkpoint(root / "step-00000008") is None  # every file as its manifest says
    assert "Traceback" not in log.read_text()  # killed in the save window, not failed before it

    resumed = accelerate_launch("deepspeed_zero2.yaml", recipe, "training.resume_from_checkpoint=latest")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed from {root / 'step-00000008'} at step 8 " in resumed.stderr
    [metrics] = printed_metrics(resumed.stdout)
    assert "DeepSpeed ZeRO-2, processes 2" in resumed.stderr
    assert metrics["train_samples_per_process"] == [TRAIN_ROWS // 4] * 2  # steps 9-16 on each process
    assert_same_trajectory(out, one_process_runs["none"])
    assert_one_checkpoint_and_adapter(out, steps=(12, 16))  # the kill's leftovers cleaned up
    shards = sorted(p.name for p in (root / "step-00000016").rglob("*optim_states.pt"))
    assert len(shards) == 2  # one optimizer shard per process, each written by its own process
    saved = json.loads((root / "step-00000016" / "state.json").read_text())
    assert saved["format"] == ENGINE_FORMAT and saved["num_processes"] == 2
    assert ckpt.verify_checkpoint(root / "step-00000016") is None


@needs_cpu_host
def test_ddp_resume_restores_every_processs_rng_and_is_bitwise_exact(tmp_path, tiny_bert_dir, uneven_data):
    """Dropout on (BERT 0.1, LoRA 0.1): each process draws its own masks, so a resumed 2-process run is the
    uninterrupted one only if every process gets its own RNG state back."""
    out, resumed = tmp_path / "uninterrupted", tmp_path / "resumed"
    raw = recipe_for(tiny_bert_dir, uneven_data, out, per_device=8, save_steps=STEPS // 2)
    raw["peft"]["dropout"] = 0.1
    recipe = write_recipe(tmp_path / "recipe.yaml", raw)
    proc = torchrun(recipe)
    assert proc.returncode == 0, proc.stderr[-3000:]
    middle = f"checkpoints/step-{STEPS // 2:08d}"
    shutil.copytree(out / middle, resumed / middle)  # what a run killed after step 8 leaves

    proc = torchrun(recipe, f"output.output_dir={resumed}", "training.resume_from_checkpoint=latest")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"at step {STEPS // 2} " in proc.stderr
    assert step_losses(resumed) == step_losses(out)
    a, b = load_file(out / "adapter_model.safetensors"), load_file(resumed / "adapter_model.safetensors")
    assert a.keys() == b.keys() and [k for k in a if not torch.equal(a[k], b[k])] == []
    rng = sorted(p.name for p in (out / middle).glob("rng-*"))
    assert rng == ["rng-rank0.safetensors", "rng-rank1.safetensors"]
    states = [load_file(out / middle / name)["torch_cpu"] for name in rng]
    assert not torch.equal(*states)  # the processes' streams really differ (else this test could not fail)


@needs_cpu_host
def test_two_nodes_through_c10d_rendezvous_train_like_one_process(
    tmp_path, bert_no_dropout, uneven_data, one_process_runs
):
    """Two "machines" of one process each (two torchrun agents meeting at a c10d rendezvous on 127.0.0.1), global
    batch 16 = 2 nodes x 8: the same per-step losses as one process x 16, one report, exact evaluation."""
    out = tmp_path / "nodes"
    recipe = write_recipe(tmp_path / "recipe.yaml", recipe_for(bert_no_dropout, uneven_data, out, per_device=8))
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nnodes",
        "2",
        "--nproc_per_node",
        "1",
        "--rdzv_backend",
        "c10d",
        "--rdzv_endpoint",
        f"127.0.0.1:{free_port()}",
        "--rdzv_id",
        "two-nodes",
        "--local_addr",
        "127.0.0.1",
        "scripts/train.py",
        str(recipe),
    ]
    logs = [tmp_path / f"node{i}.log" for i in range(2)]
    nodes = []
    for path in logs:
        with open(path, "w") as handle:
            nodes.append(
                subprocess.Popen(
                    command,
                    cwd=ROOT,
                    stdout=handle,
                    stderr=subprocess.STDOUT,
                    env={**os.environ, **OFFLINE, "ACCELERATE_USE_CPU": "true"},
                )
            )
    try:
        codes = [node.wait(420) for node in nodes]
    finally:
        for node in nodes:
            node.kill()
    texts = [path.read_text() for path in logs]
    assert codes == [0, 0], "\n".join(t[-2000:] for t in texts)
    [metrics] = [m for text in texts for m in printed_metrics(text)]  # the node that got global rank 0 reports
    assert metrics["num_processes"] == 2 and metrics["global_batch_size"] == 16
    assert metrics["train_samples_per_process"] == [TRAIN_ROWS // 2] * 2
    assert_same_trajectory(out, one_process_runs["none"])
    assert_one_checkpoint_and_adapter(out)
    assert metrics["eval_samples"] == EVAL_ROWS
    assert metrics["eval_accuracy"] == one_process_eval(out, uneven_data)["accuracy"]


# Once, in a loaded full-suite run, rank 1 aborted at exit after training had finished ("terminate called without an
# active exception"). The ZeRO-3 engine was never destroyed: its hooks and process-group references were live past
# destroy_process_group, into interpreter finalization. train() now destroys it first (train._end_training). The
# abort did not reproduce in 16 runs of this launch at load 17-30 (11 before that change, 5 after).
@needs_cpu_host
def test_deepspeed_zero3_qlora_shards_the_4bit_weights_and_gathers_the_adapter(
    tmp_path, bert_no_dropout, uneven_data, one_process_runs
):
    """ZeRO-3 partitions every weight (uint8 4-bit ones included); the saved adapter is gathered from the shards."""
    out = tmp_path / "zero3"
    recipe = write_recipe(
        tmp_path / "recipe.yaml", recipe_for(bert_no_dropout, uneven_data, out, per_device=8, quant="nf4")
    )
    proc = accelerate_launch("deepspeed_zero3.yaml", recipe)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "DeepSpeed ZeRO-3, processes 2" in proc.stderr
    assert_same_trajectory(out, one_process_runs["nf4"])
    assert_one_checkpoint_and_adapter(out)
    ours, reference = (
        load_file(out / "adapter_model.safetensors"),
        load_file(one_process_runs["nf4"] / "adapter_model.safetensors"),
    )
    assert ours.keys() == reference.keys()
    assert max(float((ours[k] - reference[k]).abs().max()) for k in ours) < 1e-5  # whole tensors, not one shard


@needs_cpu_host
def test_silent_duplication_is_refused_before_any_work(tmp_path, bert_no_dropout, uneven_data):
    """`accelerate launch --multi_gpu` on a CPU-only host starts 2 processes that each see one:
    refused, naming torchrun."""
    out = tmp_path / "dup"
    recipe = write_recipe(tmp_path / "recipe.yaml", recipe_for(bert_no_dropout, uneven_data, out, per_device=8))
    proc = accelerate_launch("", recipe, extra=("--multi_gpu",))
    assert proc.returncode != 0
    assert proc.stderr.count("WORLD_SIZE=2 but Accelerate sees a single process") == 2  # each process refused
    assert CPU_LAUNCH in proc.stderr
    # Refused before anything was written: at most the run lock's (released) file exists.
    assert not out.exists() or [p.name for p in out.iterdir()] in ([], [LOCK_FILE])


# ---------------------------------------------------------------------------------------------
# Refusal messages (no processes needed: a Launch describes what the launch gives)


def tiny_raw(**sections) -> dict:
    return tiny_recipe(Path("model"), Path("data"), Path("out"), **sections)


def problems(launch: Launch, **sections) -> list[str]:
    return launch_problems(build_recipe(tiny_raw(**sections)), launch)


CPU_DDP = Launch(engine="ddp", num_processes=2, device_type="cpu", gradient_accumulation_steps=1)


def test_mixed_precision_refusals():
    assert any("silently runs fp32" in p for p in problems(CPU_DDP, training={"mixed_precision": "fp16"}))
    assert problems(CPU_DDP, training={"mixed_precision": "bf16"}) == []  # CPU autocast works
    from_config = Launch(
        engine="ddp",
        num_processes=2,
        device_type="cuda",
        gradient_accumulation_steps=1,
        launcher_mixed_precision="bf16",
    )
    [message] = problems(from_config)
    assert "mixed_precision='bf16'" in message and "training.mixed_precision='no'" in message


def test_bf16_recipes_train_in_fp16_on_gpus_without_native_bf16():
    """The decision is a pure function of the recipe and the device's capability, so it runs on CPU; the GPU side
    (compute capability < 8 -> False) is lora_train.machine.native_bf16."""
    qlora = build_recipe(
        tiny_raw(
            model={"dtype": "bfloat16"},
            quantization={"method": "nf4", "compute_dtype": "bfloat16", "quant_storage_dtype": "bfloat16"},
            training={"mixed_precision": "bf16"},
        )
    )
    fp16, note = fp16_on_gpus_without_bf16(qlora, native_bf16=False)
    assert (fp16.training.mixed_precision, fp16.model.dtype) == ("fp16", "float16")
    assert (fp16.quantization.compute_dtype, fp16.quantization.quant_storage_dtype) == ("float16", "float16")
    assert "no native bfloat16" in note and "training.mixed_precision=fp16 model.dtype=float16" in note
    assert fp16.to_dict()["peft"] == qlora.to_dict()["peft"] and fp16.data == qlora.data  # nothing else changes
    assert fp16_on_gpus_without_bf16(qlora, native_bf16=True) == (qlora, None)  # Ampere and later, CPUs
    bf16_weights = build_recipe(tiny_raw(model={"dtype": "bfloat16"}, training={"mixed_precision": "bf16"}))
    fp16, note = fp16_on_gpus_without_bf16(bf16_weights, native_bf16=False)
    assert fp16.training.mixed_precision == "fp16" and fp16.model.dtype == "bfloat16"  # trained params stay bf16
    assert "model.dtype" not in note and "compute_dtype" not in note  # no 4-bit weights: nothing else changes
    no_autocast = build_recipe(tiny_raw(training={"mixed_precision": "no"}))
    assert fp16_on_gpus_without_bf16(no_autocast, native_bf16=False) == (no_autocast, None)
    assert native_bf16()  # this host has no CUDA device: CPUs run bf16 autocast natively


def test_accumulation_from_the_launcher_is_refused():
    launch = Launch(engine="ddp", num_processes=2, device_type="cuda", gradient_accumulation_steps=4)
    [message] = problems(launch)
    assert "ACCELERATE_GRADIENT_ACCUMULATION_STEPS" in message and "training.gradient_accumulation_steps=1" in message


def test_engine_requested_but_not_running_is_refused():
    launch = Launch(
        engine="ddp", num_processes=2, device_type="cpu", gradient_accumulation_steps=1, requested=("deepspeed", "fsdp")
    )
    ds, fsdp = problems(launch)
    assert "ACCELERATE_USE_CPU=true" in ds and "deepspeed_zero2.yaml" in ds
    assert "FSDP only on GPUs" in fsdp and CPU_LAUNCH in fsdp


def test_deepspeed_config_conflicts_are_refused():
    ds = {
        "zero_optimization": {"stage": 2},
        "optimizer": {"type": "AdamW"},
        "train_micro_batch_size_per_gpu": 4,
        "gradient_accumulation_steps": "auto",
        "gradient_clipping": 1.0,
    }
    launch = Launch(
        engine="deepspeed", num_processes=2, device_type="cuda", gradient_accumulation_steps=1, deepspeed_config=ds
    )
    found = problems(launch)
    assert len(found) == 2
    assert "'optimizer' section" in found[0]
    assert "train_micro_batch_size_per_gpu=4 but the recipe gives 16" in found[1]


def test_zero3_needs_gathering_to_save_and_fsdp_needs_version_2():
    zero3 = Launch(
        engine="deepspeed",
        num_processes=2,
        device_type="cuda",
        gradient_accumulation_steps=1,
        deepspeed_config={"zero_optimization": {"stage": 3, "stage3_gather_16bit_weights_on_model_save": False}},
    )
    [message] = problems(zero3)
    assert "zero3_save_16bit_model: true" in message
    fsdp1 = Launch(engine="fsdp", num_processes=2, device_type="cuda", gradient_accumulation_steps=1, fsdp_version=1)
    [message] = problems(fsdp1)
    assert "fsdp_version: 2" in message


def test_resume_needs_the_same_engine_and_process_count():
    ddp4 = Launch(engine="ddp", num_processes=4, device_type="cuda", gradient_accumulation_steps=1)
    with pytest.raises(RecipeError, match="written by 2 process"):
        check_resume_launch({"num_processes": 2}, ddp4)
    with pytest.raises(RecipeError, match="written under DeepSpeed ZeRO-2"):
        check_resume_launch({"num_processes": 4, "format": ENGINE_FORMAT, "engine": "DeepSpeed ZeRO-2"}, ddp4)
    check_resume_launch({"num_processes": 4}, ddp4)
