"""The base model, loaded once in the quantization its adapters were trained with, and the adapters attached to it.

Where the device merges LoRA (the CPU, :data:`lora_train.merged.MERGED_FORWARDS`), a plain LoRA adapter is kept as
its weights merged into copies of the base's Linear weights, plus its heads, exactly as ``scripts/predict.py``
builds them; like a BitFit or head_only run (only the tensors it trained) it adds nothing to the model: its texts
run in forwards of their own, with the peft layers off and its tensors swapped into the base
(:mod:`lora_train.serving.trained`). Other LoRA / AdaLoRA adapters (and every one on a GPU) are peft adapters of one
:class:`peft.PeftModel` wrapping the base (``add_adapter`` and ``load_adapter``), with their own classification
heads (peft keeps one copy of each ``modules_to_save`` module per adapter) and label names. Requests for several
such adapters with copies of the same heads share forwards: grouped (:mod:`lora_train.serving.grouped`) where their
LoRA layers allow, else peft's mixed batch (``model(..., adapter_names=[...])``) where :data:`MIX_ADAPTERS` says; a
trained BERT pooler is held as its ``dense`` layer so that it mixes (:func:`lora_train.heads.narrow_heads`); others
(AdaLoRA) run as one sub-batch each. The base's and the adapters' Linear weights are stored in the adapters'
autocast dtype.

Model changes (:meth:`AdapterRegistry.attach`, :meth:`AdapterRegistry.detach`) and forwards
(:meth:`AdapterRegistry.classify`) must all run on one thread at a time: the batcher's worker (with several workers,
each has its own registry over shared tensors, :mod:`lora_train.serving.replicas`).
"""

from __future__ import annotations

import json
import os
import re
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from safetensors.torch import load_file
from torch import nn

from lora_train.checkpoint import TRAINED_TENSORS
from lora_train.config import Recipe
from lora_train.data import encode_texts, padded_length
from lora_train.heads import is_mixable, narrow_heads, saved_shapes, shaped_like_saved
from lora_train.inference import (
    RunError,
    autocast_dtype,
    is_adapter_run,
    is_trained_tensors_run,
    load_base_for_run,
    read_run,
    resolve_run,
    store_frozen_linears_in,
    training_autocast,
)
from lora_train.merged import mergeable, merged_tensors, merges_lora
from lora_train.modeling import last_layer_at_first_position, pack_padded_tokens, packed_tokens
from lora_train.serving.grouped import GroupedLoRA
from lora_train.serving.trained import Slots, misfits, peft_layers, peft_layers_off, slots, swapped_in

ADAPTER_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")
"""Adapter names: peft keeps them as ModuleDict keys, so no dots."""
FORWARD_COST_TOKENS = {"cpu": 104, "cuda": 4096}
"""What one more forward costs, in padded tokens (see :func:`length_buckets`). CPU: measured with the CPU recipes'
merged MiniLM adapters on 1 torch thread (2026-12-05), a forward of one SST-2 sentence took 7.6 ms and one of a
256-token IMDb review 20.7 ms: about 6 ms fixed and 0.057 ms a token. GPU: a forward's fixed cost (kernel launches,
Python) outweighs its tokens until the GPU is busy; not measured here."""
MIX_ADAPTERS = {"cpu": False, "cuda": True}
"""Whether texts of LoRA adapters that :class:`~lora_train.serving.grouped.GroupedLoRA` cannot take (a LoRA
variant such as DoRA, a LoRA bias) share a forward through peft's ``adapter_names``, or run one forward per
adapter. CPU: one forward per adapter is faster, since peft's mixed forward registers hooks on every module and runs
each LoRA layer once per adapter on gathered rows (``lora-serve-bench --mixing``, docs/serving.md). GPU: a forward's
fixed cost (kernel launches, Python) dominates until the GPU is busy, so sharing one is assumed to win; not measured
here."""
METRIC_KEYS = (
    "eval_accuracy",
    "eval_macro_f1",
    "eval_loss",
    "eval_samples",
    "best_eval_accuracy",
    "best_step",
    "global_step",
    "epochs",
    "trainable_params",
)
"""The ``metrics.json`` entries the adapter listing shows."""


