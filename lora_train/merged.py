"""LoRA updates merged into copies of the base's weights: the inference forward of ``scripts/predict.py`` and of
the server, on the devices where it is the faster one (:data:`MERGED_FORWARDS`).

A LoRA layer computes ``base(x) + B(A(x)) * scaling``: besides the base's product, an input cast, two thin
products, a scaling and a sum, each one more operator call. Merged, the layer is one Linear of weight
``W + scaling * B @ A``. The merged weight is computed once, in float32, from the base weight as the forward sees it
(rounded to the autocast dtype when the run computes in one) plus the update, and rounded once to the dtype the
forward computes in. predict.py and the server both build it here (:func:`merged_tensors`), so they give the same
probabilities; those differ from the unmerged forward's (training's evaluation, ``scripts/eval.py``) by rounding
alone (docs/serving.md).

Plain LoRA only: a layer with a LoRA variant (DoRA), a LoRA bias, ``fan_in_fan_out`` weights or a base that is not a
plain ``nn.Linear`` (a 4-bit NF4 layer), or an adapter that trained the base's biases (``bias`` other than
``none``), keeps the unmerged forward (:func:`mergeable`).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

MERGED_FORWARDS = {"cpu": True, "cuda": False}
"""Whether inference on this device type runs plain LoRA adapters merged. CPU: a forward of the CPU recipes' MiniLM
adapters (r=16 on every Linear, bf16 autocast, 1 thread) took 21.6 instead of 34.9 ms for 8 SST-2 sentences and 65.5
instead of 111.4 ms for 4 IMDb reviews (docs/serving.md). GPU: the server's grouped forward serves several adapters
in one forward (:mod:`lora_train.serving.grouped`), where merged weights would need one forward per adapter; not
measured here, so GPUs keep the unmerged forward, and predict.py does there as well."""


def merges_lora(device: torch.device) -> bool:
    """Whether inference on ``device`` merges plain LoRA adapters (:data:`MERGED_FORWARDS`)."""
    return MERGED_FORWARDS.get(device.type, False)


def mergeable(model: nn.Module, adapter: str) -> bool:
    """Whether adapter ``adapter`` of the peft model ``model`` is plain LoRA that merges into one weight per layer:
    every peft layer holding it a LoRA Linear over a plain ``nn.Linear``, without a variant (DoRA), a LoRA bias or
    ``fan_in_fan_out``; no base bias trained; nothing but head copies (``modules_to_save``) besides."""
    # peft is imported where it is used, as by the rest of inference: `predict.py --help` starts without it.
    from peft.tuners.lora.layer import Linear as LoraLinear
    from peft.tuners.tuners_utils import BaseTunerLayer
    from peft.utils import ModulesToSaveWrapper
    from peft.utils.other import AuxiliaryTrainingWrapper

    config = model.peft_config[adapter]
    if config.peft_type != "LORA" or getattr(config, "bias", "none") != "none":
        return False
    for module in model.modules():
        if isinstance(module, AuxiliaryTrainingWrapper) and not isinstance(module, ModulesToSaveWrapper):
            if adapter in module._get_available_adapters():
                return False
        if not isinstance(module, BaseTunerLayer):
            continue
        if not any(adapter in getattr(module, layers, {}) for layers in module.adapter_layer_names):
            continue
        if type(module) is not LoraLinear or type(module.get_base_layer()) is not nn.Linear or module.fan_in_fan_out:
            return False
        if adapter in module.lora_variant or module.lora_bias.get(adapter, False):
            return False
    return True


@torch.no_grad()
def merged_tensors(model: nn.Module, adapter: str, dtype: Optional[torch.dtype]) -> dict[str, torch.Tensor]:
    """Adapter ``adapter`` of the peft model ``model`` (:func:`mergeable`) as base parameter name -> tensor: each
    LoRA layer's merged weight (in ``dtype``, the autocast dtype, or the base weight's when None) and each head copy's
    parameters as they are. Named as the bare transformers model names them (``bert.encoder.layer.0.output.dense
    .weight``, ``classifier.bias``)."""
    from peft.tuners.lora.layer import Linear as LoraLinear
    from peft.utils import ModulesToSaveWrapper

    tensors = {}
    for name, module in model.get_base_model().named_modules():
        if isinstance(module, LoraLinear) and adapter in module.lora_A:
            weight = module.get_base_layer().weight
            computed = dtype or weight.dtype
            a, b = module.lora_A[adapter].weight.float(), module.lora_B[adapter].weight.float()
            merged = weight.to(computed).float() + (b @ a) * module.scaling[adapter]
            tensors[f"{name}.weight"] = merged.to(computed)
        elif isinstance(module, ModulesToSaveWrapper) and adapter in module.modules_to_save:
            for leaf, value in module.modules_to_save[adapter].named_parameters():
                tensors[f"{name}.{leaf}"] = value.detach()
    return tensors


def put_tensors(model: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """Make each of ``tensors`` the frozen parameter of that name of the bare model ``model``."""
    for name, value in tensors.items():
        path, _, leaf = name.rpartition(".")
        setattr(model.get_submodule(path), leaf, nn.Parameter(value, requires_grad=False))
