"""Distributed contrastive-loss check, run by tests/test_loss.py as `torchrun --nproc_per_node 2` (gloo, CPU).

Every process builds the same global batch, takes its shard, and computes the distributed loss; rank 0
compares against an independent single-process computation on the whole batch:
- the mean of the per-process losses equals the single-process loss;
- concatenated per-process embedding gradients / world_size equal the single-process gradients;
- the mean of the per-process temperature (and bias) gradients equals the single-process gradient;
- under DistributedDataParallel the (averaged) parameter gradients equal the single-process gradients;
- GradCache accumulation over local micro-batches, encoders run outside DDP, then `average_gradients`,
  gives the single-process gradients of the whole global batch.
Prints "ALL CHECKS PASSED" on success; any mismatch raises, which makes torchrun exit non-zero.
"""

from __future__ import annotations

import copy
import math

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from hf_clip.training import ClipLoss, SigLipLoss, average_gradients, contrastive_accumulation_step

TOLERANCE = {torch.float64: 1e-6, torch.float32: 1e-5}


def reference_clip_loss(image: torch.Tensor, text: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    logits = scale * image @ text.t()
    labels = torch.arange(image.shape[0])
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.t(), labels)) / 2


def reference_siglip_loss(
    image: torch.Tensor, text: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor
) -> torch.Tensor:
    logits = scale * image @ text.t() + bias
    signs = 2 * torch.eye(image.shape[0], dtype=image.dtype) - 1
    return -F.logsigmoid(signs * logits).sum() / image.shape[0]


def all_gather_objects(obj):
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def assert_close(name: str, actual: torch.Tensor, expected: torch.Tensor, tol: float) -> None:
    diff = (actual - expected).abs().max().item()
    if dist.get_rank() == 0:
        print(f"{name}: max abs diff {diff:.2e} (tolerance {tol:.0e})", flush=True)
    assert diff <= tol, f"{name} differs by {diff} > {tol}"


def check_raw_embeddings(loss_name: str, sizes: list[int], dtype: torch.dtype) -> None:
    rank, world_size = dist.get_rank(), dist.get_world_size()
    generator = torch.Generator().manual_seed(1234 + sum(sizes))
    total, dim = sum(sizes), 16
    image = F.normalize(torch.randn(total, dim, generator=generator, dtype=dtype), dim=-1)
    text = F.normalize(torch.randn(total, dim, generator=generator, dtype=dtype), dim=-1)
    log_scale = torch.tensor(math.log(1 / 0.07), dtype=dtype)
    bias = torch.tensor(-2.5, dtype=dtype)

    # Single-process reference on the whole batch.
    ref_image, ref_text = image.clone().requires_grad_(), text.clone().requires_grad_()
    ref_log_scale, ref_bias = log_scale.clone().requires_grad_(), bias.clone().requires_grad_()
    if loss_name == "clip":
        ref_loss = reference_clip_loss(ref_image, ref_text, ref_log_scale.exp())
    else:
        ref_loss = reference_siglip_loss(ref_image, ref_text, ref_log_scale.exp(), ref_bias)
    ref_loss.backward()

    # Distributed: this rank's shard only.
    start = sum(sizes[:rank])
    local_image = image[start : start + sizes[rank]].clone().requires_grad_()
    local_text = text[start : start + sizes[rank]].clone().requires_grad_()
    local_log_scale, local_bias = log_scale.clone().requires_grad_(), bias.clone().requires_grad_()
    if loss_name == "clip":
        loss = ClipLoss()(local_image, local_text, local_log_scale.exp())
    else:
        loss = SigLipLoss()(local_image, local_text, local_log_scale.exp(), local_bias)
    loss.backward()

    results = all_gather_objects(
        (loss.detach(), local_image.grad, local_text.grad, local_log_scale.grad, local_bias.grad)
    )
    tol = TOLERANCE[dtype]
    tag = f"{loss_name} sizes={sizes} {dtype}"
    assert_close(f"{tag} loss", torch.stack([r[0] for r in results]).mean(), ref_loss.detach(), tol)
    image_grad = torch.cat([r[1] for r in results]) / world_size
    text_grad = torch.cat([r[2] for r in results]) / world_size
    assert_close(f"{tag} image grad", image_grad, ref_image.grad, tol)
    assert_close(f"{tag} text grad", text_grad, ref_text.grad, tol)
    assert_close(
        f"{tag} logit_scale grad", torch.stack([r[3] for r in results]).mean(), ref_log_scale.grad, tol
    )
    if loss_name == "siglip":
        assert_close(
            f"{tag} logit_bias grad", torch.stack([r[4] for r in results]).mean(), ref_bias.grad, tol
        )


