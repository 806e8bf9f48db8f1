"""Linear-probe evaluation (paper appendix A.3): logistic regression on frozen image features.

Follows the paper's protocol: scikit-learn's L-BFGS logistic regression (at most 1,000 iterations) on the
raw, unnormalised image features; the L2 strength chosen on a validation split (the provided one, else
carved out of train) by a parametric binary search over a log range (start at every second decade of
[1e-6, 1e6], then halve the interval around the best value until 8 steps per decade); the final model is
refit on train + validation and scored on the held-out split.
"""

from __future__ import annotations

import logging
import math
import os
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from datasets import ClassLabel, Dataset, Value
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import train_test_split
from tqdm.auto import tqdm

from .classification import classification_metrics, classification_result, model_label
from .features import FeatureOptions
from .loading import LabelInfo, align_labels, check_dataset, prepare_image_column, resolve_labels
from .reporting import EvalResult

logger = logging.getLogger(__name__)

SELECTION_METRICS = ("top1_accuracy", "mean_per_class_recall")


@dataclass
class RegularizationSweep:
    """Outcome of the C search: the chosen inverse L2 strength and every (C, validation score) tried."""

    best_c: float
    best_score: float
    history: list[dict[str, float]] = field(default_factory=list)


def fit_logistic_regression(
    features: np.ndarray, labels: np.ndarray, c: float, max_iter: int = 1000, seed: int = 0
) -> LogisticRegression:
    """L-BFGS multinomial logistic regression with inverse L2 strength ``c`` (sklearn's C = 1 / lambda)."""
    classifier = LogisticRegression(C=c, solver="lbfgs", max_iter=max_iter, random_state=seed)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ConvergenceWarning)
        classifier.fit(features, labels)
    if any(issubclass(w.category, ConvergenceWarning) for w in caught):
        logger.info("L-BFGS reached max_iter=%d without converging at C=%.3g.", max_iter, c)
    return classifier


def class_scores(classifier: LogisticRegression, features: np.ndarray, num_classes: int) -> np.ndarray:
    """Probabilities [N, num_classes]; classes absent from the training labels get probability 0."""
    probs = classifier.predict_proba(features)
    scores = np.zeros((features.shape[0], num_classes), dtype=np.float64)
    scores[:, classifier.classes_.astype(np.int64)] = probs
    return scores


def parametric_search(
    score: Callable[[float], float],
    low: float = -6.0,
    high: float = 6.0,
    initial_step: float = 2.0,
    steps_per_decade: int = 8,
) -> tuple[float, dict[float, float]]:
    """Maximise ``score(x)`` over a log10 grid in [low, high] by the paper's parametric binary search.

    Scores a coarse grid every ``initial_step`` decades, then repeatedly halves the step and scores the two
    neighbours of the current best until the step is 1 / ``steps_per_decade`` (7 + 2 * 4 = 15 evaluations
    with the defaults instead of the 96 of the full grid). Ties go to the smaller x. Returns the best x and
    every score.
    """
    scores: dict[float, float] = {}

    def visit(x: float) -> None:
        x = round(x, 6)
        if x not in scores and low - 1e-9 <= x <= high + 1e-9:
            scores[x] = float(score(x))

    def best() -> float:
        return max(sorted(scores), key=lambda x: scores[x])  # max keeps the first (smallest x) on ties

    for x in np.arange(low, high + 1e-9, initial_step):
        visit(float(x))
    step = initial_step
    while step > 1.0 / steps_per_decade + 1e-9:
        step /= 2
        center = best()
        visit(center - step)
        visit(center + step)
    return best(), scores


def sweep_regularization(
    train_features: np.ndarray,
    train_labels: np.ndarray,
    val_features: np.ndarray,
    val_labels: np.ndarray,
    num_classes: int,
    *,
    log10_range: tuple[float, float] = (-6.0, 6.0),
    steps_per_decade: int = 8,
    selection_metric: str = "top1_accuracy",
    max_iter: int = 1000,
    seed: int = 0,
    progress: bool = True,
) -> RegularizationSweep:
    """Choose C (= 1 / L2 strength) on the validation split with `parametric_search` over log10(C)."""
    if selection_metric not in SELECTION_METRICS:
        raise ValueError(
            f"selection_metric must be one of {', '.join(SELECTION_METRICS)}, got {selection_metric!r}."
        )
    bar = tqdm(desc="Linear-probe C sweep", unit="fit", disable=not progress)

    def validation_score(log_c: float) -> float:
        classifier = fit_logistic_regression(train_features, train_labels, 10.0**log_c, max_iter, seed)
        scores = class_scores(classifier, val_features, num_classes)
        value = float(classification_metrics(scores, val_labels, top_k=(1,))[selection_metric])
        bar.update(1)
        bar.set_postfix(C=f"{10.0**log_c:.3g}", score=f"{value:.4f}")
        return value

    try:
        chosen, scores = parametric_search(
            validation_score, *log10_range, initial_step=2.0, steps_per_decade=steps_per_decade
        )
    finally:
        bar.close()
    history = [{"C": 10.0**lc, "log10_C": lc, selection_metric: s} for lc, s in sorted(scores.items())]
    return RegularizationSweep(best_c=10.0**chosen, best_score=scores[chosen], history=history)


