"""PNG figures: the learning curve of a run, the confusion matrix of an evaluation, and the studies' plots.

A run's figures are drawn on matplotlib's Agg canvas directly (no pyplot, no display, no global state), so
they work on headless machines and from any thread; the studies' multi-panel figures use pyplot on Agg.
"""

from __future__ import annotations

import io
import os
from typing import Any, Sequence


def _png(fig) -> bytes:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    return buffer.getvalue()


def learning_curve_png(history: Sequence[dict[str, Any]], title: str = "") -> bytes:
    """Training loss (and evaluation loss) against step on the left, evaluation accuracy and macro-F1 on the right.

    ``history`` is the run's ``history.json``: training entries carry ``loss``, evaluation entries ``eval_*``.
    """
    from matplotlib.figure import Figure

    train = [(h["step"], h["loss"]) for h in history if "loss" in h]
    evals = [h for h in history if "eval_loss" in h]
    fig = Figure(figsize=(10, 4))
    loss_ax, metric_ax = fig.subplots(1, 2)
    if train:
        loss_ax.plot(*zip(*train), label="training loss", color="tab:blue", linewidth=1.2)
    if evals:
        loss_ax.plot(
            [h["step"] for h in evals],
            [h["eval_loss"] for h in evals],
            "o-",
            label="evaluation loss",
            color="tab:orange",
        )
        for key, label, color in (("eval_accuracy", "accuracy", "tab:green"), ("eval_macro_f1", "macro-F1", "tab:red")):
            metric_ax.plot([h["step"] for h in evals], [h[key] for h in evals], "o-", label=label, color=color)
    loss_ax.set(xlabel="optimizer step", ylabel="cross-entropy loss", title="loss")
    metric_ax.set(xlabel="optimizer step", ylabel="score", title="evaluation", ylim=(0, 1.02))
    for ax in (loss_ax, metric_ax):
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(loc="best")
    if title:
        fig.suptitle(title)
    return _png(fig)


def confusion_matrix_png(matrix: Sequence[Sequence[int]], label_names: Sequence[str], title: str = "") -> bytes:
    """Counts with true classes as rows and predicted classes as columns; colour = share of the true class."""
    import numpy as np
    from matplotlib.figure import Figure

    cm = np.asarray(matrix, dtype=np.int64)
    row_share = cm / np.maximum(cm.sum(axis=1, keepdims=True), 1)
    n = len(label_names)
    side = max(4.0, 0.8 * n + 2.5)
    fig = Figure(figsize=(side + 1, side))
    ax = fig.subplots()
    image = ax.imshow(row_share, cmap="Blues", vmin=0, vmax=1)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="share of the true class")
    for i in range(n):
        for j in range(n):
            ax.text(
                j,
                i,
                f"{cm[i, j]}\n{row_share[i, j]:.1%}",
                ha="center",
                va="center",
                fontsize=9,
                color="white" if row_share[i, j] > 0.5 else "black",
            )
    ax.set_xticks(range(n), labels=label_names, rotation=45 if n > 3 else 0, ha="right" if n > 3 else "center")
    ax.set_yticks(range(n), labels=label_names)
    ax.set(xlabel="predicted", ylabel="true", title=title or "confusion matrix")
    return _png(fig)


def pyplot():
    """matplotlib.pyplot on the headless Agg backend (study figures with several axes and legends)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def finish_plot(fig, ax, xlabel: str, ylabel: str, title: str, path: str | os.PathLike, fontsize: int = 8) -> None:
    """Labels, legend, grid; save the PNG and close the figure."""
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=fontsize)
    ax.legend(fontsize=fontsize - 1)
    ax.grid(alpha=0.3, which="both")
    fig.tight_layout()
    fig.savefig(path)
    pyplot().close(fig)
