"""Every file in accelerate_configs/ goes through Accelerate's own launch parsing and plugin construction
(DeepSpeedPlugin, FullyShardedDataParallelPlugin), so a broken config fails here rather than on a GPU cluster;
the compatibility table in docs/distributed.md is the one the checks produce."""

from __future__ import annotations

from pathlib import Path

import pytest

from lora_lab.compat_table import (
    CONFIG_DIR,
    CONFIG_ORDER,
    RUN_HERE,
    TABLE_COLUMNS,
    compatibility_table,
    launch_env,
    launch_from_config,
    table_rows,
)
from lora_train.config import build_recipe
from lora_train.distributed import configure_deepspeed, launch_problems
from tests.conftest import ROOT

EXPECTED = {  # file -> (engine, processes, ZeRO stage, FSDP version)
    "single_gpu.yaml": ("single", 1, 0, None),
    "multi_gpu.yaml": ("ddp", 2, 0, None),
    "deepspeed_zero2.yaml": ("deepspeed", 2, 2, None),
    "deepspeed_zero3.yaml": ("deepspeed", 2, 3, None),
    "fsdp.yaml": ("fsdp", 2, 0, 2),
    "multi_node.yaml": ("ddp", 16, 0, None),
}


def recipe(**sections):
    return build_recipe({"model": {"name_or_path": "base"}, **sections})


def test_every_config_file_is_known_and_documented():
    files = sorted(p.name for p in CONFIG_DIR.glob("*.yaml"))
    assert files == sorted(EXPECTED) == sorted(CONFIG_ORDER)
    docs = (ROOT / "docs" / "distributed.md").read_text()
    assert all(f"accelerate_configs/{name}" in docs for name in files)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_config_builds_accelerate_plugins(name):
    launch = launch_from_config(CONFIG_DIR / name)
    assert (launch.engine, launch.num_processes, launch.zero_stage, launch.fsdp_version) == EXPECTED[name]
    assert launch.launcher_mixed_precision == "no"  # the recipe's training.mixed_precision decides
    assert launch.gradient_accumulation_steps == 1  # not set by the config: the recipe decides
    assert launch_problems(recipe(), launch) == []  # the default recipe (LoRA) runs under every config
    if launch.engine == "deepspeed":
        ds = launch.deepspeed_config
        assert all(
            ds[k] == "auto"
            for k in (
                "train_micro_batch_size_per_gpu",
                "train_batch_size",
                "gradient_accumulation_steps",
                "gradient_clipping",
            )
        )
        assert "optimizer" not in ds and "scheduler" not in ds
        assert ds["zero_optimization"]["offload_optimizer"]["device"] == "none"


def test_building_plugins_leaves_transformers_deepspeed_state_alone():
    from transformers.integrations import is_deepspeed_zero3_enabled

    launch_from_config(CONFIG_DIR / "deepspeed_zero3.yaml")
    assert not is_deepspeed_zero3_enabled()  # in-process training after this must not think it runs ZeRO-3


@pytest.mark.parametrize(
    "broken",
    [
        "distributed_type: DEEPSPEEDX\nnum_processes: 2\n",
        "distributed_type: FSDP\nnum_processes: 2\nfsdp_config:\n  fsdp_version: 2\n"
        "  fsdp_state_dict_type: HALF_STATE_DICT\n",
    ],
)
def test_a_broken_config_fails(tmp_path: Path, broken):
    path = tmp_path / "broken.yaml"
    path.write_text("compute_environment: LOCAL_MACHINE\nmixed_precision: 'no'\n" + broken)
    with pytest.raises((ValueError, KeyError)):
        launch_from_config(path)


def test_recipe_values_are_written_into_the_deepspeed_config():
    launch = launch_from_config(CONFIG_DIR / "deepspeed_zero2.yaml")
    r = recipe(training={"per_device_train_batch_size": 8, "gradient_accumulation_steps": 4, "max_grad_norm": 0.5})
    configure_deepspeed(r, launch)
    ds = launch.deepspeed_config
    assert (
        ds["train_micro_batch_size_per_gpu"],
        ds["gradient_accumulation_steps"],
        ds["train_batch_size"],
        ds["gradient_clipping"],
    ) == (8, 4, 64, 0.5)


