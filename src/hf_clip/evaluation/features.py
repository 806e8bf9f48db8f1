"""Batched, cached image and text feature extraction for the evaluations.

Every evaluation reduces to "embed the dataset once, then do cheap math on the features"; the linear-probe
sweep and repeated zero-shot runs reuse the same features, so they are cached on disk (safetensors) under a
key that changes whenever the model weights, the data, the split, the column or the preprocessing change.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from datasets import Dataset
from PIL import Image as PILImage
from safetensors.torch import load_file, save_file
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from .._io import atomic_write
from ..zero_shot._encode import as_tensor, context_length, eval_mode, model_device

logger = logging.getLogger(__name__)

IMAGE_FEATURES = ("projected", "pooled")

_DTYPES = {
    None: None,
    "fp32": None,
    "float32": None,
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp16": torch.float16,
    "float16": torch.float16,
}


def resolve_autocast_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    """Map ``None``/"fp32"/"bf16"/"fp16" (or a torch dtype) to the autocast dtype (None: full precision)."""
    if isinstance(dtype, torch.dtype):
        return None if dtype == torch.float32 else dtype
    if dtype not in _DTYPES:
        raise ValueError(f"Unsupported dtype {dtype!r}; use one of fp32, bf16, fp16.")
    return _DTYPES[dtype]


def _autocast(device: torch.device, dtype: torch.dtype | None):
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


@torch.no_grad()
def model_fingerprint(model: torch.nn.Module) -> str:
    """Identify a model by its class and the weights it holds now: per parameter and buffer its name, dtype,
    shape, and float64 sum and norm. Fine-tuned, interpolated or edited weights, or the same checkpoint
    loaded in another dtype, therefore get their own cache entries; one pass over the weights costs far less
    than the feature extraction it may save."""
    entries = [type(model).__name__]
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        stats = ""
        if tensor.numel() and tensor.device.type != "meta":
            data = tensor.detach()
            if data.is_floating_point() or data.is_complex():
                stats = f"{float(torch.sum(data, dtype=torch.float64)):.17g}"
                stats += f",{float(torch.linalg.vector_norm(data, dtype=torch.float64)):.17g}"
            else:
                stats = f"{int(data.long().sum())}"
        entries.append(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|{stats}")
    return hashlib.sha256("\n".join(entries).encode()).hexdigest()


def _cache_file(cache_dir: str | os.PathLike | None, kind: str, key_parts: dict[str, Any]) -> Path | None:
    if cache_dir is None:
        return None
    digest = hashlib.sha256(json.dumps(key_parts, sort_keys=True, default=str).encode()).hexdigest()[:32]
    return Path(cache_dir) / f"{kind}-features-{digest}.safetensors"


def _load_cached(path: Path | None, expected_rows: int) -> torch.Tensor | None:
    if path is None or not path.is_file():
        return None
    features = load_file(str(path))["features"]
    if features.shape[0] != expected_rows:
        logger.warning(
            "Ignoring feature cache %s: %d rows, expected %d.", path, features.shape[0], expected_rows
        )
        return None
    logger.info("Loaded cached features from %s", path)
    return features


def _save_cached(path: Path | None, features: torch.Tensor, metadata: dict[str, str]) -> None:
    if path is None:
        return
    atomic_write(path, lambda tmp: save_file({"features": features.contiguous()}, tmp, metadata=metadata))


def _to_rgb(image: Any) -> PILImage.Image:
    if isinstance(image, PILImage.Image):
        return image.convert("RGB")
    if isinstance(image, (str, os.PathLike)):
        with PILImage.open(image) as opened:
            return opened.convert("RGB")
    if isinstance(image, dict) and (image.get("bytes") or image.get("path")):
        source = io.BytesIO(image["bytes"]) if image.get("bytes") else image["path"]
        with PILImage.open(source) as opened:
            return opened.convert("RGB")
    raise TypeError(f"Cannot read an image from a {type(image).__name__}; expected a PIL image or a path.")


class _ImageColumn(torch.utils.data.Dataset):
    """One image column of a datasets.Dataset as a map-style torch dataset of RGB PIL images."""

    def __init__(self, dataset: Dataset, column: str):
        self.dataset = dataset.select_columns([column])
        self.column = column

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> PILImage.Image:
        return _to_rgb(self.dataset[int(index)][self.column])

    def __getitems__(self, indices: list[int]) -> list[PILImage.Image]:
        # One Arrow slice per batch instead of one row lookup per image.
        return [_to_rgb(image) for image in self.dataset[list(indices)][self.column]]


class _PreprocessCollate:
    """Runs the image processor on a batch inside the DataLoader worker (picklable, unlike a lambda)."""

    def __init__(self, image_processor: Any):
        self.image_processor = image_processor

    def __call__(self, images: list[PILImage.Image]) -> torch.Tensor:
        return self.image_processor(images=images, return_tensors="pt")["pixel_values"]


def _embed_batches(
    model: torch.nn.Module,
    device: torch.device,
    autocast_dtype: torch.dtype | None,
    batches: Iterable[Any],
    embed: Callable[[Any], Any],
) -> torch.Tensor:
    """Run ``embed`` on each batch in eval mode (the model's own mode is restored after) on ``device``, where
    the model is moved if it is elsewhere: float32 CPU features [N, D]."""
    if model_device(model) != device:
        model.to(device)
    chunks = []
    with eval_mode(model):
        for batch in batches:
            with _autocast(device, autocast_dtype):
                embeds = embed(batch)
            chunks.append(as_tensor(embeds).float().cpu())
    return torch.cat(chunks)


@torch.inference_mode()
def extract_image_features(
    model: torch.nn.Module,
    image_processor: Any,
    dataset: Dataset,
    image_column: str = "image",
    batch_size: int = 64,
    num_workers: int = 0,
    dtype: str | torch.dtype | None = None,
    device: str | torch.device | None = None,
    cache_dir: str | os.PathLike | None = None,
    progress: bool = True,
    feature: str = "projected",
) -> torch.Tensor:
    """Embed every image of ``dataset[image_column]`` with ``model.get_image_features``.

    Returns raw (not L2-normalised) features, float32 on CPU, shape [N, D], in dataset order:
    ``feature="projected"`` gives the joint-space embeddings (zero-shot, retrieval); ``feature="pooled"``
    gives the image tower's pooled output before the projection, the representation the paper's linear
    probes use for CLIP-ViT (for the ResNets the attention pool already ends in the joint space). Decoding and preprocessing run in ``num_workers`` DataLoader workers; ``dtype="bf16"``
    runs the model under autocast. With ``cache_dir`` the result is stored as safetensors and reused when
    the model's weights (see `model_fingerprint`), dataset fingerprint, split, column and preprocessing are
    unchanged.
    """
    if len(dataset) == 0:
        raise ValueError("Cannot extract features from an empty dataset.")
    if image_column not in dataset.column_names:
        raise ValueError(
            f"Image column {image_column!r} not found; available columns: {', '.join(dataset.column_names)}."
        )
    if feature not in IMAGE_FEATURES:
        raise ValueError(f"feature must be one of {', '.join(IMAGE_FEATURES)}, got {feature!r}.")
    # A full processor works too: use the image processor inside it.
    image_processor = getattr(image_processor, "image_processor", None) or image_processor
    autocast_dtype = resolve_autocast_dtype(dtype)
    device = torch.device(device) if device is not None else model_device(model)
    processor_config = (
        image_processor.to_dict() if hasattr(image_processor, "to_dict") else repr(image_processor)
    )
    key = {
        "model": model_fingerprint(model),
        "dataset": dataset._fingerprint,
        "split": str(dataset.split),
        "column": image_column,
        "feature": feature,
        "rows": len(dataset),
        "processor": processor_config,
        "dtype": str(autocast_dtype),
    }
    cache_file = _cache_file(cache_dir, "image", key)
    cached = _load_cached(cache_file, len(dataset))
    if cached is not None:
        return cached

    loader = DataLoader(
        _ImageColumn(dataset, image_column),
        batch_size=batch_size,
        shuffle=False,
        num_workers=num_workers,
        collate_fn=_PreprocessCollate(image_processor),
        pin_memory=device.type == "cuda",
        persistent_workers=False,
    )

    def embed(pixel_values: torch.Tensor) -> Any:
        pixel_values = pixel_values.to(device, non_blocking=True)
        if feature == "pooled":
            return model.vision_model(pixel_values).pooler_output
        return model.get_image_features(pixel_values=pixel_values)

    batches = tqdm(loader, desc="Image features", unit="batch", disable=not progress)
    features = _embed_batches(model, device, autocast_dtype, batches, embed)
    metadata = {"kind": "image", "feature": feature, "column": image_column, "split": str(dataset.split)}
    _save_cached(cache_file, features, metadata)
    return features


@torch.inference_mode()
def extract_text_features(
    model: torch.nn.Module,
    tokenizer: Any,
    texts: Sequence[str],
    batch_size: int = 256,
    dtype: str | torch.dtype | None = None,
    device: str | torch.device | None = None,
    cache_dir: str | os.PathLike | None = None,
    progress: bool = True,
) -> torch.Tensor:
    """Embed ``texts`` with ``model.get_text_features``: raw projected embeddings, float32 on CPU, [N, D].

    ``tokenizer`` may also be a processor holding one. Texts are tokenised per batch (padded to the longest, truncated to the context length). With
    ``cache_dir`` the result is cached under a key of the model, the tokenizer and the texts themselves.
    """
    texts = list(texts)
    if not texts:
        raise ValueError("Cannot extract features from an empty list of texts.")
    bad = [i for i, t in enumerate(texts) if not isinstance(t, str)]
    if bad:
        raise TypeError(f"Texts must be strings; item {bad[0]} is a {type(texts[bad[0]]).__name__}.")
    tokenizer = getattr(tokenizer, "tokenizer", None) or tokenizer
    autocast_dtype = resolve_autocast_dtype(dtype)
    device = torch.device(device) if device is not None else model_device(model)
    max_length = context_length(model, tokenizer)
    texts_digest = hashlib.sha256("\x00".join(texts).encode()).hexdigest()
    key = {
        "model": model_fingerprint(model),
        "tokenizer": type(tokenizer).__name__,
        "max_length": max_length,
        "texts": texts_digest,
        "rows": len(texts),
        "dtype": str(autocast_dtype),
    }
    cache_file = _cache_file(cache_dir, "text", key)
    cached = _load_cached(cache_file, len(texts))
    if cached is not None:
        return cached

    def embed(batch_texts: list[str]) -> Any:
        batch = tokenizer(
            batch_texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt"
        )
        return model.get_text_features(
            input_ids=batch["input_ids"].to(device),
            attention_mask=batch["attention_mask"].to(device) if "attention_mask" in batch else None,
        )

    starts = tqdm(range(0, len(texts), batch_size), desc="Text features", unit="batch", disable=not progress)
    batches = (texts[start : start + batch_size] for start in starts)
    features = _embed_batches(model, device, autocast_dtype, batches, embed)
    _save_cached(cache_file, features, {"kind": "text"})
    return features


@dataclass(frozen=True)
class FeatureOptions:
    """The run settings every evaluation passes through, unchanged, to each of its feature extractions."""

    batch_size: int = 64
    num_workers: int = 0
    dtype: str | torch.dtype | None = None
    device: str | torch.device | None = None
    cache_dir: str | os.PathLike | None = None

    def image_features(
        self,
        model: torch.nn.Module,
        image_processor: Any,
        dataset: Dataset,
        image_column: str,
        feature: str = "projected",
    ) -> torch.Tensor:
        """`extract_image_features` with these settings (the fields are its keyword arguments)."""
        return extract_image_features(
            model, image_processor, dataset, image_column, feature=feature, **asdict(self)
        )

    def text_features(self, model: torch.nn.Module, tokenizer: Any, texts: Sequence[str]) -> torch.Tensor:
        """`extract_text_features` with these settings; text batches are cheap, so at least 256 long."""
        return extract_text_features(
            model,
            tokenizer,
            texts,
            batch_size=max(self.batch_size, 256),
            dtype=self.dtype,
            device=self.device,
            cache_dir=self.cache_dir,
        )
