"""Tokenizer, base model (optionally 4-bit NF4), and the PEFT / head-only / full training regime."""

from __future__ import annotations

import contextvars
import logging
import sys
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

import torch
from torch import nn

from lora_train.config import Recipe, RecipeError
from lora_train.data import padded_length
from lora_train.heads import apply_pooling, head_linear_names, head_modules, new_heads, pooling_problem
from lora_train.hub import lookup_error

logger = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "uint8": torch.uint8}


@dataclass
class ParamCount:
    """Trainable and total parameter counts (4-bit weights counted as their unpacked number)."""

    trainable: int
    total: int

    @property
    def percent(self) -> float:
        return 100.0 * self.trainable / max(self.total, 1)

    def __str__(self) -> str:
        return f"trainable params: {self.trainable:,} || all params: {self.total:,} || trainable%: {self.percent:.4f}"


def load_tokenizer(recipe: Recipe):
    """The base model's tokenizer, with a pad token chosen by :func:`set_pad_token` when it has none."""
    from transformers import AutoTokenizer

    m = recipe.model
    try:
        require_tokenizer_files(Path(m.name_or_path))
        tokenizer = AutoTokenizer.from_pretrained(
            m.name_or_path, revision=m.revision, trust_remote_code=m.trust_remote_code
        )
    except (OSError, ValueError, TypeError) as err:  # missing or unreadable tokenizer files
        raise RecipeError(
            [f"cannot load a tokenizer from model.name_or_path = {m.name_or_path!r}: {tokenizer_error(err)}"]
        ) from None
    if tokenizer.pad_token is None:
        set_pad_token(tokenizer, m.name_or_path)
    return tokenizer


def set_pad_token(tokenizer, name: str) -> str:
    """Give a tokenizer without one a pad token: UNK when the tokenizer can never emit it, else EOS; say which.

    Decoder classifiers pool the rightmost token that is not the pad token (transformers'
    ``*ForSequenceClassification`` compares ``input_ids`` with ``config.pad_token_id``), so the pad token should
    never be a token a text can end with. EOS can be (a text ending in ``</s>``, tokenizers that append EOS), and
    would then be skipped in pooling. A byte-fallback BPE (Llama, Mistral) encodes every character, so it never
    emits UNK, which is then a pad token that only padding produces. The choice is saved with the run's tokenizer,
    so prediction pads and pools with the same token.
    """
    unk, eos = tokenizer.unk_token, tokenizer.eos_token
    if unk is not None and unk not in (eos, tokenizer.bos_token) and never_emits_unk(tokenizer):
        tokenizer.pad_token = unk
        return "unk"
    if eos is None:
        raise RecipeError([f"tokenizer of {name} has no pad token, and no eos token to pad with"])
    tokenizer.pad_token = eos
    return "eos"


def never_emits_unk(tokenizer) -> bool:
    """True for a fast tokenizer whose BPE model falls back to bytes (so no text encodes to UNK)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    return backend is not None and bool(getattr(backend.model, "byte_fallback", False))


TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "vocab.txt",
    "vocab.json",
    "tokenizer.model",
    "spiece.model",
    "sentencepiece.bpe.model",
)
"""Files a saved tokenizer has at least one of (fast, slow WordPiece / BPE, SentencePiece)."""


def require_tokenizer_files(directory: Path) -> None:
    """Raise ``FileNotFoundError`` for a local directory without tokenizer files: transformers would build an empty
    vocabulary from the config alone and map every word to [UNK], silently."""
    if directory.is_dir() and not any((directory / name).is_file() for name in TOKENIZER_FILES):
        raise FileNotFoundError(f"'{directory}' holds no tokenizer files.")


def tokenizer_error(err: Exception) -> str:
    """A failed tokenizer load in one line, with what a model or run directory needs."""
    first_line = str(err).strip().splitlines()[0] if str(err).strip() else ""
    return (
        f"{type(err).__name__}: {first_line} The directory needs the files save_pretrained writes for a tokenizer"
        " (tokenizer.json and tokenizer_config.json, or its class's vocabulary files)"
    )


def load_model_config(recipe: Recipe, label_names: Optional[list[str]] = None):
    """The base model's config (reads config.json only), with the task's label mapping when given."""
    from transformers import AutoConfig

    m = recipe.model
    labels = {}
    if label_names is not None:
        labels = dict(
            num_labels=len(label_names),
            id2label=dict(enumerate(label_names)),
            label2id={name: i for i, name in enumerate(label_names)},
        )
    try:
        config = AutoConfig.from_pretrained(
            m.name_or_path, revision=m.revision, trust_remote_code=m.trust_remote_code, **labels
        )
    except (OSError, ValueError) as err:
        what = f"model.name_or_path = {m.name_or_path!r}" + (
            f" (revision {m.revision!r})" if m.revision not in (None, "main") else ""
        )
        raise RecipeError([lookup_error(what, m.name_or_path, err, m.revision, filename="config.json")]) from None
    if m.attention_dropout is not None:
        field = attention_dropout_field(config)
        if field is None:
            raise RecipeError(
                [
                    f"model.attention_dropout is set, but {m.name_or_path!r} ({config.model_type}) has none of the"
                    f" config fields {', '.join(ATTENTION_DROPOUT_FIELDS)}; remove model.attention_dropout (null"
                    " keeps the checkpoint's)"
                ]
            )
        setattr(config, field, m.attention_dropout)
    return config


# What architectures call their attention-probability dropout: BERT family, Llama/DistilBERT family, GPT-2 family.
ATTENTION_DROPOUT_FIELDS = ("attention_probs_dropout_prob", "attention_dropout", "attn_pdrop")


def attention_dropout_field(config) -> Optional[str]:
    """The config attribute holding ``config``'s attention dropout (one of ATTENTION_DROPOUT_FIELDS), or None."""
    present = (name for name in ATTENTION_DROPOUT_FIELDS if isinstance(getattr(config, name, None), (int, float)))
    return next(present, None)


