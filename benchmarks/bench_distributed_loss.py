"""The contrastive loss over the global batch, forward + backward: hf_clip's ClipLoss vs open_clip's.

Both gather every process's features with gradients and compute local rows against all columns
(open_clip: `ClipLoss(local_loss=True, gather_with_grad=True)`). Run under torchrun; each repetition
times both losses on the same random features, alternating which goes first, between barriers.

    torchrun --standalone --nproc_per_node 2 benchmarks/bench_distributed_loss.py [--batch 1024] [--dim 512]

Gloo on CPU by default (`--device cuda` uses NCCL, one GPU per process). Prints the median milliseconds
per step and the ratio open_clip / hf_clip (> 1: hf_clip faster); rank 0 writes
results/distributed_loss_<device>.json.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

import _common as common
import torch
import torch.distributed as dist


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=1024, help="local batch per process")
    parser.add_argument("--dim", type=int, default=512, help="embedding width")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--results-dir", type=Path, default=common.RESULTS_DIR)
    args = parser.parse_args()
    if "RANK" not in os.environ:
        raise SystemExit("Run under torchrun: torchrun --standalone --nproc_per_node 2 " + __file__)
    import open_clip

    from hf_clip.training import ClipLoss

    cuda = args.device == "cuda"
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device(f"cuda:{int(os.environ['LOCAL_RANK'])}" if cuda else "cpu")
    if cuda:
        torch.cuda.set_device(device)
    else:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    generator = torch.Generator().manual_seed(rank)
    image = torch.nn.functional.normalize(torch.randn(args.batch, args.dim, generator=generator), dim=-1)
    text = torch.nn.functional.normalize(torch.randn(args.batch, args.dim, generator=generator), dim=-1)
    image, text = image.to(device).requires_grad_(), text.to(device).requires_grad_()
    scale = torch.tensor(100.0, device=device)
    losses = {
        "hf_clip": ClipLoss(),
        "open_clip": open_clip.loss.ClipLoss(
            local_loss=True, gather_with_grad=True, cache_labels=True, rank=rank, world_size=world
        ),
    }
    values = {}

    def step(name: str) -> float:
        dist.barrier()
        common.synchronize(device)
        start = time.perf_counter()
        loss = losses[name](image, text, scale)
        loss.backward()
        common.synchronize(device)
        dist.barrier()
        values[name] = loss.item()
        image.grad = text.grad = None
        return time.perf_counter() - start

    times: dict[str, list[float]] = {name: [] for name in losses}
    for rep in range(args.repeats + 3):
        order = list(losses) if rep % 2 == 0 else list(reversed(losses))
        for name in order:
            seconds = step(name)
            if rep >= 3:
                times[name].append(seconds)
    medians = {name: statistics.median(t) for name, t in times.items()}
    if rank == 0:
        # open_clip averages over local rows, hf_clip scales to the global mean: equal for equal shards.
        if abs(values["hf_clip"] - values["open_clip"]) > 1e-4 * abs(values["open_clip"]):
            raise RuntimeError(f"The losses differ: {values}")
        ratio = medians["open_clip"] / medians["hf_clip"]
        print(
            f"{world} processes x {args.batch} x {args.dim} ({args.device}): "
            + ", ".join(f"{name} {1000 * m:.1f} ms" for name, m in medians.items())
            + f" | open_clip / hf_clip {ratio:.2f}"
        )
        info = common.machine_info(device)
        common.write_json(
            args.results_dir / f"distributed_loss_{device.type}.json",
            {
                "machine": info,
                "options": {k: str(v) for k, v in vars(args).items()},
                "world_size": world,
                "median_s": medians,
                "ratio_open_clip_over_hf_clip": ratio,
                "losses": values,
            },
        )
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
