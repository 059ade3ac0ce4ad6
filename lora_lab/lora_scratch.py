"""LoRA from scratch: one linear layer in plain PyTorch, to read next to the paper (Hu et al., 2021).

A frozen pretrained layer computes ``y = W x + b``. LoRA learns a low-rank change of ``W`` instead of ``W`` itself:

    y = W x + b + (alpha / r) * B A dropout(x)        A: r x in_features,  B: out_features x r

- Only A and B train: ``r * (in + out)`` numbers instead of ``in * out`` (r = 8 on a 384 x 384 layer: 6,144 vs
  147,456).
- ``B`` starts at zero, so at step 0 the layer is exactly the pretrained one; ``A`` starts random (Kaiming-uniform,
  as ``nn.Linear`` and peft do) so that the gradient of ``B`` (which is ``grad_y (A x)^T``) is not zero either.
- ``alpha / r`` scales the update: changing r with alpha fixed keeps the update's size comparable.
- After training, ``B A`` can be *merged* into ``W`` (``W' = W + (alpha / r) B A``): one plain matmul again, no extra
  inference cost. *Unmerging* subtracts it back, e.g. to switch adapters.

:class:`LoraLinear` gives the same outputs, gradients and merged weight as ``peft.tuners.lora.Linear`` at the same
weights (tests/test_lora_scratch.py checks it); the training loop of this project uses peft's. The linear toy
(``python scripts/study.py toy``, :mod:`lora_lab.toy`) shows what rank r can and cannot represent.
"""

from __future__ import annotations

import math

import torch
from torch import nn


class LoraLinear(nn.Module):
    """``base(x) + (alpha / r) * B(A(dropout(x)))`` around a frozen ``nn.Linear``, with merge and unmerge."""

    def __init__(self, base: nn.Linear, r: int = 8, alpha: float = 16.0, dropout: float = 0.0):
        super().__init__()
        if r <= 0:
            raise ValueError(f"rank r must be positive, got {r}")
        self.base = base
        self.base.requires_grad_(False)  # the pretrained weight stays frozen
        self.lora_A = nn.Linear(base.in_features, r, bias=False)
        self.lora_B = nn.Linear(r, base.out_features, bias=False)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.scaling = alpha / r
        self.merged = False
        self.reset_lora_parameters()

    def reset_lora_parameters(self) -> None:
        """A Kaiming-uniform (like ``nn.Linear``), B zero: the update B A starts at exactly 0."""
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)

    def delta_weight(self) -> torch.Tensor:
        """The update LoRA adds to W: (alpha / r) B A, an out x in matrix of rank <= r."""
        return self.scaling * (self.lora_B.weight @ self.lora_A.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base(x)
        if self.merged:  # W already holds W + (alpha / r) B A
            return result
        return result + self.scaling * self.lora_B(self.lora_A(self.dropout(x)))

    @torch.no_grad()
    def merge(self) -> None:
        """W <- W + (alpha / r) B A: inference at the cost of the plain layer."""
        if not self.merged:
            self.base.weight += self.delta_weight()
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """W <- W - (alpha / r) B A: back to the pretrained W (up to float round-off)."""
        if self.merged:
            self.base.weight -= self.delta_weight()
            self.merged = False

    def extra_repr(self) -> str:
        return f"r={self.lora_A.out_features}, scaling={self.scaling:g}, merged={self.merged}"
