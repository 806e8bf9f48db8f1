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
import torch.nn.functional as F
from datasets import Dataset

from .classification import classification_metrics, classification_result, model_label
from .features import FeatureOptions
from .loading import (
    LabelInfo,
    check_dataset,
    display_name,
    name_index,
    prepare_image_column,
    resolve_labels,
)
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


class HeadClassifier:
    """A fine-tuned `HfClipForImageClassification`'s own head, applied to cached image embeddings as its forward
    applies it (L2-normalised, then linear), its rows put in the dataset's class order. The robustness
    evaluation then scores fine-tuned (or WiSE-FT interpolated) models on the same features as zero-shot
    ones: the paper's section 3.3 comparison of adapted and zero-shot classifiers."""

    def __init__(self, model: torch.nn.Module, info: LabelInfo) -> None:
        labels = [str(model.config.id2label[i]) for i in range(model.config.num_labels)]
        rows = _head_rows(labels, info)
        self.weights = model.classifier.weight.detach().float()[rows]
        self.bias = model.classifier.bias.detach().float()[rows]

    def __call__(self, image_embeds: torch.Tensor) -> torch.Tensor:
        features = F.normalize(image_embeds.float(), dim=-1)
        return features @ self.weights.t() + self.bias


def _head_rows(labels: list[str], info: LabelInfo) -> list[int]:
    """For each dataset class, the head's output for it: matched by name (the dataset's label names, else its
    class names; case and surrounding space ignored), or by index when the head has only transformers'
    placeholder labels (LABEL_0, LABEL_1, ...). A head labelled with the dataset's own list keeps its order,
    so repeated names (ImageNet's two "missile" classes, in a head made by from_zero_shot) stay apart; matching
    a repeated name elsewhere is ambiguous and refused."""
    if all(label == f"LABEL_{i}" for i, label in enumerate(labels)):
        if len(labels) != info.num_classes:
            raise ValueError(
                f"The classifier has {len(labels)} outputs without names (id2label is LABEL_0...) and the "
                f"dataset has {info.num_classes} classes; set the model's id2label to the class names it was "
                "trained on."
            )
        return list(range(len(labels)))
    head = [label.strip().lower() for label in labels]
    index, repeated = name_index(head)
    for names in (info.label_names, [display_name(c) for c in info.classnames]):
        keys = [str(name).strip().lower() for name in names]
        if keys == head:
            return list(range(len(keys)))
        if all(key in index for key in keys):
            ambiguous = sorted(set(keys) & repeated)
            if ambiguous:
                raise ValueError(
                    f"The classifier has several outputs named {', '.join(map(repr, ambiguous))}, so the "
                    "dataset's classes cannot be matched to them by name; evaluate on the label list it was "
                    "made with (--classnames in the classifier's order), or give its outputs unique names."
                )
            return [index[key] for key in keys]
    missing = [display_name(c) for c in info.classnames if display_name(c).strip().lower() not in index]
    raise ValueError(
        f"The classifier has no output named for {len(missing)} of the dataset's {info.num_classes} classes "
        f"(e.g. {', '.join(map(repr, missing[:3]))}); its labels are {', '.join(map(repr, labels[:5]))}"
        f"{', ...' if len(labels) > 5 else ''}. Set its id2label to these class names, or pass --classnames "
        "in the classifier's order."
    )


def is_image_classifier(model: torch.nn.Module) -> bool:
    """A model with a trained head (HfClipForImageClassification) rather than a text tower."""
    return isinstance(getattr(model, "classifier", None), torch.nn.Linear) and not hasattr(
        model, "text_model"
    )


def build_classifier(model: torch.nn.Module, processor: Any, info: LabelInfo, templates: Sequence[str]):
    """The zero-shot classifier head (one ensembled text embedding per class), or a classifier model's own."""
    if is_image_classifier(model):
        return HeadClassifier(model, info)
    from ..zero_shot.classifier import ZeroShotClassifier

    return ZeroShotClassifier.from_model(model, processor, list(info.classnames), list(templates))


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
        classifier = build_classifier(model, processor, info, template_list)
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
