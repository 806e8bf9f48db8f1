"""Differentiable all-gather for contrastive losses over the global batch.

Contrastive losses need every process's features as negatives, and the gradient of a gathered feature must
flow back to the process that produced it. `gather_with_grad` does both and accepts local batches of
different sizes (the last batch of an epoch, or batches that lost corrupt samples).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

# torch 2.14 renamed the single-tensor collectives; keep working on older releases.
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter_single = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


def distributed_world() -> tuple[int, int]:
    """`(rank, world_size)` of the default process group, `(0, 1)` when not running distributed."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def gather_batch_sizes(local_size: int, device: torch.device) -> list[int]:
    """Local batch size of every process, in rank order (one tiny collective)."""
    _, world_size = distributed_world()
    size = torch.tensor([local_size], dtype=torch.long, device=device)
    sizes = [torch.zeros_like(size) for _ in range(world_size)]
    dist.all_gather(sizes, size)
    return [int(s.item()) for s in sizes]


class _GatherWithGrad(torch.autograd.Function):
    """All-gather whose backward sums each process's gradient for a shard and returns it to its owner.

    Every process's loss depends on every shard, so the gradient of the total loss (the sum of the local
    losses) w.r.t. this process's features is the sum over processes of their gradients for this shard:
    a reduce-scatter with SUM.
    """

    @staticmethod
    def forward(ctx, tensor: torch.Tensor, sizes: list[int]) -> torch.Tensor:
        rank, world_size = distributed_world()
        max_size = max(sizes)
        ctx.sizes, ctx.rank, ctx.max_size = sizes, rank, max_size
        gathered = tensor.new_empty((world_size * max_size, *tensor.shape[1:]))
        if min(sizes) == max_size:  # the usual case: the gather's buffer is already the global batch
            _all_gather_single(gathered, tensor.contiguous())
            return gathered
        padded = tensor.new_zeros((max_size, *tensor.shape[1:]))
        padded[: tensor.shape[0]] = tensor
        _all_gather_single(gathered, padded)
        chunks = gathered.view(world_size, max_size, *tensor.shape[1:])
        return torch.cat([chunks[i, :n] for i, n in enumerate(sizes)])

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor) -> tuple[torch.Tensor, None]:
        sizes, rank, max_size = ctx.sizes, ctx.rank, ctx.max_size
        nccl = dist.get_backend() == dist.Backend.NCCL
        if min(sizes) == max_size:
            # Equal shards need no padding; the gloo all-reduce below works in place, so it gets a copy.
            padded = (
                grad_output.contiguous() if nccl else grad_output.clone(memory_format=torch.contiguous_format)
            )
            padded = padded.view(len(sizes), max_size, *grad_output.shape[1:])
        else:
            padded = grad_output.new_zeros((len(sizes), max_size, *grad_output.shape[1:]))
            for i, chunk in enumerate(grad_output.split(sizes)):
                padded[i, : sizes[i]] = chunk
        if nccl:
            grad = grad_output.new_empty((max_size, *grad_output.shape[1:]))
            _reduce_scatter_single(grad, padded.view(-1, *grad_output.shape[1:]))
        else:
            # Gloo has no reduce-scatter: an all-reduce followed by taking our shard is equivalent.
            dist.all_reduce(padded)
            grad = padded[rank]
        return grad[: sizes[rank]].contiguous(), None


def gather_with_grad(tensor: torch.Tensor, sizes: list[int] | None = None) -> torch.Tensor:
    """Concatenate `tensor` from all processes along dim 0, in rank order, keeping gradients.

    Args:
        tensor: this process's rows, shape `(local_batch, ...)`.
        sizes: every process's local batch size; gathered (one extra collective) when omitted.

    Returns the input unchanged when not running distributed.
    """
    _, world_size = distributed_world()
    if world_size == 1:
        return tensor
    if sizes is None:
        sizes = gather_batch_sizes(tensor.shape[0], tensor.device)
    return _GatherWithGrad.apply(tensor, sizes)
