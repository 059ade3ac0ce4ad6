"""PiSSA / OLoRA adapters saved as plain LoRA adapters of the original, unmodified base.

PiSSA (SVD) and OLoRA (QR) start A0, B0 from the base weight and train on the residual base ``W_res = W - s B0 A0``
(``s`` = alpha / r). The trained A, B are therefore only right on ``W_res``; on the original ``W`` the same function
is ``W + s (B A - B0 A0)``, a LoRA update of rank 2r: ``B' = [B | -B0]``, ``A' = [A ; A0]``, with alpha doubled
(alpha * sqrt(2) under rsLoRA) so that the scale stays ``s``. Every saved adapter (best/, final) is converted so,
which keeps it usable with plain peft on the Hub base model, mergeable and shareable like any LoRA adapter.

peft's own ``save_pretrained(path_initial_model_for_weight_conversion=...)`` does this maths too, but in peft 0.21
it drops the trained head (modules_to_save) from the converted file and fails on a trained BERT pooler.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

ADAPTER_WEIGHTS, ADAPTER_CONFIG = "adapter_model.safetensors", "adapter_config.json"


def keep_initial_adapter(peft_model) -> None:
    """Remember A0, B0 (by their saved names) on the model, for :func:`convert_saved_adapter`.

    The initialisation is deterministic (an SVD / a QR of the base), so a resumed run recomputes the same A0, B0.
    """
    from peft import get_peft_model_state_dict

    peft_model.initial_lora_weights = {
        name: tensor.detach().clone()
        for name, tensor in get_peft_model_state_dict(peft_model).items()
        if ".lora_A." in name or ".lora_B." in name
    }


def convert_saved_adapter(directory: Path, model) -> None:
    """Rewrite the adapter just saved in ``directory`` as a rank-2r LoRA of the original base (no-op for others)."""
    initial = getattr(model, "initial_lora_weights", None)
    if initial is None:
        return
    tensors = load_file(directory / ADAPTER_WEIGHTS)
    for name, start in initial.items():
        trained = tensors[name]
        pair = [trained, start.to(trained)] if ".lora_A." in name else [trained, -start.to(trained)]
        tensors[name] = torch.cat(pair, dim=0 if ".lora_A." in name else 1).contiguous()
    save_file(tensors, directory / ADAPTER_WEIGHTS, metadata={"format": "pt"})
    config = json.loads((directory / ADAPTER_CONFIG).read_text())
    config.update(
        r=2 * config["r"],
        lora_alpha=config["lora_alpha"] * (2**0.5 if config["use_rslora"] else 2),
        init_lora_weights=True,
    )
    (directory / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True))
