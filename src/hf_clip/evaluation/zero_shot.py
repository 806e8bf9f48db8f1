"""Zero-shot classification evaluation (paper section 3.1): prompts -> text classifier -> image logits.

Reports top-1, top-5 and mean per-class recall over a labelled image dataset, with the classifier built
once from class names and (ensembled) prompt templates.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from datasets import Dataset

from .classification import classification_metrics, classification_result, model_label
from .features import FeatureOptions
from .loading import check_dataset, prepare_image_column, resolve_labels
from .reporting import EvalResult


def resolve_templates(spec: str | Sequence[str] | None) -> list[str]:
    """Prompt templates from a file (one per line, ``{}`` marks the class name), a shipped set name
    (``imagenet``, ``cifar10``...), one template, or a list; ``None`` gives the paper's "a photo of a {}."."""
    from ..zero_shot.classifier import resolve_templates as resolve_template_set

    if isinstance(spec, str) and Path(spec).expanduser().is_file():
        text = Path(spec).expanduser().read_text(encoding="utf-8")
        spec = [line.strip() for line in text.splitlines() if line.strip()]
        if not spec:
            raise ValueError(
                "The template file is empty; write one template per line, e.g. 'a photo of a {}.'."
            )
    return resolve_template_set(spec)


def build_classifier(
    model: torch.nn.Module, processor: Any, classnames: Sequence[Any], templates: Sequence[str]
):
    """The zero-shot classifier head (one ensembled text embedding per class)."""
    from ..zero_shot.classifier import ZeroShotClassifier

    return ZeroShotClassifier.from_model(model, processor, list(classnames), list(templates))


@torch.inference_mode()
def classifier_logits(classifier: Any, image_features: torch.Tensor, batch_size: int = 4096) -> torch.Tensor:
    """Apply the classifier to cached image features in chunks, on the classifier's device; float32 CPU out."""
    device = getattr(getattr(classifier, "weights", None), "device", None)
    chunks = []
    for start in range(0, image_features.shape[0], batch_size):
        chunk = image_features[start : start + batch_size]
        chunks.append(classifier(chunk.to(device) if device is not None else chunk).float().cpu())
    return torch.cat(chunks)


def evaluate_zero_shot(
    model: torch.nn.Module,
    processor: Any,
    dataset: Dataset,
    *,
    image_column: str = "image",
    label_column: str = "label",
    classnames: Sequence[str] | None = None,
    templates: str | Sequence[str] | None = None,
    batch_size: int = 64,
    num_workers: int = 0,
    dtype: str | None = None,
    device: str | torch.device | None = None,
    cache_dir: str | os.PathLike | None = None,
    top_k: Sequence[int] = (1, 5),
    dataset_name: str = "dataset",
    model_name: str | None = None,
    classifier: Any = None,
) -> EvalResult:
    """Zero-shot top-k accuracy and mean per-class recall of ``model`` on a labelled image dataset.

    Class names come from the label column's ClassLabel feature unless ``classnames`` is given; a
    prebuilt ``classifier`` (e.g. shared across datasets) skips building one.
    """
    check_dataset(dataset, [image_column, label_column], name=dataset_name)
    dataset = prepare_image_column(dataset, image_column)
    info = resolve_labels(dataset, label_column, classnames)
    template_list = resolve_templates(templates)
    if classifier is None:
        classifier = build_classifier(model, processor, info.classnames, template_list)
    options = FeatureOptions(batch_size, num_workers, dtype, device, cache_dir)
    features = options.image_features(model, processor.image_processor, dataset, image_column)
    logits = classifier_logits(classifier, features)
    metrics = classification_metrics(logits, info.labels, top_k=top_k)
    config = {
        "image_column": image_column,
        "label_column": label_column,
        "num_templates": len(template_list),
        "templates": template_list,
        "dtype": dtype or "fp32",
    }
    return classification_result(
        "zero-shot", metrics, info, model_name or model_label(model), dataset_name, config
    )
