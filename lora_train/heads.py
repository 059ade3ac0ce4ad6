"""The classification head: which modules it is, how a decoder pools its tokens into it, how it is narrowed for mixed
serving, and the shapes of a saved one.

Modeling (what is trained and never quantized), serving (one head copy per adapter, mixed batches), merging and the
model card all call this module; a new pooling or head layout is added here.

* Discovery: :func:`head_modules`, :func:`head_linear_names`, :func:`new_heads`.
* Pooling of decoder classifiers (``model.pooling``): transformers' ``*ForSequenceClassification`` scores every
  token and keeps the rightmost one that is not the pad token (``last``, the architecture's own); ``mean`` averages
  the hidden states of the attended tokens first (:func:`apply_pooling`).
* Mixed serving: :data:`MIXABLE_HEADS`, :func:`narrow_heads`, :func:`is_mixable`, :func:`mix_any_width`.
* Shapes: :func:`saved_shapes`, :func:`shaped_like_saved`.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn

HEAD_MODULE_NAMES = ("classifier", "pre_classifier", "score", "pooler", "out_proj")
"""Names of classification-head modules across architectures (BERT: pooler + classifier, DistilBERT:
pre_classifier + classifier, decoder LMs: score). They are trained in full and never quantized."""
DECODER_HEAD = "score"
"""The head of transformers' decoder classifiers, which score every token and keep one (see :func:`apply_pooling`)."""
MIXABLE_HEADS = (nn.Linear, nn.Embedding, nn.Conv1d, nn.Conv2d, nn.Conv3d)
"""Head (``modules_to_save``) module types peft can run with several adapters in one batch."""
POOLINGS = ("last", "mean")
"""Values of ``model.pooling``."""


# ---------------------------------------------------------------------------------------------
# Discovery


def head_modules(model: nn.Module) -> list[str]:
    """Top-level names of the classification head modules present in ``model`` (e.g. pooler, classifier)."""
    present = set()
    for name, _ in model.named_modules():
        leaf = name.split(".")[-1]
        if leaf in HEAD_MODULE_NAMES and "attention" not in name:
            present.add(leaf)
    return sorted(present)


def head_linear_names(model: nn.Module) -> list[str]:
    """Full names of the Linear layers inside head modules (e.g. ``bert.pooler.dense``, ``classifier``).

    transformers matches ``llm_int8_skip_modules`` as a prefix or suffix of full module names, so a
    bare ``pooler`` would not keep ``bert.pooler.dense`` out of quantization; full names do.
    """
    heads = set(head_modules(model))
    return sorted(
        name
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and heads.intersection(name.split(".")) and "attention" not in name
    )


def new_heads(model: nn.Module, missing_keys: list[str]) -> list[str]:
    """The head modules the checkpoint did not provide (they start random and must be trained); when it provided
    them all (a fine-tuned classifier), its final layer (``classifier`` / ``score``)."""
    missing = {part for key in missing_keys for part in key.split(".")}
    present = head_modules(model)
    return [h for h in present if h in missing] or [h for h in present if h in ("classifier", DECODER_HEAD)]


# ---------------------------------------------------------------------------------------------
# Pooling


def pooling_problem(pooling: str, model: nn.Module) -> Optional[str]:
    """Why ``model`` (may be on the meta device) cannot pool as ``model.pooling`` asks, or None."""
    if pooling == "last" or DECODER_HEAD in head_modules(model):
        return None
    return (
        f"model.pooling = {pooling!r} applies to decoder classifiers (a '{DECODER_HEAD}' head that scores every"
        f" token), but {type(model).__name__} classifies from its own pooled representation (e.g. BERT's [CLS]"
        " pooler): use model.pooling=last"
    )


def pooling_outside_lora_train(pooling: str) -> Optional[str]:
    """What a plain transformers model loaded from the run's files misses about ``pooling``, or None."""
    if pooling == "last":
        return None
    return (
        f"it pools with model.pooling = {pooling!r}, which lora_train's loaders apply (scripts/predict.py,"
        " lora_train.inference.load_run, the server) but a plain transformers model does not: it scores the last"
        " non-pad token"
    )


def apply_pooling(model: nn.Module, pooling: str) -> nn.Module:
    """Make a decoder classifier pool as ``pooling`` says (``last`` leaves the model as transformers built it).

    ``mean``: the backbone's output at every position becomes the mean of the attended positions' hidden states, so
    the head's last-token pick reads the mean whatever the padding side (``score`` is linear: scoring the mean is
    the mean of the scores). A forward hook on the backbone, so parameter names, peft wrapping and saved files are
    unchanged, and every loader (training, inference, the server, merge) applies it from the recipe.
    """
    if pooling == "last":
        return model
    backbone = getattr(model, model.base_model_prefix)
    backbone.register_forward_hook(_mean_over_attended_tokens, with_kwargs=True)
    return model


def _mean_over_attended_tokens(module: nn.Module, args: tuple, kwargs: dict[str, Any], output: Any) -> Any:
    hidden = output.last_hidden_state
    mask = kwargs.get("attention_mask")
    if mask is None or mask.dim() != 2:  # no padding: every position counts
        mask = torch.ones(hidden.shape[:2], device=hidden.device)
    weights = mask[:, -hidden.shape[1] :].to(hidden.dtype).unsqueeze(-1)  # soft prompts prepend attended tokens
    mean = (hidden * weights).sum(1, keepdim=True) / weights.sum(1, keepdim=True).clamp(min=1)
    output.last_hidden_state = mean.expand_as(hidden)
    return output


