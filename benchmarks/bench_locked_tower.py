"""Locked image tower (LiT): training-step time and memory against training both towers.

One small ViT CLIP, one batch, the pretraining script's step (forward, ClipLoss, backward, AdamW step), in
three set-ups that alternate within each repetition:

- `both`: nothing locked;
- `excluded`: the image tower left out of the optimizer only (its parameters still require grad): what
  filtering the optimizer alone gives, with the tower's graph and backward still paid for;
- `locked`: `lock_image_tower`, which also runs the tower without autograd.

With `--accumulation 2` the step is GradCache's (`contrastive_accumulation_step`), and `locked, recompute`
adds the locked tower run twice per micro-batch (without `image_frozen`). Memory: the bytes autograd keeps
for backward during the step (saved tensors, parameters left out), and each set-up's peak RSS in a fresh
process (`--rss`).

    python benchmarks/bench_locked_tower.py --steps 20
    python benchmarks/bench_locked_tower.py --steps 20 --accumulation 2
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from hf_clip import HfClipConfig, HfClipModel
from hf_clip.training import ClipLoss, contrastive_accumulation_step, create_optimizer, lock_image_tower

MODEL = {
    "projection_dim": 128,
    "text_config": {
        "hidden_size": 128,
        "num_hidden_layers": 3,
        "num_attention_heads": 2,
        "max_position_embeddings": 32,
        "vocab_size": 1024,
        "eos_token_id": 1023,
        "bos_token_id": 1022,
    },
    "vision_config": {"image_size": 64, "patch_size": 8, "hidden_size": 192, "num_hidden_layers": 6},
}
SETUPS = ("both", "excluded", "locked")


def build(setup: str, accumulation: int) -> tuple[HfClipModel, torch.optim.Optimizer, bool]:
    torch.manual_seed(0)
    model = HfClipModel(HfClipConfig(**MODEL)).train()
    frozen = False
    if setup == "excluded":
        names = [
            n for n, _ in model.named_parameters() if n.startswith(("vision_model.", "visual_projection."))
        ]
        optimizer = create_optimizer(model, lr=1e-4)
        kept = {id(p) for n, p in model.named_parameters() if n not in names}
        for group in optimizer.param_groups:
            group["params"] = [p for p in group["params"] if id(p) in kept]
        return model, optimizer, frozen
    if setup.startswith("locked"):
        lock_image_tower(model)
        frozen = setup == "locked"
    return model, create_optimizer(model, lr=1e-4), frozen


def batch(size: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(1, 1020, (size, 32), generator=generator)
    ids[:, 20] = 1023
    return ids, torch.randn(size, 3, 64, 64, generator=generator)


def step(model: HfClipModel, optimizer, frozen: bool, ids, pixels, accumulation: int) -> None:
    loss_fn = ClipLoss()
    if accumulation == 1:
        out = model(input_ids=ids, pixel_values=pixels)
        loss_fn(out.image_embeds, out.text_embeds, out.logit_scale).backward()
    else:
        contrastive_accumulation_step(
            lambda px: F.normalize(model.get_image_features(px), dim=-1),
            lambda t: F.normalize(model.get_text_features(t), dim=-1),
            list(zip(pixels.chunk(accumulation), ids.chunk(accumulation))),
            loss_fn,
            model.logit_scale.exp(),
            model=model,
            image_frozen=frozen,
        )
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


class _Held:
    """A tensor saved for backward, counted while the graph holding it lives."""

    def __init__(self, tensor: torch.Tensor, ledger: dict) -> None:
        self.tensor, self.ledger = tensor, ledger
        self.key = tensor.untyped_storage().data_ptr()
        entry = ledger["live"].setdefault(self.key, [0, tensor.untyped_storage().nbytes()])
        if entry[0] == 0:
            ledger["now"] += entry[1]
            ledger["peak"] = max(ledger["peak"], ledger["now"])
        entry[0] += 1

    def __del__(self) -> None:
        entry = self.ledger["live"][self.key]
        entry[0] -= 1
        if entry[0] == 0:
            self.ledger["now"] -= entry[1]
            del self.ledger["live"][self.key]


def saved_bytes(model, optimizer, frozen, ids, pixels, accumulation) -> int:
    """Peak bytes of the tensors autograd keeps for backward at once during one step (parameters, which
    exist anyway, left out; a storage saved twice counted once)."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    ledger = {"live": {}, "now": 0, "peak": 0}

    def pack(tensor: torch.Tensor):
        return tensor if tensor.untyped_storage().data_ptr() in params else _Held(tensor, ledger)

    def unpack(held):
        return held.tensor if isinstance(held, _Held) else held

    with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
        step(model, optimizer, frozen, ids, pixels, accumulation)
    return ledger["peak"]


def _peak_rss_mib() -> float:
    """This process's peak resident memory (VmHWM: unlike ru_maxrss it does not carry a parent's peak
    across fork and exec)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def rss_child(setup: str, accumulation: int, batch_size: int, steps: int) -> None:
    model, optimizer, frozen = build(setup, accumulation)
    ids, pixels = batch(batch_size)
    before = _peak_rss_mib()
    for _ in range(steps):
        step(model, optimizer, frozen, ids, pixels, accumulation)
    after = _peak_rss_mib()
    print(json.dumps({"peak_rss_mib": after, "step_rss_growth_mib": after - before}))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--accumulation", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rss-child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--output", default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.rss_child:
        rss_child(args.rss_child, args.accumulation, args.batch, 3)
        return
    setups = [*SETUPS, "locked, recompute"] if args.accumulation > 1 else list(SETUPS)
    built = {s: build(s, args.accumulation) for s in setups}
    ids, pixels = batch(args.batch)
    for s in setups:  # warm-up
        for _ in range(2):
            step(*built[s], ids, pixels, args.accumulation)
    times: dict[str, list[float]] = {s: [] for s in setups}
    for _ in range(args.steps):
        for s in setups:
            start = time.perf_counter()
            step(*built[s], ids, pixels, args.accumulation)
            times[s].append(time.perf_counter() - start)
    rows = []
    for s in setups:
        model, optimizer, frozen = built[s]
        child = subprocess.run(
            [
                sys.executable,
                __file__,
                "--rss-child",
                s,
                "--accumulation",
                str(args.accumulation),
                "--batch",
                str(args.batch),
                "--threads",
                str(args.threads),
            ],
            capture_output=True,
            text=True,
            check=True,
        )
        rows.append(
            {
                "setup": s,
                "step_ms": 1000 * statistics.median(times[s]),
                "saved_for_backward_mib": saved_bytes(
                    model, optimizer, frozen, ids, pixels, args.accumulation
                )
                / 2**20,
                "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
                **json.loads(child.stdout.strip().splitlines()[-1]),
            }
        )
    base = rows[0]
    print(
        f"\nbatch {args.batch}, accumulation {args.accumulation}, {args.steps} alternating steps, {args.threads} threads"
    )
    print(
        f"{'setup':<18} {'step ms':>8} {'x both':>7} {'saved MiB':>10} {'peak RSS MiB':>13} {'step growth':>12}"
    )
    for r in rows:
        print(
            f"{r['setup']:<18} {r['step_ms']:>8.1f} {base['step_ms'] / r['step_ms']:>7.2f} "
            f"{r['saved_for_backward_mib']:>10.1f} {r['peak_rss_mib']:>13.0f} {r['step_rss_growth_mib']:>12.0f}"
        )
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(json.dumps({"args": vars(args), "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