class TwoTower(nn.Module):
    def __init__(self, in_image: int, in_text: int, dim: int) -> None:
        super().__init__()
        self.image_tower = nn.Sequential(nn.Linear(in_image, 32), nn.GELU(), nn.Linear(32, dim))
        self.text_tower = nn.Sequential(nn.Linear(in_text, 32), nn.GELU(), nn.Linear(32, dim))
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))

    def forward(self, image: torch.Tensor, text: torch.Tensor):
        image_embeds = F.normalize(self.image_tower(image), dim=-1)
        text_embeds = F.normalize(self.text_tower(text), dim=-1)
        return image_embeds, text_embeds, self.logit_scale.exp()


def check_ddp(local_batch: int) -> None:
    rank, world_size = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    model = TwoTower(12, 10, 8).double()
    generator = torch.Generator().manual_seed(99)
    images = torch.randn(local_batch * world_size, 12, generator=generator, dtype=torch.float64)
    texts = torch.randn(local_batch * world_size, 10, generator=generator, dtype=torch.float64)

    reference = copy.deepcopy(model)
    reference_clip_loss(*reference(images, texts)).backward()

    ddp = DistributedDataParallel(model)
    shard = slice(rank * local_batch, (rank + 1) * local_batch)
    ClipLoss()(*ddp(images[shard], texts[shard])).backward()
    for (name, param), ref_param in zip(model.named_parameters(), reference.parameters()):
        assert_close(f"DDP grad {name}", param.grad, ref_param.grad, TOLERANCE[torch.float64])


def check_grad_cache(local_batch: int, micro_batches: int) -> None:
    rank, world_size = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    model = TwoTower(12, 10, 8).double()
    generator = torch.Generator().manual_seed(5)
    images = torch.randn(local_batch * world_size, 12, generator=generator, dtype=torch.float64)
    texts = torch.randn(local_batch * world_size, 10, generator=generator, dtype=torch.float64)

    reference = copy.deepcopy(model)
    reference_clip_loss(*reference(images, texts)).backward()

    shard = slice(rank * local_batch, (rank + 1) * local_batch)
    contrastive_accumulation_step(
        lambda x: F.normalize(model.image_tower(x), dim=-1),
        lambda x: F.normalize(model.text_tower(x), dim=-1),
        list(zip(images[shard].chunk(micro_batches), texts[shard].chunk(micro_batches))),
        ClipLoss(),
        model.logit_scale.exp(),
    )
    average_gradients(model)
    for (name, param), ref_param in zip(model.named_parameters(), reference.parameters()):
        assert_close(f"GradCache grad {name}", param.grad, ref_param.grad, TOLERANCE[torch.float64])


def main() -> None:
    dist.init_process_group("gloo")
    assert dist.get_world_size() == 2, "run with --nproc_per_node 2"
    for loss_name in ("clip", "siglip"):
        check_raw_embeddings(loss_name, [6, 6], torch.float64)
        check_raw_embeddings(loss_name, [5, 3], torch.float64)  # uneven local batches
        check_raw_embeddings(loss_name, [7, 7], torch.float32)
    check_ddp(local_batch=6)
    check_grad_cache(local_batch=8, micro_batches=4)
    dist.barrier()
    if dist.get_rank() == 0:
        print("ALL CHECKS PASSED", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