def linear_module_names(model: nn.Module) -> list[str]:
    """Distinct leaf names of the Linear layers outside the head (valid ``target_modules`` entries)."""
    heads = set(head_modules(model))
    names = set()
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) or type(module).__name__ in ("Linear4bit", "Conv1D"):
            parts = name.split(".")
            if not heads.intersection(parts):
                names.add(parts[-1])
    return sorted(names)


def check_target_modules(recipe: Recipe, model: nn.Module) -> None:
    """Refuse target modules the model lacks, listing the Linear names that exist."""
    targets = recipe.peft.target_modules
    if not recipe.peft.spec.uses_target_modules or targets == "all-linear":
        return
    available = linear_module_names(model)
    missing = [t for t in targets if t.split(".")[-1] not in available]
    if missing:
        raise RecipeError(
            [
                f"peft.target_modules {missing} not found in {recipe.model.name_or_path};"
                f" its Linear layers are: {available}"
            ]
        )


def meta_model(config) -> nn.Module:
    """Instantiate the architecture on the meta device (no memory, no weights) to inspect module names."""
    from transformers import AutoModelForSequenceClassification
    from transformers.modeling_utils import set_zero3_state

    # set_zero3_state: under DeepSpeed ZeRO-3, from_config would partition the model and then fail initialising
    # meta tensors ("Cannot copy out of meta tensor"); this marks zero.Init as already handled.
    with torch.device("meta"), set_zero3_state():
        return AutoModelForSequenceClassification.from_config(config)


def quantization_config(recipe: Recipe, skip: list[str]):
    """The BitsAndBytesConfig for NF4, or None."""
    q = recipe.quantization
    if not q.is_4bit:
        return None
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=q.double_quant,
        bnb_4bit_compute_dtype=DTYPES[q.compute_dtype],
        bnb_4bit_quant_storage=DTYPES[q.quant_storage_dtype],
        llm_int8_skip_modules=skip,
    )


def load_base_model(recipe: Recipe, config, device_map: Optional[dict] = None) -> tuple[nn.Module, list[str]]:
    """The pretrained classifier (NF4 when asked, heads kept out of quantization) and its new head modules.

    The second value names the head modules the checkpoint did not provide (e.g. BERT's ``classifier``,
    DistilBERT's ``pre_classifier`` and ``classifier``, a decoder's ``score``): they start random and
    must be trained. A pretrained pooler stays frozen, which keeps adapters small.
    """
    from transformers import AutoModelForSequenceClassification

    m, q = recipe.model, recipe.quantization
    skip = q.skip_modules if q.skip_modules is not None else head_linear_names(meta_model(config))
    kwargs = dict(
        config=config,
        revision=m.revision,
        trust_remote_code=m.trust_remote_code,
        dtype="auto" if m.dtype == "auto" else DTYPES[m.dtype],
        use_safetensors=True,  # never unpickle a pytorch_model.bin
    )
    if m.attn_implementation:
        kwargs["attn_implementation"] = m.attn_implementation
    qconfig = quantization_config(recipe, skip)
    if qconfig is not None:
        kwargs["quantization_config"] = qconfig
        from transformers.integrations import is_deepspeed_zero3_enabled

        if not is_deepspeed_zero3_enabled():  # ZeRO-3 refuses a device_map; bitsandbytes then uses the current device
            kwargs["device_map"] = device_map or {"": "cpu"}
    with without_load_report():  # what matters in it (weights missing outside the head) is logged below
        model, info = AutoModelForSequenceClassification.from_pretrained(
            m.name_or_path, output_loading_info=True, **kwargs
        )
    if qconfig is not None:
        keep_4bit_training_layout(model)  # training, evaluation and reloading all use one 4-bit layout
    if model.config.pad_token_id is None:
        model.config.pad_token_id = config.pad_token_id if config.pad_token_id is not None else config.eos_token_id
    trainable_heads = new_heads(model, info["missing_keys"])
    log_unexpected_loading(info, trainable_heads)
    return apply_pooling(model, m.pooling), trainable_heads


class _DropLoadReport(logging.Filter):
    """Drops transformers' "LOAD REPORT" table: for a base checkpoint it only says the new head is new."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "LOAD REPORT" not in str(record.msg)


@contextmanager
def without_load_report() -> Iterator[None]:
    """transformers' load report dropped while loading; its other messages still show."""
    emitter = logging.getLogger("transformers.modeling_utils")
    report_filter = _DropLoadReport()
    emitter.addFilter(report_filter)
    try:
        yield
    finally:
        emitter.removeFilter(report_filter)


