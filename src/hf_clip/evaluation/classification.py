"""Classification metrics from a score matrix, shared by zero-shot, linear-probe and robustness runs.

Scores are reduced to the top-k ranked class indices before they reach the `evaluate` metric modules,
so a 50,000 x 1,000 ImageNet logit matrix never has to be serialised.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from .loading import LabelInfo, display_name
from .metrics import load_metric
from .reporting import EvalResult


def top_k_indices(scores: torch.Tensor | np.ndarray, k: int) -> np.ndarray:
    """Class (or candidate) indices ranked best first, [N, min(k, C)]; ties broken by the lower index."""
    scores = torch.as_tensor(scores, dtype=torch.float32)
    k = min(int(k), scores.shape[1])
    # A stable descending sort makes ties deterministic (lower index first), unlike torch.topk.
    return torch.sort(scores, dim=1, descending=True, stable=True).indices[:, :k].numpy()


def classification_metrics(
    scores: torch.Tensor | np.ndarray,
    labels: Sequence[int] | np.ndarray,
    top_k: Sequence[int] = (1, 5),
) -> dict[str, object]:
    """Top-k accuracies, mean per-class recall and per-class recall for scores [N, C] and labels [N].

    ``scores`` may be logits, probabilities or similarities: only their ranking matters. Returns
    ``top{k}_accuracy`` for each k, ``mean_per_class_recall`` and ``per_class_recall`` (a list over all
    C classes, None for classes without examples).
    """
    scores = torch.as_tensor(scores, dtype=torch.float32)
    labels = np.asarray(labels, dtype=np.int64)
    check_top_k(top_k)
    if scores.ndim != 2 or scores.shape[0] != labels.shape[0]:
        raise ValueError(
            f"scores must be [N, C] with N = len(labels); got {tuple(scores.shape)} and {labels.shape[0]}."
        )
    if scores.shape[0] == 0:
        raise ValueError("Cannot compute classification metrics on zero examples.")
    num_classes = scores.shape[1]
    # Top-k with k >= C is 100% whatever the model (the paper's binary tasks would all read 100% top-5):
    # such cut-offs are left out rather than reported.
    ks = sorted({int(k) for k in top_k if k == 1 or k < num_classes})
    ranked = top_k_indices(scores, max(ks, default=1))
    metrics: dict[str, object] = {}
    if ks:
        metrics.update(
            load_metric("top_k_accuracy").compute(
                predictions=ranked.tolist(), references=labels.tolist(), k=ks
            )
        )
    metrics.update(
        load_metric("mean_per_class_recall").compute(
            predictions=ranked[:, 0].tolist(), references=labels.tolist(), num_classes=num_classes
        )
    )
    return metrics


def check_top_k(top_k: Sequence[int]) -> None:
    if isinstance(top_k, int) or not top_k or any(int(k) < 1 for k in top_k):
        raise ValueError(
            f"top_k must be a non-empty sequence of integers >= 1, such as (1, 5); got {top_k!r}."
        )


def per_class_names(classnames: Sequence[str | Sequence[str]]) -> list[str]:
    """Report keys for per-class results: display names, with the class index added where names repeat
    (ImageNet's published list has two "missile" and two "sunglasses" classes), so none overwrites another."""
    names = [display_name(c) for c in classnames]
    counts: dict[str, int] = {}
    for name in names:
        counts[name] = counts.get(name, 0) + 1
    return [f"{name} (#{i})" if counts[name] > 1 else name for i, name in enumerate(names)]


def model_label(model: torch.nn.Module) -> str:
    """How a model is named in reports: its directory or Hub id, else its class name."""
    return getattr(model, "name_or_path", "") or type(model).__name__


def classification_result(
    task: str,
    metrics: dict[str, Any],
    info: LabelInfo,
    model_name: str,
    dataset_name: str,
    config: dict[str, Any],
) -> EvalResult:
    """Package classification metrics as an EvalResult, per-class recall keyed by class name."""
    metrics = dict(metrics)
    per_class = metrics.pop("per_class_recall")
    return EvalResult(
        task=task,
        model=model_name,
        dataset=dataset_name,
        metrics={k: float(v) for k, v in metrics.items()},
        config={"num_examples": int(info.labels.shape[0]), "num_classes": info.num_classes, **config},
        per_class=dict(zip(per_class_names(info.classnames), per_class)),
    )
