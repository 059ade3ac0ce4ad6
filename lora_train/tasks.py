"""Built-in text-classification tasks: where their data lives and how it is laid out."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional


@dataclass(frozen=True)
class TaskSpec:
    """Everything the loop needs to know about a task's dataset."""

    name: str
    hub_id: str
    """Canonical Hub dataset id (``owner/name``)."""
    hub_config: Optional[str]
    text_column: str
    label_column: str
    label_names: tuple[str, ...]
    train_split: str
    eval_split: str
    test_split: Optional[str]
    note: str = ""


TASKS: dict[str, TaskSpec] = {
    "sst2": TaskSpec(
        name="sst2",
        hub_id="nyu-mll/glue",
        hub_config="sst2",
        text_column="sentence",
        label_column="label",
        label_names=("negative", "positive"),
        train_split="train",
        eval_split="validation",
        test_split=None,
        note="GLUE hides the test labels (-1), so results are reported on validation.",
    ),
    "imdb": TaskSpec(
        name="imdb",
        hub_id="stanfordnlp/imdb",
        hub_config="plain_text",
        text_column="text",
        label_column="label",
        label_names=("neg", "pos"),
        train_split="train",
        eval_split="validation",
        test_split="test",
        note="No validation split: a stratified one is carved out of train (data.validation_fraction).",
    ),
    "emotion": TaskSpec(
        name="emotion",
        hub_id="dair-ai/emotion",
        hub_config="split",
        text_column="text",
        label_column="label",
        label_names=("sadness", "joy", "love", "anger", "fear", "surprise"),
        train_split="train",
        eval_split="validation",
        test_split="test",
    ),
}


LEGACY_DATASET_IDS: dict[str, str] = {"glue": "nyu-mll/glue", "imdb": "stanfordnlp/imdb", "emotion": "dair-ai/emotion"}
"""Short ids the Hub once served these datasets under, and the canonical repos they redirect to."""


def canonical_dataset_id(dataset_id: str) -> str:
    """The canonical Hub id of a dataset (legacy short ids such as ``glue`` map to ``nyu-mll/glue``)."""
    return LEGACY_DATASET_IDS.get(dataset_id, dataset_id)
