"""The model card (README.md) saved beside every adapter and pushed to the Hub.

Everything in it is read from the run itself (recipe, measured metrics, history, hardware); nothing
is assumed. The YAML header is what the Hub indexes (base_model, library_name, pipeline_tag,
datasets, license, tags, model-index).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

from lora_train.config import Recipe, build_recipe, read_yaml, recipe_to_yaml
from lora_train.heads import pooling_outside_lora_train
from lora_train.tasks import TASKS

PLOT_NAME = "learning_curve.png"


def _metric(metrics: dict[str, Any], name: str) -> Optional[float]:
    """An evaluation figure from final metrics (``eval_accuracy``) or a raw report (``accuracy``)."""
    value = metrics.get(f"eval_{name}", metrics.get(name))
    return float(value) if isinstance(value, (int, float)) else None


def base_license(name_or_path: str) -> Optional[str]:
    """The base model's license from its model card, found locally (its directory or the Hub cache)."""
    from huggingface_hub import ModelCard, try_to_load_from_cache

    local = Path(name_or_path) / "README.md"
    readme = (
        local
        if local.is_file()
        else try_to_load_from_cache(name_or_path, "README.md")
        if _is_hub_id(name_or_path)
        else None
    )
    if not isinstance(readme, (str, Path)):
        return None
    try:
        return ModelCard(Path(readme).read_text()).data.license
    except Exception:  # noqa: BLE001 - a malformed card only means the license is not known
        return None


def _is_hub_id(name_or_path: str) -> bool:
    return not Path(name_or_path).exists() and name_or_path.count("/") <= 1


def _dataset(recipe: Recipe) -> tuple[Optional[str], str, Optional[str], str]:
    """(Hub dataset id or None for local data, dataset name, config, split) of the evaluation."""
    d = recipe.data
    task = TASKS.get(d.task or "")
    if task:
        return task.hub_id, task.name, task.hub_config, d.eval_split or task.eval_split
    if d.path and _is_hub_id(d.path):
        return d.path, d.path, d.config_name, d.eval_split or "validation"
    return None, Path(d.path or "local").name, None, d.eval_split or "validation"


def _card_data(recipe: Recipe, metrics: dict[str, Any]):
    from huggingface_hub import EvalResult, ModelCardData

    dataset_id, dataset_name, dataset_config, split = _dataset(recipe)
    results = [
        EvalResult(
            task_type="text-classification",
            dataset_type=dataset_id or "local",
            dataset_name=dataset_name,
            dataset_config=dataset_config,
            dataset_split=split,
            metric_type=metric_type,
            metric_name=name,
            metric_value=round(value, 4),
        )
        for metric_type, name, value in (
            ("accuracy", "accuracy", _metric(metrics, "accuracy")),
            ("f1", "macro-F1", _metric(metrics, "macro_f1")),
        )
        if value is not None
    ]
    adapter = recipe.peft.is_adapter
    license_id = base_license(recipe.model.name_or_path)
    base = recipe.model.name_or_path
    return ModelCardData(
        base_model=base,
        library_name="peft" if adapter else "transformers",
        pipeline_tag="text-classification",
        datasets=[dataset_id] if dataset_id else None,
        license=license_id or "other",
        license_name=None if license_id else "same-as-base-model",
        license_link=None if license_id or not _is_hub_id(base) else f"https://huggingface.co/{base}",
        tags=["lora_train", "text-classification", recipe.peft.method, *recipe.peft.spec.card_tags]
        + (["qlora", "nf4", "4-bit"] if recipe.quantization.is_4bit else []),
        model_name=f"{base.rstrip('/').split('/')[-1]}-{dataset_name}-{recipe.peft.method}",
        eval_results=results or None,
    )


def _duration(seconds: Optional[float]) -> str:
    if seconds is None:
        return "?"
    minutes, secs = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes} min {secs} s" if hours else f"{minutes} min {secs} s" if minutes else f"{secs} s"


