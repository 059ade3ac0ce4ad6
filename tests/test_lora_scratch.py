"""The from-scratch LoRA layer (lora_lab/lora_scratch.py) against peft's own LoRA layer
at the same weights."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from lora_lab.lora_scratch import LoraLinear


def peft_layer(base: nn.Linear, dropout: float = 0.0) -> nn.Module:
    """peft's LoRA layer (the one get_peft_model puts in place of each target Linear), r=4, alpha=8."""
    from peft import LoraConfig
    from peft.tuners.lora import Linear as PeftLoraLinear

    config = LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout)
    return PeftLoraLinear(base, adapter_name="default", config=config, r=4, lora_alpha=8, lora_dropout=dropout)


def twin_layers(dropout: float = 0.0) -> tuple[LoraLinear, nn.Module]:
    """A scratch layer and a peft ``lora.Linear`` on copies of one base layer, with the same (non-zero) A and B."""
    torch.manual_seed(0)
    base = nn.Linear(24, 16)
    ours = LoraLinear(copy.deepcopy(base), r=4, alpha=8, dropout=dropout)
    theirs = peft_layer(copy.deepcopy(base), dropout)
    with torch.no_grad():
        ours.lora_B.weight.normal_()  # B = 0 at init would make every comparison trivially equal
        theirs.lora_A["default"].weight.copy_(ours.lora_A.weight)
        theirs.lora_B["default"].weight.copy_(ours.lora_B.weight)
    return ours, theirs


def test_init_matches_peft_and_starts_at_the_base_layer():
    base = nn.Linear(24, 16)
    ours = LoraLinear(copy.deepcopy(base), r=4, alpha=8)
    theirs = peft_layer(copy.deepcopy(base))
    x = torch.randn(5, 24)
    assert torch.equal(ours(x), base(x))  # B = 0: exactly the pretrained layer
    assert torch.count_nonzero(ours.lora_B.weight) == 0 and torch.count_nonzero(theirs.lora_B["default"].weight) == 0
    assert ours.scaling == theirs.scaling["default"] == 2.0
    bound = 1 / 24**0.5  # kaiming_uniform_(a=sqrt(5)) on fan_in 24, peft's default
    assert ours.lora_A.weight.abs().max() <= bound and theirs.lora_A["default"].weight.abs().max() <= bound
    assert [n for n, p in ours.named_parameters() if p.requires_grad] == ["lora_A.weight", "lora_B.weight"]


@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_same_outputs_and_gradients_as_peft(dropout):
    ours, theirs = twin_layers(dropout)
    x = torch.randn(6, 24)
    outputs, grads = [], []
    for layer in (ours, theirs):
        layer.train()
        torch.manual_seed(1)  # the same dropout mask: each layer draws one, after the base matmul
        xi = x.clone().requires_grad_(True)
        y = layer(xi)
        (y**2).sum().backward()
        a, b = (layer.lora_A, layer.lora_B) if layer is ours else (layer.lora_A["default"], layer.lora_B["default"])
        outputs.append(y.detach())
        grads.append((xi.grad, a.weight.grad, b.weight.grad))
    torch.testing.assert_close(outputs[0], outputs[1], rtol=0, atol=1e-6)
    for ours_grad, peft_grad in zip(*grads, strict=True):
        torch.testing.assert_close(ours_grad, peft_grad, rtol=0, atol=1e-5)
    assert ours.base.weight.grad is None  # frozen


def test_merge_gives_peft_merged_weight_and_unmerge_restores_it():
    ours, theirs = twin_layers()
    original = ours.base.weight.detach().clone()
    x = torch.randn(6, 24)
    ours.eval(), theirs.eval()
    before = ours(x)
    ours.merge()
    theirs.merge()
    torch.testing.assert_close(ours.base.weight, theirs.base_layer.weight, rtol=0, atol=1e-6)
    torch.testing.assert_close(ours.base.weight, original + 2.0 * ours.lora_B.weight @ ours.lora_A.weight)
    torch.testing.assert_close(ours(x), before, rtol=0, atol=1e-5)  # merged: same function, one matmul
    ours.unmerge()
    torch.testing.assert_close(ours.base.weight, original, rtol=0, atol=1e-6)
    assert not ours.merged
