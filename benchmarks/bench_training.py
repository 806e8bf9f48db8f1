"""One full training step (forward, contrastive loss, backward, AdamW step): hf_clip vs open_clip vs transformers.

Identical weights and captions for every implementation (see _common.py), as each library's tokenizer
hands them over: 77-padded ids for open_clip and hf_clip, padded to the batch's longest caption for
transformers (its processor's padding=True). On CPU in bf16 transformers runs eager attention, faster
there than SDPA (hf_clip switches by itself). Each one trains with its own library's loss: hf_clip `hf_clip.training.ClipLoss` on the model's embeddings, open_clip
`open_clip.loss.ClipLoss`, transformers `CLIPModel(..., return_loss=True)`. All use the same optimizer,
`hf_clip.training.create_optimizer` (AdamW, the paper's betas/eps and weight-decay split) with
fused=True (transformers' Trainer default; 4x faster than the for-loop AdamW on CPU), and set gradients
to None after each step. bf16 = autocast around forward and loss, weights and optimizer in fp32. Steps
alternate between implementations after a warm-up round that also checks that the first losses agree.

Peak memory: the step's peak of memory allocated by torch above what was held before it (weights, AdamW
moments, inputs). Measured on the first (warm-up) step, after AdamW's moments were allocated by a
zero-gradient step, so it is a steady-state step: gradients, activations, temporaries. CPU:
torch.profiler(profile_memory=True), whose running total of torch's CPU allocator is exact for tensors
(tracemalloc sees only Python objects, and RSS in one process that holds three models mixes their freed
pages); GPU: torch.cuda.max_memory_allocated.

FLOPs: forward + loss + backward, counted once with FlopCounterMode on a weightless copy of the model, for
the work each implementation does (open_clip runs all 77 caption positions; transformers its padded
length; hf_clip stops at the batch's last end-of-text token, which changes no embedding or gradient); "% of peak" (MFU) divides the achieved rate by a GEMM timed in the same rounds (see bench_matmul_peak.py).

    python benchmarks/bench_training.py [--models ViT-B-32 RN50] [--batch-size 32] [--dtypes fp32 bf16]
        [--repeats 3] [--threads N] [--quick] [--device cpu|cuda]

Results: results/training_<device>[_quick].json and .png.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import _common as common
import torch
from torch import nn

TARGET_STEP = 1.10  # issue 7: training step at least 10% faster than the faster reference
TARGET_BF16 = 1.60  # issue 7: hf_clip bf16 autocast step at least 1.6x its fp32 step
LEARNING_RATE = 1e-5


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["ViT-B-32", "RN50"], choices=common.MODEL_NAMES)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--dtypes", nargs="+", default=list(common.DTYPES), choices=common.DTYPES)
    parser.add_argument("--repeats", type=int, default=3, help="timed steps per implementation")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps first (at least 1)")
    parser.add_argument("--inner", type=int, default=1, help="steps per timed repetition (use >1 on GPU)")
    parser.add_argument("--no-transformers", action="store_true", help="skip transformers' CLIPModel")
    parser.add_argument(
        "--compile",
        choices=("graph", "blocks"),
        help="torch.compile each implementation: 'graph' its whole forward + loss, 'blocks' each repeated "
        "block in place (regional compilation: one compile serves all layers). Results: training_<mode>_*",
    )
    parser.add_argument("--quick", action="store_true", help="smoke run: ViT-B-32, batch 4, fp32, 2 repeats")
    parser.add_argument("--threads", type=int, help="torch intra-op threads (default: one per core)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:index]")
    parser.add_argument("--results-dir", type=Path, default=common.RESULTS_DIR)
    args = parser.parse_args()
    if args.quick:
        args.models, args.batch_size, args.dtypes, args.repeats = ["ViT-B-32"], 4, ["fp32"], 2
    if args.repeats < 1 or args.warmup < 1 or args.inner < 1 or args.batch_size < 2:
        parser.error("--repeats, --warmup, --inner must be at least 1 and --batch-size at least 2.")
    return args


# -------------------------------------------------------------------------------------------- the step


def make_step(
    impl: str,
    model: nn.Module,
    tower: str,
    pixels: torch.Tensor,
    ids: torch.Tensor,
    dtype: str,
    device: torch.device,
    compile_mode: str | None = None,
) -> tuple[Callable[[], torch.Tensor], torch.optim.Optimizer]:
    """The step as each library's documentation trains: its forward, its loss, backward, AdamW.

    With compile_mode="graph", forward and loss are one torch.compile'd graph (backward follows through
    AOTAutograd); the optimizer step stays eager, as `accelerate`'s dynamo_backend leaves it. With
    "blocks", the model's repeated blocks were compiled in place beforehand (`common.compile_blocks`)."""
    import open_clip

    from hf_clip.training import ClipLoss, create_optimizer

    optimizer = create_optimizer(model, lr=LEARNING_RATE, tower=tower, fused=True)
    if impl == "hf_clip":
        loss_fn = ClipLoss()

        def loss_of() -> torch.Tensor:
            out = model(input_ids=ids, pixel_values=pixels)
            return loss_fn(out.image_embeds, out.text_embeds, out.logit_scale)

    elif impl == "open_clip":
        loss_fn = open_clip.loss.ClipLoss()

        def loss_of() -> torch.Tensor:
            image, text, scale = model(pixels, ids)[:3]
            return loss_fn(image, text, scale)

    else:
        # transformers' processor pads to the batch's longest caption (padding=True); done by the data
        # pipeline, before the step, as a tokenizer would.
        short_ids = common.longest_padded(ids, model.config.text_config.eos_token_id)

        def loss_of() -> torch.Tensor:
            return model(input_ids=short_ids, pixel_values=pixels, return_loss=True).loss

    forward_loss = torch.compile(loss_of) if compile_mode == "graph" else loss_of

    def step() -> torch.Tensor:
        with common.autocast(device, dtype):
            loss = forward_loss()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    return step, optimizer