def _integer_classnames(datasets: Sequence[Dataset], label_column: str) -> list[str] | None:
    """Index names for plain integer labels: a linear probe needs no class names, only a label count."""
    feature = datasets[0].features[label_column]
    if not isinstance(feature, Value) or not feature.dtype.startswith(("int", "uint")):
        return None
    top = max(int(np.max(ds[label_column])) for ds in datasets)
    return [str(i) for i in range(top + 1)]


def evaluate_linear_probe(
    model: torch.nn.Module,
    processor: Any,
    train_dataset: Dataset,
    test_dataset: Dataset,
    val_dataset: Dataset | None = None,
    *,
    image_column: str = "image",
    label_column: str = "label",
    classnames: Sequence[str] | None = None,
    feature: str = "pooled",
    val_fraction: float = 0.2,
    selection_metric: str = "top1_accuracy",
    max_iter: int = 1000,
    seed: int = 0,
    batch_size: int = 64,
    num_workers: int = 0,
    dtype: str | None = None,
    device: str | torch.device | None = None,
    cache_dir: str | os.PathLike | None = None,
    top_k: Sequence[int] = (1, 5),
    dataset_name: str = "dataset",
    model_name: str | None = None,
) -> EvalResult:
    """Linear-probe top-k accuracy and mean per-class recall on ``test_dataset``.

    ``feature="pooled"`` probes the image tower's output before the projection (the paper's choice for
    CLIP-ViT); ``"projected"`` probes the joint-space embeddings. Features are used raw (no L2 norm).
    """
    named = {
        "train": train_dataset,
        "test": test_dataset,
        **({"validation": val_dataset} if val_dataset else {}),
    }
    for split, ds in named.items():
        check_dataset(ds, [image_column, label_column], name=f"{dataset_name} ({split} split)")
    if val_dataset is None and not 0 < val_fraction < 1:  # checked before any feature is extracted
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}.")
    if classnames is None and not isinstance(train_dataset.features[label_column], ClassLabel):
        classnames = _integer_classnames(list(named.values()), label_column)
    infos = {split: resolve_labels(ds, label_column, classnames) for split, ds in named.items()}
    reference = infos["train"]
    labels = {split: align_labels(info, reference) for split, info in infos.items()}

    options = FeatureOptions(batch_size, num_workers, dtype, device, cache_dir)

    def features_of(ds: Dataset) -> np.ndarray:
        ds = prepare_image_column(ds, image_column)
        return options.image_features(model, processor.image_processor, ds, image_column, feature).numpy()

    train_x, test_x = features_of(train_dataset), features_of(test_dataset)
    train_y, test_y = labels["train"], labels["test"]
    if val_dataset is not None:
        val_x, val_y = features_of(val_dataset), labels["validation"]
        fit_x, fit_y = train_x, train_y
        val_source = "validation split"
    else:
        counts = np.bincount(train_y)
        present = int((counts > 0).sum())
        num_val = math.ceil(val_fraction * len(train_y))  # how train_test_split sizes the held-out part
        # Stratified when both parts can hold every class (few-shot sets cannot): else a random split.
        can_stratify = counts[counts > 0].min() >= 2 and present <= num_val <= len(train_y) - present
        stratify = train_y if can_stratify else None
        fit_idx, val_idx = train_test_split(
            np.arange(len(train_y)), test_size=val_fraction, random_state=seed, stratify=stratify
        )
        fit_x, fit_y, val_x, val_y = train_x[fit_idx], train_y[fit_idx], train_x[val_idx], train_y[val_idx]
        val_source = f"{val_fraction:.0%} of train ({'stratified' if can_stratify else 'random'})"
    if len(np.unique(fit_y)) < 2:
        raise ValueError("The linear probe needs at least two classes in the training split.")

    num_classes = reference.num_classes
    sweep = sweep_regularization(
        fit_x,
        fit_y,
        val_x,
        val_y,
        num_classes,
        selection_metric=selection_metric,
        max_iter=max_iter,
        seed=seed,
    )
    final = fit_logistic_regression(
        np.concatenate([fit_x, val_x]), np.concatenate([fit_y, val_y]), sweep.best_c, max_iter, seed
    )
    metrics = classification_metrics(class_scores(final, test_x, num_classes), test_y, top_k=top_k)
    config = {
        "image_column": image_column,
        "label_column": label_column,
        "feature": feature,
        "feature_normalization": "none (raw features, as in the paper)",
        "solver": "lbfgs",
        "max_iter": max_iter,
        "validation": val_source,
        "selection_metric": selection_metric,
        "num_train": int(len(fit_y)),
        "num_validation": int(len(val_y)),
        "seed": seed,
        "dtype": dtype or "fp32",
    }
    test_info = LabelInfo(test_y, reference.classnames, reference.label_names)
    result = classification_result(
        "linear-probe", metrics, test_info, model_name or model_label(model), dataset_name, config
    )
    result.extra = {"best_C": sweep.best_c, "validation_score": sweep.best_score, "sweep": sweep.history}
    return result