class ServingError(Exception):
    """A request the server refuses; ``status`` is the HTTP status, the message says what was wrong and what works."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass(frozen=True)
class BaseModelId:
    """What must be equal for two adapters to share one loaded base model: the checkpoint, how it is loaded, and
    the autocast its adapters were trained (and so are served) under, since the base's weights are stored in it."""

    name_or_path: str
    revision: str
    dtype: str
    quantization: str
    autocast: str
    pooling: str = "last"

    @classmethod
    def of(cls, recipe: Recipe) -> "BaseModelId":
        q = recipe.quantization
        quant = (
            "none"
            if q.method == "none"
            else (
                f"{q.method} (double_quant={q.double_quant}, compute_dtype={q.compute_dtype},"
                f" quant_storage_dtype={q.quant_storage_dtype}, skip_modules={q.skip_modules})"
            )
        )
        autocast = recipe.training.mixed_precision
        m = recipe.model
        return cls(m.name_or_path, m.revision, m.dtype, quant, autocast, m.pooling)

    def __str__(self) -> str:
        # A local base model is shown by its directory's name: the listing and errors show no server paths.
        shown = Path(self.name_or_path).name if Path(self.name_or_path).is_absolute() else self.name_or_path
        return (
            f"{shown}@{self.revision} (dtype {self.dtype}, quantization {self.quantization},"
            f" autocast {self.autocast}, pooling {self.pooling})"
        )


@dataclass
class Adapter:
    """One trained adapter as read from its run directory, before or after it is attached."""

    name: str
    source: str
    """As the listing shows it: a Hub repo id, or a path relative to the adapter root or the working directory
    (an absolute path given on the command line is shown by its last parts)."""
    directory: Path
    recipe: Recipe
    label_names: list[str]
    tokenizer: Any
    metrics: dict[str, Any]
    peft_type: str
    """peft's type (``LORA``, ``ADALORA``...); ``BITFIT`` or ``HEAD_ONLY`` for a run of trained tensors."""
    trained: Optional[dict[str, torch.Tensor]] = field(default=None, repr=False)
    """Base parameter name -> tensor: a BitFit / head_only run's (``trained.safetensors``), or a plain LoRA adapter's
    merged weights and heads, made on attach where the server merges (:mod:`lora_train.merged`); None for an adapter
    the PeftModel holds. On attach they move to the server's device."""
    slots: Slots = field(default_factory=list, repr=False)
    """Set on attach for an adapter of trained tensors: where each goes in the model (:func:`~lora_train.serving.
    trained.slots`)."""
    bias: str = "none"
    """peft's ``bias`` of the adapter: other than ``none``, the adapter trained the base model's biases, and loading it
    writes them into the base every adapter of the server shares."""
    heads: tuple[str, ...] = ()
    """Set on attach: paths of the head wrappers (``modules_to_save``) that hold this adapter's copies."""
    mix_key: Optional[tuple] = None
    """Set on attach: adapters with equal keys share mixed-adapter forwards; None if this one cannot mix."""
    groupable: bool = False
    """Set on attach: whether its forwards with others can be grouped (:mod:`lora_train.serving.grouped`)."""
    tokenizer_lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)
    """A fast tokenizer keeps its truncation and padding settings in shared state that every call rewrites, so two
    threads encoding at once can get each other's settings (a 256-token IMDb adapter encoded reviews of 799 tokens
    under 8 concurrent callers, and the batch failed): every use of ``tokenizer`` holds this lock."""

    @property
    def base(self) -> BaseModelId:
        return BaseModelId.of(self.recipe)

    @property
    def max_length(self) -> int:
        return self.recipe.data.max_length

    @property
    def is_peft(self) -> bool:
        """A peft adapter of the shared PeftModel (not a run of trained tensors, nor a merged LoRA adapter)."""
        return self.trained is None

    def describe(self) -> dict[str, Any]:
        """The adapter as the HTTP listing shows it."""
        return {
            "name": self.name,
            "source": self.source,
            "task": self.recipe.data.task or "custom",
            "labels": self.label_names,
            "base_model": str(self.base),
            "peft_type": self.peft_type,
            "max_length": self.max_length,
            "metrics": self.metrics,
        }

    def encode(self, texts: list[str]) -> tuple[list[dict[str, list[int]]], list[bool]]:
        """Token ids of each text (cut to the adapter's ``max_length``) and whether it was cut."""
        with self.tokenizer_lock:
            return self._encode(texts)

    def encode_if_free(self, texts: list[str]) -> Optional[tuple[list[dict[str, list[int]]], list[bool]]]:
        """:meth:`encode`, or None at once while another thread uses the tokenizer (a long request's encode in the
        thread pool, or a batch's padding on the worker): the event loop's thread must not wait for either."""
        if not self.tokenizer_lock.acquire(blocking=False):
            return None
        try:
            return self._encode(texts)
        finally:
            self.tokenizer_lock.release()

    def _encode(self, texts: list[str]) -> tuple[list[dict[str, list[int]]], list[bool]]:
        enc = encode_texts(self.tokenizer, texts, self.max_length, self.recipe.data.truncation)
        features = [{key: enc[key][i] for key in enc.keys()} for i in range(len(texts))]
        # Only a text that (nearly: head_tail keeps one token spare) fills max_length may have been cut:
        # tokenize just those again, uncut, to know.
        truncated = [
            len(f["input_ids"]) >= self.max_length - 1
            and len(self.tokenizer(text, verbose=False)["input_ids"]) > self.max_length
            for text, f in zip(texts, features, strict=True)
        ]
        return features, truncated


