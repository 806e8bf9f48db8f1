"""Zero-shot retrieval over a saved index of CLIP embeddings (text-to-image and image-to-text search).

Embeddings are stored L2-normalised, so a search is one matrix product and scores are cosine similarities.
The model is needed only to embed new items or raw queries; a loaded index answers embedding queries alone.
"""

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

import torch
from safetensors.torch import load_file, save_file

from .._io import atomic_write, atomic_write_text
from ._encode import check_model, encode_images, encode_texts, l2_normalize

INDEX_WEIGHTS = "embedding_index.safetensors"
INDEX_CONFIG = "embedding_index.json"


class SearchResult(NamedTuple):
    """Best matches first: positions in the index, cosine similarities, and the ids stored for them."""

    indices: torch.Tensor
    scores: torch.Tensor
    ids: list[Any]


class EmbeddingIndex:
    """Normalised image and/or text embeddings, with optional ids (file names, captions' keys, ...)."""

    def __init__(
        self, model: torch.nn.Module | None = None, processor: Any = None, batch_size: int = 256
    ) -> None:
        if model is not None:
            check_model(model)
        self.model = model
        self.processor = processor
        self.batch_size = batch_size
        self.image_embeds: torch.Tensor | None = None
        self.text_embeds: torch.Tensor | None = None
        self.image_ids: list[Any] = []
        self.text_ids: list[Any] = []

    # Building -----------------------------------------------------------------------------------------------

    def _need(self, what: str) -> None:
        if self.model is None or self.processor is None:
            raise ValueError(
                f"Embedding {what} needs a model and a processor: EmbeddingIndex(model, processor), or "
                "EmbeddingIndex.load(path, model=..., processor=...). Embedding tensors can be passed directly."
            )

    def _image_embeds(self, images: Any) -> torch.Tensor:
        if isinstance(images, torch.Tensor) and images.ndim == 2:
            return l2_normalize(images.float())
        if isinstance(images, torch.Tensor) and images.ndim == 4:
            self._need("pixel values")
            return encode_images(self.model, images, batch_size=self.batch_size, progress=True)
        self._need("images")
        images = list(images) if isinstance(images, list | tuple) else [images]
        image_processor = getattr(self.processor, "image_processor", self.processor)
        chunks = []
        for start in range(0, len(images), self.batch_size):
            pixels = image_processor(images=images[start : start + self.batch_size], return_tensors="pt")[
                "pixel_values"
            ]
            chunks.append(encode_images(self.model, pixels, batch_size=self.batch_size))
        return torch.cat(chunks)

    def _text_embeds(self, texts: str | Sequence[str] | torch.Tensor) -> torch.Tensor:
        if isinstance(texts, torch.Tensor):
            return l2_normalize((texts.unsqueeze(0) if texts.ndim == 1 else texts).float())
        self._need("texts")
        texts = [texts] if isinstance(texts, str) else list(texts)
        return encode_texts(self.model, self.processor, texts, batch_size=self.batch_size, progress=True)

    @staticmethod
    def _append(old: torch.Tensor | None, new: torch.Tensor) -> torch.Tensor:
        new = new.detach().float().cpu().clone()
        if old is None:
            return new
        if old.shape[1] != new.shape[1]:
            raise ValueError(
                f"New embeddings have width {new.shape[1]}, the index holds width {old.shape[1]}."
            )
        return torch.cat([old, new])

    @staticmethod
    def _ids(ids: Sequence[Any] | None, start: int, count: int) -> list[Any]:
        if ids is None:
            return list(range(start, start + count))
        ids = list(ids)
        if len(ids) != count:
            raise ValueError(f"Got {len(ids)} ids for {count} items.")
        return ids

    def add_images(self, images: Any, ids: Sequence[Any] | None = None) -> "EmbeddingIndex":
        """Add PIL images/arrays, pixel values [N, 3, H, W] or image embeddings [N, D]."""
        embeds = self._image_embeds(images)
        self.image_ids += self._ids(ids, len(self.image_ids), embeds.shape[0])
        self.image_embeds = self._append(self.image_embeds, embeds)
        return self

    def add_texts(
        self, texts: str | Sequence[str] | torch.Tensor, ids: Sequence[Any] | None = None
    ) -> "EmbeddingIndex":
        """Add strings (ids default to the strings themselves) or text embeddings [N, D]."""
        embeds = self._text_embeds(texts)
        if ids is None and not isinstance(texts, torch.Tensor):
            ids = [texts] if isinstance(texts, str) else list(texts)
        self.text_ids += self._ids(ids, len(self.text_ids), embeds.shape[0])
        self.text_embeds = self._append(self.text_embeds, embeds)
        return self

    # Searching ----------------------------------------------------------------------------------------------

    @staticmethod
    def _search(
        queries: torch.Tensor, keys: torch.Tensor | None, ids: list[Any], k: int, single: bool, what: str
    ):
        if keys is None or keys.shape[0] == 0:
            raise ValueError(f"The index holds no {what}; add some with add_{what}().")
        if k < 1:
            raise ValueError(f"k must be at least 1, got {k}.")
        if queries.shape[1] != keys.shape[1]:
            raise ValueError(f"Query width {queries.shape[1]} does not match the index's {keys.shape[1]}.")
        scores, indices = (queries.to(keys.device) @ keys.t()).topk(min(k, keys.shape[0]), dim=-1)
        found = [[ids[i] for i in row] for row in indices.tolist()]
        if single:
            return SearchResult(indices[0], scores[0], found[0])
        return SearchResult(indices, scores, found)

    def search_images(self, text_query: str | Sequence[str] | torch.Tensor, k: int = 5) -> SearchResult:
        """The k images closest to a text (or each of several texts, or text embeddings)."""
        single = isinstance(text_query, str) or (
            isinstance(text_query, torch.Tensor) and text_query.ndim == 1
        )
        queries = self._text_embeds(text_query)
        return self._search(queries, self.image_embeds, self.image_ids, k, single, "images")

    def search_texts(self, image: Any, k: int = 5) -> SearchResult:
        """The k texts closest to an image (PIL image, pixel values [3, H, W] or [N, 3, H, W], or embeddings)."""
        single = not isinstance(image, list | tuple) and not (
            isinstance(image, torch.Tensor) and image.ndim in (2, 4)
        )
        if isinstance(image, torch.Tensor) and image.ndim in (1, 3):
            image = image.unsqueeze(0)
        queries = self._image_embeds(image)
        return self._search(queries, self.text_embeds, self.text_ids, k, single, "texts")

    # Persistence --------------------------------------------------------------------------------------------

    def save(self, path: str | os.PathLike) -> None:
        """Embeddings to safetensors, ids to JSON (ids must be JSON-serialisable)."""
        folder = Path(path)
        folder.mkdir(parents=True, exist_ok=True)
        tensors = {}
        if self.image_embeds is not None:
            tensors["image_embeds"] = self.image_embeds.contiguous()
        if self.text_embeds is not None:
            tensors["text_embeds"] = self.text_embeds.contiguous()
        meta = json.dumps({"image_ids": self.image_ids, "text_ids": self.text_ids}, ensure_ascii=False)
        atomic_write(folder / INDEX_WEIGHTS, lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}))
        atomic_write_text(folder / INDEX_CONFIG, meta)

    @classmethod
    def load(
        cls, path: str | os.PathLike, model: torch.nn.Module | None = None, processor: Any = None
    ) -> "EmbeddingIndex":
        folder = Path(path)
        for name in (INDEX_WEIGHTS, INDEX_CONFIG):
            if not (folder / name).is_file():
                raise FileNotFoundError(
                    f"{folder / name} not found; is {folder} a folder written by EmbeddingIndex.save?"
                )
        index = cls(model, processor)
        tensors = load_file(str(folder / INDEX_WEIGHTS))
        with open(folder / INDEX_CONFIG, encoding="utf-8") as f:
            meta = json.load(f)
        index.image_embeds = tensors.get("image_embeds")
        index.text_embeds = tensors.get("text_embeds")
        index.image_ids, index.text_ids = meta["image_ids"], meta["text_ids"]
        return index

    def __len__(self) -> int:
        return len(self.image_ids) + len(self.text_ids)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(images={len(self.image_ids)}, texts={len(self.text_ids)})"