def step_flops(config: Any, batch: int, positions: int | None = None, full: bool = False) -> int:
    """FLOPs of forward + loss + backward of the architecture with `positions` caption positions run
    (counted on hf_clip, weightless). `full`: every block for every token, as the references run (hf_clip
    runs a ViT's last block for the class token alone)."""
    from hf_clip.training import ClipLoss

    model = common.meta_hf_clip(config).train()
    pixels, ids = (
        torch.empty(
            batch, 3, config.vision_config.image_size, config.vision_config.image_size, device="meta"
        ),
        torch.zeros(batch, positions or common.CONTEXT_LENGTH, dtype=torch.long, device="meta"),
    )

    def run() -> None:
        out = model(input_ids=ids, pixel_values=pixels, output_hidden_states=full)
        ClipLoss()(out.image_embeds, out.text_embeds, out.logit_scale).backward()

    return common.count_flops(run)


# ------------------------------------------------------------------------------------------ memory


def prime_optimizer(model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Allocate AdamW's moments with a zero-gradient step, so a measured step is a steady-state one."""
    for param in model.parameters():
        if param.requires_grad:
            param.grad = torch.zeros_like(param)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def _allocator_peak_mb(prof: torch.profiler.profile, device_type: int) -> float:
    """Peak of torch's running allocation total during a profile, above its value at the start."""
    with tempfile.TemporaryDirectory() as tmp:
        trace = Path(tmp) / "trace.json"
        prof.export_chrome_trace(str(trace))
        events = json.loads(trace.read_text())["traceEvents"]
    memory = sorted(
        (e for e in events if e.get("name") == "[memory]" and e["args"].get("Device Type") == device_type),
        key=lambda e: e["ts"],
    )
    if not memory:
        raise RuntimeError("torch.profiler recorded no memory events; cannot measure peak memory.")
    start = memory[0]["args"]["Total Allocated"] - memory[0]["args"]["Bytes"]
    return (max(e["args"]["Total Allocated"] for e in memory) - start) / 2**20


def measured_step(step: Callable[[], torch.Tensor], device: torch.device) -> tuple[torch.Tensor, float]:
    """Run one step and return (loss, peak MB allocated by torch above the memory held before the step).

    CPU: torch.profiler with profile_memory=True sees every allocation and free of torch's CPU allocator
    (activations, gradients, temporaries, optimizer scratch); its running total peaks at the step's peak.
    GPU: torch.cuda.max_memory_allocated. Neither counts memory outside torch's allocator (oneDNN's
    internal caches, malloc slack), which is the same for all implementations: they run the same kernels.
    """
    if device.type == "cuda":
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        loss = step()
        return loss, (torch.cuda.max_memory_allocated(device) - base) / 2**20
    activities = [torch.profiler.ProfilerActivity.CPU]
    with torch.profiler.profile(activities=activities, profile_memory=True) as prof:
        loss = step()
    return loss, _allocator_peak_mb(prof, device_type=0)


# ---------------------------------------------------------------------------------------------- timing


def bench_model(
    name: str, args: argparse.Namespace, device: torch.device, peak: dict
) -> list[dict[str, Any]]:
    model_set = common.build_model_set(name, device, transformers=not args.no_transformers)
    impls = list(model_set.models)
    for model in model_set.models.values():
        model.train()
        if args.compile == "blocks":
            common.compile_blocks(model)
    config, batch = model_set.config, args.batch_size
    pixels, ids = common.make_inputs(batch, model_set.image_size, config.text_config.vocab_size, device)
    # The references run all 77 caption positions; hf_clip stops at the batch's last end-of-text token
    # (not when compiled whole: the trimmed length is data-dependent, so that graph runs all of them).
    positions = (
        None if args.compile == "graph" else common.text_positions_run(ids, config.text_config.eos_token_id)
    )
    flops = {
        impl: step_flops(config, batch, None if impl == "open_clip" else positions, full=impl != "hf_clip")
        for impl in impls
    }
    rows = []
    for dtype in args.dtypes:
        if "transformers" in model_set.models:
            # Each library at its fastest here: on CPU, bf16 training is faster with eager attention than with
            # SDPA's flash backward at CLIP's sequence lengths, for transformers as for hf_clip (which switches
            # by itself).
            eager = device.type == "cpu" and dtype == "bf16"
            model_set.models["transformers"].set_attn_implementation("eager" if eager else "sdpa")
        runners, first_loss, memory = {}, {}, {}
        for impl, model in model_set.models.items():
            step, optimizer = make_step(
                impl, model, model_set.tower, pixels, ids, dtype, device, args.compile
            )
            prime_optimizer(model, optimizer)
            # On a GPU the first step also allocates cuBLAS/cuDNN workspaces, and a compiled step compiles:
            # keep both out of the figure.
            first = step() if device.type == "cuda" or args.compile else None
            loss, peak_mb = measured_step(step, device)  # a warm-up step too
            first_loss[impl] = (loss if first is None else first).item()
            memory[impl] = {"step_peak_mb": peak_mb}
            runners[impl] = step
        spread = max(first_loss.values()) - min(first_loss.values())
        if dtype == "fp32" and spread > 1e-3 * max(1.0, abs(first_loss["hf_clip"])):
            raise RuntimeError(
                f"First fp32 losses differ ({first_loss}): the implementations are not the same model."
            )
        probe, probe_flops = common.gemm_probe(device, dtype)
        probe[common.PROBE]()  # its warm-up: the models' warm-up steps ran above
        with common.ContentionMeter() as contention:
            samples = common.interleaved(
                runners,
                device,
                args.warmup - 1,
                args.repeats,
                args.inner,
                desc=f"{name} {dtype} b{batch}",
                probes=probe,
            )
        rows.append(
            _summarise(name, dtype, batch, impls, samples, flops, peak, memory, first_loss, probe_flops)
        )
        rows[-1]["others_cpu_share"] = contention.others_share
        _print_row(rows[-1], impls)
    return rows


def _summarise(
    name: str,
    dtype: str,
    batch: int,
    impls: list[str],
    samples: dict,
    flops: dict[str, int],
    peak: dict,
    memory: dict,
    first_loss: dict,
    probe_flops: int,
) -> dict[str, Any]:
    probe_rate = probe_flops / samples[common.PROBE].wall_median
    per_impl = {}
    for impl in impls:
        s = samples[impl]
        entry = {
            "samples_per_s": batch / s.wall_median,
            "step_s": s.wall_median,
            "step_cpu_s": s.cpu_median,
            "flops_per_step": flops[impl],
            "flops_per_s": flops[impl] / s.wall_median,
            "first_loss": first_loss[impl],
            "memory": memory.get(impl),
            "samples": vars(s),
        }
        entry.update(common.pct_of_peak(entry["flops_per_s"], probe_rate, peak, dtype))
        per_impl[impl] = entry
    refs = [impl for impl in impls if impl != "hf_clip"]
    ours = per_impl["hf_clip"]
    ratios = {
        "step": ours["samples_per_s"] / max(per_impl[r]["samples_per_s"] for r in refs),
        "step_cpu": min(per_impl[r]["step_cpu_s"] for r in refs) / ours["step_cpu_s"],
    }
    if memory:
        ratios["memory"] = ours["memory"]["step_peak_mb"] / min(
            per_impl[r]["memory"]["step_peak_mb"] for r in refs
        )
    best = max(refs, key=lambda r: per_impl[r]["samples_per_s"])
    return {
        "model": name,
        "dtype": dtype,
        "batch": batch,
        "implementations": per_impl,
        "ratios": ratios,
        "best_reference": best,
        "gemm_probe": {"flops_per_s": probe_rate, **vars(samples[common.PROBE])},
    }


def _print_row(row: dict[str, Any], impls: list[str]) -> None:
    per, r = row["implementations"], row["ratios"]
    speeds = "  ".join(f"{impl} {per[impl]['samples_per_s']:6.2f}" for impl in impls)
    memory = f" | step memory hf_clip/best {r['memory']:.3f}" if "memory" in r else ""
    share = row["others_cpu_share"]
    print(
        f"{row['model']:9s} {row['dtype']} b{row['batch']} samples/s: {speeds} | hf_clip/best {r['step']:.3f} "
        f"(CPU-time {r['step_cpu']:.3f}){memory} | hf_clip {per['hf_clip']['pct_peak']:.0f}% of peak"
        + ("" if share is None else f" | others used {100 * share:.0f}% of the CPUs"),
        flush=True,
    )


def _bf16_speedups(rows: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Per model and implementation: bf16 samples/s over fp32 samples/s."""
    by_key = {(r["model"], r["dtype"]): r for r in rows}
    out = {}
    for (model, dtype), row in by_key.items():
        if dtype == "bf16" and (model, "fp32") in by_key:
            fp32 = by_key[(model, "fp32")]["implementations"]
            out[model] = {
                impl: entry["samples_per_s"] / fp32[impl]["samples_per_s"]
                for impl, entry in row["implementations"].items()
            }
    return out


def _table(rows: list[dict[str, Any]]) -> str:
    headers = (
        "model",
        "dtype",
        "batch",
        "hf_clip samples/s",
        "open_clip",
        "transformers",
        "ratio (CPU-time)",
        "step peak MB hf_clip / open_clip / transformers",
        "hf_clip % of GEMM peak: in-run (saved)",
    )
    lines = []
    for row in rows:
        per, r = row["implementations"], row["ratios"]

        def mem(impl: str, per: dict = per) -> str:
            entry = per.get(impl, {}).get("memory") if impl in per else None
            return f"{entry['step_peak_mb']:.0f}" if entry else "-"

        lines.append(
            (
                row["model"],
                row["dtype"],
                row["batch"],
                *common.rate_cells(per, "samples_per_s"),
                f"**{r['step']:.3f}** ({r['step_cpu']:.3f})",
                " / ".join(mem(impl) for impl in common.IMPLEMENTATIONS),
                common.pct_cell(per["hf_clip"]),
            )
        )
    return common.markdown_table(headers, lines)


def write_chart(data: dict[str, Any], path: Path) -> None:
    """Bar chart of the step-speed (and step-memory) ratios of a results file."""
    rows = data["results"]
    groups, where = common.chart_labels(data)
    series = {"step speed": [r["ratios"]["step"] for r in rows]}
    if all("memory" in r["ratios"] for r in rows):
        series["step peak memory (best ref / hf_clip)"] = [1 / r["ratios"]["memory"] for r in rows]
    title = f"Training step, hf_clip / faster reference (wall time)\n{where}"
    common.ratio_chart(path, title, groups, series, data["targets"]["step"])


def main() -> None:
    args = parse_args()
    common.set_threads(args.threads)
    device = common.parse_device(args.device)
    info = common.machine_info(device)
    peak = common.load_matmul_peak(args.results_dir, device, info)
    stem = f"training_compiled_{args.compile}" if args.compile else "training"
    rows = []
    for name in args.models:
        rows.extend(bench_model(name, args, device, peak))
        # Saved after every model, so a crash or time limit later keeps what was measured.
        speedups = _bf16_speedups(rows)
        table = _table(rows)
        extra = {
            "targets": {"step": TARGET_STEP, "bf16_over_fp32": TARGET_BF16},
            "results": rows,
            "bf16_speedup": speedups,
            "table": table,
        }
        common.save_results(stem, args, device, info, peak, extra, write_chart)
    print(table)
    for model, values in speedups.items():
        print(f"{model} bf16 / fp32 speed-up: " + ", ".join(f"{impl} {v:.2f}x" for impl, v in values.items()))


if __name__ == "__main__":
    main()