# ---------------------------------------------------------------------------------------------
# Mixed serving


def narrow_heads(model: nn.Module, modules_to_save: Optional[list[str]]) -> Optional[list[str]]:
    """``modules_to_save`` with each entry that names a module holding all its weights in one mixable layer
    narrowed to that layer: BERT's ``pooler`` (a Linear ``dense`` and a tanh) becomes ``pooler.dense``.

    peft runs a head for several adapters in one batch only when the wrapped module is a single layer
    (:data:`MIXABLE_HEADS`), and the CPU recipes train the pooler with the classifier. The saved tensors are named
    the same either way (``base_model.model.bert.pooler.dense.weight``), and a tanh has no weights, so the adapter
    computes the same; only the wrapper moves down one level.
    """
    from peft.utils import ModulesToSaveWrapper

    if not modules_to_save:
        return modules_to_save
    single_layer = (ModulesToSaveWrapper, *MIXABLE_HEADS)

    def has_weights(module: nn.Module, recurse: bool = True) -> bool:
        return next(module.parameters(recurse=recurse), None) is not None

    narrowed = []
    for entry in modules_to_save:
        matches = [m for n, m in model.named_modules() if n == entry or n.endswith(f".{entry}")]
        holders = {name: child for m in matches for name, child in m.named_children() if has_weights(child)}
        if (
            matches
            and len(holders) == 1
            and not any(isinstance(m, single_layer) or has_weights(m, recurse=False) for m in matches)
            and all(isinstance(child, single_layer) for child in holders.values())
        ):
            entry = f"{entry}.{next(iter(holders))}"
        narrowed.append(entry)
    return narrowed


def is_mixable(peft_type: str, wrappers: list[nn.Module]) -> bool:
    """Whether an adapter with these head wrappers can share a forward with others (peft's ``adapter_names``)."""
    return peft_type == "LORA" and all(isinstance(w.original_module, MIXABLE_HEADS) for w in wrappers)


def mix_any_width(wrapper: nn.Module) -> None:
    """Let a head wrapper run a mixed batch whose adapters' heads differ in width (2 classes beside 6).

    peft's ``ModulesToSaveWrapper`` runs each adapter's rows through its own copy and stacks the rows, which fails
    for outputs of different widths, so adapters with different numbers of classes needed a forward each. This
    version pads every output's last dimension with zeros to the widest; each row's first columns are exactly what
    its adapter's copy computes (the same sub-batch call as peft's), and the caller reads only its own classes.
    Installing it again replaces it with an equal one.
    """

    def mixed_batch_forward(input: torch.Tensor, *args: Any, adapter_names: list[str], **kwargs: Any) -> torch.Tensor:
        rows: dict[str, list[int]] = {}
        for index, name in enumerate(adapter_names):
            rows.setdefault(name, []).append(index)
        outputs = []
        for name, indices in rows.items():
            chosen = torch.tensor(indices, device=input.device)
            sub_batch = input[chosen]
            if name == "__base__":
                output = wrapper.original_module(sub_batch, *args, **kwargs)
            else:
                output = wrapper._forward_wrapped_mixed_batch(sub_batch, name, *args, **kwargs)
            outputs.append((chosen, output))
        first = outputs[0][1]
        width = max(output.shape[-1] for _, output in outputs)
        result = first.new_zeros((len(adapter_names), *first.shape[1:-1], width))
        for chosen, output in outputs:
            result[chosen, ..., : output.shape[-1]] = output
        return result

    wrapper._mixed_batch_forward = mixed_batch_forward  # the instance's, in place of peft's (see the docstring)


# ---------------------------------------------------------------------------------------------
# Shapes


def saved_shapes(weights: Path) -> dict[str, tuple[int, ...]]:
    """Every tensor's shape in a safetensors file, read from its header (no tensor loaded)."""
    from safetensors import safe_open

    with safe_open(weights, "pt") as saved:
        return {key: tuple(saved.get_slice(key).get_shape()) for key in saved.keys()}


def shaped_like_saved(head: nn.Module, path: str, shapes: dict[str, tuple[int, ...]]) -> Optional[nn.Module]:
    """A copy of ``head`` (at module path ``path``) whose parameters have the saved shapes (e.g. 6 classes where the
    base has 2), or None when every shape already agrees. The copy's values are uninitialised: loading fills them."""
    copied = copy.deepcopy(head)
    resized = False
    for param_name, param in list(copied.named_parameters()):
        shape = shapes.get(f"{path}.{param_name}")
        if shape is not None and shape != tuple(param.shape):
            owner_name, _, leaf = param_name.rpartition(".")
            owner = copied.get_submodule(owner_name)
            setattr(owner, leaf, nn.Parameter(param.new_empty(shape), requires_grad=False))
            if isinstance(owner, nn.Linear):
                owner.out_features = shape[0]
            resized = True
    return copied if resized else None
