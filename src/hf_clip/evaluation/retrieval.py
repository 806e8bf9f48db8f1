"""Zero-shot image-text retrieval (paper section 3.1.4, Flickr30k / MSCOCO): recall@1/5/10 both ways.

Image -> text: an image query is a hit at k when ANY of its captions is among the k most similar
captions. Text -> image: a caption query is a hit when its own image is among the k most similar images.
Similarities are cosine similarities of the L2-normalised joint-space embeddings.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from datasets import Dataset

from .classification import model_label, top_k_indices
from .features import FeatureOptions
from .loading import check_dataset, prepare_image_column
from .metrics import load_metric
from .reporting import EvalResult


def flatten_captions(captions: Sequence[str | Sequence[str]]) -> tuple[list[str], np.ndarray]:
    """Flatten one caption or a list of captions per image into (texts, owning image index per text)."""
    texts: list[str] = []
    owners: list[int] = []
    for i, entry in enumerate(captions):
        if entry is not None and not isinstance(entry, (str, list, tuple)):
            raise ValueError(
                f"Image {i}'s caption is a {type(entry).__name__}, not text: the caption column must hold a "
                "string or a list of strings per image (choose it with --caption_column)."
            )
        items = [entry] if isinstance(entry, str) else list(entry or [])
        items = [c for c in items if isinstance(c, str) and c.strip()]
        if not items:
            raise ValueError(f"Image {i} has no caption; every image needs at least one non-empty caption.")
        texts.extend(items)
        owners.extend([i] * len(items))
    return texts, np.asarray(owners, dtype=np.int64)


def _normalize(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)


def retrieval_rankings(
    image_features: torch.Tensor, text_features: torch.Tensor, max_k: int, chunk_size: int = 2048
) -> tuple[np.ndarray, np.ndarray]:
    """Top-``max_k`` candidates both ways by cosine similarity: (texts per image [I, k], images per text [T, k]).

    Works through the similarity matrix in row chunks so 5k images x 25k captions never sit in memory twice.
    """
    images, texts = _normalize(image_features.float()), _normalize(text_features.float())
    i2t = [
        top_k_indices(images[s : s + chunk_size] @ texts.T, max_k) for s in range(0, len(images), chunk_size)
    ]
    t2i = [
        top_k_indices(texts[s : s + chunk_size] @ images.T, max_k) for s in range(0, len(texts), chunk_size)
    ]
    return np.concatenate(i2t), np.concatenate(t2i)


def retrieval_metrics(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    text_to_image: Sequence[int] | np.ndarray,
    k: Sequence[int] = (1, 5, 10),
) -> dict[str, float]:
    """Recall@k in both directions plus their mean (``mean_recall``, the usual single-number summary).

    ``text_to_image[j]`` is the index of the image that caption ``j`` describes.
    """
    owners = np.asarray(text_to_image, dtype=np.int64)
    if owners.shape[0] != text_features.shape[0]:
        raise ValueError(f"text_to_image has {owners.shape[0]} entries for {text_features.shape[0]} texts.")
    if owners.min() < 0 or owners.max() >= image_features.shape[0]:
        raise ValueError("text_to_image holds an index outside the image range.")
    # Recall@k with k at least the gallery's size is 1.0 whatever the model (a 3-image test set would read
    # R@5 = R@10 = 100%): such cut-offs are left out rather than reported, as classification does for top-k.
    i2t_k = sorted({int(c) for c in k if c == 1 or c < text_features.shape[0]})
    t2i_k = sorted({int(c) for c in k if c == 1 or c < image_features.shape[0]})
    i2t, t2i = retrieval_rankings(image_features, text_features, max(k))
    captions_of = [[] for _ in range(image_features.shape[0])]
    for text_index, image_index in enumerate(owners.tolist()):
        captions_of[image_index].append(text_index)
    if any(not caps for caps in captions_of):
        raise ValueError("Every image needs at least one caption for image->text recall.")
    metric = load_metric("retrieval_recall")
    image_to_text = metric.compute(predictions=i2t.tolist(), references=captions_of, k=i2t_k)
    text_to_image_scores = metric.compute(
        predictions=t2i.tolist(), references=[[o] for o in owners.tolist()], k=t2i_k
    )
    metrics = {f"image_to_text_{name}": value for name, value in image_to_text.items()}
    metrics.update({f"text_to_image_{name}": value for name, value in text_to_image_scores.items()})
    metrics["mean_recall"] = float(np.mean(list(metrics.values())))
    return metrics


def evaluate_retrieval(
    model: torch.nn.Module,
    processor: Any,
    dataset: Dataset,
    *,
    image_column: str = "image",
    caption_column: str = "caption",
    k: Sequence[int] = (1, 5, 10),
    batch_size: int = 64,
    num_workers: int = 0,
    dtype: str | None = None,
    device: str | torch.device | None = None,
    cache_dir: str | os.PathLike | None = None,
    dataset_name: str = "dataset",
    model_name: str | None = None,
) -> EvalResult:
    """Image-text retrieval recall@k on an image-caption dataset (one caption or a list per image)."""
    check_dataset(dataset, [image_column, caption_column], name=dataset_name)
    if not k or any(int(c) < 1 for c in k):  # checked before any feature is extracted
        raise ValueError(f"Recall cut-offs k must be integers >= 1, got {list(k)}.")
    dataset = prepare_image_column(dataset, image_column)
    texts, owners = flatten_captions(dataset[caption_column])
    options = FeatureOptions(batch_size, num_workers, dtype, device, cache_dir)
    image_features = options.image_features(model, processor.image_processor, dataset, image_column)
    text_features = options.text_features(model, getattr(processor, "tokenizer", processor), texts)
    metrics = retrieval_metrics(image_features, text_features, owners, k)
    return EvalResult(
        task="retrieval",
        model=model_name or model_label(model),
        dataset=dataset_name,
        metrics=metrics,
        config={
            "image_column": image_column,
            "caption_column": caption_column,
            "num_images": len(dataset),
            "num_captions": len(texts),
            "k": list(k),
            "dtype": dtype or "fp32",
        },
    )
