"""Resumable checkpoints for the launch at hand: one saver is chosen at setup (:func:`checkpoint_saver`), so the
training loop saves and restores without asking which engine runs.

* One process or DDP (:class:`FileSaver`): pickle-free safetensors + JSON written by the main process, with every
  process's RNG states (:mod:`lora_train.checkpoint`).
* DeepSpeed / FSDP (:class:`EngineSaver`): the engine owns the optimizer and sharded weights, so every process writes
  its shard through ``accelerator.save_state`` (:mod:`lora_train.distributed`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Protocol

import torch

from lora_train import checkpoint as ckpt
from lora_train import distributed as dist


class CheckpointSaver(Protocol):
    def save(self, path: Path, state: dict[str, Any], extra_tensors: Optional[dict[str, torch.Tensor]]) -> None:
        """Write a resumable checkpoint at ``path`` (collective: every process calls it)."""

    def load(self, path: Path) -> dict[str, Any]:
        """Restore weights, optimizer, scheduler and RNGs; return the saved state with ``extra_tensors``."""


@dataclass
class FileSaver:
    """One process or DDP: the main process writes the trainable tensors, optimizer, scheduler and RNG files."""

    accelerator: Any
    model: torch.nn.Module
    """The unwrapped (PEFT or transformers) model."""
    optimizer: Any
    scheduler: Any

    @property
    def torch_optimizer(self) -> torch.optim.Optimizer:
        return getattr(self.optimizer, "optimizer", self.optimizer)  # the torch optimizer inside Accelerate's

    def save(self, path: Path, state: dict[str, Any], extra_tensors: Optional[dict[str, torch.Tensor]]) -> None:
        rng_states = dist.every_process_rng_state(self.accelerator)  # every process: its dropout stream is its own
        if self.accelerator.is_main_process:
            ckpt.save_training_state(
                path, self.model, self.torch_optimizer, self.scheduler, state, extra_tensors, rng_states
            )

    def load(self, path: Path) -> dict[str, Any]:
        rank = self.accelerator.process_index
        return ckpt.load_training_state(path, self.model, self.torch_optimizer, self.scheduler, rank)


@dataclass
class EngineSaver:
    """DeepSpeed / FSDP: every process saves and loads its own shard through Accelerate."""

    accelerator: Any
    scheduler: Any
    launch: dist.Launch

    def save(self, path: Path, state: dict[str, Any], extra_tensors: Optional[dict[str, torch.Tensor]]) -> None:
        if extra_tensors:  # launch checks refuse the methods that have some (AdaLoRA) under these engines
            raise ValueError(f"{self.launch.name} checkpoints hold no method state")
        dist.save_engine_state(self.accelerator, path, state, self.scheduler, self.launch)

    def load(self, path: Path) -> dict[str, Any]:
        loaded = dist.load_engine_state(self.accelerator, path, self.scheduler, self.launch)
        return {**loaded, "extra_tensors": {}}


def checkpoint_saver(launch: dist.Launch, accelerator, model: torch.nn.Module, optimizer, scheduler) -> CheckpointSaver:
    """The saver for this launch (``model`` unwrapped)."""
    if launch.engine_owns_optimizer:
        return EngineSaver(accelerator, scheduler, launch)
    return FileSaver(accelerator, model, optimizer, scheduler)
