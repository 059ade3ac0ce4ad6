"""Typed recipe schema, YAML loading, command-line overrides and validation.

A recipe is a YAML file with one mapping per section (``model``, ``quantization``, ``peft``,
``data``, ``training``, ``output``). Every field is declared below with its type, default and a
one-line ``help`` text; ``--help`` on the scripts prints this table. Overrides are given as
``section.field=value`` and are parsed as YAML scalars, then typed by the schema.

All problems are collected in one pass and reported together in a :class:`RecipeError`, before
any model or data is touched.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml

from lora_train.methods import METHODS, Method, method_help
from lora_train.tasks import TASKS

DType = Literal["float32", "bfloat16", "float16"]
PeftMethod = Literal[tuple(METHODS)]  # type: ignore[valid-type]  # the method table decides
LoraInit = Literal["gaussian", "pissa", "olora", "loftq"]


def _f(default: Any, help: str, **kwargs: Any) -> Any:
    """A dataclass field with its help text (shown by ``--help`` and in the README)."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help}, **kwargs)
    return field(default=default, metadata={"help": help}, **kwargs)


@dataclass
class ModelConfig:
    """The pretrained base model."""

    name_or_path: str = _f("sentence-transformers/all-MiniLM-L6-v2", "Hub id or local directory of the base model.")
    revision: str = _f("main", "Hub revision (branch, tag or commit) of the base model.")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = _f(
        "float32", "dtype the non-quantized weights are loaded in ('auto' keeps the checkpoint's)."
    )
    trust_remote_code: bool = _f(False, "Run code shipped with the checkpoint. Off unless you trust the repo.")
    pooling: Literal["last", "mean"] = _f(
        "last",
        "Decoder classifiers (a 'score' head): 'last' scores the rightmost non-pad token (transformers' own);"
        " 'mean' the mean of the attended tokens' hidden states, whatever the padding side (lora_train.heads).",
    )
    attn_implementation: Optional[Literal["sdpa", "eager", "flash_attention_2"]] = _f(
        "sdpa", "Attention kernel; null lets transformers choose."
    )
    attention_dropout: Optional[float] = _f(
        None,
        "Dropout on the attention probabilities while training, in [0, 1); null keeps the checkpoint's (BERT: 0.1)."
        " 0 lets sdpa use its fused kernel on CPUs too, which keeps no length x length probabilities for backward.",
    )


@dataclass
class QuantizationConfig:
    """Base-weight quantization (QLoRA = LoRA on a 4-bit NF4 base)."""

    method: Literal["none", "nf4"] = _f("none", "'nf4' loads the base in 4-bit NormalFloat via bitsandbytes (QLoRA).")
    double_quant: bool = _f(True, "Quantize the quantization constants too (saves ~0.4 bit/param).")
    compute_dtype: DType = _f("bfloat16", "dtype the 4-bit weights are dequantized to for matmuls.")
    quant_storage_dtype: Literal["uint8", "bfloat16", "float16", "float32"] = _f(
        "uint8",
        "dtype packing the 4-bit weights. uint8 runs on one process, DDP and DeepSpeed ZeRO-2/3; FSDP needs a"
        " floating one; under DeepSpeed / FSDP a floating one must equal training.mixed_precision's dtype"
        " (docs/distributed.md).",
    )
    skip_modules: Optional[list[str]] = _f(
        None, "Modules kept out of quantization; null = the classification head (classifier, score, pooler...)."
    )

    @property
    def is_4bit(self) -> bool:
        """True when the base is loaded in 4-bit NF4 (QLoRA)."""
        return self.method == "nf4"


