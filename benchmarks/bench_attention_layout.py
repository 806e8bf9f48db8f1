"""How hf_clip's attention feeds q, k, v to SDPA, measured as one training step on a GPU (or CPU).

hf_clip stores OpenAI's fused in-projection (one [3D, D] weight). Three ways to run it, all with the same
parameters and the same results:
  fused     one GEMM to [B, S, 3D], q/k/v are strided views of it (permute + unbind);
  fused-contiguous  the same, each view copied to a dense [B, H, S, Dh] tensor;
  split     three GEMMs on the weight's row blocks: q/k/v are separate dense [B, S, D] tensors, the layout
            transformers' separate q/k/v projections give SDPA.
Each variant is timed as a full step (bench_training's: forward, ClipLoss, backward, fused AdamW) next to
open_clip and transformers on identical weights, eager and with regional compilation, and a torch.profiler
table of the eager step's heaviest kernels is written for each, to say where a difference comes from.

    python benchmarks/bench_attention_layout.py --device cuda [--model ViT-B-16] [--batch-size 256]

Results: results/attention_layout_<device>.json and profiler tables beside it.
"""

from __future__ import annotations

import argparse
import copy
import types
from pathlib import Path
from typing import Any

import _common as common
import torch
import torch.nn.functional as F
from bench_training import make_step, prime_optimizer

from hf_clip.modeling_hf_clip import HfClipAttention, _attention, _rows_at


# Each variant keeps HfClipAttention.forward's contract, `pooled_at` (one query per row) included.
def _fused_contiguous(
    self: HfClipAttention, hidden_states: torch.Tensor, causal_mask: Any = None, pooled_at: Any = None
) -> Any:
    batch, seq, _ = hidden_states.shape
    qkv = self.qkv_proj(hidden_states).view(batch, seq, 3, self.num_heads, self.head_dim)
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
    if pooled_at is not None:
        q = _rows_at(q.transpose(1, 2), pooled_at).transpose(1, 2)
    q, k, v = (t.contiguous() for t in (q, k, v))
    out, _ = _attention(self, q, k, v, causal_mask, pooled_at)
    return self.out_proj(out.reshape(batch, q.shape[2], self.embed_dim))


def _split(
    self: HfClipAttention, hidden_states: torch.Tensor, causal_mask: Any = None, pooled_at: Any = None
) -> Any:
    batch, seq, _ = hidden_states.shape
    weight, bias = self.qkv_proj._weights(hidden_states)
    queries = hidden_states if pooled_at is None else _rows_at(hidden_states, pooled_at)
    rows = (queries, hidden_states, hidden_states)
    q, k, v = (
        F.linear(x, w, b).view(batch, x.shape[1], self.num_heads, self.head_dim).transpose(1, 2)
        for x, w, b in zip(rows, weight.chunk(3), bias.chunk(3), strict=True)
    )
    out, _ = _attention(self, q, k, v, causal_mask, pooled_at)
    return self.out_proj(out.reshape(batch, q.shape[2], self.embed_dim))


VARIANTS = {"fused": None, "fused-contiguous": _fused_contiguous, "split": _split}


def variant_model(model: torch.nn.Module, forward: Any) -> torch.nn.Module:
    model = copy.deepcopy(model)
    if forward is not None:
        for module in model.modules():
            if isinstance(module, HfClipAttention):
                module.forward = types.MethodType(forward, module)
    return model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="ViT-B-16", choices=[m for m in common.MODEL_NAMES if "ViT" in m])
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--inner", type=int, default=2)
    parser.add_argument("--no-compile", action="store_true", help="eager steps only")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--results-dir", type=Path, default=common.RESULTS_DIR)
    args = parser.parse_args()
    device = common.parse_device(args.device)
    model_set = common.build_model_set(args.model, device)
    config = model_set.config
    pixels, ids = common.make_inputs(
        args.batch_size, model_set.image_size, config.text_config.vocab_size, device
    )
    dtype = "bf16"
    base = model_set.models.pop("hf_clip")
    models = {f"hf_clip {name}": variant_model(base, fn) for name, fn in VARIANTS.items()}
    models.update(model_set.models)
    del base
    results: dict[str, Any] = {
        "machine": common.machine_info(device),
        "model": args.model,
        "batch": args.batch_size,
    }
    for mode in ("eager",) if args.no_compile else ("eager", "compiled blocks"):
        runners, losses = {}, {}
        for name, model in models.items():
            model = copy.deepcopy(model).train() if mode != "eager" else model.train()
            if mode != "eager":
                common.compile_blocks(model)
            impl = name.split()[0]
            step, optimizer = make_step(impl, model, model_set.tower, pixels, ids, dtype, device)
            prime_optimizer(model, optimizer)
            losses[name] = step().item()
            runners[name] = step
            if mode == "eager":
                activities = [torch.profiler.ProfilerActivity.CPU]
                if device.type == "cuda":
                    activities.append(torch.profiler.ProfilerActivity.CUDA)
                with torch.profiler.profile(activities=activities) as prof:
                    step()
                    common.synchronize(device)
                sort = "cuda_time_total" if device.type == "cuda" else "cpu_time_total"
                table = prof.key_averages().table(sort_by=sort, row_limit=25, max_name_column_width=70)
                path = (
                    args.results_dir / f"attention_layout_profile_{name.replace(' ', '_')}_{device.type}.txt"
                )
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(table)
        samples = common.interleaved(runners, device, 2, args.repeats, args.inner, desc=mode)
        rates = {name: args.batch_size / s.wall_median for name, s in samples.items()}
        results[mode] = {"samples_per_s": rates, "first_loss": losses}
        best_ref = max(rate for name, rate in rates.items() if not name.startswith("hf_clip"))
        print(f"\n{args.model} bf16 b{args.batch_size} training step, {mode}:")
        for name, rate in rates.items():
            print(
                f"  {name:22s} {rate:9.1f} samples/s  {rate / best_ref:6.3f} x best reference  "
                f"first loss {losses[name]:.5f}"
            )
    common.write_json(args.results_dir / f"attention_layout_{device.type}.json", results)


if __name__ == "__main__":
    main()
