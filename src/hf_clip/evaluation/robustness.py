"""Robustness to natural distribution shift (paper section 3.3): one classifier, several datasets.

The classifier is the zero-shot one, or, for a fine-tuned HfClipForImageClassification, its own head: the
paper's comparison of zero-shot and ImageNet-adapted models (and WiSE-FT's interpolations between them).

The classifier is built once from the in-distribution dataset's classes and applied unchanged to every
shifted dataset sharing that label set (ImageNet -> ImageNetV2, -Sketch, -R, -A, ObjectNet). The table
reports each dataset's accuracy and its gap to the in-distribution one. A shifted dataset that covers only
a subset of the classes (ImageNet-R and -A: 200 of 1,000) is scored over that subset only, as in the paper.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from datasets import ClassLabel, Dataset, Value

from .classification import classification_metrics, model_label, per_class_names
from .features import FeatureOptions
from .loading import LabelInfo, align_labels, check_dataset, prepare_image_column, resolve_labels
from .reporting import EvalResult
from .zero_shot import HeadClassifier, build_classifier, classifier_logits, resolve_templates


def _shifted_labels(
    dataset: Dataset, label_column: str, reference: LabelInfo
) -> tuple[np.ndarray, np.ndarray]:
    """Labels of a shifted dataset in the reference index space (by name when it names its classes, by index
    in the reference order when it holds plain integers), and the sorted reference indices of the classes it
    covers: every class its ClassLabel names, whether or not this sample holds an image of it (a
    ``--max_samples`` cut of ImageNetV2 still covers all 1,000 classes); else the classes its labels hold."""
    feature = dataset.features[label_column]
    if isinstance(feature, ClassLabel):
        info = resolve_labels(dataset, label_column)
        declared = LabelInfo(np.arange(info.num_classes), info.classnames, info.label_names)
        mapping = align_labels(declared, reference)  # each declared class's reference index
        return mapping[info.labels], np.unique(mapping)
    if isinstance(feature, Value) and feature.dtype in ("string", "large_string"):
        labels = align_labels(resolve_labels(dataset, label_column), reference)
    else:
        labels = resolve_labels(dataset, label_column, reference.classnames).labels
    return labels, np.unique(labels)


def evaluate_robustness(
    model: torch.nn.Module,
    processor: Any,
    datasets: Mapping[str, Dataset],
    *,
    reference: str | None = None,
    image_column: str = "image",
    label_column: str = "label",
    classnames: Sequence[str] | None = None,
    templates: str | Sequence[str] | None = None,
    restrict_to_present_classes: bool = True,
    batch_size: int = 64,
    num_workers: int = 0,
    dtype: str | None = None,
    device: str | torch.device | None = None,
    cache_dir: str | os.PathLike | None = None,
    top_k: Sequence[int] = (1, 5),
    model_name: str | None = None,
) -> EvalResult:
    """Accuracy on each dataset of ``datasets`` (name -> Dataset) and the gap to ``reference``: zero-shot,
    or with the head of an HfClipForImageClassification ``model`` (``processor`` then needs only its
    ``image_processor``; its labels are matched to the reference classes by name).

    ``reference`` (default: the first entry) is the in-distribution dataset whose classes define the
    classifier. Gaps are ``metric(shifted) - metric(reference)``: negative means accuracy lost.
    """
    if not datasets:
        raise ValueError("Robustness evaluation needs at least one dataset.")
    reference = reference or next(iter(datasets))
    if reference not in datasets:
        raise ValueError(f"Reference dataset {reference!r} is not among {', '.join(datasets)}.")
    for name, ds in datasets.items():
        check_dataset(ds, [image_column, label_column], name=name)
    ref_info = resolve_labels(datasets[reference], label_column, classnames)
    # Every dataset's labels before any image is encoded: a bad shifted dataset fails at once, by name.
    aligned = {reference: (ref_info.labels, np.arange(ref_info.num_classes))}
    for name in datasets:
        if name != reference:
            try:
                aligned[name] = _shifted_labels(datasets[name], label_column, ref_info)
            except ValueError as err:
                raise ValueError(f"Shifted dataset {name!r}: {err}") from err
    template_list = resolve_templates(templates)
    classifier = build_classifier(model, processor, ref_info, template_list)
    options = FeatureOptions(batch_size, num_workers, dtype, device, cache_dir)

    per_dataset: dict[str, dict[str, float]] = {}
    per_class = None
    counts: dict[str, int] = {}
    scored_classes: dict[str, int] = {}
    ordered = [reference] + [n for n in datasets if n != reference]
    for name in ordered:
        ds = prepare_image_column(datasets[name], image_column)
        labels, covered = aligned[name]
        features = options.image_features(model, processor.image_processor, ds, image_column)
        logits = classifier_logits(classifier, features)
        if restrict_to_present_classes and len(covered) < ref_info.num_classes:
            # Score only over the classes this dataset covers; labels move to the subset's index space.
            logits = logits[:, torch.as_tensor(covered)]
            labels = np.searchsorted(covered, labels)
        scored_classes[name] = int(logits.shape[1])
        metrics = classification_metrics(logits, labels, top_k=top_k)
        recall = metrics.pop("per_class_recall")
        if name == reference:
            per_class = dict(zip(per_class_names(ref_info.classnames), recall))
        per_dataset[name] = {k: float(v) for k, v in metrics.items()}
        counts[name] = int(len(labels))

    base = dict(per_dataset[reference])
    shifted = [n for n in ordered if n != reference]
    for name in shifted:
        metrics = per_dataset[name]
        for metric in [m for m in base if m in metrics]:  # a class subset may have too few classes for top-5
            metrics[f"{metric}_gap"] = metrics[metric] - base[metric]
    summary = dict(base)
    if shifted:
        summary["mean_shifted_top1_accuracy"] = float(
            np.mean([per_dataset[n]["top1_accuracy"] for n in shifted])
        )
        summary["mean_top1_accuracy_gap"] = summary["mean_shifted_top1_accuracy"] - base["top1_accuracy"]
    return EvalResult(
        task="robustness",
        model=model_name or model_label(model),
        dataset=reference,
        metrics=summary,
        config={
            "reference": reference,
            "shifted": shifted,
            "num_examples": counts,
            "num_classes": ref_info.num_classes,
            "num_classes_scored": scored_classes,
            "image_column": image_column,
            "label_column": label_column,
            # A fine-tuned classifier's own head, or the zero-shot one built from its templates.
            "classifier": "head" if isinstance(classifier, HeadClassifier) else "zero-shot",
            "num_templates": 0 if isinstance(classifier, HeadClassifier) else len(template_list),
            "restrict_to_present_classes": restrict_to_present_classes,
            "dtype": dtype or "fp32",
        },
        per_class=per_class,
        per_dataset=per_dataset,
    )