@dataclass
class PeftConfig:
    """What is trained: adapters (LoRA, AdaLoRA, IA3, soft prompts) + head, biases + head, the head only, or all."""

    method: PeftMethod = _f("lora", method_help())
    r: int = _f(8, "LoRA rank (for AdaLoRA: the rank budget per module is set by init_r / target_r).")
    alpha: float = _f(16.0, "LoRA scaling numerator: the update is scaled by alpha / r.")
    dropout: float = _f(0.1, "Dropout on the LoRA input, in [0, 1).")
    bias: Literal["none", "all", "lora_only"] = _f("none", "Which biases are trained.")
    target_modules: Union[list[str], str] = _f(
        ["query", "value"], "Module name suffixes to adapt (a list), or 'all-linear'."
    )
    modules_to_save: Optional[list[str]] = _f(
        None,
        "Modules trained in full and saved with the adapter; null = the head modules the checkpoint lacks"
        " (e.g. classifier), found automatically. [pooler, classifier] also trains BERT's pretrained pooler:"
        " much better on sentence-embedding checkpoints such as all-MiniLM-L6-v2 (docs/results.md).",
    )
    init_r: int = _f(12, "AdaLoRA: initial rank of every adapted matrix.")
    target_r: int = _f(8, "AdaLoRA: average target rank after pruning (<= init_r).")
    tinit: int = _f(0, "AdaLoRA: warm-up optimizer steps before rank pruning starts; 0 = 10% of the steps.")
    tfinal: int = _f(0, "AdaLoRA: final optimizer steps with the budget frozen; 0 = 20% of the steps.")
    deltaT: int = _f(10, "AdaLoRA: optimizer steps between two budget allocations.")
    beta1: float = _f(0.85, "AdaLoRA: EMA coefficient of the importance sensitivity.")
    beta2: float = _f(0.85, "AdaLoRA: EMA coefficient of the importance uncertainty.")
    orth_reg_weight: float = _f(0.5, "AdaLoRA: weight of the orthogonality regulariser on P and Q.")
    use_dora: bool = _f(False, "LoRA: DoRA, a trained magnitude per output feature times a LoRA-updated direction.")
    use_rslora: bool = _f(False, "LoRA: rank-stabilised scaling alpha / sqrt(r) instead of alpha / r.")
    init_lora_weights: Union[bool, LoraInit] = _f(
        True,
        "LoRA: true = A Kaiming-uniform, B = 0 (the update starts at 0); gaussian = A Gaussian, B = 0; pissa /"
        " olora = A, B from the base weight's SVD / QR, the base keeps the residual (saved converted to a plain rank-2r"
        " LoRA on the original base); loftq = A, B that cancel the NF4 quantization error (quantization.method nf4,"
        " CUDA only in peft).",
    )
    feedforward_modules: list[str] = _f(
        [], "IA3: the target_modules that are feed-forward layers (scaled at their input; the others at their output)."
    )
    num_virtual_tokens: int = _f(20, "prompt_tuning / prefix_tuning: learned virtual tokens per input.")
    prompt_init_text: Optional[str] = _f(
        None,
        "prompt_tuning: start the soft prompt from this text's token embeddings (repeated to"
        " num_virtual_tokens); null = random.",
    )

    @property
    def spec(self) -> Method:
        """The method's entry in :data:`lora_train.methods.METHODS`."""
        return METHODS[self.method]

    @property
    def is_adapter(self) -> bool:
        """True for methods saved as a peft adapter (apart from the base); see :attr:`Method.saves`."""
        return self.spec.is_adapter


