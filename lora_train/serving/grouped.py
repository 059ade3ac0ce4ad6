"""One forward for the texts of several LoRA adapters, each row computed as its adapter alone computes it.

peft's own mixed batch (``model(..., adapter_names=[...])``) registers a hook on every module for each forward and
runs every LoRA layer once per adapter on gathered rows; on a CPU that costs more than the forward it saves
(``lora-serve-bench --mixing``). Here each LoRA Linear runs the base layer once and the adapters' updates as two
matrix products over all rows: the batch's adapters' ``A`` matrices stacked (``x @ [A_1; A_2; ...]^T``), each row's
columns of other adapters zeroed, then ``@ [B_1, B_2, ...]^T`` and the row's adapter's scaling. The zeroed columns
add exact zeros, so a row gets the products peft computes for its adapter alone: ``base(x) + B(A(x)) * scaling``,
rounded in the same dtype at the same points. Heads run each adapter's copy on its rows
(:func:`lora_train.heads.mix_any_width`).

Plain LoRA only: a model whose adapters use a LoRA variant (DoRA), a LoRA bias, ``fan_in_fan_out`` weights or LoRA
layers other than Linear is served one forward per adapter (:meth:`GroupedLoRA.supports`). Served models are in
eval mode, where LoRA dropout is the identity, so it is not applied.
"""

from __future__ import annotations

import contextlib
import types
from collections import OrderedDict
from dataclasses import dataclass
from typing import Iterator, Optional

import torch
import torch.nn.functional as F
from torch import nn

from lora_train.heads import mix_any_width


@dataclass
class _Rows:
    """The adapter of each row of the running forward."""

    names: list[str]
    order: tuple[str, ...]
    """The batch's distinct adapters, sorted (so that a set of adapters has one key for its stacked weights)."""
    index: torch.Tensor
    """Each row's position in ``order``."""


@dataclass
class _Stack:
    """One LoRA layer's weights for one set of adapters."""

    a: torch.Tensor  # [sum of ranks, in]
    b: torch.Tensor  # [out, sum of ranks]
    columns: torch.Tensor  # [adapters in order, sum of ranks]: 1 where the column is that adapter's, in a's dtype
    scales: torch.Tensor  # [adapters in order]: each adapter's scaling (0 if it has no LoRA here), float32


STACKED_SETS = 2
"""Sets of adapters whose stacked weights are kept (the least recently used is dropped). Stacking at every forward
cost 3 to 8 ms a forward (two adapters, 1 thread); keeping up to 32 sets grew a server of 8 adapters from 967 to
1,504 MB (a batch's set is one of 255). Two cover a steady mix of a few adapters; with many, a batch's set is
mostly new and is stacked again."""


