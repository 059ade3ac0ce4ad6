"""Serving runs that keep only the tensors they trained (BitFit, head_only) on the server's shared base model.

Such a run is its base model with some parameters replaced (every bias and the head for BitFit, the head for
head_only), as :func:`lora_train.inference.apply_trained_tensors` builds it for ``scripts/predict.py``. The registry
runs its texts in forwards of their own: every peft layer and head wrapper is switched off (:func:`peft_layers_off`,
``AdapterRegistry._route_heads``), so the model computes the bare base, and the run's tensors are swapped in for
that forward (:func:`swapped_in`). A swap exchanges parameter objects, nothing is copied: the base's own are put back
right after, and a head with another number of classes than the base's fits as well.

The tensors keep the dtype they were saved in, which is the dtype the run trained them in and ``scripts/predict.py``
copies them into (``model.dtype`` is part of the base model's identity); frozen Linear weights the server stores in
the autocast dtype are cast to it by autocast either way.
"""

from __future__ import annotations

import contextlib
from typing import Iterator, Sequence

import torch
from torch import nn

from lora_train.heads import HEAD_MODULE_NAMES


def _unwrapped(module: nn.Module) -> nn.Module:
    """The base module under peft's wrappers (a LoRA layer's ``base_layer``, a head wrapper's ``original_module``)."""
    # peft (and transformers under it) is imported where it is used: ``lora-serve --help`` starts without it.
    from peft.tuners.tuners_utils import BaseTunerLayer
    from peft.utils import ModulesToSaveWrapper

    while isinstance(module, (BaseTunerLayer, ModulesToSaveWrapper)):
        module = module.get_base_layer() if isinstance(module, BaseTunerLayer) else module.original_module
    return module


def owner(model: nn.Module, name: str) -> tuple[nn.Module, str] | None:
    """The module of ``model`` (the transformers model, with or without peft layers injected) holding the base
    parameter ``name`` as the bare model names it (``bert.encoder.layer.0.output.dense.bias``), and the parameter's
    name in it; None if there is no such parameter."""
    *path, leaf = name.split(".")
    module = _unwrapped(model)
    for part in path:
        child = dict(module.named_children()).get(part)
        if child is None:
            return None
        module = _unwrapped(child)
    return (module, leaf) if leaf in dict(module.named_parameters(recurse=False)) else None


def misfits(model: nn.Module, tensors: dict[str, torch.Tensor], num_labels: int) -> list[str]:
    """The saved tensors that do not fit ``model``'s base parameters, each as ``NAME SHAPE (model: SHAPE)`` or
    ``NAME SHAPE (absent)``. A head tensor may have ``num_labels`` (the run's classes) where the base's head has its
    own number of classes, in its first dimension."""
    wrong = []
    for name, value in tensors.items():
        found = owner(model, name)
        if found is None:
            wrong.append(f"{name} {tuple(value.shape)} (absent)")
            continue
        shape, saved = tuple(getattr(*found).shape), tuple(value.shape)
        is_head = bool(set(HEAD_MODULE_NAMES) & set(name.split(".")))
        if shape != saved and not (is_head and saved[:1] == (num_labels,) and shape[1:] == saved[1:]):
            wrong.append(f"{name} {saved} (model: {shape})")
    return wrong


Slots = list[tuple[nn.Module, str, nn.Parameter]]
"""Where each of a run's tensors goes: (module holding the base parameter, its name there, the run's tensor)."""


def slots(model: nn.Module, tensors: dict[str, nn.Parameter]) -> Slots:
    """Where :func:`swapped_in` puts each of ``tensors`` (base parameter names) in ``model``. Resolved once per run:
    peft keeps the base's own module objects under its wrappers (and gives them back on ``unload``), so the slots
    hold while adapters come and go; resolving at every forward cost 0.8 ms of a 9 ms one."""
    return [(*owner(model, name), value) for name, value in tensors.items()]


@contextlib.contextmanager
def swapped_in(places: Slots) -> Iterator[None]:
    """Each slot's module with the run's tensor in place of its base parameter, for the ``with`` block."""
    originals = []
    try:
        for module, leaf, value in places:
            originals.append((module, leaf, module._parameters[leaf]))
            module._parameters[leaf] = value
        yield
    finally:
        for module, leaf, original in reversed(originals):
            module._parameters[leaf] = original


def peft_layers(model: nn.Module) -> list[nn.Module]:
    """Every peft layer of ``model``: found once per change of the model, not at each forward (a walk over every
    module)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [m for m in model.modules() if isinstance(m, BaseTunerLayer)]


@contextlib.contextmanager
def peft_layers_off(layers: Sequence[nn.Module]) -> Iterator[None]:
    """The peft layers ``layers`` (LoRA, AdaLoRA...: :func:`peft_layers` of the model) pass through to their base
    layers for the ``with`` block.

    Head wrappers are not touched: the registry switches them per forward (``AdapterRegistry._route_heads``; all off
    for these runs). peft's ``PeftModel.disable_adapter()`` would switch both, and warns when the heads were left
    switched unevenly, as the registry leaves them.
    """
    for layer in layers:
        layer.enable_adapters(False)
    try:
        yield
    finally:
        for layer in layers:
            layer.enable_adapters(True)