@dataclass
class DataConfig:
    """The task and its data."""

    task: Optional[str] = _f("sst2", "Built-in task (sst2, imdb, emotion), or null for a generic dataset.")
    path: Optional[str] = _f(
        None,
        "Where the data lives: one .csv, .tsv, .json, .jsonl or .parquet file (the training split), a local directory"
        " of {split}.csv|tsv|json|jsonl|parquet files, or a Hub dataset id (e.g. nyu-mll/glue; read through the Hub"
        " cache, so HF_HUB_OFFLINE works). null = the task's Hub dataset.",
    )
    config_name: Optional[str] = _f(
        None, "Hub dataset config (e.g. sst2 of nyu-mll/glue); null = the task's, or the dataset's default."
    )
    text_column: Optional[str] = _f(
        None,
        "Text column; null = the task's, else found in the data: its one string column besides the label, or the"
        " one named text, sentence, review or content.",
    )
    text_pair_column: Optional[str] = _f(
        None, "Second text column for sentence-pair tasks (NLI, paraphrase), given to the tokenizer as the pair."
    )
    label_column: Optional[str] = _f(
        None, "Label column: class names (strings) or integer class ids; null = the task's, else 'label'."
    )
    label_names: Optional[list[str]] = _f(
        None,
        "Class names in class-id order; string labels are mapped to their position here (a label not listed is an"
        " error). null = the task's, else from the whole training split: its string labels sorted, its ClassLabel"
        " names, or LABEL_0..LABEL_max.",
    )
    train_split: Optional[str] = _f(None, "Training split; null = the task's, else 'train'.")
    eval_split: Optional[str] = _f(
        None,
        "Split evaluated during and after training; null = the task's, else 'validation', carved out of train"
        " (data.validation_fraction) when the data has no such split.",
    )
    validation_fraction: float = _f(
        0.1,
        "When the data has no evaluation split (one file, IMDb), carve this fraction out of train: stratified by"
        " label, seeded, every class kept in train; the rows are saved with the run (data_split.json).",
    )
    max_length: int = _f(128, "Truncate inputs to this many tokens.")
    truncation: Literal["right", "head_tail"] = _f(
        "right",
        "How a longer text is cut: 'right' keeps its start; 'head_tail' keeps its first quarter and last three"
        " quarters of the budget (better on long reviews: Sun et al. 2019). Prediction and serving cut the same way.",
    )
    max_train_samples: Optional[int] = _f(
        None,
        "Use a fixed random subset of this many training rows (holding every class it has room for); the classes"
        " still come from the whole split.",
    )
    max_eval_samples: Optional[int] = _f(None, "Use a fixed random subset of this many evaluation rows.")
    group_by_length: bool = _f(True, "Batch examples of similar length (less padding, same epoch contents).")
    num_workers: int = _f(0, "DataLoader worker processes.")


@dataclass
class TrainingConfig:
    """Optimisation and the loop."""

    num_epochs: float = _f(3.0, "Passes over the training set (ignored when max_steps > 0).")
    max_steps: int = _f(-1, "Optimizer steps to run; -1 = num_epochs.")
    per_device_train_batch_size: int = _f(32, "Training batch per process.")
    per_device_eval_batch_size: int = _f(128, "Evaluation batch per process.")
    gradient_accumulation_steps: int = _f(1, "Micro-batches per optimizer step.")
    learning_rate: float = _f(5e-4, "Peak learning rate of AdamW.")
    weight_decay: float = _f(0.01, "AdamW decoupled weight decay (not applied to biases and norms).")
    warmup_ratio: float = _f(0.06, "Fraction of optimizer steps spent warming up linearly, in [0, 1).")
    lr_scheduler: Literal["linear", "cosine", "constant"] = _f("linear", "Decay after warm-up.")
    max_grad_norm: float = _f(1.0, "Clip the gradient norm to this; 0 = no clipping.")
    layer_lr_decay: float = _f(
        1.0,
        "peft.method full: layer-wise learning rates; the head gets learning_rate, transformer layer L-k"
        " learning_rate * decay^k, the embeddings the lowest (1.0 = one rate for all).",
    )
    seed: int = _f(42, "Seed of data order, dropout and head initialisation.")
    mixed_precision: Literal["no", "fp16", "bf16"] = _f(
        "no",
        "Autocast dtype. bf16 also runs on CPUs (1.8x the fp32 step rate on this project's AVX512-BF16 CPU);"
        " fp16 is GPU only. On a GPU without native bf16 (before Ampere: T4, V100) bf16 trains as fp16, with a"
        " warning.",
    )
    gradient_checkpointing: bool = _f(False, "Recompute activations in backward (less memory, ~30% slower).")
    torch_compile: bool = _f(
        False, "Compile the model with torch.compile (slower on the 2-core CPU measured: docs/performance.md)."
    )
    eval_steps: int = _f(0, "Evaluate every N optimizer steps; 0 = at the end of each epoch only.")
    save_steps: int = _f(0, "Save a resumable checkpoint every N optimizer steps; 0 = at the end of each epoch.")
    logging_steps: int = _f(10, "Log loss, learning rate and throughput every N optimizer steps.")
    keep_last: int = _f(2, "Resumable checkpoints kept (oldest deleted first).")
    resume_from_checkpoint: Optional[str] = _f(None, "'latest' or a checkpoint directory to resume from.")


