"""Model replicas for several batcher workers: one :class:`AdapterRegistry` each, sharing every tensor.

A peft model keeps per-forward state in its modules (the active adapter, which heads are switched on, the hooks of
a mixed-adapter forward), so two threads cannot run forwards through one model object. Each worker gets its own
module tree instead, built like the first and then pointed at the first's parameters and buffers: the tensors
exist once, only the Python objects are repeated. Every model change is made to every replica, by the batcher's
barrier (:mod:`lora_train.serving.batcher`); requests are tokenized and looked up against the first.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional

from torch import nn

from lora_train.serving.registry import Adapter, AdapterRegistry, BaseModelId


class ReplicatedRegistry:
    """``replicas`` registries over the same tensors; the catalog (names, lookups, checks) is the first's."""

    def __init__(
        self,
        device: Optional[str] = None,
        forward_cost_tokens: Optional[int] = None,
        replicas: int = 1,
        merge: Optional[bool] = None,
    ):
        if replicas < 1:
            raise ValueError(f"replicas = {replicas} must be >= 1")
        self.replicas = [AdapterRegistry(device, forward_cost_tokens, merge=merge) for _ in range(replicas)]
        self.primary = self.replicas[0]

    @property
    def device(self):
        return self.primary.device

    @property
    def base(self) -> Optional[BaseModelId]:
        return self.primary.base

    def names(self) -> list[str]:
        return self.primary.names()

    def describe(self) -> list[dict[str, Any]]:
        return self.primary.describe()

    def get(self, name: str) -> Adapter:
        return self.primary.get(name)

    def check_can_attach(self, adapter: Adapter) -> None:
        self.primary.check_can_attach(adapter)

    def mark_unloading(self, name: str) -> Adapter:
        return self.primary.mark_unloading(name)

    def runners(self) -> list[Callable]:
        """Each replica's forward, one per batcher worker."""
        return [replica.classify for replica in self.replicas]

    def attach(self, adapter: Adapter) -> None:
        """Attach ``adapter`` to every replica (each gets its own :class:`Adapter` record, which attach fills in),
        then point the others' tensors at the first's; on failure no replica keeps it."""
        self.primary.attach(adapter)
        done = [self.primary]
        try:
            for replica in self.replicas[1:]:
                replica.attach(dataclasses.replace(adapter))
                done.append(replica)
                share_tensors(self.primary.model, replica.model)
        except BaseException:
            for replica in done:
                replica.detach(adapter.name)
            raise

    def detach(self, name: str) -> None:
        for replica in self.replicas:
            replica.detach(name)


def share_tensors(source: nn.Module, target: nn.Module) -> None:
    """Make every parameter and buffer of ``target`` the tensor of the same name in ``source`` (two models built
    the same way from the same files), so that ``target`` holds no weights of its own."""
    twins = dict(source.named_modules())
    for name, module in target.named_modules():
        twin = twins.get(name)
        if twin is None:
            raise RuntimeError(f"replica has module {name!r} that the first model lacks")
        for slots, twin_slots in ((module._parameters, twin._parameters), (module._buffers, twin._buffers)):
            for key, tensor in slots.items():
                shared = twin_slots.get(key)
                if tensor is None or shared is None or tensor is shared:
                    continue
                if shared.shape != tensor.shape or shared.dtype != tensor.dtype:
                    raise RuntimeError(
                        f"replica tensor {name}.{key} is {tuple(tensor.shape)} {tensor.dtype}, the first model's"
                        f" {tuple(shared.shape)} {shared.dtype}"
                    )
                slots[key] = shared
