"""Image-caption data for pretraining: decode, augment and tokenize in DataLoader workers, skipping bad rows.

Web-scale caption data always holds some broken images and empty captions; a run must not die on row
7,000,001. Bad rows are dropped in the worker and counted, and the count travels with each batch so the
training loop can log it. Augmentation is seeded by (seed, epoch, row), so a resumed run sees exactly the
batches an uninterrupted one would.
"""

from __future__ import annotations

import io
import os
from collections.abc import Callable, Iterator
from typing import Any

import torch
from PIL import Image, UnidentifiedImageError

from ..image_processing_hf_clip import _canonical_pil

PIL_ERRORS = (OSError, UnidentifiedImageError, ValueError, Image.DecompressionBombError, SyntaxError)


def decode_image(value: Any) -> Image.Image:
    """A PIL image from what `datasets` stores: a PIL image, {"bytes", "path"}, raw bytes or a file path."""
    if isinstance(value, Image.Image):
        image = value
    elif isinstance(value, dict):
        if value.get("bytes"):
            image = Image.open(io.BytesIO(value["bytes"]))
        elif value.get("path"):
            image = Image.open(value["path"])
        else:
            raise ValueError("image entry has neither bytes nor path")
    elif isinstance(value, (bytes, bytearray)):
        image = Image.open(io.BytesIO(value))
    elif isinstance(value, (str, os.PathLike)):
        image = Image.open(value)
    else:
        raise ValueError(f"unsupported image value of type {type(value).__name__}")
    image.load()  # force the decode here, so a truncated file fails inside the try
    # 16-bit and float images are scaled to 8 bits as the image processor does: Pillow's convert("RGB") clips
    # them at 255, which turns almost every pixel of a 16-bit photograph white.
    image = _canonical_pil(image, "image")
    return image.convert("RGB")


def prepare_example(
    row: dict[str, Any],
    image_column: str,
    caption_column: str,
    transform: Callable[[Image.Image, torch.Generator], torch.Tensor],
    generator: torch.Generator | None,
) -> dict[str, Any] | None:
    """(pixel_values, caption) for one row, or None when the image is unreadable or the caption empty.

    Several captions per image (COCO's five): one of the non-empty ones drawn with `generator`, which is
    seeded by (seed, epoch, row), so every caption serves in turn over the epochs and a resumed run draws the
    same ones; without a generator (evaluation), the first."""
    caption = row.get(caption_column)
    if isinstance(caption, (list, tuple)):
        captions = [c for c in caption if isinstance(c, str) and c.strip()]
        pick = (
            0
            if generator is None or len(captions) < 2
            else int(torch.randint(len(captions), (), generator=generator))
        )
        caption = captions[pick] if captions else None
    if not isinstance(caption, str) or not caption.strip():
        return None
    try:
        image = decode_image(row.get(image_column))
    except PIL_ERRORS:
        return None
    return {"pixel_values": transform(image, generator), "caption": caption}


def check_columns(dataset: Any, image_column: str, caption_column: str) -> None:
    """Name the missing columns up front (a stream that lacks them would otherwise skip every row)."""
    columns = getattr(dataset, "column_names", None)
    if columns is None:  # a stream whose features are not known until read
        return
    missing = [c for c in (image_column, caption_column) if c not in columns]
    if missing:
        raise ValueError(
            f"Column(s) {missing} not in the dataset (columns: {columns}); set --image_column / --caption_column."
        )


def without_image_decoding(dataset: Any, image_column: str) -> Any:
    """Images left as bytes for the workers to decode, so a broken one is skipped there, not raised by
    `datasets` while it reads the row."""
    from datasets import Image as ImageFeature

    features = getattr(dataset, "features", None)
    if features is not None and isinstance(features.get(image_column), ImageFeature):
        dataset = dataset.cast_column(image_column, ImageFeature(decode=False))
    return dataset


class _CaptionRows:
    """What both views share: the columns, the transform, and augmentation seeded by (seed, epoch, row)."""

    def __init__(
        self,
        dataset: Any,
        image_column: str,
        caption_column: str,
        transform: Callable[[Image.Image, torch.Generator], torch.Tensor],
        seed: int = 0,
    ) -> None:
        self.dataset, self.image_column, self.caption_column = dataset, image_column, caption_column
        self.transform, self.seed, self.epoch = transform, seed, 0

    def _example(self, row: dict[str, Any], index: int) -> dict[str, Any] | None:
        generator = torch.Generator().manual_seed(hash((self.seed, self.epoch, index)) & 0x7FFF_FFFF_FFFF)
        return prepare_example(row, self.image_column, self.caption_column, self.transform, generator)