@dataclass
class OutputConfig:
    """Where results go and who hears about them."""

    output_dir: str = _f("runs/default", "Directory of the run: final adapter, metrics, checkpoints, logs.")
    overwrite_output_dir: bool = _f(False, "Allow writing into a directory that holds another run, or other files.")
    report_to: list[str] = _f(["tensorboard"], "Trackers: any of tensorboard, wandb; [] for none.")
    push_to_hub: bool = _f(False, "Push the final adapter and model card to the Hub.")
    hub_model_id: Optional[str] = _f(None, "Hub repo id (user/name) to push to.")
    hub_private: bool = _f(True, "Create the Hub repo as private.")
    push_checkpoints: bool = _f(False, "Also push the adapter at every checkpoint.")


@dataclass
class Recipe:
    """A whole training recipe."""

    model: ModelConfig = field(default_factory=ModelConfig)
    quantization: QuantizationConfig = field(default_factory=QuantizationConfig)
    peft: PeftConfig = field(default_factory=PeftConfig)
    data: DataConfig = field(default_factory=DataConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    output: OutputConfig = field(default_factory=OutputConfig)

    def to_dict(self) -> dict[str, dict[str, Any]]:
        """The recipe as plain YAML-able data."""
        return dataclasses.asdict(self)


SECTIONS: dict[str, type] = {f.name: f.default_factory for f in dataclasses.fields(Recipe)}  # type: ignore[misc]


class RecipeError(ValueError):
    """A recipe that cannot run; ``problems`` lists every reason, one line each."""

    def __init__(self, problems: list[str], source: str = "recipe"):
        self.problems = problems
        lines = "\n".join(f"  - {p}" for p in problems)
        super().__init__(f"{source} has {len(problems)} problem(s):\n{lines}")


# ---------------------------------------------------------------------------------------------
# Typing of raw YAML values


def _describe(tp: Any) -> str:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if origin in (Union, types.UnionType):
        parts = [_describe(a) for a in args if a is not type(None)]
        text = " or ".join(parts)
        return text + " or null" if type(None) in args else text
    if origin is list:
        return f"a list of {_describe(args[0])}"
    return {bool: "true/false", int: "an integer", float: "a number", str: "a string"}.get(tp, str(tp))


def _coerce(value: Any, tp: Any) -> Any:
    """Convert ``value`` to the schema type ``tp`` or raise ``TypeError``."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (Union, types.UnionType):
        return _coerce_union(value, args)
    if origin is Literal:
        if value in args:
            return value
        raise TypeError
    if origin is list:
        if isinstance(value, str) and args[0] is str:
            raise TypeError  # a bare string for a list is ambiguous unless the union allows it
        if not isinstance(value, (list, tuple)):
            raise TypeError
        return [_coerce(v, args[0]) for v in value]
    if tp not in _SCALARS or (isinstance(value, bool) and tp is not bool):
        raise TypeError  # YAML's true / false are never numbers or text here
    return _SCALARS[tp](value)


def _coerce_union(value: Any, args: tuple) -> Any:
    """The first member type of a union (``Optional``) that ``value`` converts to."""
    if value is None and type(None) in args:
        return None
    for arg in args:
        if arg is type(None):
            continue
        try:
            return _coerce(value, arg)
        except TypeError:
            continue
    raise TypeError


def _to_bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    raise TypeError


def _to_int(value: Any) -> int:
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    raise TypeError


def _to_float(value: Any) -> float:
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str):  # YAML 1.1 reads "1e-4" (no dot) as a string
        try:
            return float(value)
        except ValueError:
            raise TypeError from None
    raise TypeError


def _to_str(value: Any) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, (int, float)):
        return str(value)  # e.g. a revision that looks like a number
    raise TypeError


_SCALARS = {bool: _to_bool, int: _to_int, float: _to_float, str: _to_str}
"""Scalar schema types and their converters (each raises ``TypeError`` for a value it cannot take)."""


def _field_types(section_cls: type) -> dict[str, Any]:
    return typing.get_type_hints(section_cls, include_extras=False)


def _suggest(name: str, options: list[str]) -> str:
    close = difflib.get_close_matches(name, options, n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""


# ---------------------------------------------------------------------------------------------
# Loading


def parse_override(text: str) -> tuple[str, str, Any]:
    """Split ``section.field=value`` into its parts; the value is read as a YAML scalar or list."""
    if "=" not in text:
        raise RecipeError([f"override '{text}' is not of the form section.field=value"], "command line")
    key, raw = text.split("=", 1)
    if key.count(".") != 1:
        raise RecipeError([f"override key '{key}' must be section.field, e.g. training.learning_rate"], "command line")
    section, name = key.split(".")
    try:
        value = load_yaml_text(raw) if raw != "" else ""
    except yaml.YAMLError:
        value = raw
    return section, name, value


class DuplicateKeyError(yaml.YAMLError):
    """A mapping gives the same key twice; the message names both lines."""


class _UniqueKeyLoader(yaml.SafeLoader):
    """A safe YAML loader that refuses a key given twice in one mapping (plain YAML keeps the last silently)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        first_line: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            if isinstance(key, typing.Hashable) and key in first_line:
                raise DuplicateKeyError(
                    f"duplicate key {key!r} at line {line} (first at line {first_line[key]}): YAML"
                    " would keep only the last one silently; keep one of them"
                )
            if isinstance(key, typing.Hashable):
                first_line[key] = line
        return super().construct_mapping(node, deep)


# YAML 1.1 reads yes/no/on/off as booleans, so `mixed_precision: no` would arrive as False; like YAML 1.2, only
# true/false are booleans here and the other words stay strings.
_UniqueKeyLoader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:bool"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_UniqueKeyLoader.add_implicit_resolver(
    "tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF")
)


