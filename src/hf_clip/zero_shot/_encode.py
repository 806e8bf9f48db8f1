"""Batched, gradient-free text and image encoding shared by the classifier, pipeline and retrieval index."""

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from tqdm.auto import tqdm

# OpenAI's context length; used only when neither the model nor the tokenizer says otherwise.
DEFAULT_CONTEXT_LENGTH = 77


def as_tensor(features: Any) -> torch.Tensor:
    """Projected features from `get_*_features`, which returns a tensor (hf_clip) or an output object (CLIPModel in v5)."""
    if isinstance(features, torch.Tensor):
        return features
    for name in ("image_embeds", "text_embeds", "pooler_output"):
        value = getattr(features, name, None)
        if isinstance(value, torch.Tensor):
            return value
    raise TypeError(
        f"get_*_features returned {type(features).__name__}; expected a tensor or an output with pooler_output."
    )


def l2_normalize(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(p=2, dim=-1, keepdim=True).clamp_min(1e-12)


def model_device(model: torch.nn.Module) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device("cpu")


@contextmanager
def eval_mode(model: torch.nn.Module) -> Iterator[None]:
    """Encode in eval mode (dropout and patch dropout off), then give the caller back the mode it had."""
    training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(training)


def get_tokenizer(tokenizer_or_processor: Any) -> Any:
    """The tokenizer itself, or the one inside a processor."""
    tokenizer = getattr(tokenizer_or_processor, "tokenizer", None)
    return tokenizer if tokenizer is not None else tokenizer_or_processor


def context_length(model: torch.nn.Module, tokenizer: Any) -> int:
    """Longest prompt the text tower accepts: the model's position table, else the tokenizer's limit."""
    text_config = getattr(getattr(model, "config", None), "text_config", None)
    length = getattr(text_config, "max_position_embeddings", None)
    if isinstance(length, int) and length > 0:
        return length
    length = getattr(tokenizer, "model_max_length", None)
    if isinstance(length, int) and 0 < length < 1_000_000:
        return length
    return DEFAULT_CONTEXT_LENGTH


def check_model(model: Any) -> None:
    missing = [
        name
        for name in ("get_text_features", "get_image_features", "logit_scale")
        if not hasattr(model, name)
    ]
    if missing:
        raise TypeError(
            f"{type(model).__name__} lacks {', '.join(missing)}; zero-shot classification needs a CLIP-style model "
            "such as hf_clip.HfClipModel or transformers.CLIPModel."
        )


def check_tokenizer_kwargs(tokenizer_kwargs: Mapping[str, Any] | None) -> None:
    """Refuse tokenizer options the encoder sets itself (texts, tensors) rather than ignore them."""
    refused = sorted(set(tokenizer_kwargs or {}) & {"text", "text_pair", "return_tensors"})
    if refused:
        raise ValueError(
            f"tokenizer_kwargs may not set {', '.join(refused)}: the prompts and PyTorch tensors are fixed here."
        )


@torch.inference_mode()
def encode_texts(
    model: torch.nn.Module,
    tokenizer: Any,
    texts: Sequence[str],
    batch_size: int = 256,
    device: torch.device | str | None = None,
    normalize: bool = True,
    progress: bool = False,
    tokenizer_kwargs: Mapping[str, Any] | None = None,
) -> torch.Tensor:
    """Text embeddings [N, D] in float32, prompts longer than the context truncated by the tokenizer.

    `tokenizer_kwargs` override the tokenizer options padding=True, truncation=True and max_length=<the
    text tower's context> (for example padding="max_length" for a model trained on padded captions)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}.")
    check_tokenizer_kwargs(tokenizer_kwargs)
    tokenizer = get_tokenizer(tokenizer)
    device = torch.device(device) if device is not None else model_device(model)
    options = {"padding": True, "truncation": True, "max_length": context_length(model, tokenizer)}
    options.update(tokenizer_kwargs or {})
    chunks = []
    starts = range(0, len(texts), batch_size)
    with eval_mode(model):
        for start in tqdm(starts, desc="encoding prompts", disable=not progress or len(starts) < 2):
            batch = list(texts[start : start + batch_size])
            tokens = tokenizer(batch, return_tensors="pt", **options)
            kwargs = {"input_ids": tokens["input_ids"].to(device)}
            if "attention_mask" in tokens:
                kwargs["attention_mask"] = tokens["attention_mask"].to(device)
            chunks.append(as_tensor(model.get_text_features(**kwargs)).float())
    if not chunks:
        raise ValueError("No texts to encode.")
    out = torch.cat(chunks)
    return l2_normalize(out) if normalize else out


@torch.inference_mode()
def encode_images(
    model: torch.nn.Module,
    pixel_values: torch.Tensor,
    batch_size: int = 256,
    normalize: bool = True,
    progress: bool = False,
) -> torch.Tensor:
    """Image embeddings [N, D] in float32 from preprocessed pixel values [N, C, H, W]."""
    if pixel_values.ndim != 4:
        hint = (
            " (one image: add the batch dimension, pixel_values.unsqueeze(0))"
            if pixel_values.ndim == 3
            else ""
        )
        raise ValueError(
            f"pixel_values must be [batch, channels, height, width], got shape {tuple(pixel_values.shape)}{hint}."
        )
    device = model_device(model)
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    chunks = []
    starts = range(0, pixel_values.shape[0], batch_size)
    with eval_mode(model):
        for start in tqdm(starts, desc="encoding images", disable=not progress or len(starts) < 2):
            batch = pixel_values[start : start + batch_size].to(device=device, dtype=dtype)
            chunks.append(as_tensor(model.get_image_features(pixel_values=batch)).float())
    out = torch.cat(chunks)
    return l2_normalize(out) if normalize else out
