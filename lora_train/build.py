"""The one setup path from a recipe to data and a model: training, inference, benchmarks and studies all use it.

recipe -> data spec -> splits + label names            :func:`load_task_data`
label names + tokenizer -> model config (+ pad token)
  -> base model (NF4 when asked) -> PEFT regime         :func:`build_classifier`
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from typing import Callable, Optional

import torch
from torch import nn

from lora_train.config import Recipe
from lora_train.data import Carve, TaskData, load_splits, resolve_spec
from lora_train.modeling import apply_regime, last_layer_at_first_position, load_base_model, load_model_config


def load_task_data(
    recipe: Recipe, loading_context: Callable[[], AbstractContextManager] = nullcontext, carve: Optional[Carve] = None
) -> TaskData:
    """Resolve the task and load both splits (inside ``loading_context``, e.g. main-process-first), checked, with the
    class names; ``carve``: the validation rows a resumed run carved out of train."""
    with loading_context():
        return load_splits(resolve_spec(recipe.data), recipe.data, carve)


def build_classifier(
    recipe: Recipe,
    label_names: list[str],
    tokenizer,
    device: Optional[torch.device] = None,
    total_steps: Optional[int] = None,
    full_last_layer: bool = False,
) -> nn.Module:
    """The recipe's sequence classifier with the task's labels and the tokenizer's pad token.

    NF4 weights are placed on ``device`` as they load (bitsandbytes quantizes there); other models are moved to
    it afterwards. With ``total_steps`` the recipe's training regime is applied (adapters + head, head only, or
    everything trainable; AdaLoRA's schedule needs the step count); without it the bare base model is returned,
    ready for an adapter to be loaded onto it.

    The last encoder layer of a classifier whose head reads the first position only computes that position
    (:func:`lora_train.modeling.last_layer_at_first_position`) unless ``full_last_layer``: the baselines the
    benchmarks compare against keep the model as transformers builds it.
    """
    from transformers.integrations import is_deepspeed_zero3_enabled

    config = load_model_config(recipe, label_names)
    if config.pad_token_id is None:
        config.pad_token_id = tokenizer.pad_token_id
    device_map = {"": device or torch.device("cpu")} if recipe.quantization.is_4bit else None
    model, trainable_heads = load_base_model(recipe, config, device_map)
    if not full_last_layer:
        last_layer_at_first_position(model)
    if device is not None and not recipe.quantization.is_4bit and not is_deepspeed_zero3_enabled():
        model = model.to(device)  # ZeRO-3 places (partitions) the weights itself
    if total_steps is None:
        return model
    return apply_regime(recipe, model, trainable_heads, total_steps)