def load_yaml_text(text: str) -> Any:
    """Parse YAML safely (no Python objects), refusing duplicate keys."""
    return yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass


def read_text_file(path: Path, what: str) -> str:
    """A UTF-8 text file's content (a byte-order mark is allowed); a directory or other encoding is named clearly.

    Raises ``ValueError`` with the message; callers wrap it in their own error type.
    """
    if path.is_dir():
        raise ValueError(f"{what} '{path}' is a directory, not a file")
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        where = _undecodable_at(data, err)
        raise ValueError(f"{what} '{path}' is not UTF-8 text ({where}); re-save it as UTF-8") from None


def _undecodable_at(data: bytes, err: UnicodeDecodeError) -> str:
    """Where a decoding error is: the offending byte and its line, e.g. 'byte 0xe9 at line 3'."""
    line = data.count(b"\n", 0, err.start) + 1
    return f"byte 0x{data[err.start]:02x} at line {line}"


def read_yaml(path: str | Path) -> dict[str, Any]:
    """Read a recipe file; YAML syntax errors and duplicate keys are reported with their line numbers."""
    path = Path(path)
    if not path.exists():
        raise RecipeError([f"recipe file '{path}' does not exist"], str(path))
    try:
        raw = load_yaml_text(read_text_file(path, "recipe"))
    except (ValueError, DuplicateKeyError) as err:
        raise RecipeError([str(err)], str(path)) from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        problem = getattr(err, "problem", None) or str(err)
        raise RecipeError([f"malformed YAML at {where}{problem}"], str(path)) from None
    if raw is None or raw == {}:
        raise RecipeError(
            [
                f"recipe file '{path}' is empty: it needs at least the sections that differ from the"
                " defaults (model, data, ...); start from one of recipes/*.yaml"
            ],
            str(path),
        )
    if not isinstance(raw, dict):
        raise RecipeError(["the top level must be a mapping of sections: " + ", ".join(SECTIONS)], str(path))
    return raw