def log_unexpected_loading(info: dict, new_heads: list[str]) -> None:
    """Warn about checkpoint weights that were missing outside the new classification head; a base checkpoint
    never has the head, so that part is expected and not reported. Unused checkpoint weights (a decoder's
    ``lm_head``, a pretraining head) are normal for a classifier and logged at debug level only."""
    stray = [key for key in info["missing_keys"] if not set(key.split(".")) & set(new_heads)]
    if stray:
        logger.warning(
            "%d weights were not in the checkpoint and start random (besides the new head %s): %s",
            len(stray),
            ", ".join(new_heads),
            ", ".join(sorted(stray)[:8]) + (" ..." if len(stray) > 8 else ""),
        )
    if info["unexpected_keys"]:
        logger.debug(
            "checkpoint weights a sequence classifier does not use: %s", ", ".join(sorted(info["unexpected_keys"]))
        )


def peft_config(recipe: Recipe, trainable_heads: list[str], total_steps: int):
    """peft's config of the recipe's method for sequence classification (the head goes to modules_to_save)."""
    from peft import TaskType

    pe = recipe.peft
    # A copy: peft extends modules_to_save in place with its SEQ_CLS defaults.
    trained_heads = pe.modules_to_save if pe.modules_to_save is not None else trainable_heads
    heads = dict(task_type=TaskType.SEQ_CLS, modules_to_save=list(trained_heads))
    return pe.spec.peft_config(recipe, heads, total_steps)


def keep_4bit_training_layout(model: nn.Module) -> None:
    """Stop bitsandbytes repacking 4-bit weights for AVX512-BF16 CPU inference (at an evaluation, or a reload).

    That repacking rounds the quantization constants to bfloat16, is undone only lossily (by ``state_dict()``),
    and breaks the next training forward (``result += bias`` on a leaf view); a model being trained keeps one
    layout, so evaluation and training use the same numerics and a resumed run the same base weights.
    """
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False


def apply_regime(recipe: Recipe, model: nn.Module, trainable_heads: list[str], total_steps: int) -> nn.Module:
    """Make only what the recipe trains trainable: adapters + head, the head alone, or everything."""
    spec = recipe.peft.spec
    if spec.peft_config is None:  # bitfit, head_only, full: the method says which parameters train
        heads = set(recipe.peft.modules_to_save or trainable_heads)
        for name, param in model.named_parameters():
            param.requires_grad_(spec.trains(name) or bool(heads.intersection(name.split("."))))
        if recipe.training.gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        return model
    from peft import get_peft_model, prepare_model_for_kbit_training

    if recipe.quantization.is_4bit:
        model = prepare_model_for_kbit_training(
            model,
            use_gradient_checkpointing=recipe.training.gradient_checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": False},
        )
    elif recipe.training.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    peft_model = get_peft_model(model, peft_config(recipe, trainable_heads, total_steps))
    if spec.after_wrap is not None:
        spec.after_wrap(recipe, peft_model)
    return peft_model


def check_method_runs(recipe: Recipe, model: nn.Module) -> None:
    """Refuse, before any work, a method the installed peft cannot run here, or a pooling the model's head does not
    support (``model`` may be on the meta device)."""
    problems = recipe.peft.spec.run_problems(recipe, model) + [pooling_problem(recipe.model.pooling, model)]
    problems = [p for p in problems if p]
    if problems:
        raise RecipeError(problems)


def count_parameters(model: nn.Module) -> ParamCount:
    """Trainable / total parameters; a packed 4-bit tensor holds two weights per byte."""
    trainable = total = 0
    for param in model.parameters():
        n = param.numel()
        if param.__class__.__name__ == "Params4bit":
            n = n * 2 * param.element_size()
        total += n
        if param.requires_grad:
            trainable += n
    return ParamCount(trainable, total)


