"""Evaluation results and their three outputs: a JSON record, a markdown table and a PNG chart.

The JSON file is the machine-readable record (dataset, model, task, metrics, config); the markdown table
is what goes into a model card or a PR; the PNG shows what one number hides (which classes fail, how much
accuracy each shifted dataset loses).
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # headless: never needs a display
import matplotlib.pyplot as plt  # noqa: E402

from .._io import atomic_write  # noqa: E402

_MAX_LABELLED_BARS = 60


@dataclass
class EvalResult:
    """One evaluation run.

    ``metrics`` holds the headline numbers (fractions in [0, 1]); ``per_class`` maps class name to recall
    (None when the class has no example); ``per_dataset`` holds one metrics dict per dataset for runs over
    several datasets (robustness), in which case ``metrics`` summarises the in-distribution one.
    """

    task: str
    model: str
    dataset: str
    metrics: dict[str, float]
    config: dict[str, Any] = field(default_factory=dict)
    per_class: dict[str, float | None] | None = None
    per_dataset: dict[str, dict[str, float]] | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _slug(text: str) -> str:
    return (
        re.sub(r"[^A-Za-z0-9._-]+", "_", Path(str(text).rstrip("/")).name or str(text)).strip("_")
        or "dataset"
    )


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return "n/a" if math.isnan(value) else f"{100 * value:.2f}" if abs(value) <= 1 else f"{value:.4g}"
    return "n/a" if value is None else str(value)


def to_markdown(result: EvalResult) -> str:
    """A markdown report: a title line and one table (per dataset for multi-dataset runs).

    Fractions in [0, 1] are printed as percentages with two decimals.
    """
    lines = [f"## {result.task}: {result.dataset}", "", f"Model: `{result.model}`", ""]
    if result.per_dataset:
        names = list(dict.fromkeys(n for metrics in result.per_dataset.values() for n in metrics))
        lines.append("| dataset | " + " | ".join(names) + " |")
        lines.append("|---|" + "---:|" * len(names))
        for dataset, metrics in result.per_dataset.items():
            lines.append(f"| {dataset} | " + " | ".join(_fmt(metrics.get(n)) for n in names) + " |")
    else:
        lines.append("| metric | value |")
        lines.append("|---|---:|")
        for name, value in result.metrics.items():
            lines.append(f"| {name} | {_fmt(value)} |")
    lines += ["", "Values are percentages (fractions x 100)."]
    return "\n".join(lines) + "\n"


def plot_result(result: EvalResult, path: str | os.PathLike) -> Path:
    """Save a chart: accuracy side by side for several datasets, per-class recall for one dataset,
    the metric bars otherwise (retrieval)."""
    path = Path(path)
    if result.per_dataset:
        fig = _plot_datasets(result)
    elif result.per_class:
        fig = _plot_per_class(result)
    else:
        fig = _plot_metrics(result)
    try:
        atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100, bbox_inches="tight"))
    finally:
        plt.close(fig)
    return path


def _plot_per_class(result: EvalResult):
    items = sorted(((n, v) for n, v in result.per_class.items() if v is not None), key=lambda kv: kv[1])
    names = [n for n, _ in items]
    values = [100 * v for _, v in items]
    width = min(max(6.0, 0.25 * len(items)), 24.0)
    fig, ax = plt.subplots(figsize=(width, 4.5))
    ax.bar(range(len(values)), values, color="tab:blue")
    if len(items) <= _MAX_LABELLED_BARS:
        ax.set_xticks(range(len(names)), names, rotation=90, fontsize=8)
    else:
        ax.set_xticks([])
        ax.set_xlabel(f"{len(items)} classes, sorted by recall")
    mean = result.metrics.get("mean_per_class_recall")
    if mean is not None:
        ax.axhline(
            100 * mean, color="tab:red", linestyle="--", label=f"mean per-class recall {100 * mean:.1f}%"
        )
        ax.legend(loc="upper left")
    ax.set_ylabel("recall (%)")
    ax.set_ylim(0, 100)
    ax.set_title(f"{result.task} per-class recall: {result.dataset}")
    return fig


def _plot_datasets(result: EvalResult):
    names = list(result.per_dataset)
    metrics = [
        m
        for m in ("top1_accuracy", "top5_accuracy", "mean_per_class_recall")
        if m in result.per_dataset[names[0]]
    ]
    fig, ax = plt.subplots(figsize=(max(6.0, 1.6 * len(names)), 4.5))
    bar = 0.8 / max(len(metrics), 1)
    for i, metric in enumerate(metrics):
        xs = [j + (i - (len(metrics) - 1) / 2) * bar for j in range(len(names))]
        heights = [100 * result.per_dataset[n].get(metric, math.nan) for n in names]  # nan: no bar
        ax.bar(xs, heights, width=bar, label=metric)
    ax.set_xticks(range(len(names)), names, rotation=30, ha="right")
    ax.set_ylabel("%")
    ax.set_ylim(0, 100)
    ax.legend()
    ax.set_title(f"{result.task}: {result.dataset}")
    return fig


def _plot_metrics(result: EvalResult):
    items = [(n, v) for n, v in result.metrics.items() if isinstance(v, float) and 0 <= v <= 1]
    fig, ax = plt.subplots(figsize=(max(6.0, 0.9 * len(items)), 4.5))
    ax.bar(range(len(items)), [100 * v for _, v in items], color="tab:green")
    ax.set_xticks(range(len(items)), [n for n, _ in items], rotation=30, ha="right")
    ax.set_ylabel("%")
    ax.set_ylim(0, 100)
    ax.set_title(f"{result.task}: {result.dataset}")
    return fig


def result_stem(task: str, dataset: str, split: str | None) -> str:
    """``<task>_<dataset name>``, with ``_<split>`` for a split other than ``test``, so that runs on the
    train and test splits do not overwrite each other."""
    stem = f"{task}_{_slug(dataset)}"
    return stem + (f"_{_slug(str(split))}" if split and split != "test" else "")


def save_result(
    result: EvalResult, output_dir: str | os.PathLike, stem: str | None = None
) -> dict[str, Path]:
    """Write ``<stem>.json``, ``<stem>.md`` and ``<stem>.png`` into ``output_dir`` (atomically); return paths.

    ``stem`` defaults to `result_stem`'s name.
    """
    output_dir = Path(output_dir)
    if stem is None:
        stem = result_stem(result.task, result.dataset, result.config.get("split"))
    paths = {
        "json": output_dir / f"{stem}.json",
        "markdown": output_dir / f"{stem}.md",
        "plot": output_dir / f"{stem}.png",
    }
    payload = json.dumps(result.to_dict(), indent=2, default=str, allow_nan=False)
    atomic_write(paths["json"], lambda tmp: Path(tmp).write_text(payload + "\n", encoding="utf-8"))
    markdown = to_markdown(result)
    atomic_write(paths["markdown"], lambda tmp: Path(tmp).write_text(markdown, encoding="utf-8"))
    plot_result(result, paths["plot"])
    return paths