class GroupedLoRA:
    """Grouped forwards for the peft model ``model`` (one registry's; used by one thread at a time)."""

    def __init__(self, model: nn.Module):
        self.model = model
        self._rows: Optional[_Rows] = None
        self._stacks: OrderedDict[tuple[str, ...], dict[int, Optional[_Stack]]] = OrderedDict()
        self.refresh()

    def refresh(self) -> None:
        """After an adapter is attached or detached: forget the stacked weights, wrap any new layer."""
        from peft.tuners.lora.layer import Linear as LoraLinear
        from peft.utils import ModulesToSaveWrapper

        self._stacks.clear()
        for module in self.model.modules():
            if isinstance(module, LoraLinear) and not hasattr(module, "_grouped_forward"):
                module._grouped_forward = module.forward
                module.forward = types.MethodType(self._lora_forward, module)
            elif isinstance(module, ModulesToSaveWrapper) and not hasattr(module, "_grouped_forward"):
                mix_any_width(module)
                module._grouped_forward = module.forward
                module.forward = types.MethodType(self._head_forward, module)

    def supports(self, names: set[str]) -> bool:
        """Whether every LoRA layer holding one of ``names`` is a plain LoRA Linear."""
        from peft.tuners.lora.layer import Linear as LoraLinear
        from peft.tuners.lora.layer import LoraLayer

        for module in self.model.modules():
            if not isinstance(module, LoraLayer):
                continue
            held = names & set(module.lora_A.keys())
            if not held:
                continue
            if not isinstance(module, LoraLinear) or module.fan_in_fan_out:
                return False
            if any(name in module.lora_variant or module.lora_bias.get(name, False) for name in held):
                return False
        return True

    @contextlib.contextmanager
    def rows(self, names: list[str]) -> Iterator[None]:
        """Within: forwards of the model route row ``i`` to adapter ``names[i]``."""
        order = tuple(sorted(set(names)))
        position = {name: k for k, name in enumerate(order)}
        device = next(self.model.parameters()).device
        self._rows = _Rows(names, order, torch.tensor([position[n] for n in names], device=device))
        try:
            yield
        finally:
            self._rows = None

    def _lora_forward(self, layer: nn.Module, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        rows = self._rows
        if rows is None or layer.merged or layer.disable_adapters:
            return layer._grouped_forward(x, *args, **kwargs)
        result = layer.base_layer(x, *args, **kwargs)
        if len(rows.order) == 1:  # peft's own sum for one adapter, without its per-forward set_adapter walk
            name = rows.order[0]
            if name not in layer.lora_A:
                return result
            x = layer._cast_input_dtype(x, layer.lora_A[name].weight.dtype)
            update = F.linear(F.linear(x, layer.lora_A[name].weight), layer.lora_B[name].weight)
            return (result + update * layer.scaling[name]).to(result.dtype)
        stack = self._stack(layer, rows.order)
        if stack is None:  # no adapter of this batch adapts this layer
            return result
        x = layer._cast_input_dtype(x, stack.a.dtype)
        shape = (-1,) + (1,) * (x.dim() - 2) + (stack.a.shape[0],)  # a row's column mask over its tokens
        update = F.linear(x, stack.a) * stack.columns[rows.index].view(shape)
        update = F.linear(update, stack.b)
        # The scaling as peft applies it: a multiplication in the update's dtype, then the sum with the base output.
        update = (update * stack.scales[rows.index].view((-1,) + (1,) * (update.dim() - 1))).to(update.dtype)
        return (result + update).to(result.dtype)

    def _head_forward(self, wrapper: nn.Module, *args, **kwargs) -> torch.Tensor:
        rows = self._rows
        if rows is None or wrapper.disable_adapters or any(name not in wrapper.modules_to_save for name in rows.order):
            return wrapper._grouped_forward(*args, **kwargs)
        if len(rows.order) == 1:
            return wrapper.modules_to_save[rows.order[0]](*args, **kwargs)
        return wrapper._mixed_batch_forward(*args, adapter_names=rows.names, **kwargs)

    def _stack(self, layer: nn.Module, order: tuple[str, ...]) -> Optional[_Stack]:
        stacks = self._stacks.get(order)
        if stacks is None:
            stacks = self._stacks[order] = {}
            while len(self._stacks) > STACKED_SETS:
                self._stacks.popitem(last=False)
        else:
            self._stacks.move_to_end(order)
        if id(layer) not in stacks:
            stacks[id(layer)] = _stacked(layer, order)
        return stacks[id(layer)]


def _stacked(layer: nn.Module, order: tuple[str, ...]) -> Optional[_Stack]:
    """``layer``'s LoRA weights of the adapters in ``order`` side by side (None if none of them adapts it)."""
    held = [name for name in order if name in layer.lora_A]
    if not held:
        return None
    a = torch.cat([layer.lora_A[name].weight for name in held])
    b = torch.cat([layer.lora_B[name].weight for name in held], dim=1)
    columns = torch.zeros(len(order), a.shape[0], device=a.device, dtype=a.dtype)
    scales = torch.zeros(len(order), device=a.device)
    start = 0
    for name in held:
        k, rank = order.index(name), layer.lora_A[name].weight.shape[0]
        columns[k, start : start + rank] = 1
        scales[k] = layer.scaling[name]
        start += rank
    return _Stack(a, b, columns, scales)