def build_recipe(raw: dict[str, Any], overrides: list[str] = (), source: str = "recipe") -> Recipe:
    """Type ``raw`` (and the ``overrides``) against the schema and validate the result."""
    problems: list[str] = []
    merged = _merged_sections(raw, overrides, problems)
    sections = {
        section: _typed_section(section, cls, merged.get(section, {}), problems) for section, cls in SECTIONS.items()
    }
    recipe = Recipe(**sections)
    problems.extend(validate(recipe))
    if problems:
        raise RecipeError(problems, source)
    return recipe


def _merged_sections(raw: dict[str, Any], overrides: list[str], problems: list[str]) -> dict[str, dict[str, Any]]:
    """The recipe's sections with the overrides applied (values still raw); unknown sections go to ``problems``."""
    merged: dict[str, dict[str, Any]] = {}
    for section, values in raw.items():
        if section not in SECTIONS:
            problems.append(
                f"unknown section '{section}'{_suggest(section, list(SECTIONS))}; valid: {', '.join(SECTIONS)}"
            )
        elif values is not None and not isinstance(values, dict):
            problems.append(f"section '{section}' must be a mapping of field: value")
        else:
            merged[section] = dict(values or {})
    for text in overrides:
        try:
            section, name, value = parse_override(text)
        except RecipeError as err:
            problems.extend(err.problems)
            continue
        if section not in SECTIONS:
            problems.append(f"unknown section '{section}' in override '{text}'{_suggest(section, list(SECTIONS))}")
            continue
        merged.setdefault(section, {})[name] = value
    return merged


def _typed_section(section: str, cls: type, values: dict[str, Any], problems: list[str]) -> Any:
    """One section's dataclass from its raw values; unknown fields and wrong types go to ``problems``."""
    hints = _field_types(cls)
    typed: dict[str, Any] = {}
    for name, value in values.items():
        key = f"{section}.{name}"
        if name not in hints:
            problems.append(f"unknown field '{key}'{_suggest(name, list(hints))}")
            continue
        try:
            typed[name] = _coerce(value, hints[name])
        except TypeError:
            problems.append(f"{key} = {value!r} is invalid: expected {_describe(hints[name])}")
    return cls(**typed)


def load_recipe(path: str | Path, overrides: list[str] = ()) -> Recipe:
    """Load, override, type and validate a recipe file."""
    return build_recipe(read_yaml(path), list(overrides), source=str(path))


# ---------------------------------------------------------------------------------------------
# Validation of values (types are already right here)


METHOD_OPTIONS: dict[str, tuple[str, ...]] = {
    option: tuple(m.name for m in METHODS.values() if option in m.options)
    for option in dict.fromkeys(option for m in METHODS.values() for option in m.options)
}
"""Method-specific options (:attr:`Method.options`) and the peft.method values they apply to: set away from its
default under any other method, an option is an error (it would be silently ignored)."""


def _inapplicable_options(recipe: Recipe) -> list[str]:
    """The method-specific options set (not at their default) for a peft.method they do not apply to."""
    problems = []
    for key, methods in METHOD_OPTIONS.items():
        section, name = key.split(".")
        value = getattr(getattr(recipe, section), name)
        spec = next(f for f in dataclasses.fields(SECTIONS[section]) if f.name == name)
        missing = spec.default is dataclasses.MISSING
        default_value = spec.default_factory() if missing else spec.default  # type: ignore[misc]
        if recipe.peft.method not in methods and value != default_value:
            problems.append(
                f"{key} = {value!r} does not apply to peft.method = {recipe.peft.method!r} (only to"
                f" {' / '.join(methods)}): remove it, or set peft.method={methods[0]}"
            )
    return problems


