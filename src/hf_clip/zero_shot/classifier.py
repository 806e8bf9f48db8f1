"""A zero-shot classifier: class-name prompts encoded once into a weight matrix (section 3.1 of the paper).

Each class's prompts (every template, for every synonym of the class) are encoded, L2-normalised, averaged and
renormalised. The text tower runs once at construction; classifying images then costs one image encoding and
one matrix product, which is why the paper's 80-prompt ensemble is free at inference.
"""

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from .._io import atomic_write, atomic_write_text
from ._encode import check_model, encode_images, encode_texts, get_tokenizer, l2_normalize, model_device
from .templates import get_classnames, get_templates, is_known_dataset

ClassName = str | Sequence[str]

WEIGHTS_NAME = "zero_shot_classifier.safetensors"
CONFIG_NAME = "zero_shot_classifier.json"
_PLACEHOLDERS = ("{}", "{label}", "{c}", "{0}")  # {0}: str.format style, as transformers accepts


def fill_template(template: str, name: str) -> str:
    """Put `name` in `template`'s placeholder; plain replacement, so braces inside class names are safe."""
    for placeholder in _PLACEHOLDERS:
        if placeholder in template:
            return template.replace(placeholder, name)
    raise ValueError(
        f"Template {template!r} has no class-name placeholder; write one of {', '.join(_PLACEHOLDERS)}."
    )


def check_top_k(top_k: int | None) -> None:
    """How many labels to return per image: an integer >= 1, or None for all of them."""
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
        raise ValueError(f"top_k must be an integer >= 1 (or None for every label), got {top_k!r}.")


def resolve_templates(templates: str | Sequence[str] | None) -> list[str]:
    """A template list from one template, a list of them, or a shipped template-set name such as "imagenet"."""
    if templates is None:
        return ["a photo of a {}."]
    if isinstance(templates, str):
        if any(p in templates for p in _PLACEHOLDERS):
            return [templates]
        if is_known_dataset(templates):
            return get_templates(templates)
        raise ValueError(
            f"{templates!r} is neither a template (no placeholder {', '.join(_PLACEHOLDERS)}) nor a shipped "
            "template set; see hf_clip.zero_shot.available_datasets()."
        )
    templates = list(templates)
    if not templates:
        raise ValueError("templates is empty; give at least one template such as 'a photo of a {}.'.")
    for template in templates:
        if not isinstance(template, str):
            raise TypeError(f"Templates must be strings, got {type(template).__name__}: {template!r}.")
        fill_template(template, "x")  # raises when the placeholder is missing
    return templates


def resolve_classnames(classnames: str | Sequence[ClassName]) -> list[list[str]]:
    """Each class as a list of synonyms, from a list of names (or of synonym lists) or a shipped dataset name."""
    if isinstance(classnames, str):
        if not is_known_dataset(classnames):
            raise ValueError(
                f"classnames={classnames!r} is a string but not a shipped dataset; pass a list of class names "
                "or one of hf_clip.zero_shot.available_datasets()."
            )
        classnames = get_classnames(classnames)
    resolved = []
    for entry in classnames:
        try:
            synonyms = [entry] if isinstance(entry, str) else list(entry)
        except TypeError:  # a number or other non-iterable: the same message as for a bad list
            synonyms = []
        if not synonyms or not all(isinstance(s, str) for s in synonyms):
            raise TypeError(f"A class must be a name or a non-empty list of names, got {entry!r}.")
        resolved.append(synonyms)
    if not resolved:
        raise ValueError("classnames is empty; a classifier needs at least one class.")
    return resolved


def _check_tokenizable(tokenizer: Any, classes: list[list[str]]) -> None:
    names = [name for synonyms in classes for name in synonyms]
    ids = tokenizer(names, add_special_tokens=False, truncation=True)["input_ids"]
    empty = [name for name, tokens in zip(names, ids) if len(tokens) == 0]
    if empty:
        raise ValueError(
            f"Class name(s) {empty!r} tokenise to nothing, so every prompt for them would read the same; "
            "give each class a non-empty name."
        )