def _hyperparameters(recipe: Recipe, metrics: dict[str, Any]) -> str:
    pe, q, t, d = recipe.peft, recipe.quantization, recipe.training, recipe.data
    rows = [("method", pe.method), *pe.spec.card_rows(pe)]
    rows.append(
        (
            "base weights",
            f"NF4 4-bit (double quant: {q.double_quant}, compute {q.compute_dtype})"
            if q.is_4bit
            else recipe.model.dtype,
        )
    )
    steps = metrics.get("global_step")
    rows += [
        ("learning rate", f"{t.learning_rate:g} ({t.lr_scheduler}, warm-up {t.warmup_ratio:g} of the steps)"),
        ("optimizer", f"AdamW, weight decay {t.weight_decay:g}, gradient clipping {t.max_grad_norm:g}"),
        (
            "batch",
            f"{t.per_device_train_batch_size} per device x {t.gradient_accumulation_steps} accumulation"
            f" x {metrics.get('num_processes', 1)} processes = {metrics.get('global_batch_size', '?')}",
        ),
        (
            "optimizer steps",
            f"{steps if steps is not None else '?'}"
            + (f" ({metrics['epochs']:.2f} epochs)" if isinstance(metrics.get("epochs"), (int, float)) else ""),
        ),
        ("max sequence length", str(d.max_length) + (" (head + tail)" if d.truncation == "head_tail" else "")),
        ("training examples", str(d.max_train_samples) + " (subset)" if d.max_train_samples else "all"),
        ("mixed precision", t.mixed_precision),
        ("seed", str(t.seed)),
    ]
    return "\n".join(f"| {k} | {v} |" for k, v in rows)


def _usage(recipe: Recipe, repo: str, label_names: list[str]) -> str:
    adapter = recipe.peft.is_adapter
    loader = "AutoPeftModelForSequenceClassification" if adapter else "AutoModelForSequenceClassification"
    module = "peft" if adapter else "transformers"
    labels = dict(enumerate(label_names))
    # AutoPeftModel builds the base from its own config (2 labels, LABEL_i names): pass the run's labels.
    label_kwargs = (
        f", id2label={labels!r}, label2id={ {v: k for k, v in labels.items()}!r}" if adapter and labels else ""
    )
    nf4 = recipe.quantization.is_4bit
    note = (
        "\nThe adapter was trained on a 4-bit NF4 base. The snippet loads the base in full precision;"
        " `scripts/predict.py` and `lora_train.inference.load_run` rebuild the NF4 base from `recipe.yaml`"
        " as in training.\n"
        if nf4
        else ""
    )
    pooling = pooling_outside_lora_train(recipe.model.pooling)
    if pooling:
        note += f"\nThe snippet is not exact for this model: {pooling}.\n"
    if recipe.data.truncation == "head_tail":
        note += (
            f"\nLong texts were cut to their head and tail (`data.truncation: head_tail`), not their first"
            f" {recipe.data.max_length} tokens as in the snippet: `lora_train.data.encode_texts(tokenizer, texts,"
            f" {recipe.data.max_length}, 'head_tail', padding=True, return_tensors='pt')` cuts them the same way.\n"
        )
    load = f'{loader}.from_pretrained("{repo}"{label_kwargs}).eval()'
    if recipe.peft.spec.saves == "trained":  # only the trained tensors: the base first, then them
        label_kwargs = f", id2label={labels!r}, label2id={ {v: k for k, v in labels.items()}!r}" if labels else ""
        base = recipe.model.name_or_path
        load = (
            f'{loader}.from_pretrained("{base}"{label_kwargs})\n'
            "from huggingface_hub import hf_hub_download\nfrom safetensors.torch import load_file\n"
            f'model.load_state_dict(load_file(hf_hub_download("{repo}", "trained.safetensors")), strict=False)\n'
            "model.eval()"
        )
    return f"""```python
import torch
from {module} import {loader}
from transformers import AutoTokenizer

model = {load}
tokenizer = AutoTokenizer.from_pretrained("{repo}")
inputs = tokenizer(["a delightful film"], return_tensors="pt", truncation=True, max_length={recipe.data.max_length})
with torch.no_grad():
    probs = model(**inputs).logits.softmax(-1)[0]
print(model.config.id2label[int(probs.argmax())], float(probs.max()))
```
{note}
With lora_train: `python scripts/predict.py {repo} "a delightful film"`, `python scripts/eval.py {repo}`,
`python scripts/merge_adapter.py {repo} merged/` (standalone safetensors model).
"""