def check_adapter_name(name: str) -> None:
    """Refuse a name that is not :data:`ADAPTER_NAME`, saying what a valid one is."""
    if not ADAPTER_NAME.match(name):
        raise ServingError(
            422,
            f"adapter name {name!r} is not valid: use 1 to 64 letters, digits, '_' or '-',"
            " starting with a letter or digit",
        )


def default_name(source: str, directory: Path) -> str:
    """A name for an adapter nobody named: its run directory's (or Hub repo's) name, made a valid adapter name."""
    path = Path(source.rstrip("/"))
    stem = path.parent.name if path.name == "best" else path.name
    name = re.sub(r"[^A-Za-z0-9_-]", "_", stem or directory.name).lstrip("_-")[:64]
    return name or "adapter"


def shown_source(source: str) -> str:
    """``source`` as the listing may show it: relative paths and Hub ids as given, an absolute path (or one with
    ``..`` or ``~``) by its run directory's name (``NAME`` or ``NAME/best``)."""
    path = Path(source)
    if not path.is_absolute() and ".." not in path.parts and not source.startswith("~"):
        return source
    path = Path(os.path.normpath(path.expanduser()))
    return f"{path.parent.name}/best" if path.name == "best" else path.name


def read_adapter(source: str, name: Optional[str] = None, shown: Optional[str] = None) -> Adapter:
    """Read a run directory or Hub repo as an adapter to attach; refuse anything that is not a trained adapter.

    Reads only: a run left with its ``best/`` moved aside is not repaired here (``resolve_run(repair=False)``).
    ``shown`` is the source as the listing shows it (default: :func:`shown_source`).
    """
    from transformers import AutoTokenizer

    if name is not None:
        check_adapter_name(name)
    try:
        directory = resolve_run(source, repair=False)
        recipe, label_names = read_run(directory)
    except RunError as err:
        raise ServingError(400, str(err)) from None
    if not is_adapter_run(directory) and not is_trained_tensors_run(directory):
        raise ServingError(
            400,
            f"'{source}' holds a full model (every weight trained; no adapter_config.json or {TRAINED_TENSORS}),"
            " not an adapter of a shared base model: classify with it through scripts/predict.py. The server takes"
            " LoRA / AdaLoRA / QLoRA adapters and BitFit / head_only runs",
        )
    if recipe.data.text_pair_column:
        raise ServingError(
            400,
            f"'{source}' classifies text pairs (data.text_pair_column = {recipe.data.text_pair_column!r}); the"
            " server takes one text per request: classify pairs with scripts/predict.py --file",
        )
    if is_trained_tensors_run(directory):
        trained, peft_type, bias = load_file(directory / TRAINED_TENSORS), recipe.peft.method.upper(), "none"
    else:
        config = json.loads((directory / "adapter_config.json").read_text())
        trained, peft_type, bias = None, str(config.get("peft_type")), str(config.get("bias") or "none")
    metrics_file = directory / "metrics.json"
    metrics = json.loads(metrics_file.read_text()) if metrics_file.is_file() else {}
    return Adapter(
        name=name or default_name(source, directory),
        source=shown if shown is not None else shown_source(source),
        directory=directory,
        recipe=recipe,
        label_names=label_names,
        tokenizer=AutoTokenizer.from_pretrained(directory),
        metrics={key: metrics[key] for key in METRIC_KEYS if key in metrics},
        peft_type=peft_type,
        trained=trained,
        bias=bias,
    )


