"""The LoRA studies, one command each: ``python scripts/study.py {rank,regimes,quant,peft_methods,toy}``.

Each study is a list of sweep arms over one recipe (see :mod:`lora_lab.sweep`; finished runs are
skipped, so a command resumes) followed by an analysis that writes its tables (CSV + Markdown) and plots
into the study's directory, copies the plots to ``--figures``, and writes ``report.md`` for docs/results.md.
"""

from __future__ import annotations

import json
import logging
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

# The torch-importing modules of lora_train are imported inside the functions that use them, as torch itself is:
# importing this module (a command's --help, a test) stays light.
from lora_lab import sweep
from lora_train.config import load_recipe
from lora_train.machine import machine_info
from lora_train.plots import finish_plot, pyplot

logger = logging.getLogger("lora_lab.studies")

RANKS = (1, 2, 4, 8, 16, 32)


@dataclass
class Study:
    """A named grid of runs over one recipe and the analysis of its results."""

    name: str
    recipe: str
    arms: Callable[[int], list[tuple[str, list[str]]]]
    """Seeds -> (arm, axes) pairs in run order."""
    analyse: Callable[["Study", list[dict[str, Any]], Path, Path], str]
    """(study, rows, study dir, figures dir) -> the Markdown report."""
    seeds: int = 1
    extra_runs: Optional[Callable[[Path], None]] = None
    """Work outside the training loop (e.g. frozen features + logistic regression), run before the sweep."""


# ---------------------------------------------------------------------------------------------
# Study 1: rank sweep on SST-2


HEAD_POOLER = "peft.modules_to_save=[pooler,classifier]"
"""Head-only that also trains BERT's pooler (dense + tanh on [CLS]): the analogue of DistilBERT's pre_classifier +
classifier, the two layers a DistilBERT head-only run trains."""


def rank_arms(seeds: int) -> list[tuple[str, list[str]]]:
    """Head-only (classifier; pooler + classifier), full fine-tuning, LoRA with alpha = 2r and with alpha fixed at
    16, seed-major.

    Every arm's first seed runs before any second seed, and the fixed-alpha arm (a side curve) gets its
    extra seeds last, so a study stopped early still has a balanced main comparison.
    """
    ranks = ",".join(map(str, RANKS))
    arms = []
    for seed in range(seeds):
        arms += [
            ("head_only", ["peft.method=head_only", f"training.seed={seed}"]),
            ("head_pooler", ["peft.method=head_only", HEAD_POOLER, f"training.seed={seed}"]),
            ("full", ["peft.method=full", "training.learning_rate=1e-4", f"training.seed={seed}"]),
            ("lora_alpha_2r", ["peft.method=lora", f"peft.r={ranks}", "peft.alpha=2*peft.r", f"training.seed={seed}"]),
        ]
        if seed == 0:
            arms.append(
                ("lora_alpha_16", ["peft.method=lora", f"peft.r={ranks}", "peft.alpha=16", f"training.seed={seed}"])
            )
    arms += [
        ("lora_alpha_16", ["peft.method=lora", f"peft.r={ranks}", "peft.alpha=16", f"training.seed={seed}"])
        for seed in range(1, seeds)
    ]
    return arms


ARM_LABELS = {
    "head_only": "head-only (classifier)",
    "head_pooler": "head-only (pooler + classifier)",
    "full": "full fine-tuning",
    "lora_alpha_2r": r"LoRA $\alpha=2r$",
    "lora_alpha_16": r"LoRA $\alpha=16$",
}


def data_setting(recipe_path: str) -> str:
    """``2,048 sst2 rows, 1 epoch(s)``: the training budget of a study recipe, for titles."""
    recipe = load_recipe(recipe_path)
    rows = f"{recipe.data.max_train_samples:,}" if recipe.data.max_train_samples else "all"
    return f"{rows} {recipe.data.task or 'train'} rows, {recipe.training.num_epochs:g} epoch(s)"


def _by_arm(summary: Sequence[dict[str, Any]], arm: str) -> list[dict[str, Any]]:
    rows = [row for row in summary if row["arm"] == arm]
    return sorted(rows, key=lambda row: int(row.get("peft.r") or 0))


def eval_curve(run_dir: Path) -> list[tuple[int, float]]:
    """(step, validation accuracy) of every evaluation a run logged."""
    history = json.loads((run_dir / "history.json").read_text())
    return [(h["step"], h["eval_accuracy"]) for h in history if "eval_accuracy" in h]


