"""Contrastive losses over the global batch (CLIP softmax loss, SigLIP sigmoid loss).

Distributed convention (the paper's sharded similarity, as in open_clip's "local loss + gather with grad"):
every process gathers all features with gradients, but computes only its LOCAL rows against ALL columns.
Each process returns `sum over its rows * world_size / global_batch`, so the mean of the per-process losses
is exactly the single-process loss over the global batch, and so is the DDP gradient (DDP averages
gradients over processes; the gathers route each row's gradient back to its owner). With equal local
batches the returned value is simply the mean over local rows. For the raw embeddings this means: the
concatenation of the per-process gradients divided by `world_size` equals the single-process gradient.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .distributed import distributed_world, gather_batch_sizes, gather_with_grad


def _check_embeds(image_embeds: torch.Tensor, text_embeds: torch.Tensor) -> None:
    if image_embeds.ndim != 2 or image_embeds.shape != text_embeds.shape:
        raise ValueError(
            "image_embeds and text_embeds must both have shape (batch, dim), got "
            f"{tuple(image_embeds.shape)} and {tuple(text_embeds.shape)}; pass one text per image."
        )


class _GlobalBatchLoss(nn.Module):
    """Shared machinery: gather the global batch and cache the positive-pair indices."""

    def __init__(self) -> None:
        super().__init__()
        self._labels_key: tuple | None = None
        self._labels: torch.Tensor | None = None

    def _labels_for(self, local_size: int, offset: int, device: torch.device) -> torch.Tensor:
        """Column of each local row's positive pair; rebuilt only when the batch layout changes."""
        key = (local_size, offset, device)
        if self._labels_key != key:
            self._labels = torch.arange(offset, offset + local_size, device=device)
            self._labels_key = key
        return self._labels

    def _global_batch(
        self, local: torch.Tensor, *to_gather: torch.Tensor
    ) -> tuple[list[torch.Tensor], int, int]:
        """Gather `to_gather` across processes; returns (gathered, offset of our rows, global batch size)."""
        rank, world_size = distributed_world()
        if world_size == 1:
            return list(to_gather), 0, local.shape[0]
        sizes = gather_batch_sizes(local.shape[0], local.device)
        gathered = [gather_with_grad(t, sizes) for t in to_gather]
        return gathered, sum(sizes[:rank]), sum(sizes)


class ClipLoss(_GlobalBatchLoss):
    """Symmetric cross-entropy over the image-text similarity matrix (Radford et al. 2021, fig. 3).

    Called as `ClipLoss()(image_embeds, text_embeds, logit_scale)` with L2-normalised embeddings and
    `logit_scale` the multiplier (already exponentiated). See the module docstring for the distributed
    convention.
    """

    def forward(
        self, image_embeds: torch.Tensor, text_embeds: torch.Tensor, logit_scale: torch.Tensor | float
    ) -> torch.Tensor:
        _check_embeds(image_embeds, text_embeds)
        local_size = image_embeds.shape[0]
        (all_image, all_text), offset, global_size = self._global_batch(
            image_embeds, image_embeds, text_embeds
        )
        if global_size == 0:
            raise ValueError("ClipLoss got an empty global batch; skip steps whose batches are empty.")
        labels = self._labels_for(local_size, offset, image_embeds.device)
        logits_per_image = logit_scale * image_embeds @ all_text.t()
        logits_per_text = logit_scale * text_embeds @ all_image.t()
        total = F.cross_entropy(logits_per_image, labels, reduction="sum") + F.cross_entropy(
            logits_per_text, labels, reduction="sum"
        )
        _, world_size = distributed_world()
        return total * (world_size / (2 * global_size))


class SigLipLoss(_GlobalBatchLoss):
    """Pairwise sigmoid loss (Zhai et al. 2023): every image-text pair is an independent binary task.

    Called as `SigLipLoss()(image_embeds, text_embeds, logit_scale, logit_bias)`. The loss is the sum over
    pairs of `-log sigmoid(z * (scale * sim + bias))` (z = +1 for matching pairs, -1 otherwise) divided by
    the batch size, as in the paper. Distributed: all texts are gathered (with gradients) and each process
    scores its local images against them; the same averaging convention as `ClipLoss` applies.
    """

    def forward(
        self,
        image_embeds: torch.Tensor,
        text_embeds: torch.Tensor,
        logit_scale: torch.Tensor | float,
        logit_bias: torch.Tensor | float,
    ) -> torch.Tensor:
        _check_embeds(image_embeds, text_embeds)
        local_size = image_embeds.shape[0]
        (all_text,), offset, global_size = self._global_batch(image_embeds, text_embeds)
        if global_size == 0:
            raise ValueError("SigLipLoss got an empty global batch; skip steps whose batches are empty.")
        labels = self._labels_for(local_size, offset, image_embeds.device)
        logits = logit_scale * image_embeds @ all_text.t() + logit_bias
        positives = logits.gather(1, labels[:, None])
        # Treat every pair as negative, then swap the positives' terms: avoids a (local, global) label matrix.
        total = -(
            F.logsigmoid(-logits).sum() - F.logsigmoid(-positives).sum() + F.logsigmoid(positives).sum()
        )
        _, world_size = distributed_world()
        return total * (world_size / global_size)