class CaptionDataset(_CaptionRows, torch.utils.data.Dataset):
    """Map-style view of a `datasets.Dataset` (images left undecoded, decoded in the workers)."""

    def __init__(
        self, dataset: Any, image_column: str, caption_column: str, *args: Any, **kwargs: Any
    ) -> None:
        check_columns(dataset, image_column, caption_column)
        dataset = without_image_decoding(dataset, image_column).select_columns([image_column, caption_column])
        super().__init__(dataset, image_column, caption_column, *args, **kwargs)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict[str, Any] | None:
        return self._example(self.dataset[index], index)


class StreamingCaptionDataset(_CaptionRows, torch.utils.data.IterableDataset):
    """Iterable view of a streaming `datasets.IterableDataset` already split across processes.

    `datasets` itself hands each DataLoader worker its own shards. To resume, set `batch_size` and
    `start_batch` (batches already trained this epoch): the DataLoader takes batches from its workers in
    turn, so each worker skips its share of them, row for row with one worker.
    """

    def __init__(
        self, dataset: Any, image_column: str, caption_column: str, *args: Any, **kwargs: Any
    ) -> None:
        check_columns(dataset, image_column, caption_column)
        super().__init__(
            without_image_decoding(dataset, image_column), image_column, caption_column, *args, **kwargs
        )
        self.batch_size, self.start_batch = 1, 0
        # Batches each DataLoader worker already delivered this epoch (recorded by the training loop). The
        # DataLoader alternates between workers only while all of them have rows: with fewer shards than
        # workers, or shards spread unevenly, `start_batch` alone does not say which worker made which batch.
        self.worker_start: list[int] | None = None

    def __iter__(self) -> Iterator[dict[str, Any] | None]:
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        self.dataset.set_epoch(self.epoch)
        if self.worker_start is not None:
            done = self.worker_start[worker]
        else:
            done = self.start_batch // workers + (worker < self.start_batch % workers)
        for index, row in enumerate(self.dataset):
            if index >= done * self.batch_size:
                yield self._example(row, index * workers + worker)  # distinct augmentation seeds per worker


class CaptionCollator:
    """Stack images, tokenize captions, and report how many rows of the batch were skipped."""

    def __init__(self, tokenizer: Any, max_length: int) -> None:
        self.tokenizer, self.max_length = tokenizer, max_length

    def __call__(self, rows: list[dict[str, Any] | None]) -> dict[str, Any]:
        good = [r for r in rows if r is not None]
        info = torch.utils.data.get_worker_info()  # which worker made this batch: streams resume per worker
        batch: dict[str, Any] = {"num_skipped": len(rows) - len(good), "worker": info.id if info else 0}
        if good:
            tokens = self.tokenizer(
                [r["caption"] for r in good],
                padding="max_length",
                truncation=True,
                max_length=self.max_length,
                return_tensors="pt",
            )
            batch["input_ids"] = tokens["input_ids"]
            batch["pixel_values"] = torch.stack([r["pixel_values"] for r in good])
        return batch


class EpochBatchSampler(torch.utils.data.Sampler[list[int]]):
    """This process's share of a seeded per-epoch permutation, in batches, resumable at any batch."""

    def __init__(
        self,
        num_rows: int,
        batch_size: int,
        rank: int,
        world_size: int,
        seed: int,
        epoch: int,
        start_batch: int = 0,
    ) -> None:
        self.num_rows, self.batch_size, self.rank, self.world = num_rows, batch_size, rank, world_size
        self.seed, self.epoch, self.start_batch = seed, epoch, start_batch

    def __len__(self) -> int:
        return self.num_rows // (self.batch_size * self.world) - self.start_batch

    def __iter__(self) -> Iterator[list[int]]:
        order = torch.randperm(
            self.num_rows, generator=torch.Generator().manual_seed(self.seed + self.epoch)
        ).tolist()
        global_batch = self.batch_size * self.world
        for b in range(self.start_batch, self.num_rows // global_batch):  # drop the ragged last batch
            chunk = order[b * global_batch : (b + 1) * global_batch]
            yield chunk[self.rank * self.batch_size : (self.rank + 1) * self.batch_size]
