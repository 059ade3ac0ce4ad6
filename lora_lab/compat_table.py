"""The compatibility table of docs/distributed.md: what each launch refuses, straight from
:func:`lora_train.distributed.launch_problems`, and which cells a test in this repository runs end to end.

    python -m lora_lab.compat_table    # prints the table; tests/test_accelerate_configs.py keeps the docs equal to it
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from lora_train.config import build_recipe
from lora_train.distributed import UNTESTED_RISKS, Launch, launch_problems

CONFIG_DIR = Path(__file__).resolve().parents[1] / "accelerate_configs"
CONFIG_ORDER = (
    "single_gpu.yaml",
    "multi_gpu.yaml",
    "multi_node.yaml",
    "deepspeed_zero2.yaml",
    "deepspeed_zero3.yaml",
    "fsdp.yaml",
)

BF16_QLORA = "QLoRA (bf16 storage, bf16 mixed precision)"
TABLE_COLUMNS: dict[str, dict[str, dict[str, Any]]] = {
    "LoRA": {},
    "AdaLoRA": {"peft": {"method": "adalora"}},
    "QLoRA (uint8 storage)": {"quantization": {"method": "nf4"}},
    BF16_QLORA: UNTESTED_RISKS[("fsdp", BF16_QLORA)][0],
    "LoRA, PiSSA / OLoRA init": {"peft": {"init_lora_weights": "pissa"}},
    "IA3": {"peft": {"method": "ia3"}},
    "prompt tuning": {"peft": {"method": "prompt_tuning"}},
    "BitFit": {"peft": {"method": "bitfit"}},
    "head_only": {"peft": {"method": "head_only"}},
    "full": {"peft": {"method": "full"}},
}
"""Recipe variants (on top of the defaults) that make the columns of the compatibility table."""


class _Environ:
    """Temporarily replace os.environ entries (to build Accelerate's plugins as a launched process would)."""

    def __init__(self, env: dict[str, str]):
        self.env, self.saved = env, {}

    def __enter__(self) -> None:
        self.saved = {k: os.environ.get(k) for k in self.env}
        os.environ.update(self.env)

    def __exit__(self, *_exc) -> None:
        for key, value in self.saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def launch_env(config_file: Path) -> tuple[Any, dict[str, str]]:
    """The parsed arguments and the environment ``accelerate launch --config_file CONFIG`` gives its processes.

    Uses Accelerate's own parser and environment preparation, so a config Accelerate rejects fails here.
    """
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import (
        prepare_deepspeed_cmd_env,
        prepare_multi_gpu_env,
        prepare_simple_launcher_cmd_env,
    )

    args = launch_command_parser().parse_args(["--config_file", str(config_file), "scripts/train.py"])
    args, defaults, mp_from_config = _validate_launch_command(args)
    if args.use_deepspeed:  # as accelerate's launch_command sets it before calling its DeepSpeed launcher
        fields = [*defaults.deepspeed_config, *(["mixed_precision"] if mp_from_config else [])]
        args.deepspeed_fields_from_accelerate_config = ",".join(fields)
        return args, prepare_deepspeed_cmd_env(args)[1]
    if args.use_fsdp or args.multi_gpu:
        return args, prepare_multi_gpu_env(args)
    return args, prepare_simple_launcher_cmd_env(args)[1]


def launch_from_config(config_file: Path) -> Launch:
    """What a GPU launch with this Accelerate config gives a run, built with Accelerate's DeepSpeed / FSDP plugins."""
    from accelerate.utils import DeepSpeedPlugin, FullyShardedDataParallelPlugin

    args, env = launch_env(config_file)
    engine = "deepspeed" if args.use_deepspeed else "fsdp" if args.use_fsdp else "ddp" if args.multi_gpu else "single"
    with _Environ({k: str(v) for k, v in env.items()}):
        deepspeed = DeepSpeedPlugin() if engine == "deepspeed" else None
        fsdp = FullyShardedDataParallelPlugin() if engine == "fsdp" else None
    gas = env.get("ACCELERATE_GRADIENT_ACCUMULATION_STEPS", "1")
    return Launch(
        engine=engine,
        num_processes=args.num_processes,
        device_type="cuda",
        gradient_accumulation_steps=int(gas) if gas.isdigit() else 1,
        deepspeed_config=deepspeed.deepspeed_config if deepspeed else {},
        fsdp_version=fsdp.fsdp_version if fsdp else None,
        requested=tuple(e for e in ("deepspeed", "fsdp") if env.get(f"ACCELERATE_USE_{e.upper()}") == "true"),
        launcher_mixed_precision=env.get("ACCELERATE_MIXED_PRECISION"),
    )


CPU_ONE_PROCESS = "CPU: one process (`python scripts/train.py`)"
CPU_DDP = "CPU: `torchrun` (DDP, gloo)"

PEFT_METHODS_TEST = "tests/test_peft_methods.py::test_method_trains_saves_reloads_and_merges_or_refuses"
RUN_HERE: dict[tuple[str, str], str] = {
    (CPU_ONE_PROCESS, "LoRA"): "tests/test_train_real.py::test_cpu_recipe_learns_on_a_real_subset",
    (CPU_ONE_PROCESS, "AdaLoRA"): "tests/test_train_real.py::test_cpu_recipe_learns_on_a_real_subset",
    (CPU_ONE_PROCESS, "QLoRA (uint8 storage)"): "tests/test_decoder.py::test_qlora_recipe_path_learns_a_story_task",
    **{
        (CPU_ONE_PROCESS, column): PEFT_METHODS_TEST
        for column in ("LoRA, PiSSA / OLoRA init", "IA3", "prompt tuning", "BitFit")
    },
    (CPU_ONE_PROCESS, "full"): "tests/test_train_tiny.py::test_tiny_full_finetuning_learns",
    (CPU_DDP, "LoRA"): "tests/test_distributed.py::test_two_processes_train_like_one_with_the_same_global_batch",
    (CPU_DDP, "QLoRA (uint8 storage)"): "tests/test_decoder.py::test_two_process_ddp_qlora_on_the_decoder",
    (
        "`deepspeed_zero2.yaml`",
        "LoRA",
    ): "tests/test_distributed.py::test_deepspeed_zero2_killed_mid_save_keeps_the_previous_checkpoint_and_resumes",
    (
        "`deepspeed_zero3.yaml`",
        "QLoRA (uint8 storage)",
    ): "tests/test_distributed.py::test_deepspeed_zero3_qlora_shards_the_4bit_weights_and_gathers_the_adapter",
}
"""(launch row, column) combinations that a test in this repository runs end to end, on CPU processes (the
DeepSpeed configs over gloo). Nothing has run on a GPU; every other allowed cell is 'untested'."""


def table_rows() -> dict[str, Launch]:
    """The launches of the compatibility table: each Accelerate config as on GPUs, then the CPU launches."""
    launches = {f"`{name}`": launch_from_config(CONFIG_DIR / name) for name in CONFIG_ORDER}
    launches[CPU_ONE_PROCESS] = Launch(
        engine="single", num_processes=1, device_type="cpu", gradient_accumulation_steps=1
    )
    launches[CPU_DDP] = Launch(engine="ddp", num_processes=2, device_type="cpu", gradient_accumulation_steps=1)
    return launches


def cell(row: str, column: str, launch: Launch) -> str:
    """'refused' (the start-up checks say why), 'runs (CPU test)' when a test runs it here, else 'untested'."""
    recipe = build_recipe({"model": {"name_or_path": "base"}, **TABLE_COLUMNS[column]})
    if launch_problems(recipe, launch):
        return "refused"
    if (row, column) in RUN_HERE:
        return "runs (CPU test)"
    return "untested (upstream reports problems)" if (launch.engine, column) in UNTESTED_RISKS else "untested"


def compatibility_table() -> str:
    """Markdown table: what each launch refuses (from :func:`launch_problems` itself) and what was run here."""
    lines = ["| launch | " + " | ".join(TABLE_COLUMNS) + " |", "|---" * (len(TABLE_COLUMNS) + 1) + "|"]
    for row, launch in table_rows().items():
        lines.append(f"| {row} | " + " | ".join(cell(row, column, launch) for column in TABLE_COLUMNS) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(compatibility_table())