class AdapterRegistry:
    """The loaded base model and its attached adapters (see the module docstring for the threading rule)."""

    def __init__(
        self,
        device: Optional[str] = None,
        forward_cost_tokens: Optional[int] = None,
        mix: Optional[bool] = None,
        group: bool = True,
        merge: Optional[bool] = None,
    ):
        """``mix``: peft's mixed forwards for adapters that cannot be grouped (default :data:`MIX_ADAPTERS`);
        ``group``: grouped forwards where they can (off only to compare, ``lora-serve-bench --mixing``); ``merge``:
        plain LoRA adapters merged into copies of the base's weights, served one forward per adapter, as
        ``scripts/predict.py`` computes them (default :data:`lora_train.merged.MERGED_FORWARDS`)."""
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.forward_cost_tokens = forward_cost_tokens or FORWARD_COST_TOKENS.get(self.device.type, 4096)
        self.mix = MIX_ADAPTERS.get(self.device.type, True) if mix is None else mix
        self.group = group
        self.merge = merges_lora(self.device) if merge is None else merge
        self.grouped: Optional[GroupedLoRA] = None
        self.model: Optional[nn.Module] = None
        """The base model, or the PeftModel wrapping it once a peft adapter is attached."""
        self._base_model: Optional[nn.Module] = None  # the transformers model itself, wrapped or not
        self.base: Optional[BaseModelId] = None
        self.peft_type: Optional[str] = None
        self._adapters: dict[str, Adapter] = {}
        self._head_wrappers: dict[str, nn.Module] = {}
        self._peft_layers: list[nn.Module] = []  # switched off for the forwards of trained-tensor runs
        self._module_names: set[str] = set()  # the base model's module names, which adapter names must avoid
        self.max_positions: Optional[int] = None  # the base model's position limit, which max_length must respect
        self._unloading: set[str] = set()
        self._lock = threading.Lock()  # guards the two collections above: HTTP handlers read them from other threads

    def names(self) -> list[str]:
        with self._lock:
            return sorted(self._adapters)

    def describe(self) -> list[dict[str, Any]]:
        with self._lock:
            return [self._adapters[name].describe() for name in sorted(self._adapters)]

    def get(self, name: str) -> Adapter:
        """The attached adapter ``name`` that accepts requests (404 if unknown or being unloaded)."""
        with self._lock:
            adapter = self._adapters.get(name)
            if adapter is None or name in self._unloading:
                state = "is being unloaded" if adapter is not None else "is not loaded"
                raise ServingError(404, f"adapter {name!r} {state}; loaded adapters: {self._accepting()}")
            return adapter

    def _accepting(self) -> list[str]:
        return sorted(set(self._adapters) - self._unloading)

    def check_can_attach(self, adapter: Adapter) -> None:
        """Refuse a name already taken or naming a module, an adapter of another base model, quantization,
        autocast or PEFT type, one whose max_length exceeds the base model's positions, and any second adapter
        where one writes the shared base's biases."""
        if adapter.name in self._module_names:
            # peft keys each adapter's layers by its name inside the modules, and matches modules by name
            raise ServingError(
                422,
                f"adapter name {adapter.name!r} is also the name of a module of the base model; peft keeps adapters"
                " by name inside its modules, so choose another name (NAME=SOURCE)",
            )
        with self._lock:
            if adapter.name in self._adapters:
                raise ServingError(
                    409,
                    f"an adapter named {adapter.name!r} is already loaded (from"
                    f" {self._adapters[adapter.name].source}); unload it or choose another name",
                )
            if self.base is not None and adapter.base != self.base:
                raise ServingError(
                    409,
                    f"adapter {adapter.name!r} was trained on {adapter.base}, but this server's"
                    f" base model is {self.base}: serve it from another server",
                )
            writer = next((a for a in [adapter, *self._adapters.values()] if a.bias != "none"), None)
            if writer is not None and self._adapters:
                raise ServingError(
                    409,
                    f"adapter {writer.name!r} trained the base model's biases (peft bias = {writer.bias!r}), and"
                    " loading it writes them into the base that every adapter of a server shares, so the others"
                    " would answer with its biases: serve it from a server of its own, or retrain it with"
                    " peft.bias=none",
                )
            if adapter.is_peft and self.peft_type is not None and adapter.peft_type != self.peft_type:
                raise ServingError(
                    409,
                    f"adapter {adapter.name!r} is a {adapter.peft_type} adapter, but this server"
                    f" holds {self.peft_type} adapters; peft keeps one adapter type per model",
                )
        if self.max_positions is not None and adapter.max_length > self.max_positions:
            # Its texts would be encoded past the model's positions and fail every forward they share.
            raise ServingError(
                422,
                f"adapter {adapter.name!r} encodes texts to data.max_length = {adapter.max_length} tokens, but the"
                f" base model has {self.max_positions} positions; retrain or edit its recipe.yaml with"
                f" data.max_length <= {self.max_positions}",
            )

    def attach(self, adapter: Adapter) -> None:
        """Add ``adapter`` to the model, loading the base model first if this is the first adapter."""
        self.check_can_attach(adapter)
        try:
            if self.model is None:
                self._load_base(adapter)
                self.check_can_attach(adapter)  # the base's module names and positions are known now
            if adapter.is_peft:
                self._add_peft_adapter(adapter)
                if self.merge and mergeable(self.model, adapter.name):
                    self._merge_peft_adapter(adapter)
            if not adapter.is_peft:
                self._add_trained_tensors(adapter)
        except Exception as err:  # noqa: BLE001 - a half-loaded adapter is removed, the error goes to the client
            peft_model = self._peft_model()
            if peft_model is not None and adapter.name in peft_model.peft_config:
                self._drop_peft_adapter(adapter.name)
            if isinstance(err, ServingError):
                raise
            raise ServingError(
                400, f"cannot load adapter {adapter.name!r} from {adapter.source}: {type(err).__name__}: {err}"
            ) from None
        self.model.eval()
        dtype = autocast_dtype(adapter.recipe, self.device)
        if dtype is not None:  # every adapter of this server runs under it (BaseModelId): the base's and the new
            store_frozen_linears_in(self.model, dtype, adapters_too=True)  # adapter's weights, stored in it once
        self._find_wrappers()
        heads = {path: w for path, w in self._head_wrappers.items() if adapter.name in w.modules_to_save}
        adapter.heads = tuple(sorted(heads))
        mixable = adapter.is_peft and is_mixable(adapter.peft_type, list(heads.values()))
        # Rows that share a forward need copies of the same heads (see _route_heads), of any width.
        adapter.mix_key = ("heads", adapter.heads) if mixable else None
        if self.grouped is None:  # it wraps LoRA layers wherever peft injects them into the base, now or later
            self.grouped = GroupedLoRA(self._base_model)
        self.grouped.refresh()
        adapter.groupable = mixable and self.grouped.supports({adapter.name})
        with self._lock:
            self._adapters[adapter.name] = adapter

    def _load_base(self, adapter: Adapter) -> None:
        """Load the base model ``adapter`` was trained on: this server's model from now on."""
        base = load_base_for_run(adapter.recipe, adapter.label_names, adapter.tokenizer, self.device)
        # as predict.py's merged forward: the last layer at the first position (--no-merge: the full one, as eval.py's)
        last_layer_at_first_position(base, in_evaluation=self.merge)
        if self.merge:  # and on the real tokens only, in the merged forwards (lora_train.modeling.packed_tokens)
            pack_padded_tokens(base)
        self._module_names = {part for name, _ in base.named_modules() for part in name.split(".") if part}
        self.max_positions = getattr(base.config, "max_position_embeddings", None) or getattr(
            base.config, "n_positions", None
        )
        self.model = self._base_model = base
        self.base = adapter.base

    def _peft_model(self):
        """The PeftModel wrapping the base, or None while no peft adapter was attached."""
        from peft import PeftModel

        return self.model if isinstance(self.model, PeftModel) else None

    def _add_peft_adapter(self, adapter: Adapter) -> None:
        """Add a LoRA / AdaLoRA adapter, with its head copies, to the PeftModel (made from the base for the first)."""
        from peft import PeftConfig, get_peft_model

        config = PeftConfig.from_pretrained(adapter.directory)
        config.inference_mode = True  # as load_adapter would set it: served adapters are frozen
        config.modules_to_save = narrow_heads(self._base_model, config.modules_to_save)
        if self._peft_model() is None:  # as PeftModel.from_pretrained builds it, but with heads fitted before loading
            self.model = get_peft_model(self._base_model, config, adapter_name=adapter.name)
        else:
            self.model.add_adapter(adapter.name, config)
        self._find_wrappers()
        self._fit_heads(adapter)
        self.model.load_adapter(adapter.directory, adapter_name=adapter.name)
        self.peft_type = adapter.peft_type

    def _merge_peft_adapter(self, adapter: Adapter) -> None:
        """Keep the plain LoRA ``adapter`` just added as its merged weights and heads, served like a run of trained
        tensors, and take it out of the PeftModel again."""
        adapter.trained = merged_tensors(self.model, adapter.name, autocast_dtype(adapter.recipe, self.device))
        self._drop_peft_adapter(adapter.name)

    def _drop_peft_adapter(self, name: str) -> None:
        """Remove adapter ``name`` from the PeftModel; the bare base again once it holds no adapter."""
        peft_model = self._peft_model()
        peft_model.delete_adapter(name)
        if not peft_model.peft_config:  # peft cannot add adapters to a PeftModel left without one
            self.model = peft_model.unload()
            self.peft_type = None
        self._find_wrappers()
        if self.grouped is not None:
            self.grouped.refresh()

    def _add_trained_tensors(self, adapter: Adapter) -> None:
        """Check a BitFit / head_only run's tensors against the base and keep them, on the device, for its forwards."""
        wrong = misfits(self._base_model, adapter.trained, len(adapter.label_names))
        if wrong:
            raise ServingError(
                400,
                f"{adapter.source}/{TRAINED_TENSORS} does not fit this server's base model {self.base}:"
                f" {', '.join(wrong[:5])}; was model.name_or_path in its recipe.yaml changed after training?",
            )
        adapter.trained = {
            name: nn.Parameter(value.to(self.device), requires_grad=False) for name, value in adapter.trained.items()
        }
        adapter.slots = slots(self._base_model, adapter.trained)

    def mark_unloading(self, name: str) -> Adapter:
        """Stop accepting requests for ``name``; those already queued still run before :meth:`detach`."""
        adapter = self.get(name)
        with self._lock:
            accepting = [self._adapters[n] for n in self._accepting()]
            if [a.name for a in accepting] == [name]:
                raise ServingError(
                    409, f"{name!r} is the last loaded adapter; load another before unloading it, or stop the server"
                )
            self._unloading.add(name)
        return adapter

    def detach(self, name: str) -> None:
        """Remove adapter ``name`` (its LoRA weights and head copies, or its trained tensors) from the server."""
        if self._adapters[name].is_peft:
            self._drop_peft_adapter(name)
        with self._lock:
            del self._adapters[name]
            self._unloading.discard(name)

    def _find_wrappers(self) -> None:
        """After the model's modules changed: its ``modules_to_save`` wrappers (each holds one head copy per adapter),
        by module path, and its peft layers."""
        from peft.utils import ModulesToSaveWrapper

        self._head_wrappers = {p: m for p, m in self.model.named_modules() if isinstance(m, ModulesToSaveWrapper)}
        self._peft_layers = peft_layers(self.model)

    def _route_heads(self, heads: tuple[str, ...]) -> None:
        """Switch on exactly the head wrappers in ``heads`` for the next forward.

        A switched-on peft head wrapper sends each row of a mixed batch to its adapter's copy (and fails for an
        adapter without one); a switched-off one gives every row the base module. The rows of one forward have
        copies of the same heads (``mix_key``), so each row gets the heads it would get alone: an adapter that
        trained BERT's pooler its pooler, one that did not the base model's.
        """
        for path, wrapper in self._head_wrappers.items():
            wrapper.enable_adapters(path in heads)

    def _fit_heads(self, adapter: Adapter) -> None:
        """Give ``adapter`` head copies shaped like its saved head (e.g. 6 classes where the base has 2).

        peft copies the base model's head for each adapter (``add_adapter``, ``get_peft_model``) and then loads the
        saved weights into the copy (``load_adapter``), which fails when the adapter has another number of labels
        than the base's head (built for the first run loaded): in between, a copy of the saved shape replaces it.
        """
        shapes = saved_shapes(adapter.directory / "adapter_model.safetensors")
        for path, wrapper in self._head_wrappers.items():
            head = shaped_like_saved(wrapper.original_module, path, shapes)
            if head is not None:
                wrapper.modules_to_save[adapter.name] = head

    def runners(self) -> list[Callable]:
        """The forward of each batcher worker: this registry's alone (several: :mod:`lora_train.serving.replicas`)."""
        return [self.classify]

    @torch.no_grad()
    def classify(self, requests: list[tuple[str, list[dict[str, list[int]]]]]) -> list[Any]:
        """Class probabilities for each request ``(adapter name, token features)``, in order.

        Texts of adapters that share forwards (:meth:`_group_of`) run together; the others run per adapter. Within
        a group, texts of very different lengths go to separate forwards (see :func:`length_buckets`), except in a
        packed forward (:func:`lora_train.modeling.packed_tokens`), which computes no padding outside the attention.
        A request whose adapter is gone gets a :class:`ServingError` in place of its probabilities.
        """
        results: list[Any] = [None] * len(requests)
        groups: dict[tuple, list[tuple[int, int]]] = {}  # group -> (request index, text index) of its texts
        with self._lock:
            adapters = dict(self._adapters)
        for index, (name, features) in enumerate(requests):
            adapter = adapters.get(name)
            if adapter is None:
                results[index] = ServingError(404, f"adapter {name!r} was unloaded before this request ran")
                continue
            groups.setdefault(self._group_of(adapter), []).extend((index, text) for text in range(len(features)))
        rows: dict[tuple[int, int], torch.Tensor] = {}
        for (how, *_), texts in groups.items():
            lengths = [len(requests[i][1][t]["input_ids"]) for i, t in texts]
            adapter = adapters[requests[texts[0][0]][0]]  # a group's adapters are alike (peft or not)
            # A packed forward (merged and trained-tensor runs where the server merges) does not compute the padding
            # but in the attention, so splitting it by length would save little for another forward's fixed cost.
            packs = self.merge and not adapter.is_peft
            for bucket in [list(range(len(texts)))] if packs else length_buckets(lengths, self.forward_cost_tokens):
                chosen = [texts[k] for k in bucket]
                names = [requests[i][0] for i, _ in chosen]
                logits = self._forward(how, names, [requests[i][1][t] for i, t in chosen], adapters)
                rows.update(_probabilities(logits, [len(adapters[name].label_names) for name in names], chosen))
        for index, (_, features) in enumerate(requests):
            if results[index] is None:
                results[index] = torch.stack([rows[(index, t)] for t in range(len(features))])
        return results

    def _group_of(self, adapter: Adapter) -> tuple:
        """Which texts share forwards: those of adapters with copies of the same heads (any number of classes),
        grouped (:mod:`lora_train.serving.grouped`) where their LoRA layers allow, else through peft's
        ``adapter_names`` where :data:`MIX_ADAPTERS` says it pays; each other adapter's texts alone."""
        if adapter.mix_key and self.group and adapter.groupable:
            return ("grouped", adapter.mix_key)
        if adapter.mix_key and self.mix:
            return ("mixed", adapter.mix_key)
        return ("alone", adapter.name)

    def _forward(self, how: str, names: list[str], features: list[dict], adapters: dict[str, Adapter]) -> torch.Tensor:
        """The logits of one forward over ``features``, row ``i`` for adapter ``names[i]``."""
        first = adapters[names[0]]
        # Few distinct lengths under bf16: oneDNN caches its kernels per shape (lora_train.data).
        length = padded_length(
            max(len(f["input_ids"]) for f in features),
            max(adapters[n].max_length for n in set(names)),
            self.device.type,
            autocast_dtype(first.recipe, self.device) == torch.bfloat16,
        )
        with first.tokenizer_lock:
            batch = first.tokenizer.pad(features, padding="max_length", max_length=length, return_tensors="pt")
        batch = batch.to(self.device)
        # The autocast the adapters were trained and evaluated in (bf16 for the CPU recipes, one per server), so the
        # server gives the probabilities scripts/predict.py gives.
        self._route_heads(first.heads)
        with training_autocast(first.recipe, self.device):
            if not first.is_peft:  # the bare base with the run's tensors in place (lora_train.serving.trained)
                with peft_layers_off(self._peft_layers), swapped_in(first.slots), packed_tokens():
                    return self._base_model(**batch).logits
            if how == "grouped":  # also for one adapter: peft's set_adapter walks every module at each switch
                with self.grouped.rows(names):
                    return self.model(**batch).logits
            if len(set(names)) == 1:
                self.model.set_adapter(names[0])  # leaves the head wrappers switched as routed
                return self.model(**batch).logits
            return self.model(**batch, adapter_names=names).logits


