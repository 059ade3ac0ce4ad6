"""The model card (README.md) saved beside every adapter and pushed to the Hub."""

from __future__ import annotations

from typing import Any

from lora_train.config import Recipe, recipe_to_yaml
from lora_train.tasks import TASKS


def _card_data(recipe: Recipe, metrics: dict[str, Any]):
    from huggingface_hub import EvalResult, ModelCardData

    task = TASKS.get(recipe.data.task or "")
    dataset_id = task.hub_id if task else (recipe.data.path or "custom")
    dataset_name = task.name if task else dataset_id
    results = []
    for metric, key in (("accuracy", "eval_accuracy"), ("f1", "eval_macro_f1")):
        if metrics.get(key) is not None:
            results.append(EvalResult(
                task_type="text-classification", dataset_type=dataset_id, dataset_name=dataset_name,
                dataset_config=task.hub_config if task else None, dataset_split=task.eval_split if task else recipe.data.eval_split,
                metric_type=metric, metric_name="macro-F1" if metric == "f1" else metric, metric_value=round(float(metrics[key]), 4),
            ))
    adapter = recipe.peft.method in ("lora", "adalora")
    return ModelCardData(
        base_model=recipe.model.name_or_path,
        library_name="peft" if adapter else "transformers",
        pipeline_tag="text-classification",
        datasets=[dataset_id],
        license="apache-2.0",
        tags=["lora_train", recipe.peft.method] + (["qlora", "nf4"] if recipe.quantization.method == "nf4" else []),
        model_name=f"{recipe.model.name_or_path.split('/')[-1]}-{dataset_name}-{recipe.peft.method}",
        eval_results=results or None,
    )


def model_card(recipe: Recipe, metrics: dict[str, Any], history: list[dict[str, Any]]) -> str:
    """Hub-parsable YAML metadata, then recipe, parameters, metrics and a usage snippet."""
    data = _card_data(recipe, metrics)
    pe = recipe.peft
    rows = "\n".join(
        f"| {name} | {metrics[key]:.4f} |" for name, key in (("accuracy", "eval_accuracy"), ("macro-F1", "eval_macro_f1"), ("loss", "eval_loss"))
        if isinstance(metrics.get(key), (int, float))
    )
    trainable = metrics.get("trainable_params")
    params_line = (
        f"Trainable parameters: {trainable:,} of {metrics['total_params']:,} ({metrics['trainable_percent']:.3f}%)."
        if trainable else ""
    )
    loader = "AutoPeftModelForSequenceClassification" if pe.method in ("lora", "adalora") else "AutoModelForSequenceClassification"
    module = "peft" if pe.method in ("lora", "adalora") else "transformers"
    return f"""---
{data.to_yaml()}
---

# {data.model_name}

Fine-tuned from [{recipe.model.name_or_path}](https://huggingface.co/{recipe.model.name_or_path}) with
**{pe.method}**{' on a 4-bit NF4 base (QLoRA)' if recipe.quantization.method == 'nf4' else ''} by
[lora_train](https://github.com/), task `{recipe.data.task or recipe.data.path}`.
{params_line}

## Evaluation ({metrics.get('eval_samples', '?')} examples)

| metric | value |
|---|---|
{rows}

## Training

- steps: {metrics.get('global_step', '?')}, global batch {metrics.get('global_batch_size', '?')}, processes {metrics.get('num_processes', '?')}, device {metrics.get('device', '?')}
- peak memory: {metrics.get('peak_memory_mb', float('nan')):.0f} MB

<details><summary>Recipe</summary>

```yaml
{recipe_to_yaml(recipe)}```
</details>

## Usage

```python
from {module} import {loader}
from transformers import AutoTokenizer

model = {loader}.from_pretrained("PATH_OR_REPO")
tokenizer = AutoTokenizer.from_pretrained("PATH_OR_REPO")
inputs = tokenizer(["a delightful film"], return_tensors="pt")
print(model.config.id2label[model(**inputs).logits.argmax(-1).item()])
```
"""