class ZeroShotClassifier:
    """Class weights [C, D] (unit rows) and the model's temperature; optionally the model for raw pixels.

    Build with `from_model`; call with pixel values [B, 3, H, W] or image embeddings [B, D] to get logits
    [B, C] = exp(logit_scale) * cos(image, class) (+ logit_bias for a model trained with the sigmoid loss,
    whose scores are then per-class sigmoids, as transformers' pipeline gives SigLIP models).
    """

    def __init__(
        self,
        weights: torch.Tensor,
        logit_scale: float | torch.Tensor,
        classnames: Sequence[ClassName],
        templates: Sequence[str],
        model: torch.nn.Module | None = None,
        logit_bias: float | None = None,
    ) -> None:
        if weights.ndim != 2:
            raise ValueError(f"weights must be [num_classes, embed_dim], got shape {tuple(weights.shape)}.")
        self.classes = resolve_classnames(classnames)
        if len(self.classes) != weights.shape[0]:
            raise ValueError(f"{len(self.classes)} class names for {weights.shape[0]} weight rows.")
        self.templates = list(templates)
        self.weights = weights
        self.logit_scale = float(logit_scale)
        self.logit_bias = None if logit_bias is None else float(logit_bias)
        self.model = model

    @property
    def labels(self) -> list[str]:
        """One display label per class: its first name."""
        return [synonyms[0] for synonyms in self.classes]

    @property
    def scale(self) -> float:
        """The multiplier applied to cosine similarities, exp(logit_scale)."""
        return float(torch.tensor(self.logit_scale).exp())

    @classmethod
    def from_model(
        cls,
        model: torch.nn.Module,
        tokenizer_or_processor: Any,
        classnames: str | Sequence[ClassName],
        templates: str | Sequence[str] | None = None,
        batch_size: int = 256,
        device: torch.device | str | None = None,
        progress: bool = True,
        tokenizer_kwargs: dict[str, Any] | None = None,
    ) -> "ZeroShotClassifier":
        """Encode every (class, template) prompt once and ensemble per class.

        `classnames`: names, lists of synonyms, or a shipped dataset name ("cifar10"); `templates`: one template,
        a list, or a shipped set name ("imagenet"); default "a photo of a {}.". Prompts beyond the context
        length are truncated by the tokenizer. Encoding runs where the model is; `device` is where the weights
        are kept (default: the model's device). `tokenizer_kwargs` override the tokenizer options
        (padding=True, truncation=True, max_length=<the text tower's context>).
        """
        check_model(model)
        classes = resolve_classnames(classnames)
        templates = resolve_templates(templates)
        tokenizer = get_tokenizer(tokenizer_or_processor)
        _check_tokenizable(tokenizer, classes)

        prompts, owner = [], []
        for index, synonyms in enumerate(classes):
            for name in synonyms:
                for template in templates:
                    prompts.append(fill_template(template, name))
                    owner.append(index)
        embeddings = encode_texts(
            model,
            tokenizer,
            prompts,
            batch_size=batch_size,
            progress=progress,
            tokenizer_kwargs=tokenizer_kwargs,
        )
        owner_t = torch.tensor(owner, device=embeddings.device)
        sums = torch.zeros(len(classes), embeddings.shape[1], device=embeddings.device).index_add_(
            0, owner_t, embeddings
        )
        counts = torch.bincount(owner_t, minlength=len(classes)).unsqueeze(1)
        # Renormalise the mean; clone leaves inference mode so the weights can seed a trainable head.
        weights = l2_normalize(sums / counts).clone()
        if device is not None:
            weights = weights.to(device)
        logit_scale = float(model.logit_scale.detach().float().cpu())
        bias = getattr(model, "logit_bias", None)
        bias = None if bias is None else float(bias.detach().float().cpu())
        return cls(weights, logit_scale, [list(s) for s in classes], templates, model=model, logit_bias=bias)

    def to(self, device: torch.device | str) -> "ZeroShotClassifier":
        """Move the class weights (not the attached model) to `device`."""
        self.weights = self.weights.to(device)
        return self

    def __call__(
        self, pixel_values: torch.Tensor | None = None, *, image_embeds: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Logits [B, C]. A 4-d tensor is read as pixel values, a 2-d one as (unnormalised) image embeddings."""
        if pixel_values is not None and image_embeds is not None:
            raise ValueError("Pass pixel_values or image_embeds, not both.")
        if pixel_values is not None and pixel_values.ndim == 2:
            pixel_values, image_embeds = None, pixel_values
        if pixel_values is not None and pixel_values.ndim == 1:
            raise ValueError(
                f"Got a 1-d tensor of shape {tuple(pixel_values.shape)}: for one image embedding pass "
                "image_embeds=embedding.unsqueeze(0); pixel values are [batch, 3, height, width]."
            )
        if pixel_values is not None:
            if self.model is None:
                raise ValueError(
                    "This classifier has no model attached (loaded without one), so it can only take image_embeds; "
                    "load it with ZeroShotClassifier.load(path, model=model) to classify pixels."
                )
            image_embeds = encode_images(self.model, pixel_values, normalize=False)
        if image_embeds is None:
            raise ValueError("Pass pixel_values [B, 3, H, W] or image_embeds [B, D].")
        if image_embeds.ndim != 2 or image_embeds.shape[1] != self.weights.shape[1]:
            raise ValueError(
                f"image_embeds must be [batch, {self.weights.shape[1]}], got shape {tuple(image_embeds.shape)}."
            )
        weights = self.weights.to(device=image_embeds.device)
        logits = self.scale * l2_normalize(image_embeds.float()) @ weights.t()
        return logits if self.logit_bias is None else logits + self.logit_bias

    def scores(self, logits: torch.Tensor) -> torch.Tensor:
        """Scores from logits: a softmax over the classes, as the contrastive loss trained them; for a
        sigmoid-loss model (with a logit bias) each class's own sigmoid, as that loss trained them."""
        return logits.float().softmax(dim=-1) if self.logit_bias is None else logits.float().sigmoid()

    def classify(self, images: Any, processor: Any, top_k: int | None = None) -> list[list[dict[str, Any]]]:
        """Scores (`scores`) for raw images (PIL images, paths, arrays or tensors, one or a batch), best first:
        one list of {label, score} per image."""
        image_processor = getattr(processor, "image_processor", processor)
        check_top_k(top_k)
        if isinstance(images, np.ndarray | torch.Tensor) and images.ndim == 4:
            images = list(images)  # a stacked batch of [H, W, C] (or [C, H, W]) arrays or tensors
        elif not isinstance(images, list | tuple):
            images = [images]
        pixel_values = image_processor(images=list(images), return_tensors="pt")["pixel_values"]
        probs = self.scores(self(pixel_values)).cpu()
        top_k = probs.shape[1] if top_k is None else min(top_k, probs.shape[1])
        scores, indices = probs.topk(top_k, dim=-1)
        labels = self.labels
        return [
            [{"label": labels[i], "score": s} for s, i in zip(row_s.tolist(), row_i.tolist())]
            for row_s, row_i in zip(scores, indices)
        ]

    def save(self, path: str | os.PathLike) -> None:
        """Write the weights (safetensors) and the class names, templates and temperature (JSON) to a folder."""
        folder = Path(path)
        folder.mkdir(parents=True, exist_ok=True)
        tensors = {"weights": self.weights.detach().float().cpu().contiguous()}
        atomic_write(folder / WEIGHTS_NAME, lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}))
        meta = {
            "classnames": self.classes,
            "templates": self.templates,
            "logit_scale": self.logit_scale,
            "logit_bias": self.logit_bias,
        }
        atomic_write_text(folder / CONFIG_NAME, json.dumps(meta, indent=1, ensure_ascii=False))

    @classmethod
    def load(
        cls,
        path: str | os.PathLike,
        model: torch.nn.Module | None = None,
        device: torch.device | str | None = None,
    ) -> "ZeroShotClassifier":
        """Read a folder written by `save`; attach `model` to classify pixel values rather than embeddings."""
        folder = Path(path)
        for name in (WEIGHTS_NAME, CONFIG_NAME):
            if not (folder / name).is_file():
                raise FileNotFoundError(
                    f"{folder / name} not found; is {folder} a folder written by ZeroShotClassifier.save?"
                )
        with open(folder / CONFIG_NAME, encoding="utf-8") as f:
            meta = json.load(f)
        if device is None:
            device = model_device(model) if model is not None else "cpu"
        weights = load_file(str(folder / WEIGHTS_NAME), device=str(device))["weights"]
        return cls(
            weights,
            meta["logit_scale"],
            meta["classnames"],
            meta["templates"],
            model=model,
            logit_bias=meta.get("logit_bias"),
        )

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(classes={len(self.classes)}, templates={len(self.templates)}, "
            f"embed_dim={self.weights.shape[1]}, logit_scale={self.logit_scale:.4f})"
        )