class FastDropout(nn.Dropout):
    """Inverted dropout whose keep-mask comes from 16-bit random integers, four per 64-bit draw.

    On CPU, ``bernoulli_`` draws one random number per element and was ~16% of a MiniLM LoRA step; this
    draws a quarter as many (docs/performance.md). The drop probability is rounded to a multiple of
    1/65536 (0.1 -> 0.100006), at most 65535/65536, and the scale uses that rounded value, so the output stays
    unbiased.

    The mask is uint8, not bool: a product with a bool tensor first copies it to the activation's dtype, forward
    and backward (121 us against 46 us with uint8 for a 32 x 22 x 384 activation on 2 cores), and the result is bit
    for bit the same. The saved mask stays one byte per element. Mask and scale are applied in one pass, forward and
    backward (:class:`_MaskProduct`).
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0:
            return x
        return _MaskProduct.apply(x, *self.mask(x))

    def mask(self, x: torch.Tensor) -> tuple[torch.Tensor, float]:
        """A fresh keep-mask for ``x`` (uint8, ``x``'s shape) and the scale of what it keeps."""
        dropped = min(round(self.p * 65536), 65535)  # a p in [0, 1) just below 1 would round to 1: nothing kept
        bits = torch.empty((x.numel() + 3) // 4, dtype=torch.int64, device=x.device).random_(-(2**63), None)
        keep = torch.empty(x.shape, dtype=torch.uint8, device=x.device)
        torch.ge(bits.view(torch.int16)[: x.numel()].view(x.shape), dropped - 32768, out=keep)
        return keep, 65536 / (65536 - dropped)


def _masked(x: torch.Tensor, keep: torch.Tensor, scale: float) -> torch.Tensor:
    """``x * keep * scale`` in one pass. ``addcmul`` onto -0.0 gives the bits of the two products exactly, the sign of a
    dropped zero included (+0.0 would turn a -0.0 into +0.0)."""
    return torch.addcmul(x.new_full((), -0.0), x, keep, value=scale)


class _MaskProduct(torch.autograd.Function):
    """:func:`_masked` and its gradient, one pass each (autograd's two products took two each)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, keep: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.save_for_backward(keep)
        ctx.scale = scale
        return _masked(x, keep, scale)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (keep,) = ctx.saved_tensors
        return _masked(grad, keep, ctx.scale), None, None


def use_fast_dropout(model: nn.Module) -> int:
    """Swap every ``nn.Dropout`` of ``model`` for :class:`FastDropout` (same p); return how many were swapped.

    A BERT-family classifier's self-attention layers then also apply theirs to the attention probabilities in
    training (:func:`fast_dropout_attention`), where they passed its p to SDPA.
    """
    swapped = 0
    for module in model.modules():
        for name, child in module.named_children():
            if type(child) is nn.Dropout:
                fast = FastDropout(child.p, child.inplace)
                fast.train(child.training)
                setattr(module, name, fast)
                swapped += 1
    for layer in _bert_family_layers(model):
        _rewrite_forward(layer.attention.self, "FastDropout", _self_attention)
    return swapped


def use_fused_lora(model: nn.Module) -> int:
    """Make peft's LoRA layers over a plain ``nn.Linear`` compute base and adapter in one autograd Function when they
    train (:class:`_LoraProduct`); returns how many layers were switched. For training on a CPU, with the weights
    whole on the device (not ZeRO or FSDP shards, which their hooks on the base layer gather).

    peft's forward is ``base(x) + lora_B(lora_A(dropout(x))) * scaling``: beside the products, a scaling and a sum
    over the whole output, forward and backward, the dropout's two passes, and the sum of the input's two gradients.
    Here the adapter's product is added into the base's output by the matrix product itself, the dropout is one
    pass, and its gradient is added into the base's in one more. Evaluation, merged or mixed-adapter forwards, DoRA
    and other variants take peft's forward.
    """
    from peft.tuners.lora.layer import Linear as LoraLinear

    switched = 0
    for module in model.modules():
        if getattr(type(module), "original_class", type(module)) is LoraLinear and type(module.base_layer) is nn.Linear:
            _rewrite_forward(module, "Fused", _fused_lora_forward)
            switched += 1
    return switched


def _fused_lora_forward(layer, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    active = layer.active_adapters
    name = active[0] if len(active) == 1 else None
    base = layer.base_layer
    if (
        not layer.training
        or args
        or kwargs
        or layer.disable_adapters
        or layer.merged
        or name not in layer.lora_A
        or name in layer.lora_variant
        or layer.lora_B[name].bias is not None
        or base.weight.requires_grad
        or (base.bias is not None and base.bias.requires_grad)
        or not isinstance(layer.lora_dropout[name], (FastDropout, nn.Identity))
    ):
        return layer.original_class.forward(layer, x, *args, **kwargs)
    device = x.device.type
    autocast = torch.is_autocast_enabled(device)
    if not autocast and x.dtype != layer.lora_A[name].weight.dtype:
        # a bf16 model with float32 adapters: peft computes the adapter in float32, the base in bf16
        return layer.original_class.forward(layer, x, *args, **kwargs)
    dropout = layer.lora_dropout[name]
    keep, keep_scale = dropout.mask(x) if isinstance(dropout, FastDropout) and dropout.p > 0 else (None, 1.0)
    dtype = torch.get_autocast_dtype(device) if autocast else x.dtype
    return _LoraProduct.apply(
        x,
        base.weight,
        base.bias,
        layer.lora_A[name].weight,
        layer.lora_B[name].weight,
        keep,
        keep_scale,
        layer.scaling[name],
        dtype,
    )


class _LoraProduct(torch.autograd.Function):
    """``x @ W.T + b + scaling * (dropout(x) @ A.T) @ B.T`` for a frozen ``W``, ``b``, in ``dtype`` (the autocast's,
    as autocast would cast each product's operands), with its gradients for ``x``, ``A`` and ``B``."""

    @staticmethod
    def forward(ctx, x, weight, bias, lora_a, lora_b, keep, keep_scale: float, scaling: float, dtype):
        with torch.autocast(x.device.type, enabled=False):
            rows = x.reshape(-1, x.shape[-1]).to(dtype)
            weight, lora_a, lora_b = weight.to(dtype), lora_a.to(dtype), lora_b.to(dtype)
            out = torch.mm(rows, weight.t()) if bias is None else torch.addmm(bias.to(dtype), rows, weight.t())
            if keep is not None:
                rows = _masked(rows, keep.view(rows.shape), keep_scale)
            down = torch.mm(rows, lora_a.t())
            out.addmm_(down, lora_b.t(), alpha=scaling)
        ctx.save_for_backward(weight, lora_a, lora_b, keep, rows, down)
        ctx.keep_scale, ctx.scaling, ctx.x_shape, ctx.x_dtype = keep_scale, scaling, x.shape, x.dtype
        return out.view(*x.shape[:-1], out.shape[-1])

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        weight, lora_a, lora_b, keep, rows, down = ctx.saved_tensors
        grad = grad.reshape(-1, grad.shape[-1]).to(weight.dtype)
        grad_down = torch.mm(grad, lora_b).mul_(ctx.scaling)
        grad_b = torch.mm(grad.t(), down).mul_(ctx.scaling)
        grad_a = torch.mm(grad_down.t(), rows)
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_x = torch.mm(grad, weight)
            through_adapter = torch.mm(grad_down, lora_a)
            if keep is None:
                grad_x.add_(through_adapter)
            else:
                grad_x.addcmul_(through_adapter, keep.view(through_adapter.shape), value=ctx.keep_scale)
            grad_x = grad_x.view(ctx.x_shape).to(ctx.x_dtype)
        # autograd casts grad_a and grad_b to the adapter weights' dtype
        return grad_x, None, None, grad_a, grad_b, None, None, None, None


def store_frozen_linears_in(model: nn.Module, dtype: torch.dtype, adapters_too: bool = False) -> int:
    """Keep the frozen parameters of ``model``'s base ``nn.Linear`` layers in ``dtype``; returns how many layers
    had one cast.

    For forwards under an autocast of ``dtype`` only: autocast casts every float32 weight to ``dtype`` at every
    forward (on a 2-core CPU, 46% of a one-sentence MiniLM forward was these copies), and caches no cast of a weight
    that does not train; a weight stored in ``dtype`` is used as is, and the outputs are bit for bit the same, and so
    are the gradients of the parameters that train (they keep their dtype: a BitFit bias in a frozen Linear too).
    Adapter layers (LoRA A/B, ``modules_to_save`` heads) keep their dtype unless ``adapters_too`` (for a model that
    only serves: autocast casts them too, and peft casts a LoRA layer's input to its weight's dtype, so bf16-stored
    adapters also give bit-identical outputs, and a mixed-adapter batch of 16 texts took 179 instead of 222 ms), and
    quantized layers (not plain ``nn.Linear``) are left alone.
    """
    from peft.tuners.tuners_utils import BaseTunerLayer
    from peft.utils import ModulesToSaveWrapper

    adapter_parts: set[int] = set()
    for module in () if adapters_too else model.modules():
        if isinstance(module, ModulesToSaveWrapper):
            adapter_parts.update(id(m) for m in module.modules())
        elif isinstance(module, BaseTunerLayer):
            for name in module.adapter_layer_names:
                adapter_parts.update(id(m) for m in getattr(module, name).modules())
    cast = 0
    for module in model.modules():
        if type(module) is not nn.Linear or id(module) in adapter_parts:
            continue
        frozen = [n for n, p in module.named_parameters() if p.dtype == torch.float32 and not p.requires_grad]
        for name in frozen:
            setattr(module, name, nn.Parameter(getattr(module, name).detach().to(dtype), requires_grad=False))
        cast += bool(frozen)
    return cast


def autocast_dtype(recipe: Recipe, device: torch.device) -> Optional[torch.dtype]:
    """The dtype ``recipe``'s training autocast computes in on ``device``; None when it runs in float32.

    CPUs have no fp16 autocast, so an fp16 run runs (and evaluates) in fp32 there, as training would have.
    """
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(recipe.training.mixed_precision)
    return None if device.type == "cpu" and dtype == torch.float16 else dtype


def keep_lora_inputs_uncast(model: nn.Module) -> int:
    """Under autocast: stop peft's adapter layers from casting their input to the adapter weights' dtype; returns how
    many layers were switched.

    A LoRA layer casts its input to its weights' dtype (float32 while they train) before products that autocast
    casts back to bf16: two copies of every adapted layer's input at each step, and of its gradient in the backward.
    A bf16 value survives the trip to float32 and back, so the products see the same numbers (peft's own switch,
    ``cast_input_dtype_enabled``, as ``peft.helpers.disable_input_dtype_casting`` sets it). LoRA dropout, applied to
    that input, then rounds its scaling once, in bf16, where it rounded in float32 and then again in the product.
    """
    switched = 0
    for module in model.modules():
        if getattr(module, "cast_input_dtype_enabled", False):
            module.cast_input_dtype_enabled = False
            switched += 1
    return switched


# BERT-family sequence classifiers (their head reads the encoder's first position only, [CLS] or <s>; their
# self-attention has query/key/value/dropout/scaling) and where their encoder's layers are. Their last layer can run
# at the first position only (last_layer_at_first_position), and their attention can drop out with FastDropout.
BERT_FAMILY_CLASSIFIERS = {
    "BertForSequenceClassification": "bert.encoder",
    "RobertaForSequenceClassification": "roberta.encoder",
    "XLMRobertaForSequenceClassification": "roberta.encoder",
    "ElectraForSequenceClassification": "electra.encoder",
}
BERT_FAMILY_ATTENTION = ("eager", "sdpa")
"""Attention implementations the rewritten forwards below are tested with; others (flash_attention_2's unpadded
path) keep transformers' forwards."""
_REWRITTEN: dict[tuple[type, str], type] = {}


def _bert_family_encoder(model: nn.Module) -> Optional[nn.Module]:
    """The encoder of ``model`` (or of the model a peft model wraps) when it is one of :data:`BERT_FAMILY_CLASSIFIERS`
    with an attention of :data:`BERT_FAMILY_ATTENTION`; else None."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    path = BERT_FAMILY_CLASSIFIERS.get(type(base).__name__)
    if path is None or base.config._attn_implementation not in BERT_FAMILY_ATTENTION:
        return None
    return base.get_submodule(path)


def _bert_family_layers(model: nn.Module) -> nn.ModuleList:
    """The encoder layers of ``model`` (:func:`_bert_family_encoder`); an empty list where it has no such encoder."""
    encoder = _bert_family_encoder(model)
    return nn.ModuleList() if encoder is None else encoder.layer


def _rewrite_forward(module: nn.Module, name: str, forward) -> None:
    """Give ``module`` a subclass of its class whose forward is ``forward``; the class's own stays reachable as
    ``module.original_class.forward``. A subclass, so transformers wraps its forward for gradient checkpointing as it
    wrapped the original; parameter names, saved files and peft's wrapping do not change. Idempotent."""
    cls = type(module)
    if getattr(cls, "rewritten_as", None) == name:  # (its forward may since be wrapped for checkpointing)
        return
    if (cls, name) not in _REWRITTEN:
        # __module__: code that finds a class's module by name (the eager attention beside it) finds the original's
        members = {"forward": forward, "original_class": cls, "rewritten_as": name, "__module__": cls.__module__}
        _REWRITTEN[cls, name] = type(f"{name}{cls.__name__}", (cls,), members)
    module.__class__ = _REWRITTEN[cls, name]


def fast_dropout_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: Optional[torch.Tensor],
    scaling: float,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor]:
    """transformers' eager attention (``(batch, heads, positions, head_dim)`` in, ``(batch, positions, heads,
    head_dim)`` out, and the probabilities), with ``module.dropout`` (a :class:`FastDropout`) applied to the
    probabilities; ``dropout`` is that module's p and not used.

    On a CPU, SDPA's flash kernel takes no dropout: with one, SDPA runs its math path, which draws a random number per
    probability. For MiniLM's 32 x 12 heads x 22 x 22 probabilities, forward + backward took 2,893 us there and 1,738 us
    here (2 threads; docs/performance.md, [F]). An SDPA mask (bool, True where a query may attend) becomes eager's
    additive one.
    """
    scores = torch.matmul(query, key.transpose(2, 3)).mul_(scaling)
    if attention_mask is not None:
        if attention_mask.dtype == torch.bool:
            dtype = torch.promote_types(scores.dtype, torch.float32)
            additive = torch.zeros(attention_mask.shape, dtype=dtype, device=scores.device)
            attention_mask = additive.masked_fill_(~attention_mask, torch.finfo(additive.dtype).min)
        # in place where that keeps the dtype; a float32 mask promotes bf16 scores, as eager's sum does
        scores = scores.add_(attention_mask) if attention_mask.dtype == scores.dtype else scores + attention_mask
    probabilities = module.dropout(nn.functional.softmax(scores, dim=-1))
    return torch.matmul(probabilities, value).transpose(1, 2).contiguous(), probabilities


def _attend(attention: nn.Module, queries_from: torch.Tensor, hidden_states: torch.Tensor, attention_mask, **kwargs):
    """A BERT-family self-attention's output, ``(batch, queries, hidden)``, and probabilities, for the queries of
    ``queries_from`` over keys and values from every position of ``hidden_states``: :func:`fast_dropout_attention`
    in training with a FastDropout, else the implementation the config names."""
    heads = lambda x: x.view(*x.shape[:2], -1, attention.attention_head_size).transpose(1, 2)  # noqa: E731
    attend = fast_dropout_attention if _drops_out(attention) else _attention_function(attention)
    out, probabilities = attend(
        attention,
        heads(attention.query(queries_from)),
        heads(attention.key(hidden_states)),
        heads(attention.value(hidden_states)),
        attention_mask,
        dropout=attention.dropout.p if attention.training else 0.0,
        scaling=attention.scaling,
        **kwargs,
    )
    return out.reshape(*queries_from.shape[:-1], -1), probabilities


def _attention_function(attention: nn.Module):
    """The attention function a BERT-family self-attention's config names (SDPA, eager)."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    return ALL_ATTENTION_FUNCTIONS.get_interface(
        attention.config._attn_implementation, sys.modules[type(attention).__module__].eager_attention_forward
    )


def _drops_out(attention: nn.Module) -> bool:
    """Whether a BERT-family self-attention drops out its probabilities with a FastDropout now (in training)."""
    return attention.training and isinstance(attention.dropout, FastDropout) and attention.dropout.p > 0


def _self_attention(attention, hidden_states, attention_mask=None, cache=None, **kwargs):
    """A BERT-family self-attention's forward: with :func:`fast_dropout_attention` where it drops out (and has no
    cache), else transformers' own."""
    if cache is not None or not _drops_out(attention):
        return attention.original_class.forward(attention, hidden_states, attention_mask, cache, **kwargs)
    return _attend(attention, hidden_states, hidden_states, attention_mask, **kwargs)


def last_layer_at_first_position(model: nn.Module, in_evaluation: bool = False) -> bool:
    """Make the encoder's last layer compute its output at the first position only, the one the classifier's head
    reads, in training, and in evaluation too where ``in_evaluation``; returns whether ``model`` (or the model a peft
    model wraps) is one of :data:`BERT_FAMILY_CLASSIFIERS` (with an encoder layer to change).

    The layer's keys and values still come from every position. Its query, attention output projection,
    feed-forward, LayerNorms and dropouts run on one position instead of all, in the forward and in the backward:
    for MiniLM's 6 layers that is 10/72 of the Linear layers' arithmetic. The logits, and so the loss and every
    gradient, are the full layer's up to float rounding; in bf16 that rounding can move a borderline example, so the
    evaluations behind ``metrics.json`` (training's and ``scripts/eval.py``'s, which reproduces it to the bit) keep
    the full layer, as plain transformers + peft have it. Parameter names, saved files and peft's wrapping do not
    change (:func:`_rewrite_forward`). A prefix (peft's prefix tuning passes it as a cache) or cross-attention takes
    the full layer.
    """
    layers = _bert_family_layers(model)
    if len(layers) == 0:  # not the BERT family, or no layer: the head reads the embeddings
        return False
    _rewrite_forward(layers[-1], "FirstPosition", _first_position)
    layers[-1].first_position_in_evaluation = in_evaluation
    return True


def _first_position(layer, hidden_states, attention_mask=None, encoder_hidden_states=None, *args, **kwargs):
    in_use = layer.training or layer.first_position_in_evaluation
    if not in_use or encoder_hidden_states is not None or kwargs.get("cache") is not None:
        # the original class by name, not super(): FSDP2 subclasses the class again, which super(type(...)) loops on
        return layer.original_class.forward(
            layer, hidden_states, attention_mask, encoder_hidden_states, *args, **kwargs
        )
    kwargs.pop("cache", None)
    kwargs.pop("encoder_attention_mask", None)
    first = hidden_states[:, :1]
    if attention_mask is not None and attention_mask.dim() == 4:
        attention_mask = attention_mask[:, :, :1]  # the first query's row (or the one row every query shares)
    out, _ = _attend(layer.attention.self, first, hidden_states, attention_mask, **kwargs)
    attended = layer.attention.output(out, first)
    return layer.feed_forward_chunk(attended)


# Inference on the batch's real tokens only: a BERT-family encoder's Linear layers, LayerNorms and GELUs work on
# each token alone, so they need not run on padding; only the attention needs the texts apart.
_PACKING = contextvars.ContextVar("lora_train_packing", default=False)


def pack_padded_tokens(model: nn.Module) -> bool:
    """Make the encoder of ``model`` (or of the model a peft model wraps) skip the padding in inference forwards run
    within :func:`packed_tokens`; returns whether ``model`` is one of :data:`BERT_FAMILY_CLASSIFIERS`.

    Within, the encoder gathers the real tokens of a padded batch into one ``(tokens, hidden)`` tensor and runs every
    layer's products, LayerNorms and GELU on those rows alone, and each text's tokens attend over their own, text by
    text, without padding or mask (:func:`_per_text_attention`). Four batches of 8 SST-2 validation sentences, padded
    to their longest (33 to 48 tokens), held 40% padding (848 real of 1,416 tokens). Each row of a product is the same
    dot products as padded; the attention over fewer keys rounds differently (the logits within 0.002 of the
    padded forward's in bf16, docs/serving.md). The last layer at the first position
    (:func:`last_layer_at_first_position`) takes each text's first token as its queries. Training, a batch without
    padding or of one text, a decoder, a cache or cross-attention, a chunked feed-forward or a first position that is
    padding (left padding) take transformers' forward.
    """
    encoder = _bert_family_encoder(model)
    if encoder is None:
        return False
    _rewrite_forward(encoder, "Packed", _packed_encoder)
    return True


@contextmanager
def packed_tokens() -> Iterator[None]:
    """Within (in this thread), encoders made to pack (:func:`pack_padded_tokens`) run inference on real tokens only.
    Only around forwards in which a batch row is not routed to an adapter of its own: the rows of peft's
    mixed-adapter forward (``adapter_names``) and of the grouped LoRA forward are texts, not tokens."""
    token = _PACKING.set(True)
    try:
        yield
    finally:
        _PACKING.reset(token)


def _real_tokens(encoder, hidden_states, attention_mask, encoder_hidden_states, kwargs) -> Optional[torch.Tensor]:
    """The ``(batch, positions)`` mask of real tokens where :func:`_packed_encoder` can skip the padding; else None."""
    config, length = encoder.config, hidden_states.shape[1]
    if not _PACKING.get() or encoder.training or encoder_hidden_states is not None or config.is_decoder:
        return None
    if kwargs.get("cache") is not None or kwargs.get("use_cache") or getattr(config, "chunk_size_feed_forward", 0):
        return None
    if attention_mask is None or attention_mask.dim() != 4 or attention_mask.shape[-1] != length:
        return None  # no padding (transformers passes no mask), or a mask of another form
    if hidden_states.shape[0] == 1:
        return None  # one text: its padding is its length's bucket, which the packed rows keep too
    row = attention_mask[:, 0, 0, :]  # a bidirectional padding mask: every query's row is the same
    keep = row if row.dtype == torch.bool else row == 0  # SDPA's mask (True: attend), or eager's additive one
    if bool(keep.all()) or not bool(keep[:, 0].all()):
        return None
    return keep


def _packed_encoder(encoder, hidden_states, attention_mask=None, encoder_hidden_states=None, *args, **kwargs):
    keep = _real_tokens(encoder, hidden_states, attention_mask, encoder_hidden_states, kwargs)
    if keep is None:
        return encoder.original_class.forward(
            encoder, hidden_states, attention_mask, encoder_hidden_states, *args, **kwargs
        )
    from transformers.modeling_outputs import BaseModelOutputWithPastAndCrossAttentions

    for name in ("cache", "use_cache", "encoder_attention_mask", "position_ids"):
        kwargs.pop(name, None)
    batch, length, width = hidden_states.shape
    where = keep.flatten().nonzero().squeeze(1)  # the real tokens' positions in the padded (batch x positions)
    # The rows padded to a bucket, as a batch's positions are: bf16 kernels are compiled and cached per shape.
    bf16 = hidden_states.dtype == torch.bfloat16 or (
        torch.is_autocast_enabled(hidden_states.device.type)
        and torch.get_autocast_dtype(hidden_states.device.type) == torch.bfloat16
    )
    rows = padded_length(len(where), batch * length, hidden_states.device.type, bf16)
    tokens = _rows(hidden_states.reshape(-1, width).index_select(0, where), rows)
    layers = list(encoder.layer)
    last = layers[-1]
    first_position = getattr(last, "rewritten_as", None) == "FirstPosition" and last.first_position_in_evaluation
    lengths = keep.sum(1).tolist()
    for layer in layers[:-1] if first_position else layers:
        attended = _per_text_attention(layer.attention.self, tokens, lengths, kwargs)
        tokens = layer.feed_forward_chunk(layer.attention.output(attended, tokens))
    if first_position:  # each text's first token: its position 0, and the real tokens come in order
        firsts = torch.searchsorted(where, torch.arange(batch, device=where.device) * length)
        queries = tokens.index_select(0, firsts)
        attended = _first_position_attention(
            last.attention.self, queries, tokens, where, (batch, length), attention_mask[:, :, :1], kwargs
        )
        hidden = last.feed_forward_chunk(last.attention.output(attended, queries)).unsqueeze(1)
    else:
        hidden = _unpacked(tokens, where, (batch, length))
    return BaseModelOutputWithPastAndCrossAttentions(last_hidden_state=hidden)


def _unpacked(tokens: torch.Tensor, where: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """Packed rows (the real tokens at ``where`` first) laid out as the padded batch of ``shape``, zeros at the
    padding: ``(batch, positions, width)``."""
    batch, length = shape
    return (
        tokens.new_zeros(batch * length, tokens.shape[-1])
        .index_copy_(0, where, tokens[: len(where)])
        .view(batch, length, -1)
    )


def _rows(tokens: torch.Tensor, rows: int) -> torch.Tensor:
    """``tokens`` with zero rows appended up to ``rows``."""
    return torch.nn.functional.pad(tokens, (0, 0, 0, rows - len(tokens))) if rows > len(tokens) else tokens


def _per_text_attention(attention, tokens: torch.Tensor, lengths: list[int], kwargs) -> torch.Tensor:
    """A BERT-family self-attention's output for packed ``tokens``: each text's tokens (``lengths``, in order) attend
    over their own, one call per text, without padding or a mask. A padded batch's attention is quadratic in the
    longest text: in a batch of 8 SST-2 sentences of 9 to 48 tokens, padded to 48, 55% of its attention's work is
    padding; attending text by text made forwards of 8 or 16 short texts 4% to 9% faster on a CPU (docs/serving.md)."""
    size, attend = attention.attention_head_size, _attention_function(attention)
    projected = [attention.query(tokens), attention.key(tokens), attention.value(tokens)]
    options = {**kwargs, "dropout": 0.0, "scaling": attention.scaling, "is_causal": False}
    outputs, start = [], 0
    for n in lengths:
        heads = [x[start : start + n].view(1, n, -1, size).transpose(1, 2) for x in projected]
        out, _ = attend(attention, *heads, None, **options)
        outputs.append(out.reshape(n, -1))
        start += n
    return _rows(torch.cat(outputs), len(tokens))


def _first_position_attention(attention, queries, tokens, where, shape: tuple[int, int], attention_mask, kwargs):
    """A BERT-family self-attention's output for one query per text (``queries``, each text's first token) over the
    keys and values of the packed ``tokens``, laid out again as the padded batch of ``shape``, under
    ``attention_mask``; one row per text."""
    batch, length = shape
    size = attention.attention_head_size
    keys, values = (
        _unpacked(x, where, shape).view(batch, length, -1, size).transpose(1, 2)
        for x in (attention.key(tokens), attention.value(tokens))
    )
    query = attention.query(queries).view(batch, 1, -1, size).transpose(1, 2)
    out, _ = _attention_function(attention)(
        attention, query, keys, values, attention_mask, dropout=0.0, scaling=attention.scaling, **kwargs
    )
    return out.reshape(batch, -1)
