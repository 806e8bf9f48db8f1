"""Gradient accumulation that keeps every accumulated sample as a negative (GradCache, Gao et al. 2021).

Plain accumulation computes the contrastive loss per micro-batch, so each sample only sees its own
micro-batch as negatives and the result differs from one big batch. GradCache instead:
1. encodes every micro-batch without building a graph and caches the features;
2. computes the loss over the whole accumulated batch and its gradient w.r.t. the cached features;
3. re-encodes each micro-batch with a graph and back-propagates the cached feature gradients.
Parameter gradients equal those of one big batch, while only one micro-batch's activations are alive
(except through BatchNorm, which normalises each micro-batch by its own statistics).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from .distributed import distributed_world


class _RngState:
    """CPU and CUDA generator states, so a recomputed forward draws the same dropout masks."""

    def __init__(self) -> None:
        self.cpu = torch.get_rng_state()
        self.cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None

    def restore(self) -> None:
        torch.set_rng_state(self.cpu)
        if self.cuda is not None:
            torch.cuda.set_rng_state_all(self.cuda)


def contrastive_accumulation_step(
    encode_image: Callable[[Any], torch.Tensor],
    encode_text: Callable[[Any], torch.Tensor],
    micro_batches: Sequence[tuple[Any, Any]],
    loss_fn: Callable[..., torch.Tensor],
    logit_scale: torch.Tensor | float,
    *,
    logit_bias: torch.Tensor | float | None = None,
    backward: Callable[[torch.Tensor], Any] | None = None,
    no_sync: Callable[[], contextlib.AbstractContextManager] | None = None,
    model: nn.Module | None = None,
    image_frozen: bool = False,
    text_frozen: bool = False,
) -> torch.Tensor:
    """Accumulate gradients over `micro_batches` as if they formed one contrastive batch.

    Args:
        encode_image: maps a micro-batch's image inputs to the embeddings `loss_fn` expects (normalise
            inside it, e.g. `lambda px: F.normalize(model.get_image_features(px), dim=-1)`).
        encode_text: the same for the text inputs.
        micro_batches: `(image_inputs, text_inputs)` pairs.
        loss_fn: called as `loss_fn(image_embeds, text_embeds, logit_scale[, logit_bias])`, e.g. `ClipLoss()`.
        logit_scale: the temperature multiplier, with its graph to the parameter (`model.logit_scale.exp()`).
        logit_bias: SigLIP's bias, passed to `loss_fn` when given.
        backward: how to back-propagate a scalar, e.g. `accelerator.backward` (fp16 loss scaling);
            defaults to `Tensor.backward`. It is called once per micro-batch on a surrogate scalar whose
            gradient w.r.t. the features is the cached one, so gradient scalers apply exactly once. With
            accelerate keep `gradient_accumulation_steps=1` (it would divide each call's loss), and do not
            use DeepSpeed's backward, which steps the optimizer inside every call.
        no_sync: context factory entered around all but the last micro-batch's backward, e.g.
            `lambda: accelerator.no_sync(model)`, to skip redundant DDP gradient all-reduces. When the
            encoders bypass the DDP wrapper (e.g. `model.module.get_image_features`), DDP never reduces;
            call `average_gradients(model)` after this function instead.
        model: the module the encoders run; its BatchNorm running statistics are put back after the
            feature pass, so that each micro-batch updates them once (in the recompute), not twice.
        image_frozen: the image encoder has no trainable parameter (a locked tower, LiT): its features from
            the first pass are final, so it runs once per micro-batch instead of twice, and its BatchNorm
            statistics keep that pass's update.
        text_frozen: the same for the text encoder.

    Returns the (detached) loss over the accumulated batch. Gradients are accumulated into `.grad`;
    zero them before and step the optimizer after, as usual.
    """
    if len(micro_batches) == 0:
        raise ValueError("micro_batches is empty; pass at least one (image_inputs, text_inputs) pair.")
    backward = backward or torch.Tensor.backward

    # 1. Features for the whole accumulated batch, without activations. A frozen encoder runs here only.
    count = len(micro_batches)
    image_cache: list[Any] = [None] * count
    text_cache: list[Any] = [None] * count
    with torch.no_grad():
        for index, (image_inputs, text_inputs) in enumerate(micro_batches):
            if image_frozen:
                image_cache[index] = encode_image(image_inputs)
            if text_frozen:
                text_cache[index] = encode_text(text_inputs)
    rng_states = []
    norm_stats = _BatchNormStats(model)
    with torch.no_grad():
        for index, (image_inputs, text_inputs) in enumerate(micro_batches):
            rng_states.append(_RngState())
            if not image_frozen:
                image_cache[index] = encode_image(image_inputs)
            if not text_frozen:
                text_cache[index] = encode_text(text_inputs)
    final_rng = _RngState()
    norm_stats.restore()

    # 2. Loss over the accumulated batch; gradients w.r.t. the cached features and the loss scalars.
    image_features = torch.cat(image_cache)
    text_features = torch.cat(text_cache)
    features = [
        f for f, frozen in ((image_features, image_frozen), (text_features, text_frozen)) if not frozen
    ]
    for f in features:
        f.requires_grad_()
    live_scalars = [s for s in (logit_scale, logit_bias) if isinstance(s, torch.Tensor) and s.requires_grad]
    if not features and not live_scalars:
        raise ValueError("Both encoders are frozen and the loss has no trainable scalar: nothing to train.")
    detached = {id(s): s.detach().requires_grad_() for s in live_scalars}
    loss_args = [detached.get(id(s), s) for s in (logit_scale, logit_bias) if s is not None]
    with torch.enable_grad():
        loss = loss_fn(image_features, text_features, *loss_args)
        grads = list(torch.autograd.grad(loss, [*features, *detached.values()]))
    image_grads = None if image_frozen else grads.pop(0).split([f.shape[0] for f in image_cache])
    text_grads = None if text_frozen else grads.pop(0).split([f.shape[0] for f in text_cache])
    scalar_grads = grads
    del image_cache, text_cache, image_features, text_features, features

    # 3. Re-encode each micro-batch with a graph and push the cached gradients through it.
    last = 0 if image_frozen and text_frozen else count - 1  # the one backward that DDP syncs
    for index, (image_inputs, text_inputs) in enumerate(micro_batches[: last + 1]):
        rng_states[index].restore()
        sync_context = no_sync() if no_sync is not None and index < last else contextlib.nullcontext()
        with sync_context:
            parts = []
            if image_grads is not None:
                parts.append(_dot(encode_image(image_inputs), image_grads[index]))
            if text_grads is not None:
                parts.append(_dot(encode_text(text_inputs), text_grads[index]))
            if index == 0:  # the temperature's graph is shared, so back-propagate through it only once
                parts += [_dot(scalar, grad) for scalar, grad in zip(live_scalars, scalar_grads)]
            backward(sum(parts[1:], parts[0]))
    final_rng.restore()
    return loss.detach()


class _BatchNormStats:
    """The running statistics of a module's BatchNorm layers, to undo the feature pass's update."""

    def __init__(self, model: nn.Module | None) -> None:
        norms = (
            [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)] if model else []
        )
        self.saved = [
            (buffer, buffer.clone()) for m in norms if m.training for buffer in m.buffers(recurse=False)
        ]

    @torch.no_grad()
    def restore(self) -> None:
        for buffer, value in self.saved:
            buffer.copy_(value)


def _dot(tensor: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """Scalar whose gradient w.r.t. `tensor` is `grad` (summed in at least float32 for half features)."""
    dtype = torch.promote_types(tensor.dtype, torch.float32)
    return (tensor.to(dtype) * grad.to(dtype)).sum()


@torch.no_grad()
def average_gradients(model: nn.Module) -> None:
    """All-reduce and average `.grad` over processes (what DDP does), for encoders run outside DDP."""
    _, world_size = distributed_world()
    if world_size == 1:
        return
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    for dtype in dict.fromkeys(g.dtype for g in grads):  # same order on every process
        same_dtype = [g for g in grads if g.dtype == dtype]
        flat = torch.cat([g.reshape(-1) for g in same_dtype])
        dist.all_reduce(flat)
        flat /= world_size
        for grad, chunk in zip(same_dtype, flat.split([g.numel() for g in same_dtype])):
            grad.copy_(chunk.view_as(grad))
