"""The PEFT methods: one table of what each method trains, builds, saves, merges, checks and reports.

Adding a method is one entry in :data:`METHODS` (and its test): the recipe schema and its validation
(:mod:`lora_train.config`), the training regime (:mod:`lora_train.modeling`), what a run saves
(:mod:`lora_train.checkpoint`), merging (:mod:`lora_train.merge`), the loop's per-step hook and extra resume state
(:mod:`lora_train.train`), the model card (:mod:`lora_train.card`) and the launch checks
(:mod:`lora_train.distributed`) all read it and switch on nothing else.

Importing this module is cheap (no torch, peft or transformers): the command line validates recipes with it
before any heavy import.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Literal, Optional

if TYPE_CHECKING:  # type hints only: config imports this module
    from lora_train.config import PeftConfig, Recipe

Saves = Literal["adapter", "trained", "model"]
"""What a run of the method keeps: a peft adapter (``adapter_model.safetensors`` + ``adapter_config.json``), only
the tensors it trained (``trained.safetensors``, applied to the base named in ``recipe.yaml``), or the whole model."""

Problems = list[str]


@dataclass(frozen=True)
class ResumeState:
    """Method state a resume needs beyond the trained parameters (AdaLoRA's rank allocator): tensors + JSON."""

    save: Callable[[Any], tuple[dict[str, Any], dict[str, Any]]]
    """peft model -> (named tensors, JSON-able metadata)."""
    load: Callable[[Any, dict[str, Any], dict[str, Any]], None]
    """Put back what ``save`` returned."""


def _none(*_: Any) -> Problems:
    return []


@dataclass(frozen=True)
class Method:
    """One value of ``peft.method`` and everything the rest of the project needs to know about it."""

    name: str
    summary: str
    """Shown in ``--help`` and the recipe reference."""
    saves: Saves
    options: tuple[str, ...] = ()
    """Recipe fields (``section.field``) that only this method reads; set under another method they are an error."""
    uses_target_modules: bool = False
    """Reads ``peft.target_modules`` (checked against the model's Linear layers, shown on the model card)."""
    nf4_base: bool = False
    """Can train on a frozen 4-bit NF4 base (QLoRA)."""
    peft_config: Optional[Callable[["Recipe", dict[str, Any], int], Any]] = None
    """(recipe, peft's head arguments, total optimizer steps) -> peft config; None for a method peft does not wrap."""
    trains: Optional[Callable[[str], bool]] = None
    """Non-peft methods: whether a parameter (by name) outside the head is trained."""
    after_wrap: Optional[Callable[["Recipe", Any], None]] = None
    """Called on the peft model right after ``get_peft_model`` (LoftQ / PiSSA / OLoRA initialisation)."""
    step_hook: Optional[Callable[[Any, int], None]] = None
    """Called with (unwrapped model, global step) after every optimizer step (AdaLoRA's rank allocation)."""
    resume_state: Optional[ResumeState] = None
    merge_refusal: Optional[str] = None
    """Why the adapter cannot be merged into the base, or None when it can."""
    before_merge: Optional[Callable[[Any], None]] = None
    """Called on the loaded peft model before ``merge_and_unload``."""
    card_rows: Callable[["PeftConfig"], list[tuple[str, str]]] = lambda pe: []
    """The method's hyperparameter rows on the model card."""
    card_tags: tuple[str, ...] = ()
    """Hub tags beyond the method's name."""
    problems: Callable[["Recipe"], Problems] = _none
    """Value and cross-field problems of the method's own options (recipe validation). AdaLoRA's budget fields are
    checked only here, not as ``options``: shared recipes set them beside ``peft.method`` choices."""
    launch_problems: Callable[["Recipe", Any], Problems] = _none
    """(recipe, :class:`lora_train.distributed.Launch`) -> why this launch cannot run the method."""
    run_problems: Callable[["Recipe", Any], Problems] = _none
    """(recipe, model on the meta device) -> why the installed libraries cannot run the method here."""

    @property
    def is_adapter(self) -> bool:
        return self.saves == "adapter"


# ---------------------------------------------------------------------------------------------
# peft configs


def _targets(pe: "PeftConfig") -> str:
    return ", ".join(pe.target_modules) if isinstance(pe.target_modules, list) else pe.target_modules


def _lora_config(recipe: "Recipe", heads: dict[str, Any], total_steps: int):
    from peft import LoraConfig

    pe = recipe.peft
    # LoftQ is applied after get_peft_model (on the NF4 base, see _lora_after_wrap), from peft's default init.
    init = True if pe.init_lora_weights == "loftq" else pe.init_lora_weights
    return LoraConfig(
        r=pe.r,
        lora_alpha=pe.alpha,
        lora_dropout=pe.dropout,
        bias=pe.bias,
        target_modules=pe.target_modules,
        use_dora=pe.use_dora,
        use_rslora=pe.use_rslora,
        init_lora_weights=init,
        **heads,
    )


def _adalora_schedule(pe: "PeftConfig", total_steps: int) -> tuple[int, int]:
    """AdaLoRA's (tinit, tfinal): the recipe's, or 10% / 20% of the steps."""
    tinit = pe.tinit or max(1, int(0.1 * total_steps))
    tfinal = pe.tfinal or max(1, int(0.2 * total_steps))
    if tinit + tfinal >= total_steps:
        from lora_train.config import RecipeError  # config imports this module

        raise RecipeError(
            [
                f"AdaLoRA needs tinit + tfinal < total optimizer steps, got {tinit} + {tfinal} >= {total_steps};"
                " lower peft.tinit / peft.tfinal or train longer"
            ]
        )
    return tinit, tfinal


def _adalora_config(recipe: "Recipe", heads: dict[str, Any], total_steps: int):
    from peft import AdaLoraConfig

    pe = recipe.peft
    tinit, tfinal = _adalora_schedule(pe, total_steps)
    return AdaLoraConfig(
        init_r=pe.init_r,
        target_r=pe.target_r,
        tinit=tinit,
        tfinal=tfinal,
        deltaT=pe.deltaT,
        beta1=pe.beta1,
        beta2=pe.beta2,
        orth_reg_weight=pe.orth_reg_weight,
        total_step=total_steps,
        lora_alpha=pe.alpha,
        lora_dropout=pe.dropout,
        bias=pe.bias,
        target_modules=pe.target_modules,
        **heads,
    )


def _ia3_config(recipe: "Recipe", heads: dict[str, Any], total_steps: int):
    from peft import IA3Config

    pe = recipe.peft
    return IA3Config(target_modules=pe.target_modules, feedforward_modules=pe.feedforward_modules, **heads)


def _prompt_tuning_config(recipe: "Recipe", heads: dict[str, Any], total_steps: int):
    from peft import PromptTuningConfig

    pe = recipe.peft
    init = (
        dict(
            prompt_tuning_init="TEXT",
            prompt_tuning_init_text=pe.prompt_init_text,
            tokenizer_name_or_path=recipe.model.name_or_path,
        )
        if pe.prompt_init_text
        else {}
    )
    return PromptTuningConfig(num_virtual_tokens=pe.num_virtual_tokens, **init, **heads)


def _prefix_tuning_config(recipe: "Recipe", heads: dict[str, Any], total_steps: int):
    from peft import PrefixTuningConfig

    return PrefixTuningConfig(num_virtual_tokens=recipe.peft.num_virtual_tokens, **heads)


def _vera_config(recipe: "Recipe", heads: dict[str, Any], total_steps: int):
    from peft import VeraConfig

    pe = recipe.peft
    # One pair of frozen random projections shared by every adapted layer, seeded by training.seed and saved with
    # the adapter (save_projection), so a reload needs no generator of the same version.
    return VeraConfig(
        r=pe.r,
        target_modules=pe.target_modules,
        vera_dropout=pe.dropout,
        projection_prng_key=recipe.training.seed,
        save_projection=True,
        **heads,
    )


# ---------------------------------------------------------------------------------------------
# Method-specific checks


def _lora_problems(recipe: "Recipe") -> Problems:
    """DoRA / rsLoRA / initialisation combinations peft or this project cannot train, save or reload."""
    pe, nf4 = recipe.peft, recipe.quantization.method == "nf4"
    init, p = pe.init_lora_weights, []
    if init is False:
        p.append(
            "peft.init_lora_weights = false starts from a random, non-zero update (peft's test setting): use true,"
            " gaussian, pissa, olora or loftq"
        )
    if init == "loftq" and not nf4:
        p.append(
            "peft.init_lora_weights = 'loftq' corrects the error of a 4-bit base: set quantization.method=nf4 (or"
            " use true / pissa / olora on a full-precision base)"
        )
    if init in ("pissa", "olora") and nf4:
        p.append(
            f"peft.init_lora_weights = {init!r} rewrites the base weights (base = W - BA at the start), which a"
            " frozen NF4 base cannot hold: use quantization.method=none, or init_lora_weights=loftq for NF4"
        )
    if init in ("pissa", "olora", "loftq") and pe.use_dora:
        p.append(
            f"peft.use_dora with peft.init_lora_weights = {init!r}: the adapter is saved converted to a plain LoRA"
            " of the original base, which has no DoRA magnitude; use one of the two"
        )
    return p


def _adalora_problems(recipe: "Recipe") -> Problems:
    pe = recipe.peft
    checks = [
        (pe.init_r > 0, f"peft.init_r = {pe.init_r} must be > 0"),
        (0 < pe.target_r <= pe.init_r, f"peft.target_r = {pe.target_r} must be in (0, init_r = {pe.init_r}]"),
        (pe.deltaT > 0, f"peft.deltaT = {pe.deltaT} must be > 0"),
        (pe.tinit >= 0 and pe.tfinal >= 0, "peft.tinit and peft.tfinal must be >= 0"),
        (0 <= pe.beta1 < 1, f"peft.beta1 = {pe.beta1} must be in [0, 1)"),
        (0 <= pe.beta2 < 1, f"peft.beta2 = {pe.beta2} must be in [0, 1)"),
        (pe.orth_reg_weight >= 0, "peft.orth_reg_weight must be >= 0"),
    ]
    return [message for ok, message in checks if not ok]


def _ia3_problems(recipe: "Recipe") -> Problems:
    pe = recipe.peft
    stray = [m for m in pe.feedforward_modules if isinstance(pe.target_modules, str) or m not in pe.target_modules]
    return [f"peft.feedforward_modules {stray} must be a subset of peft.target_modules (a list)"] if stray else []


def _adalora_launch_problems(recipe: "Recipe", launch: Any) -> Problems:
    if not launch.engine_owns_optimizer:
        return []
    why = (
        "Accelerate runs DeepSpeed's optimizer step inside accelerator.backward(), so the gradients AdaLoRA's"
        " rank allocator scores are gone by update_and_allocate()"
        if launch.engine == "deepspeed"
        else "FSDP shards the parameters and gradients AdaLoRA's rank allocator scores, so each process would prune"
        " ranks from its own shard"
    )
    return [
        f"peft.method = 'adalora' is not supported under {launch.name}: {why}. Use DDP"
        " (accelerate_configs/multi_gpu.yaml) for AdaLoRA, or peft.method=lora"
    ]


def _lora_launch_problems(recipe: "Recipe", launch: Any) -> Problems:
    init = recipe.peft.init_lora_weights
    if init not in ("pissa", "olora", "loftq") or launch.zero_stage != 3:
        return []
    return [
        f"peft.init_lora_weights = {init!r} is not supported under {launch.name}: it"
        " computes A and B from each whole base weight (and PiSSA / OLoRA rewrite it), but ZeRO-3 partitions"
        " the weights across processes as the model loads. Use DDP, ZeRO-2 or FSDP (they initialise before"
        " sharding), or init_lora_weights=true"
    ]


def _loftq_run_problems(recipe: "Recipe", model: Any) -> Problems:
    import torch

    if recipe.peft.init_lora_weights != "loftq" or torch.cuda.is_available():
        return []
    import peft

    return [
        f"peft.init_lora_weights = 'loftq': peft {peft.__version__} computes LoftQ on a CUDA (or XPU)"
        " device only (loftq_utils hard-codes it), and none is available. Train on a GPU, or use"
        " init_lora_weights=true (plain QLoRA)"
    ]


def _prefix_tuning_run_problems(recipe: "Recipe", model: Any) -> Problems:
    """Why peft cannot prefix-tune ``model`` for classification (peft's own check, done before any work).

    peft injects the prefix as ``past_key_values`` and looks for that argument in the model's forward (or its
    backbone's); transformers 5 renamed it ``cache``, and BERT-style encoders attend to no cache at all.
    """
    import inspect

    import peft
    import transformers

    backbone = getattr(model, getattr(model, "base_model_prefix", ""), model)
    if any("past_key_values" in inspect.signature(m.forward).parameters for m in (model, backbone)):
        return []
    return [
        f"peft.method = 'prefix_tuning' cannot run on {type(model).__name__} with peft {peft.__version__} and"
        f" transformers {transformers.__version__}: peft passes the prefix as past_key_values, which this model's"
        " forward does not take (transformers 5 calls it `cache`, and encoders such as BERT use no key/value"
        " cache). Use peft.method=prompt_tuning (a soft prompt in the input) or lora / ia3"
    ]


# ---------------------------------------------------------------------------------------------
# Hooks and extra state


def _lora_after_wrap(recipe: "Recipe", peft_model: Any) -> None:
    init = recipe.peft.init_lora_weights
    if init == "loftq":
        from peft import replace_lora_weights_loftq

        replace_lora_weights_loftq(peft_model)  # reads the unquantized weights from the checkpoint's safetensors
    elif init in ("pissa", "olora"):
        from lora_train.mutated_init import keep_initial_adapter  # torch: the table is read by config, kept light

        keep_initial_adapter(peft_model)


def _adalora_step(peft_model: Any, step: int) -> None:
    peft_model.base_model.update_and_allocate(step)


def adalora_state(peft_model: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    """AdaLoRA's rank allocator: importance EMAs as named tensors, and the rank pattern once the budget is final
    (peft masks with it in the last ``tfinal`` steps, so a resume there needs it)."""
    allocator = peft_model.base_model.rankallocator
    tensors = {}
    for kind in ("ipt", "exp_avg_ipt", "exp_avg_unc"):
        for name, value in getattr(allocator, kind).items():
            tensors[f"{kind}::{name}"] = value
    config = peft_model.peft_config[peft_model.base_model.trainable_adapter_name]
    return tensors, {"rank_pattern": config.rank_pattern}


def load_adalora_state(peft_model: Any, tensors: dict[str, Any], meta: dict[str, Any]) -> None:
    """Put back what :func:`adalora_state` saved."""
    allocator = peft_model.base_model.rankallocator
    for key, value in tensors.items():
        kind, name = key.split("::", 1)
        getattr(allocator, kind)[name] = value.to(peft_model.device)
    peft_model.peft_config[peft_model.base_model.trainable_adapter_name].rank_pattern = meta.get("rank_pattern")


def _unwrap_trained_heads(adapter: Any) -> None:
    """Put each trained head module (modules_to_save) in place of its wrapper before merging.

    peft 0.21's IA3 and VeRA unloads copy ``.weight`` from every wrapper they replace, which fails for a head module
    that is not a single layer (BERT's pooler); the trained copy itself is what the merged model needs.
    """
    from peft.utils import ModulesToSaveWrapper

    for name, module in list(adapter.base_model.model.named_modules()):
        if isinstance(module, ModulesToSaveWrapper):
            parent_name, _, child = name.rpartition(".")
            parent = adapter.base_model.model.get_submodule(parent_name) if parent_name else adapter.base_model.model
            setattr(parent, child, module.modules_to_save[module.active_adapters[0]])


# ---------------------------------------------------------------------------------------------
# Model-card rows


def _lora_rows(pe: "PeftConfig") -> list[tuple[str, str]]:
    rows = [("LoRA r / alpha / dropout", f"{pe.r} / {pe.alpha:g} / {pe.dropout:g}")]
    if pe.use_dora or pe.use_rslora or pe.init_lora_weights is not True:
        rows.append(("LoRA variant", f"DoRA {pe.use_dora}, rsLoRA {pe.use_rslora}, init {pe.init_lora_weights}"))
    return rows + [("target modules", _targets(pe))]


def _adalora_rows(pe: "PeftConfig") -> list[tuple[str, str]]:
    budget = f"{pe.init_r} -> {pe.target_r} / {pe.alpha:g} / {pe.dropout:g}"
    return [("AdaLoRA init_r -> target_r / alpha / dropout", budget), ("target modules", _targets(pe))]


def _vera_rows(pe: "PeftConfig") -> list[tuple[str, str]]:
    rank = ("VeRA r (shared random projections) / dropout", f"{pe.r} / {pe.dropout:g}")
    return [rank, ("target modules", _targets(pe))]


SOFT_PROMPT_REFUSAL = (
    "learned virtual tokens prepended to every input, not a change of weights, so there is nothing to merge into"
    " the base. Use it as an adapter (scripts/predict.py, lora_train.inference.load_run or peft's"
    " AutoPeftModelForSequenceClassification)"
)


def _virtual_token_rows(pe: "PeftConfig") -> list[tuple[str, str]]:
    return [("virtual tokens", str(pe.num_virtual_tokens))]


# ---------------------------------------------------------------------------------------------
# The table

METHODS: dict[str, Method] = {
    m.name: m
    for m in (
        Method(
            "lora",
            "LoRA (low-rank updates; DoRA, rsLoRA, PiSSA / OLoRA / LoftQ initialisation as options)",
            saves="adapter",
            options=("peft.use_dora", "peft.use_rslora", "peft.init_lora_weights"),
            uses_target_modules=True,
            nf4_base=True,
            peft_config=_lora_config,
            after_wrap=_lora_after_wrap,
            card_rows=_lora_rows,
            problems=_lora_problems,
            launch_problems=_lora_launch_problems,
            run_problems=_loftq_run_problems,
        ),
        Method(
            "adalora",
            "AdaLoRA (LoRA with a rank budget pruned while training)",
            saves="adapter",
            uses_target_modules=True,
            nf4_base=True,
            peft_config=_adalora_config,
            step_hook=_adalora_step,
            resume_state=ResumeState(adalora_state, load_adalora_state),
            card_rows=_adalora_rows,
            card_tags=("lora",),
            problems=_adalora_problems,
            launch_problems=_adalora_launch_problems,
        ),
        Method(
            "ia3",
            "IA3 (learned scaling vectors)",
            saves="adapter",
            options=("peft.feedforward_modules",),
            uses_target_modules=True,
            peft_config=_ia3_config,
            before_merge=_unwrap_trained_heads,
            card_rows=lambda pe: [("target modules", _targets(pe))],
            problems=_ia3_problems,
        ),
        Method(
            "prompt_tuning",
            "prompt tuning (a learned soft prompt)",
            saves="adapter",
            options=("peft.num_virtual_tokens", "peft.prompt_init_text"),
            peft_config=_prompt_tuning_config,
            merge_refusal=SOFT_PROMPT_REFUSAL,
            card_rows=_virtual_token_rows,
        ),
        Method(
            "prefix_tuning",
            "prefix tuning (learned key/value prefixes)",
            saves="adapter",
            options=("peft.num_virtual_tokens",),
            peft_config=_prefix_tuning_config,
            merge_refusal=SOFT_PROMPT_REFUSAL,
            card_rows=_virtual_token_rows,
            run_problems=_prefix_tuning_run_problems,
        ),
        Method(
            "vera",
            "VeRA (frozen shared random projections, trained scaling vectors; peft.r is their rank, e.g. 256)",
            saves="adapter",
            uses_target_modules=True,
            peft_config=_vera_config,
            before_merge=_unwrap_trained_heads,  # like IA3's, peft's VeRA unload copies .weight from each wrapper
            card_rows=_vera_rows,
        ),
        Method(
            "bitfit",
            "BitFit (every bias + the head; saves only those tensors)",
            saves="trained",
            trains=lambda name: name.endswith(".bias"),  # Ben Zaken et al., 2021: every bias term
        ),
        Method(
            "head_only",
            "the head only (frozen encoder; saves only the head)",
            saves="trained",
            trains=lambda name: False,
        ),
        Method(
            "full",
            "full fine-tuning (saves the whole model)",
            saves="model",
            options=("training.layer_lr_decay",),
            trains=lambda name: True,
        ),
    )
}
"""Every value of ``peft.method``, in the order ``--help`` lists them."""


def method_help() -> str:
    """``peft.method``'s help text: every method of the table with its summary."""
    return "; ".join(f"{m.name}: {m.summary}" for m in METHODS.values()) + ". docs/results.md compares them."
