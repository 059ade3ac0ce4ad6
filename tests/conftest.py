"""Shared fixtures: the real assets in ../shared (skipped when absent) and tiny random models built here."""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
HF_HUB = SHARED / "hf-hub"
DATA = SHARED / "data"
MINILM = "sentence-transformers/all-MiniLM-L6-v2"

HAS_SHARED = (HF_HUB / "models--sentence-transformers--all-MiniLM-L6-v2").is_dir() and (DATA / "sst2").is_dir()
needs_shared = pytest.mark.skipif(not HAS_SHARED, reason="needs the real assets in ../shared (data and hf-hub)")
HAS_HUB_DATA = all(
    (HF_HUB / f"datasets--{repo}").is_dir() for repo in ("nyu-mll--glue", "stanfordnlp--imdb", "dair-ai--emotion")
)
needs_hub_data = pytest.mark.skipif(not HAS_HUB_DATA, reason="needs the dataset repos in ../shared/hf-hub")

# Offline everywhere: tests never reach the Hub. The real checkpoint cache is used when present.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
if HAS_SHARED or HAS_HUB_DATA:
    os.environ["HF_HUB_CACHE"] = str(HF_HUB)

from lora_train.startup import prepare_process  # noqa: E402

prepare_process()  # as every program does, before any test module imports peft: bitsandbytes fetches no Hub kernel

POSITIVE = ["good", "great", "fine", "lovely", "superb", "nice", "fun", "brilliant"]
NEGATIVE = ["bad", "awful", "poor", "dull", "boring", "weak", "ugly", "terrible"]
FILLER = ["the", "movie", "film", "was", "a", "plot", "and", "actors", "story", "very", "quite", "it", "this", "is"]


def make_sentiment_rows(n: int, seed: int) -> list[dict]:
    """Synthetic two-class rows: the label is carried by one sentiment word among filler words."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        label = rng.randint(0, 1)
        words = rng.choices(FILLER, k=rng.randint(3, 12))
        words.insert(rng.randint(0, len(words)), rng.choice(POSITIVE if label else NEGATIVE))
        rows.append({"text": " ".join(words), "label": label})
    return rows


STORY_NAMES = ["Lily", "Tom", "Ben", "Sue", "Max", "Anna", "Tim", "Mia"]
STORY_PLACES = ["park", "garden", "house", "forest", "beach", "school"]
STORY_HAPPY = ["happy", "glad", "excited", "proud"]
STORY_SAD = ["sad", "scared", "angry", "upset"]
STORY_AFTER = [
    "They played with a ball.",
    "The sun was big.",
    "Then they went home.",
    "It was a nice day.",
    "A dog ran by.",
    "Mom gave them a cake.",
]


def make_story_rows(n: int, seed: int) -> list[dict]:
    """Two-class rows in the words of children's stories (what llama2c stories260K was trained on): the label is
    whether the character felt happy or sad, stated in the middle of the text, with 0-2 sentences after it (so a
    classifier must carry it to the last token it pools)."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        label = rng.randint(0, 1)
        name = rng.choice(STORY_NAMES)
        feeling = rng.choice(STORY_HAPPY if label else STORY_SAD)
        after = " ".join(rng.sample(STORY_AFTER, rng.randint(0, 2)))
        text = f"{name} went to the {rng.choice(STORY_PLACES)}. {name} was {feeling}. {after}".strip()
        rows.append({"text": text, "label": label})
    return rows


def write_splits(directory: Path, make_rows, sizes: tuple[int, int, int] = (512, 128, 128)) -> Path:
    """A local dataset directory ({split}.parquet) of ``make_rows(n, seed)`` for train, validation and test."""
    import pandas as pd

    for split, n, seed in zip(("train", "validation", "test"), sizes, (1, 2, 3)):
        pd.DataFrame(make_rows(n, seed)).to_parquet(directory / f"{split}.parquet")
    return directory


@pytest.fixture(scope="session")
def toy_data_dir(tmp_path_factory) -> Path:
    """A local dataset directory ({split}.parquet) of synthetic sentiment rows."""
    return write_splits(tmp_path_factory.mktemp("toy_data"), make_sentiment_rows)


def _word_tokenizer(directory: Path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {
        tok: i for i, tok in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + POSITIVE + NEGATIVE + FILLER)
    }
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    from tokenizers.processors import TemplateProcessing

    backend.post_processor = TemplateProcessing(single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        unk_token="[UNK]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
        model_max_length=64,
    )
    tok.save_pretrained(directory)
    return tok


def save_tiny_bert(directory: Path, with_pooler: bool, seed: int) -> Path:
    """A randomly initialised 2-layer BERT (hidden 64; bitsandbytes CPU kernels need in_features >= 64) with a
    word-level tokenizer, saved as safetensors in ``directory``."""
    import torch
    from transformers import BertConfig, BertModel

    tok = _word_tokenizer(directory)
    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=len(tok),
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=128,
        max_position_embeddings=64,
        pad_token_id=tok.pad_token_id,
    )
    BertModel(config, add_pooling_layer=with_pooler).save_pretrained(directory, safe_serialization=True)
    return directory