def test_refusals_under_the_shipped_configs_name_what_works():
    zero2, zero3, fsdp = (
        launch_from_config(CONFIG_DIR / n) for n in ("deepspeed_zero2.yaml", "deepspeed_zero3.yaml", "fsdp.yaml")
    )
    [message] = launch_problems(recipe(peft={"method": "adalora"}), zero2)
    assert "not supported under DeepSpeed ZeRO-2" in message and "multi_gpu.yaml" in message
    [message] = launch_problems(recipe(peft={"method": "adalora"}), fsdp)
    assert "not supported under FSDP" in message
    qlora = recipe(quantization={"method": "nf4"})  # default uint8 storage: DeepSpeed shards it, FSDP would not
    assert launch_problems(qlora, zero2) == launch_problems(qlora, zero3) == []
    [message] = launch_problems(qlora, fsdp)
    assert "every GPU would hold the whole 4-bit model" in message and "quant_storage_dtype=bfloat16" in message
    float_storage = recipe(
        quantization={"method": "nf4", "quant_storage_dtype": "float32"}, training={"mixed_precision": "bf16"}
    )
    for launch in (zero2, zero3, fsdp):
        [message] = launch_problems(float_storage, launch)
        assert "convert the packed 4-bit data as numbers" in message and "quant_storage_dtype=bfloat16" in message
    assert (
        launch_problems(
            recipe(
                quantization={"method": "nf4", "quant_storage_dtype": "bfloat16"}, training={"mixed_precision": "bf16"}
            ),
            fsdp,
        )
        == []
    )
    pushing = recipe(output={"push_to_hub": True, "hub_model_id": "me/x", "push_checkpoints": True})
    assert "push_checkpoints" in launch_problems(pushing, zero3)[0]


def test_docs_table_is_the_generated_one():
    docs = (ROOT / "docs" / "distributed.md").read_text()
    assert compatibility_table() in docs, "regenerate with: python -m lora_lab.compat_table"


def test_launch_env_matches_what_accelerate_launch_sets():
    _, env = launch_env(CONFIG_DIR / "deepspeed_zero3.yaml")
    assert env["ACCELERATE_USE_DEEPSPEED"] == "true" and env["ACCELERATE_DEEPSPEED_ZERO_STAGE"] == "3"
    assert env["ACCELERATE_DEEPSPEED_ZERO3_SAVE_16BIT_MODEL"] == "true"
    _, env = launch_env(CONFIG_DIR / "fsdp.yaml")
    assert env["ACCELERATE_USE_FSDP"] == "true" and env["FSDP_VERSION"] == "2"


def test_every_cell_marked_run_names_a_test_that_exists():
    """The table's 'runs (CPU test)' cells name the test that runs them; a renamed or deleted test fails here."""
    import ast

    for (row, column), test_id in RUN_HERE.items():
        path, name = test_id.split("::")
        tree = ast.parse((ROOT / path).read_text())
        defined = {node.name for node in ast.walk(tree) if isinstance(node, ast.FunctionDef)}
        assert name in defined, f"{row} x {column}: {test_id} does not exist"
        assert row in table_rows() and column in TABLE_COLUMNS
    assert "runs (CPU test)" not in compatibility_table().splitlines()[2], "nothing has run on a GPU"


def test_multi_node_config_starts_one_torchrun_agent_per_machine_meeting_at_the_main_host():
    """What each machine's `accelerate launch --config_file multi_node.yaml` hands torchrun (placeholders as is)."""
    args, env = launch_env(CONFIG_DIR / "multi_node.yaml")
    assert (args.nnodes, args.nproc_per_node, args.node_rank) == ("2", "8", 0)
    assert (args.rdzv_backend, args.rdzv_endpoint) == ("static", "MAIN_HOST:29500")
    assert "ACCELERATE_USE_DEEPSPEED" not in env and "ACCELERATE_USE_FSDP" not in env  # plain DDP