class _Problems(list):
    """Problem messages, collected by :meth:`need`."""

    def need(self, cond: bool, msg: str) -> None:
        if not cond:
            self.append(msg)


def validate(recipe: Recipe) -> list[str]:
    """Every value and cross-field problem of a typed recipe, as messages."""
    checks = (_model_and_peft_problems, _data_problems, _training_problems, _output_problems)
    return [problem for check in checks for problem in check(recipe)]


def _model_and_peft_problems(recipe: Recipe) -> list[str]:
    p = _Problems()
    need = p.need
    m, q, pe = recipe.model, recipe.quantization, recipe.peft
    need(bool(m.name_or_path), "model.name_or_path must name a Hub id or a local directory")
    if m.attention_dropout is not None:
        need(0 <= m.attention_dropout < 1, f"model.attention_dropout = {m.attention_dropout} must be in [0, 1)")
    need(pe.r > 0, f"peft.r = {pe.r} must be a positive integer")
    need(pe.alpha > 0, f"peft.alpha = {pe.alpha} must be > 0")
    need(0 <= pe.dropout < 1, f"peft.dropout = {pe.dropout} must be in [0, 1)")
    if isinstance(pe.target_modules, str):
        need(
            pe.target_modules == "all-linear",
            f"peft.target_modules = {pe.target_modules!r}: give a list of module names or 'all-linear'",
        )
    else:
        need(len(pe.target_modules) > 0, "peft.target_modules must not be empty")
    if q.is_4bit:
        nf4_methods = [name for name, spec in METHODS.items() if spec.nf4_base]
        need(
            pe.spec.nf4_base,
            "quantization.method = 'nf4' trains adapters on a frozen 4-bit base:"
            f" peft.method must be {' or '.join(nf4_methods)}, not {pe.method!r}",
        )
    p.extend(_inapplicable_options(recipe))
    p.extend(pe.spec.problems(recipe))
    need(pe.num_virtual_tokens > 0, f"peft.num_virtual_tokens = {pe.num_virtual_tokens} must be > 0")
    need(
        pe.prompt_init_text is None or pe.prompt_init_text.strip() != "",
        "peft.prompt_init_text must be a non-empty text, or null for a random soft prompt",
    )
    return p


def _data_problems(recipe: Recipe) -> list[str]:
    p = _Problems()
    need = p.need
    d = recipe.data
    if d.task is not None and d.task not in TASKS:
        p.append(
            f"data.task = {d.task!r} is not a built-in task{_suggest(d.task, list(TASKS))};"
            f" valid: {', '.join(TASKS)}, or null with data.path"
        )
    if d.task is None:
        need(d.path is not None, "data.task is null, so data.path must name a data file or directory, or a Hub id")
    need(
        d.text_pair_column is None or d.text_pair_column != d.text_column,
        f"data.text_pair_column = {d.text_pair_column!r} is also data.text_column: the pair needs a second column",
    )
    need(
        d.text_pair_column is None or d.truncation == "right",
        "data.truncation = 'head_tail' cuts single texts: with data.text_pair_column use 'right'",
    )
    if d.label_names is not None:
        repeated = sorted({n for n in d.label_names if d.label_names.count(n) > 1})
        need(not repeated, f"data.label_names repeats {repeated}: each class needs one name")
        need(len(d.label_names) > 1, "data.label_names needs two or more class names (or null to read them)")
    need(d.max_length > 0, f"data.max_length = {d.max_length} must be > 0")
    need(0 < d.validation_fraction < 1, f"data.validation_fraction = {d.validation_fraction} must be in (0, 1)")
    for name in ("max_train_samples", "max_eval_samples"):
        v = getattr(d, name)
        need(v is None or v > 0, f"data.{name} = {v} must be > 0 or null")
    need(d.num_workers >= 0, "data.num_workers must be >= 0")
    return p


