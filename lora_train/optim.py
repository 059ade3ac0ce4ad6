"""Optimizer parameter groups: no weight decay on biases and norms, and layer-wise (discriminative) learning rates.

Layer-wise learning-rate decay (Howard & Ruder 2018, ULMFiT; Sun et al. 2019 for BERT) trains the layers near the
head fastest and the embeddings slowest, since the lower layers hold the most general features: with L transformer
layers numbered 0..L-1, the head (and pooler, final norm) gets ``lr``, layer ``L-k`` gets ``lr * decay**k`` and the
embeddings ``lr * decay**(L+1)``.
"""

from __future__ import annotations

import re
from typing import Any, Optional

from torch import nn

LAYER_INDEX = re.compile(r"\.(?:layer|layers|h|block|blocks)\.(\d+)\.")
"""The index of a transformer layer in a parameter name (BERT ``encoder.layer.3.``, Llama ``layers.3.``, GPT-2
``h.3.``)."""


def layer_depth(name: str, num_layers: int) -> int:
    """How many steps below the head a parameter sits: 0 for the head, L - i for layer i, L + 1 for embeddings."""
    match = LAYER_INDEX.search(name)
    if match:
        return num_layers - int(match.group(1))
    if "embed" in name or ".wte." in name or ".wpe." in name:
        return num_layers + 1
    return 0


def param_groups(model: nn.Module, weight_decay: float, lr: float, layer_lr_decay: float = 1.0) -> list[dict[str, Any]]:
    """AdamW groups of the trainable parameters: decayed / not decayed (biases, norms), each split by learning rate.

    Groups come out by learning rate, highest (the head's) first, so the first group's rate is the one logged.
    """
    trainable = [(name, param) for name, param in model.named_parameters() if param.requires_grad]
    num_layers = _num_layers(model, [name for name, _ in trainable]) if layer_lr_decay != 1.0 else 0
    groups: dict[tuple[int, bool], dict[str, Any]] = {}
    for name, param in trainable:
        depth = layer_depth(name, num_layers) if layer_lr_decay != 1.0 else 0
        no_decay = param.ndim < 2 or "norm" in name.lower()
        group = groups.setdefault(
            (depth, no_decay),
            {
                "params": [],
                "weight_decay": 0.0 if no_decay else weight_decay,
                "lr": lr * layer_lr_decay**depth,
            },
        )
        group["params"].append(param)
    return [groups[key] for key in sorted(groups)]


def _num_layers(model: nn.Module, names: list[str]) -> int:
    """The model's transformer layer count (config.num_hidden_layers, else one more than the highest index seen)."""
    config = getattr(model, "config", None)
    found: Optional[int] = getattr(config, "num_hidden_layers", None) or getattr(config, "n_layer", None)
    indices = [int(m.group(1)) for m in map(LAYER_INDEX.search, names) if m]
    return found or (max(indices) + 1 if indices else 0)