def over_seeds(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per arm: the mean (and sample std) over its seeds of every result column, and n."""
    return sweep.aggregate(rows, "training.seed")


def _mean_std(row: dict[str, Any], key: str, factor: float = 100, fmt: str = ".1f", single: str = " (1 seed)") -> str:
    """``81.2 ± 0.4`` (``factor`` x the mean over seeds ± the std), or ``81.2`` + ``single`` where there is nothing
    to take a std of (one run)."""
    value = f"{factor * row[key]:{fmt}}"
    return value + single if row["n"] == 1 else f"{value} ± {factor * row[key + '_std']:{fmt}}"


def pareto_front(points: Sequence[tuple[float, float]]) -> list[tuple[float, float]]:
    """The points no other point beats with fewer or equal parameters and higher accuracy, by parameters."""
    front, best = [], -1.0
    for params, acc in sorted(points, key=lambda p: (p[0], -p[1])):
        if acc > best:
            front.append((params, acc))
            best = acc
    return front


def analyse_rank(study: Study, rows: list[dict[str, Any]], out: Path, figures: Path) -> str:
    """Study 1: accuracy vs rank (alpha = 2r and alpha = 16), vs trainable parameters, learning curves."""
    plt = pyplot()
    summary = over_seeds(rows)
    columns = [
        "arm",
        "peft.r",
        "peft.alpha",
        "n",
        "trainable_params",
        "eval_accuracy",
        "eval_accuracy_std",
        "best_eval_accuracy",
        "train_seconds",
        "train_samples_per_s",
    ]
    sweep.write_table(rows, out / "results.csv", out / "results.md")
    sweep.write_table(summary, out / "summary.csv", out / "summary.md", columns)
    baselines = {arm: _by_arm(summary, arm) for arm in ("head_only", "head_pooler", "full")}
    setting = data_setting(study.recipe)

    fig, ax = plt.subplots(figsize=(5.2, 3.5), dpi=100)
    for arm, style, label in (
        ("lora_alpha_2r", "o-", r"LoRA, $\alpha = 2r$"),
        ("lora_alpha_16", "s--", r"LoRA, $\alpha = 16$ fixed"),
    ):
        points = _by_arm(summary, arm)
        if points:
            ax.errorbar(
                [int(p["peft.r"]) for p in points],
                [100 * p["eval_accuracy"] for p in points],
                yerr=[100 * p["eval_accuracy_std"] for p in points],
                fmt=style,
                capsize=3,
                label=label,
            )
    for (arm, points), color in zip(baselines.items(), ("tab:gray", "tab:olive", "tab:red")):
        if points:
            mean, std = 100 * points[0]["eval_accuracy"], 100 * points[0]["eval_accuracy_std"]
            ax.axhline(mean, color=color, lw=1, label=f"{ARM_LABELS[arm]} ({mean:.1f})")
            ax.axhspan(mean - std, mean + std, color=color, alpha=0.12)
    ax.set_xscale("log", base=2)
    ax.set_xticks(RANKS, [str(r) for r in RANKS])
    finish_plot(
        fig,
        ax,
        "LoRA rank r (query, value)",
        "SST-2 validation accuracy (%)",
        f"all-MiniLM-L6-v2, {setting}; mean ± std over seeds",
        figures / "study1_accuracy_vs_rank.png",
    )

    fig, ax = plt.subplots(figsize=(5.2, 3.5), dpi=100)
    points = []
    for arm, marker in (
        ("head_only", "v"),
        ("head_pooler", "^"),
        ("full", "D"),
        ("lora_alpha_2r", "o"),
        ("lora_alpha_16", "s"),
    ):
        arm_points = _by_arm(summary, arm)
        xs = [p["trainable_params"] for p in arm_points]
        ys = [100 * p["eval_accuracy"] for p in arm_points]
        points += list(zip(xs, ys))
        if xs:
            ax.errorbar(
                xs,
                ys,
                yerr=[100 * p["eval_accuracy_std"] for p in arm_points],
                fmt=marker,
                capsize=2,
                label=ARM_LABELS[arm],
            )
    front = pareto_front(points)
    ax.step(
        [p[0] for p in front], [p[1] for p in front], where="post", color="k", lw=1, alpha=0.6, label="Pareto frontier"
    )
    ax.set_xscale("log")
    finish_plot(
        fig,
        ax,
        "trainable parameters (log)",
        "SST-2 validation accuracy (%)",
        f"Accuracy vs trainable parameters ({setting})",
        figures / "study1_pareto.png",
    )

    fig, ax = plt.subplots(figsize=(5.2, 3.5), dpi=100)
    curves = {
        "head-only": ("head_only", None),
        "pooler + head": ("head_pooler", None),
        "full FT": ("full", None),
        "LoRA r=1": ("lora_alpha_2r", "1"),
        "LoRA r=8": ("lora_alpha_2r", "8"),
        "LoRA r=32": ("lora_alpha_2r", "32"),
        r"LoRA r=1, $\alpha$=16": ("lora_alpha_16", "1"),
        r"LoRA r=32, $\alpha$=16": ("lora_alpha_16", "32"),
    }
    for label, (arm, r) in curves.items():
        members = [row for row in rows if row["arm"] == arm and (r is None or row.get("peft.r") == r)]
        if not members:
            continue
        per_seed = [dict(eval_curve(out / row["run"])) for row in members]
        steps = sorted(set.intersection(*(set(c) for c in per_seed)))
        ax.plot(
            steps,
            [100 * statistics.mean(c[s] for c in per_seed) for s in steps],
            "o-",
            ms=3,
            label=f"{label} (n={len(members)})",
        )
    finish_plot(
        fig,
        ax,
        "optimizer step (batch 32)",
        "SST-2 validation accuracy (%)",
        f"Validation accuracy during training ({setting})",
        figures / "study1_learning_curves.png",
    )

    lines = [
        "| regime | r | alpha | seeds | trainable params | final val. accuracy (%), mean ± std |"
        " best-during-run acc. (%) | train s (mean) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in summary:
        lines.append(
            f"| {row['arm']} | {row.get('peft.r', '')} | {row.get('peft.alpha', '')} | {row['n']} |"
            f" {row['trainable_params']:,.0f} |"
            f" {_mean_std(row, 'eval_accuracy')} | {100 * row['best_eval_accuracy']:.1f} |"
            f" {row['train_seconds']:.0f} |"
        )
    return (
        "\n".join(lines)
        + "\n\n"
        + "\n".join(
            f"![{name}](figures/{name}.png)"
            for name in ("study1_accuracy_vs_rank", "study1_pareto", "study1_learning_curves")
        )
        + "\n"
    )


# ---------------------------------------------------------------------------------------------
# Study 2: frozen features + logistic regression vs full fine-tuning vs LoRA (emotion)


def frozen_features(recipe_path: str, out_dir: Path) -> dict[str, Any]:
    """Mean-pooled embeddings of the frozen base model + scikit-learn LogisticRegression, on the recipe's data.

    Uses the recipe's model, data subset and max_length, so it sees exactly the rows the trained arms see.
    Writes ``metrics.json`` (the training loop's keys: eval_accuracy, eval_macro_f1, trainable_params,
    train_seconds_this_session = feature extraction + fit, peak_memory_mb = peak RSS) and returns it.
    """
    import numpy as np
    import torch
    from sklearn.linear_model import LogisticRegression
    from transformers import AutoModel

    from lora_train.build import load_task_data
    from lora_train.metrics import classification_report, peak_memory_mb
    from lora_train.modeling import load_tokenizer

    recipe = load_recipe(recipe_path)
    torch.manual_seed(recipe.training.seed)
    data = load_task_data(recipe)
    spec, train_raw, eval_raw, label_names = data.spec, data.train, data.eval, data.label_names
    tokenizer = load_tokenizer(recipe)
    model = AutoModel.from_pretrained(recipe.model.name_or_path, revision=recipe.model.revision).eval()

    @torch.no_grad()
    def embed(texts: list[str]) -> np.ndarray:
        chunks = []
        for i in range(0, len(texts), recipe.training.per_device_eval_batch_size):
            enc = tokenizer(
                texts[i : i + recipe.training.per_device_eval_batch_size],
                padding=True,
                truncation=True,
                max_length=recipe.data.max_length,
                return_tensors="pt",
            )
            hidden = model(**enc).last_hidden_state
            mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            chunks.append(((hidden * mask).sum(1) / mask.sum(1)).numpy())  # mean over real tokens
        return np.concatenate(chunks)

    start = time.perf_counter()
    x_train = embed(list(train_raw[spec.text_column]))
    classifier = LogisticRegression(max_iter=2000).fit(x_train, np.asarray(train_raw[spec.label_column]))
    train_seconds = time.perf_counter() - start
    predictions = classifier.predict(embed(list(eval_raw[spec.text_column])))
    report = classification_report(predictions, eval_raw[spec.label_column], len(label_names), label_names)
    metrics = {
        "eval_accuracy": report["accuracy"],
        "eval_macro_f1": report["macro_f1"],
        "eval_samples": report["num_samples"],
        "per_class": report["per_class"],
        "confusion_matrix": report["confusion_matrix"],
        "best_eval_accuracy": report["accuracy"],
        "train_seconds_this_session": train_seconds,
        "peak_memory_mb": peak_memory_mb(torch.device("cpu")),
        "trainable_params": int(classifier.coef_.size + classifier.intercept_.size),
        "train_examples": len(train_raw),
        "label_names": label_names,
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=1))
    return metrics


FEATURES_RUN = "frozen_features_logreg"


def regimes_extra(study: Study, root: Path) -> None:
    """Run the frozen-features baseline in its own process (clean peak RSS), unless it is done."""
    run = sweep.Run({}, root / FEATURES_RUN, "frozen_features")
    if (run.out_dir / "metrics.json").exists():
        return
    code = (
        "from pathlib import Path; from lora_lab.studies import frozen_features;"
        f" frozen_features({study.recipe!r}, Path({str(run.out_dir)!r}))"
    )
    logger.info("%s: extracting features and fitting the logistic regression", FEATURES_RUN)
    if sweep.execute([sys.executable, "-c", code], run, root / "logs") != 0:
        raise RuntimeError(f"{FEATURES_RUN} failed; see {root / 'logs' / (FEATURES_RUN + '.log')}")


def regimes_arms(seeds: int) -> list[tuple[str, list[str]]]:
    """Full fine-tuning and LoRA on query/key/value, per seed; then LoRA that also trains the pooler (full
    fine-tuning trains it, LoRA by default keeps BERT's pretrained pooler frozen)."""
    arms = []
    for seed in range(seeds):
        arms += [
            ("full", ["peft.method=full", "training.learning_rate=1e-4", f"training.seed={seed}"]),
            ("lora_qkv", ["peft.method=lora", f"training.seed={seed}"]),
        ]
    arms += [("lora_qkv_pooler", ["peft.method=lora", HEAD_POOLER, f"training.seed={seed}"]) for seed in range(seeds)]
    return arms


def comparison_table(arms: Sequence[dict[str, Any]], label: Callable[[dict[str, Any]], str]) -> str:
    """A Markdown table of one row per arm (mean ± std over seeds): accuracy, macro-F1, time, throughput, memory."""
    lines = [
        "| arm | seeds | accuracy (%) | macro-F1 (%) | train s | train samples/s | peak memory MB |"
        " trainable params | run wall s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in arms:
        rate, wall = row.get("train_samples_per_s"), row.get("wall_seconds")
        lines.append(
            f"| {label(row)} | {row['n']} | {_mean_std(row, 'eval_accuracy', single='')} |"
            f" {_mean_std(row, 'eval_macro_f1', single='')} | {_mean_std(row, 'train_seconds', 1, '.0f', '')} |"
            f" {'' if rate is None else f'{rate:.0f}'} |"
            f" {row['peak_memory_mb']:.0f} | {row['trainable_params']:,.0f} | {'' if wall is None else f'{wall:.0f}'} |"
        )
    return "\n".join(lines) + "\n"


def bar_panels(
    arms: Sequence[dict[str, Any]],
    labels: Sequence[str],
    path: Path,
    title: str,
    panels: Sequence[tuple[str, str, float]],
) -> None:
    """One bar chart per metric (key, axis label, factor), side by side; error bars are the std over seeds."""
    plt = pyplot()
    fig, axes = plt.subplots(1, len(panels), figsize=(2.3 * len(panels), 3.0), dpi=100)
    for ax, (key, ylabel, factor) in zip(axes, panels):
        values = [factor * (row.get(key) or 0) for row in arms]
        errors = [factor * (row.get(key + "_std") or 0) for row in arms]
        bars = ax.bar(range(len(arms)), values, yerr=errors, capsize=2, color=[f"C{i}" for i in range(len(arms))])
        ax.bar_label(bars, fmt="%.1f" if factor == 100 else "%.0f", fontsize=6)
        ax.set_xticks(range(len(arms)), labels, rotation=35, ha="right", fontsize=7)
        ax.set_ylabel(ylabel, fontsize=8)
        if key == "trainable_params":
            ax.set_yscale("log")
        ax.tick_params(axis="y", labelsize=7)
        ax.grid(alpha=0.3, axis="y")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def analyse_regimes(study: Study, rows: list[dict[str, Any]], out: Path, figures: Path) -> str:
    """Study 2: frozen features + LogReg, full fine-tuning and LoRA side by side (mean ± std over seeds)."""
    features = sweep.read_result(sweep.Run({}, out / FEATURES_RUN, "frozen_features"))
    rows = ([features] if features else []) + rows
    sweep.write_table(rows, out / "results.csv", out / "results.md")
    arms = over_seeds(rows)
    names = {
        "frozen_features": "frozen features + LogReg",
        "full": "full fine-tuning",
        "lora_qkv": "LoRA q,k,v",
        "lora_qkv_pooler": "LoRA q,k,v + pooler",
    }
    labels = [names.get(row["arm"], row["arm"]) for row in arms]
    bar_panels(
        arms,
        labels,
        figures / "study2_regimes.png",
        f"all-MiniLM-L6-v2, {data_setting(study.recipe)} (6 classes)",
        [
            ("eval_accuracy", "val. accuracy (%)", 100),
            ("eval_macro_f1", "val. macro-F1 (%)", 100),
            ("train_seconds", "train time (s)", 1),
            ("peak_memory_mb", "peak RSS (MB)", 1),
            ("trainable_params", "trainable params", 1),
        ],
    )
    return (
        comparison_table(arms, lambda row: labels[arms.index(row)])
        + "\n![study2_regimes](figures/study2_regimes.png)\n"
    )


# ---------------------------------------------------------------------------------------------
# Study 3: LoRA vs QLoRA (NF4, with and without double quantization) vs AdaLoRA


ADALORA = ["peft.method=adalora", "quantization.method=none", "training.learning_rate=6e-3"]
"""AdaLoRA's singular values start at 0: at LoRA's 2e-3 it does not move in 64 steps (measured), so it gets the rate
of recipes/cpu/sst2_adalora.yaml."""


def quant_arms(seeds: int) -> list[tuple[str, list[str]]]:
    """LoRA r=8, QLoRA r=8 (double quant on / off) and AdaLoRA 12 -> 8 (same final rank budget), per seed; then
    LoRA and AdaLoRA on a 4-epoch schedule, since AdaLoRA's rank allocation needs more steps than 64."""
    arms = []
    for seed in range(seeds):
        s = f"training.seed={seed}"
        arms += [
            ("lora", ["peft.method=lora", "quantization.method=none", s]),
            ("qlora_nf4_dq", ["peft.method=lora", "quantization.method=nf4", "quantization.double_quant=true", s]),
            ("qlora_nf4", ["peft.method=lora", "quantization.method=nf4", "quantization.double_quant=false", s]),
            ("adalora", [*ADALORA, s]),
        ]
    for seed in range(seeds):
        s = f"training.seed={seed}"
        arms += [
            ("lora_4ep", ["peft.method=lora", "quantization.method=none", "training.num_epochs=4", s]),
            ("adalora_4ep", [*ADALORA, "training.num_epochs=4", s]),
        ]
    return arms


def analyse_quant(study: Study, rows: list[dict[str, Any]], out: Path, figures: Path) -> str:
    """Study 3: accuracy, peak memory and time of LoRA, QLoRA (NF4 +/- double quant) and AdaLoRA
    (mean ± std over seeds)."""
    sweep.write_table(rows, out / "results.csv", out / "results.md")
    arms = over_seeds(rows)
    names = {
        "lora": "LoRA r=8 (fp32 base)",
        "qlora_nf4_dq": "QLoRA NF4 + double quant",
        "qlora_nf4": "QLoRA NF4",
        "adalora": "AdaLoRA 12 -> 8",
        "lora_4ep": "LoRA r=8, 4 epochs",
        "adalora_4ep": "AdaLoRA 12 -> 8, 4 epochs",
    }
    labels = [names[row["arm"]] for row in arms]
    bar_panels(
        arms,
        labels,
        figures / "study3_quant.png",
        f"all-MiniLM-L6-v2, {data_setting(study.recipe)} (the '4 epochs' arms: 4)",
        [
            ("eval_accuracy", "val. accuracy (%)", 100),
            ("peak_memory_mb", "peak RSS (MB)", 1),
            ("train_seconds", "train time (s)", 1),
            ("train_samples_per_s", "train samples/s", 1),
        ],
    )
    footprints = weight_footprints(study.recipe, out / "weight_footprints.json")
    lines = ["| base weights | in-memory footprint (MB, `get_memory_footprint`) |", "|---|---|"]
    lines += [f"| {name} | {mb:.2f} |" for name, mb in footprints.items()]
    return (
        comparison_table(arms, lambda row: labels[arms.index(row)])
        + "\n![study3_quant](figures/study3_quant.png)\n\n"
        + "\n".join(lines)
        + "\n"
    )


def weight_footprints(recipe_path: str, cache: Path) -> dict[str, float]:
    """The base model's weight memory (parameters + buffers) in fp32, NF4 and NF4 + double quant, cached in ``cache``.

    Peak RSS on a CPU mixes the weights with the Python, torch and data footprint; this isolates the weights.
    """
    if cache.exists():
        return json.loads(cache.read_text())
    from lora_train.build import build_classifier
    from lora_train.modeling import load_tokenizer

    sizes = {}
    for name, overrides in (
        ("float32", ["quantization.method=none"]),
        ("NF4", ["quantization.method=nf4", "quantization.double_quant=false"]),
        ("NF4 + double quant", ["quantization.method=nf4", "quantization.double_quant=true"]),
    ):
        recipe = load_recipe(recipe_path, overrides)
        model = build_classifier(recipe, ["negative", "positive"], load_tokenizer(recipe))
        sizes[name] = model.get_memory_footprint() / 2**20
        del model
    cache.write_text(json.dumps(sizes, indent=1))
    return sizes


# ---------------------------------------------------------------------------------------------
# Study 4: every PEFT method at one training budget (SST-2 and emotion)


PEFT_METHODS: dict[str, tuple[str, list[str]]] = {
    "lora": ("LoRA r=8 (q, v)", ["peft.method=lora", "training.learning_rate=2e-3"]),
    "dora": ("DoRA r=8", ["peft.method=lora", "peft.use_dora=true", "training.learning_rate=2e-3"]),
    "rslora": ("rsLoRA r=8", ["peft.method=lora", "peft.use_rslora=true", "training.learning_rate=2e-3"]),
    "pissa": (
        "LoRA r=8, PiSSA init",
        ["peft.method=lora", "peft.init_lora_weights=pissa", "training.learning_rate=2e-3"],
    ),
    "olora": (
        "LoRA r=8, OLoRA init",
        ["peft.method=lora", "peft.init_lora_weights=olora", "training.learning_rate=2e-3"],
    ),
    "ia3": (
        "IA3 (k, v, ffn)",
        [
            "peft.method=ia3",
            "peft.target_modules=[key,value,output.dense]",
            "peft.feedforward_modules=[output.dense]",
            "training.learning_rate=1e-2",
        ],
    ),
    "vera": ("VeRA r=256 (q, v)", ["peft.method=vera", "peft.r=256", "training.learning_rate=4e-3"]),
    "prompt_tuning": ("prompt tuning (20 tokens)", ["peft.method=prompt_tuning", "training.learning_rate=3e-2"]),
    "bitfit": ("BitFit (biases + head)", ["peft.method=bitfit", "training.learning_rate=2e-3"]),
    "full": ("full fine-tuning", ["peft.method=full", "training.learning_rate=1e-4"]),
    "full_llrd": (
        "full FT, layer LR decay 0.8",
        ["peft.method=full", "training.layer_lr_decay=0.8", "training.learning_rate=1e-4"],
    ),
}
"""Arm -> (label, overrides). Learning rates: the LoRA family at Study 1's 2e-3 (PiSSA / OLoRA papers keep LoRA's
rate); IA3 and prompt tuning train a few scaling vectors / embeddings from a neutral start and need larger steps
(1e-2, 3e-2, the range of the IA3 and prompt-tuning papers' AdamW settings); VeRA 4e-3 (its paper's rate for the
scaling vectors of RoBERTa-base on GLUE, rank 256 of the shared projections as there); BitFit 2e-3; full
fine-tuning Study 1's 1e-4 with and without layer-wise decay (head 1e-4 ... embeddings 1e-4 x 0.8^7 = 2.1e-5)."""

STUDY_DATASETS = {"sst2": [], "emotion": ["data.task=emotion", "data.path=dair-ai/emotion", "data.config_name=split"]}
"""The datasets (on top of the recipe's SST-2) each method is trained on."""

NOT_RUN = {
    "prefix_tuning": "refused at start: peft 0.21 passes the prefix as `past_key_values`, which transformers 5's BERT"
    " no longer takes (and a BERT encoder attends to no key/value cache)",
    "LoRA, LoftQ init": "refused on CPU: peft's LoftQ code runs on CUDA / XPU only",
}
"""Methods of the schema that cannot run in this study, and why (each is refused by the recipe checks)."""


def peft_method_arms(seeds: int) -> list[tuple[str, list[str]]]:
    """Every method on every dataset, seed-major (all first seeds first, so an early stop leaves a balanced table)."""
    return [
        (f"{dataset}/{arm}", [*data, *overrides, f"training.seed={seed}"])
        for seed in range(seeds)
        for dataset, data in STUDY_DATASETS.items()
        for arm, (_, overrides) in PEFT_METHODS.items()
    ]


def saved_megabytes(run_dir: Path) -> float:
    """Size of what a run saves to be used again: the adapter file, the trained tensors (bitfit / head_only), or the
    whole model (full)."""
    files = [run_dir / name for name in ("adapter_model.safetensors", "trained.safetensors", "model.safetensors")]
    return next(f.stat().st_size for f in files if f.exists()) / 1e6


def analyse_peft_methods(study: Study, rows: list[dict[str, Any]], out: Path, figures: Path) -> str:
    """Study 4: accuracy and macro-F1 against trainable parameters, saved size, time and memory, per dataset."""
    plt = pyplot()
    for row in rows:
        row["saved_mb"] = saved_megabytes(out / row["run"])
    sweep.write_table(rows, out / "results.csv", out / "results.md")
    summary = sweep.aggregate(rows, "training.seed", [*sweep.RESULT_COLUMNS, "saved_mb"])
    fig, axes = plt.subplots(1, len(STUDY_DATASETS), figsize=(10, 4), dpi=100)
    tables = []
    for ax, dataset in zip(axes, STUDY_DATASETS, strict=True):
        arms = [row for row in summary if row["arm"].startswith(dataset + "/")]
        for i, row in enumerate(arms):
            key = row["arm"].split("/", 1)[1]
            ax.errorbar(
                [row["trainable_params"]],
                [100 * row["eval_accuracy"]],
                yerr=[100 * row["eval_accuracy_std"]],
                fmt="os^vD<>pP*"[i % 10],
                color=f"C{i}",
                capsize=3,
                label=PEFT_METHODS[key][0],
            )
        ax.set_xscale("log")
        ax.set_title(dataset, fontsize=9)
        ax.set_xlabel("trainable parameters (log)", fontsize=8)
        ax.set_ylabel("validation accuracy (%)", fontsize=8)
        ax.grid(alpha=0.3)
        tables.append(f"**{dataset}**\n\n" + methods_table(arms))
    axes[-1].legend(fontsize=7, loc="center left", bbox_to_anchor=(1.02, 0.5))
    rows_per_run = data_setting(study.recipe).replace(" sst2 rows", " training rows")  # both datasets: same budget
    fig.suptitle(f"all-MiniLM-L6-v2, {rows_per_run}; mean ± std over seeds", fontsize=9)
    fig.tight_layout()
    fig.savefig(figures / "study4_peft_methods.png")
    plt.close(fig)
    not_run = "\n".join(f"- {name}: {why}." for name, why in NOT_RUN.items())
    return "\n".join(tables) + f"\nNot run:\n{not_run}\n\n![study4_peft_methods](figures/study4_peft_methods.png)\n"


def methods_table(arms: Sequence[dict[str, Any]]) -> str:
    """One Markdown row per method: accuracy, macro-F1 (mean ± std), parameters, saved size, time, memory, lr."""
    lines = [
        "| method | learning rate | seeds | accuracy (%) | macro-F1 (%) | trainable params | saved MB |"
        " train s | run wall s | peak RSS MB |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in arms:
        label, overrides = PEFT_METHODS[row["arm"].split("/", 1)[1]]
        lr = next(o.split("=", 1)[1] for o in overrides if o.startswith("training.learning_rate="))
        lines.append(
            f"| {label} | {lr} | {row['n']} | {_mean_std(row, 'eval_accuracy', single='')} |"
            f" {_mean_std(row, 'eval_macro_f1', single='')} | {row['trainable_params']:,.0f} |"
            f" {row['saved_mb']:.2f} | {row['train_seconds']:.0f} | {row.get('wall_seconds') or 0:.0f} |"
            f" {row['peak_memory_mb']:.0f} |"
        )
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------
# Study 5: the seed notebooks' settings, at full size


IMDB_SEED_001 = [
    "data.task=imdb",
    "data.path=stanfordnlp/imdb",
    "data.config_name=plain_text",
    "data.eval_split=test",
    "data.max_length=256",
    "data.max_train_samples=500",
    "peft.r=4",
    "peft.alpha=32",
    "peft.target_modules=[query,value]",
    "training.num_epochs=3",
    "training.per_device_train_batch_size=8",  # 2 x 8 = the global batch of 16 at 256 tokens (memory)
    "training.gradient_accumulation_steps=2",
    "training.per_device_eval_batch_size=32",
]
"""Seed 001's IMDb setting: LoRA r=4, alpha=32 on query and value, 500 training reviews (3 epochs, 96 steps),
scored on the whole 25,000-review test split."""

SEED_ARMS: dict[str, tuple[str, str, list[str]]] = {
    "emotion/frozen_features": ("frozen features + LogReg", "about 63% macro-F1", []),
    "emotion/full": ("full fine-tuning", "about 92%", ["peft.method=full", "training.learning_rate=1e-4"]),
    "emotion/lora_qkv_r32": ("LoRA r=32 q,k,v", "about 92%", ["peft.method=lora"]),
    "emotion/lora_qkv_r32_pooler": ("LoRA r=32 q,k,v + pooler", "", ["peft.method=lora", HEAD_POOLER]),
    "imdb/lora_r4_qv": ("LoRA r=4, alpha=32, q,v; 500 reviews", "(no figure quoted)", IMDB_SEED_001),
}
"""Arm -> (label, the seed's published figure as the issue quotes it, overrides of the emotion recipe)."""


def seed_comparison_arms(seeds: int) -> list[tuple[str, list[str]]]:
    """The trained arms of SEED_ARMS per seed (the frozen features are an extra run: deterministic, one)."""
    return [
        (arm, [*overrides, f"training.seed={seed}"])
        for seed in range(seeds)
        for arm, (_, _, overrides) in SEED_ARMS.items()
        if arm != "emotion/frozen_features"
    ]


def seed_comparison_extra(root: Path) -> None:
    """The frozen-features baseline on all emotion training rows, scored on the test split."""
    regimes_extra(STUDIES["seed_comparisons"], root)


def analyse_seed_comparisons(study: Study, rows: list[dict[str, Any]], out: Path, figures: Path) -> str:
    """Study 5: one row per setting, beside the figure the seed notebook published."""
    features = sweep.read_result(sweep.Run({}, out / FEATURES_RUN, "emotion/frozen_features"))
    rows = ([features] if features else []) + rows
    for row in rows:  # the share of the model trained (the training loop writes it; the LogReg has none)
        row["trainable_percent"] = json.loads((out / row["run"] / "metrics.json").read_text()).get("trainable_percent")
    sweep.write_table(rows, out / "results.csv", out / "results.md")
    lines = [
        "| setting | published (seed) | seeds | test accuracy (%) | test macro-F1 (%) | trainable params |"
        " trainable % | train s | peak RSS MB |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in sweep.aggregate(rows, "training.seed", [*sweep.RESULT_COLUMNS, "trainable_percent"]):
        label, published, _ = SEED_ARMS[row["arm"]]
        share = row.get("trainable_percent")
        lines.append(
            f"| {label} | {published} | {row['n']} | {_mean_std(row, 'eval_accuracy', single='')} |"
            f" {_mean_std(row, 'eval_macro_f1', single='')} | {row['trainable_params']:,.0f} |"
            f" {'' if share is None else f'{share:.3f}'} | {_mean_std(row, 'train_seconds', 1, '.0f', '')} |"
            f" {row['peak_memory_mb']:.0f} |"
        )
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------
# The linear toy (no training loop; seconds)


def toy_study(out: Path, figures: Path) -> str:
    """Learned LoRA error vs the SVD bound for r = 1..32 on a 64 x 64 layer; table + plot."""
    from lora_lab.toy import plot_toy, run_toy

    results = run_toy()
    rows = [
        {
            "r": res.r,
            "svd_bound": res.bound,
            "learned_error": res.learned,
            "learned_over_bound": res.ratio,
            "steps": res.steps,
        }
        for res in results
    ]
    sweep.write_table(rows, out / "results.csv")
    plot_toy(results, figures / "toy_svd_bound.png")
    lines = ["| r | SVD bound sum_{i>r} sigma_i^2 | learned error | (learned - bound) / bound |", "|---|---|---|---|"]
    lines += [f"| {res.r} | {res.bound:.6g} | {res.learned:.6g} | {res.ratio - 1:.1e} |" for res in results]
    return "\n".join(lines) + "\n\n![toy_svd_bound](figures/toy_svd_bound.png)\n"


# ---------------------------------------------------------------------------------------------
# Running a study


STUDIES: dict[str, Study] = {
    "rank": Study("rank", "recipes/studies/sst2_minilm_rank.yaml", rank_arms, analyse_rank, seeds=3),
    "regimes": Study(
        "regimes",
        "recipes/studies/emotion_minilm_regimes.yaml",
        regimes_arms,
        analyse_regimes,
        seeds=3,
        extra_runs=lambda root: regimes_extra(STUDIES["regimes"], root),
    ),
    "quant": Study("quant", "recipes/studies/sst2_minilm_quant.yaml", quant_arms, analyse_quant, seeds=3),
    "peft_methods": Study(
        "peft_methods", "recipes/studies/peft_methods_minilm.yaml", peft_method_arms, analyse_peft_methods, seeds=3
    ),
    "seed_comparisons": Study(
        "seed_comparisons",
        "recipes/studies/seed_comparisons_minilm.yaml",
        seed_comparison_arms,
        analyse_seed_comparisons,
        seeds=3,
        extra_runs=seed_comparison_extra,
    ),
}


def hardware() -> str:
    """One line naming the machine the study ran on."""
    m = machine_info()
    return f"{m['cpu']}, {m['cpu_count']} CPU cores, {m['gpu'] or 'no GPU'}, torch {m['torch']}"


def run_study(name: str, out_root: Path, figures: Path, seeds: Optional[int] = None, analyse_only: bool = False) -> str:
    """Run (or resume) a study, analyse it, write ``report.md`` in its directory and return the report."""
    figures.mkdir(parents=True, exist_ok=True)
    out = out_root / name
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    if name == "toy":
        body = toy_study(out, figures)
        command = "python scripts/study.py toy"
    else:
        study = STUDIES[name]
        if seeds is not None:
            study = Study(study.name, study.recipe, study.arms, study.analyse, seeds, study.extra_runs)
        runs = sweep.plan(study.arms(study.seeds), out)
        if not analyse_only:
            sweep.validate_runs(study.recipe, sweep.unique(runs))
            if study.extra_runs:
                study.extra_runs(out)
            failed = sweep.run_sweep(study.recipe, runs)
            if failed:
                logger.warning("%d run(s) failed: %s", len(failed), ", ".join(r.name for r in failed))
        rows = sweep.collect(runs)
        missing = len(sweep.unique(runs)) - len({row["run"] for row in rows})
        body = study.analyse(study, rows, out, figures)
        if missing:
            body += f"\n{missing} planned run(s) have no results yet (not run or failed).\n"
        walls = [json.loads(p.read_text())["wall_seconds"] for p in sorted(out.glob("*/sweep_run.json"))]
        body += (
            f"\nSum of the run wall times recorded by the sweep: {sum(walls) / 60:.1f} min over {len(walls)} runs.\n"
        )
        command = f"python scripts/study.py {name}" + (f" --seeds {seeds}" if seeds is not None else "")
    report = (
        f"Command: `HF_HUB_OFFLINE=1 HF_HUB_CACHE=../shared/hf-hub {command}`  \nHardware: {hardware()}  \n"
        f"This invocation took {time.perf_counter() - start:.0f} s.\n\n{body}"
    )
    (out / "report.md").write_text(report)
    return report