def _training_problems(recipe: Recipe) -> list[str]:
    p = _Problems()
    need = p.need
    t = recipe.training
    need(
        t.learning_rate > 0 and math.isfinite(t.learning_rate),
        f"training.learning_rate = {t.learning_rate} must be > 0",
    )
    need(t.num_epochs > 0 or t.max_steps > 0, "set training.num_epochs > 0 or training.max_steps > 0")
    need(t.max_steps == -1 or t.max_steps > 0, f"training.max_steps = {t.max_steps} must be > 0 or -1")
    for name in (
        "per_device_train_batch_size",
        "per_device_eval_batch_size",
        "gradient_accumulation_steps",
        "logging_steps",
        "keep_last",
    ):
        need(getattr(t, name) > 0, f"training.{name} = {getattr(t, name)} must be > 0")
    need(0 <= t.warmup_ratio < 1, f"training.warmup_ratio = {t.warmup_ratio} must be in [0, 1)")
    need(t.weight_decay >= 0, "training.weight_decay must be >= 0")
    need(t.max_grad_norm >= 0, "training.max_grad_norm must be >= 0 (0 = no clipping)")
    need(0 < t.layer_lr_decay <= 1, f"training.layer_lr_decay = {t.layer_lr_decay} must be in (0, 1] (1 = no decay)")
    need(t.eval_steps >= 0 and t.save_steps >= 0, "training.eval_steps and training.save_steps must be >= 0")
    return p


def _output_problems(recipe: Recipe) -> list[str]:
    p = _Problems()
    need = p.need
    o = recipe.output
    for tracker in o.report_to:
        need(
            tracker in ("tensorboard", "wandb"),
            f"output.report_to: unknown tracker {tracker!r}; valid: tensorboard, wandb",
        )
    if o.push_to_hub:
        need(
            bool(o.hub_model_id) and "/" in (o.hub_model_id or ""),
            "output.push_to_hub is true, so output.hub_model_id must be 'user/name'",
        )
    need(
        o.push_to_hub or not o.push_checkpoints,
        "output.push_checkpoints is true but output.push_to_hub is false:"
        " set output.push_to_hub=true (and output.hub_model_id)",
    )
    return p


# ---------------------------------------------------------------------------------------------
# Help


def fields_help() -> str:
    """Every recipe field with its type, default and meaning, for ``--help``."""
    lines = []
    for section, cls in SECTIONS.items():
        lines.append(f"{section}:  {cls.__doc__}")
        hints = _field_types(cls)
        for f in dataclasses.fields(cls):
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
            shown = yaml.safe_dump(default, default_flow_style=True).strip().removesuffix("...").strip()
            lines.append(f"  {section}.{f.name} = {shown}  ({_describe(hints[f.name])})")
            lines.append(f"      {f.metadata['help']}")
    return "\n".join(lines)


def fields_markdown() -> str:
    """The recipe reference as Markdown tables (docs/recipe_reference.md; a test keeps them equal)."""
    out = []
    for section, cls in SECTIONS.items():
        out += [f"**{section}**: {cls.__doc__}", "", "| field | default | type | meaning |", "|---|---|---|---|"]
        hints = _field_types(cls)
        for f in dataclasses.fields(cls):
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
            shown = yaml.safe_dump(default, default_flow_style=True).strip().removesuffix("...").strip()
            meaning = f.metadata["help"].replace("|", "\\|")  # a bare pipe would split the table cell
            out.append(f"| `{section}.{f.name}` | `{shown}` | {_describe(hints[f.name])} | {meaning} |")
        out.append("")
    return "\n".join(out)


def recipe_to_yaml(recipe: Recipe) -> str:
    """The resolved recipe as YAML (what a run saves beside its adapter)."""
    return yaml.safe_dump(recipe.to_dict(), sort_keys=False)