def _probabilities(logits: torch.Tensor, classes: list[int], keys: list) -> dict[Any, torch.Tensor]:
    """Each row's softmax over its own adapter's ``classes`` columns (a mixed head pads narrower heads with zeros),
    on the CPU, by ``keys``."""
    logits = logits.float().cpu()
    out = {}
    for width in set(classes):
        chosen = [row for row, c in enumerate(classes) if c == width]
        out.update(zip([keys[row] for row in chosen], torch.softmax(logits[chosen, :width], dim=-1), strict=True))
    return out


def length_buckets(lengths: list[int], forward_cost_tokens: int) -> list[list[int]]:
    """Indices of ``lengths`` split into forwards of the least estimated cost, the sum over forwards of
    ``forward_cost_tokens`` + texts x longest text.

    A batch is padded to its longest text, so a 20-token SST-2 sentence beside a 256-token IMDb review costs like
    a second review; but every forward also has a fixed cost. Texts are sorted by length and split where the
    padding saved is worth more than one more forward (the best split into runs of the sorted lengths, by dynamic
    programming over the at most ``max_batch_texts`` texts).
    """
    order = sorted(range(len(lengths)), key=lengths.__getitem__)
    best = [0.0] + [float("inf")] * len(order)  # best[k]: least cost of the k shortest texts
    cut = [0] * (len(order) + 1)  # where the last forward of that best split starts
    for end in range(1, len(order) + 1):
        longest = lengths[order[end - 1]]
        for start in range(end):
            cost = best[start] + forward_cost_tokens + (end - start) * longest
            if cost < best[end]:
                best[end], cut[end] = cost, start
    buckets, end = [], len(order)
    while end:
        buckets.append(order[cut[end] : end])
        end = cut[end]
    return buckets[::-1]
