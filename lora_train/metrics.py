"""Classification metrics through the ``evaluate`` API, computed locally (no Hub download); evaluating a model
over a split; peak memory.

``evaluate.load("accuracy")`` fetches a script from the Hub, which fails offline. This module defines
the metric in code as an ``evaluate.Metric`` subclass, so the usual ``add_batch`` / ``compute`` API
works anywhere.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import numpy as np
import torch

from lora_train.progress import progress_bar


def confusion_matrix(predictions: Sequence[int], references: Sequence[int], num_labels: int) -> np.ndarray:
    """``cm[true, predicted]`` counts."""
    cm = np.zeros((num_labels, num_labels), dtype=np.int64)
    np.add.at(cm, (np.asarray(references, dtype=np.int64), np.asarray(predictions, dtype=np.int64)), 1)
    return cm


def classification_report(
    predictions: Sequence[int], references: Sequence[int], num_labels: int, label_names: Optional[list[str]] = None
) -> dict:
    """Accuracy, macro-F1, per-class precision / recall / F1 / support and the confusion matrix."""
    cm = confusion_matrix(predictions, references, num_labels)
    tp = np.diag(cm).astype(np.float64)
    predicted = cm.sum(axis=0)
    support = cm.sum(axis=1)
    precision = np.divide(tp, predicted, out=np.zeros_like(tp), where=predicted > 0)
    recall = np.divide(tp, support, out=np.zeros_like(tp), where=support > 0)
    denom = precision + recall
    f1 = np.divide(2 * precision * recall, denom, out=np.zeros_like(tp), where=denom > 0)
    names = label_names or [str(i) for i in range(num_labels)]
    present = support > 0  # macro-F1 over the classes that occur, as scikit-learn's labels=None does
    present |= predicted > 0
    return {
        "accuracy": float(tp.sum() / max(cm.sum(), 1)),
        "macro_f1": float(f1[present].mean()) if present.any() else 0.0,
        "per_class": {
            names[i]: {
                "precision": float(precision[i]),
                "recall": float(recall[i]),
                "f1": float(f1[i]),
                "support": int(support[i]),
            }
            for i in range(num_labels)
        },
        "confusion_matrix": cm.tolist(),
        "num_samples": int(cm.sum()),
    }


def _metric_class():
    import datasets
    import evaluate

    class ClassificationMetrics(evaluate.Metric):
        """Accuracy, macro-F1, per-class scores and confusion matrix, as an offline ``evaluate`` metric."""

        def __init__(self, num_labels: int, label_names: Optional[list[str]] = None, **kwargs):
            super().__init__(**kwargs)
            self.num_labels = num_labels
            self.label_names = label_names

        def _info(self) -> evaluate.MetricInfo:
            return evaluate.MetricInfo(
                description="Accuracy, macro-F1, per-class precision/recall/F1 and confusion matrix.",
                citation="",
                inputs_description="predictions and references: integer class ids",
                features=datasets.Features(
                    {"predictions": datasets.Value("int64"), "references": datasets.Value("int64")}
                ),
            )

        def _compute(self, predictions, references):
            return classification_report(predictions, references, self.num_labels, self.label_names)

    return ClassificationMetrics


def load_metric(num_labels: int, label_names: Optional[list[str]] = None):
    """A fresh in-memory ``evaluate.Metric`` for classification."""
    return _metric_class()(num_labels=num_labels, label_names=label_names, keep_in_memory=True)


def peak_memory_mb(device: torch.device) -> float:
    """CUDA max allocated on GPU, the process's peak RSS on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


@torch.no_grad()
def evaluate(
    model, loader: "torch.utils.data.DataLoader", accelerator, num_labels: int, label_names: list[str]
) -> dict[str, Any]:
    """Exact metrics over the whole split: ``gather_for_metrics`` drops the padding of the last batch."""
    model.eval()
    metric = load_metric(num_labels, label_names)
    total_loss, total_n = torch.zeros((), device=accelerator.device), 0
    # leave=False: inside training the bar disappears when done, under the training bar it interrupted
    for batch in progress_bar(loader, desc="eval", unit="batch", leave=False, disable=not accelerator.is_main_process):
        # Labels stay out of the forward: the loss is computed here, and a reloaded AdaLoRA model fails when
        # asked for its (training-only) orthogonality loss.
        outputs = model(**{k: v for k, v in batch.items() if k != "labels"})
        preds, refs = accelerator.gather_for_metrics((outputs.logits.argmax(-1), batch["labels"]))
        losses = accelerator.gather_for_metrics(
            torch.nn.functional.cross_entropy(outputs.logits.float(), batch["labels"], reduction="none")
        )
        total_loss += losses.sum()
        total_n += losses.numel()
        metric.add_batch(predictions=preds.cpu().numpy(), references=refs.cpu().numpy())
    model.train()
    report = metric.compute()
    report["loss"] = float(total_loss) / max(total_n, 1)
    return report
