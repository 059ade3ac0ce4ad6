"""Classification metrics through the ``evaluate`` API, computed locally (no Hub download).

``evaluate.load("accuracy")`` fetches a script from the Hub, which fails offline. This module defines
the metric in code as an ``evaluate.Metric`` subclass, so the usual ``add_batch`` / ``compute`` API
works anywhere.
"""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np


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
            names[i]: {"precision": float(precision[i]), "recall": float(recall[i]), "f1": float(f1[i]), "support": int(support[i])}
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
                features=datasets.Features({"predictions": datasets.Value("int64"), "references": datasets.Value("int64")}),
            )

        def _compute(self, predictions, references):
            return classification_report(predictions, references, self.num_labels, self.label_names)

    return ClassificationMetrics


def load_metric(num_labels: int, label_names: Optional[list[str]] = None):
    """A fresh in-memory ``evaluate.Metric`` for classification."""
    return _metric_class()(num_labels=num_labels, label_names=label_names, keep_in_memory=True)