@pytest.fixture(scope="session")
def tiny_bert_dir(tmp_path_factory) -> Path:
    """The tiny BERT saved without a pooler, so the pooler and the classifier are the new head modules that get
    trained."""
    return save_tiny_bert(tmp_path_factory.mktemp("tiny_bert"), with_pooler=False, seed=0)


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory) -> Path:
    """A randomly initialised 2-layer Llama (hidden 64) without a pad token, as decoder classifiers ship."""
    import torch
    from transformers import LlamaConfig, LlamaModel

    directory = tmp_path_factory.mktemp("tiny_llama")
    tok = _word_tokenizer(directory)
    tok.pad_token = None
    tok.eos_token = "[SEP]"
    tok.save_pretrained(directory)
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        eos_token_id=3,
        bos_token_id=2,
        pad_token_id=None,
    )
    LlamaModel(config).save_pretrained(directory, safe_serialization=True)
    return directory


@pytest.fixture(autouse=True)
def fresh_accelerator_state():
    """Forget Accelerate's process-wide state after each test: it keeps the first Accelerator's mixed precision and
    refuses another in the same process, so a bf16 run would break every later float32 run."""
    yield
    reset_accelerator_state()


def reset_accelerator_state() -> None:
    """Let the next ``train()`` in this process create its Accelerator with its own mixed precision."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)


def script(name: str):
    """scripts/<name>.py as a module (its ``main(argv)`` is what the command line runs)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"script_{name}", ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def write_recipe(path: Path, sections: dict) -> Path:
    """Write a recipe YAML file from nested dicts."""
    path.write_text(yaml.safe_dump(sections, sort_keys=False))
    return path


def tiny_recipe(model_dir: Path, data_dir: Path, output_dir: Path, **sections) -> dict:
    """A recipe dict for a fast CPU run of a tiny model on the synthetic data; ``sections`` update it."""
    recipe = {
        "model": {"name_or_path": str(model_dir), "attn_implementation": "eager"},
        "peft": {"method": "lora", "r": 4, "alpha": 8, "dropout": 0.0, "target_modules": ["query", "value"]},
        "data": {
            "task": None,
            "path": str(data_dir),
            "text_column": "text",
            "label_names": ["neg", "pos"],
            "max_length": 32,
        },
        "training": {
            "num_epochs": 2,
            "per_device_train_batch_size": 16,
            "learning_rate": 5e-3,
            "logging_steps": 4,
            "warmup_ratio": 0.0,
            "seed": 0,
        },
        "output": {"output_dir": str(output_dir), "report_to": []},
    }
    for section, values in sections.items():
        recipe.setdefault(section, {}).update(values)
    return recipe


def reload_accuracy(run_dir: Path, texts: list[str], labels, max_length: int) -> float:
    """Reload a saved adapter the way users do and return its accuracy on ``texts`` (see :func:`reload_logits`)."""
    import numpy as np

    return float((reload_logits(run_dir, texts, max_length).argmax(-1) == np.asarray(labels)).mean())


def reload_logits(run_dir: Path, texts: list[str], max_length: int):
    """Reload a saved adapter the way users do (AutoPeftModelForSequenceClassification; NF4 again when the
    run was NF4, with the same skip list; bf16 autocast when the run used it) in this one process and return its
    logits on ``texts``."""
    import numpy as np
    import torch
    from peft import AutoPeftModelForSequenceClassification
    from transformers import AutoTokenizer

    from lora_train.config import load_recipe
    from lora_train.heads import head_linear_names
    from lora_train.modeling import (
        keep_4bit_training_layout,
        load_model_config,
        meta_model,
        quantization_config,
    )

    recipe = load_recipe(run_dir / "recipe.yaml")
    tokenizer = AutoTokenizer.from_pretrained(run_dir)
    kwargs = {"pad_token_id": tokenizer.pad_token_id}  # decoders ship without one; the run's tokenizer has it
    if recipe.quantization.method == "nf4":
        kwargs["quantization_config"] = quantization_config(
            recipe, head_linear_names(meta_model(load_model_config(recipe)))
        )
    model = AutoPeftModelForSequenceClassification.from_pretrained(run_dir, **kwargs).eval()
    keep_4bit_training_layout(
        model
    )  # bitsandbytes would repack NF4 weights with bf16-rounded scales on AVX512-BF16 CPUs
    # Under the run's bf16 autocast when it trained with one, as its own evaluation did (fp32 differs in the 4th digit).
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=recipe.training.mixed_precision == "bf16")
    logits = []
    with torch.no_grad(), autocast:
        for i in range(0, len(texts), 128):
            enc = tokenizer(
                texts[i : i + 128], padding=True, truncation=True, max_length=max_length, return_tensors="pt"
            )
            logits.append(model(**enc).logits.float().numpy())
    return np.concatenate(logits)