def model_card(
    recipe: Recipe, metrics: dict[str, Any], plot: Optional[str] = None, repo_id: Optional[str] = None
) -> str:
    """Hub-parsable YAML metadata, then results, recipe, hyperparameters, hardware, plot and usage.

    ``metrics`` is the final ``metrics.json`` (or an evaluation report); ``plot`` the file name of the
    learning curve beside the card; ``repo_id`` the Hub repo used in the usage snippet.
    """
    data = _card_data(recipe, metrics)
    base = recipe.model.name_or_path
    repo = repo_id or (recipe.output.hub_model_id if recipe.output.push_to_hub else None) or "PATH_TO_THIS_DIRECTORY"
    label_names = metrics.get("label_names") or list(metrics.get("per_class", {}))
    dataset_id, dataset_name, dataset_config, split = _dataset(recipe)
    source = (
        f"`{dataset_id}`" + (f" / `{dataset_config}`" if dataset_config else "")
        if dataset_id
        else f"local data `{recipe.data.path}`"
    )
    at_step = f", step {metrics['step']}" if "step" in metrics else ""
    base_link = f"[{base}](https://huggingface.co/{base})" if _is_hub_id(base) else f"`{base}` (a local directory)"
    adapter_note = {
        "adapter": "Only the adapter and the classification head are stored here (adapter-only weights).",
        "trained": "Only the tensors it trained are stored here (`trained.safetensors`); they apply to the base model.",
    }.get(recipe.peft.spec.saves, "")
    n_examples = metrics.get("eval_samples", metrics.get("num_samples", "?"))
    return f"""---
{data.to_yaml()}
---

# {data.model_name}

A text classifier fine-tuned from {base_link} with **{recipe.peft.method}**
{"on a 4-bit NF4 base (QLoRA) " if recipe.quantization.is_4bit else ""}by lora_train on {source}
(task `{recipe.data.task or "custom"}`, labels: {", ".join(label_names) or "?"}).
{adapter_note}

## Evaluation: split `{split}` of {dataset_name}, {n_examples} examples{at_step}

{_evaluation_tables(metrics)}

## Training

{f"![learning curve: loss and evaluation metrics against optimizer step]({plot})" if plot else ""}

| hyperparameter | value |
|---|---|
{_hyperparameters(recipe, metrics)}

{_training_facts(metrics)}

<details><summary>Full recipe (recipe.yaml)</summary>

```yaml
{recipe_to_yaml(recipe)}```
</details>

## Usage

{_usage(recipe, repo, label_names)}"""


def _evaluation_tables(metrics: dict[str, Any]) -> str:
    """The overall metrics table and the per-class one."""
    overall = (
        ("accuracy", _metric(metrics, "accuracy")),
        ("macro-F1", _metric(metrics, "macro_f1")),
        ("loss", _metric(metrics, "loss")),
    )
    rows = "\n".join(f"| {name} | {value:.4f} |" for name, value in overall if value is not None)
    per_class = "\n".join(
        f"| {name} | {c['precision']:.4f} | {c['recall']:.4f} | {c['f1']:.4f} | {c['support']} |"
        for name, c in metrics.get("per_class", {}).items()
    )
    return f"""| metric | value |
|---|---|
{rows}

| class | precision | recall | F1 | support |
|---|---|---|---|---|
{per_class}"""


def _training_facts(metrics: dict[str, Any]) -> str:
    """Trainable parameters, hardware, time and memory, as a Markdown list."""
    trainable = metrics.get("trainable_params")
    params_line = (
        f"- trainable parameters: {trainable:,} of {metrics['total_params']:,} ({metrics['trainable_percent']:.3f}%)"
        if trainable
        else "- trainable parameters: see the final run directory"
    )
    device = str(metrics.get("device", ""))
    memory_kind = "peak GPU memory allocated" if device.startswith("cuda") else "peak resident memory of the process"
    memory = metrics.get("peak_memory_mb")
    resumed = metrics.get("resumed_from_step")
    session = f" (this session, resumed at step {resumed})" if resumed else ""
    return f"""{params_line}
- hardware: {metrics.get("hardware", device or "?")}
- training time: {_duration(metrics.get("train_seconds_this_session"))}{session}
- {memory_kind}: {f"{memory:,.0f} MB" if isinstance(memory, (int, float)) else "?"}"""


def run_card(directory: Path, repo_id: Optional[str] = None) -> str:
    """Rebuild a run directory's card from its files (recipe.yaml, metrics.json, learning curve).

    A corrupt recipe raises :class:`~lora_train.config.RecipeError`, a corrupt metrics.json ``ValueError``; both
    name the file.
    """
    recipe = build_recipe(read_yaml(directory / "recipe.yaml"), source=str(directory / "recipe.yaml"))
    metrics_file = directory / "metrics.json"
    try:
        metrics = json.loads(metrics_file.read_text()) if metrics_file.is_file() else {}
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"'{metrics_file}' is corrupt: not valid JSON ({err}); a finished run rewrites it") from None
    plot = PLOT_NAME if (directory / PLOT_NAME).is_file() else None
    return model_card(recipe, metrics, plot=plot, repo_id=repo_id)
