"""The machine's measured GEMM peak (fp32 and bf16): what "% of peak" (MFU) is measured against.

Square matrix products of several sizes, repetitions interleaved across sizes and dtypes; the peak of a
dtype is the median FLOP/s of its best size. bench_inference.py and bench_training.py report their FLOP/s
against two peaks: a GEMM of the size at the top of this curve (n=4096 on CPU, 8192 on GPU) timed in the
same interleaved rounds as the models, so both see the same machine load (the headline figure), and the
peak saved here in results/matmul_peak_<device>.json when it was measured on the same hardware (CPU
model, core count, torch threads, GPU). On a shared machine the two differ by however much the load
changed between the runs.

With `--sustain-seconds S` it also runs each dtype's best size back to back for S seconds and reports the
median rate of the second half: a GPU's clocks drop under sustained load (on the H200 the 16384 size, whose
repetitions last longest, measured 644 TFLOP/s against 783 at 8192), and a training run is sustained load.

    python benchmarks/bench_matmul_peak.py [--device cpu|cuda] [--sizes 1024 2048 4096] [--repeats 5] [--quick]
        [--sustain-seconds 10]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path
from typing import Any

import _common as common
import torch


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:index]")
    parser.add_argument("--sizes", type=int, nargs="+", help="matrix sizes n (n x n @ n x n)")
    parser.add_argument("--dtypes", nargs="+", default=list(common.DTYPES), choices=common.DTYPES)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument(
        "--inner", type=int, help="products per timed repetition (default 1 on CPU, 20 on GPU)"
    )
    parser.add_argument(
        "--sustain-seconds", type=float, default=0.0, help="also measure each dtype's sustained rate"
    )
    parser.add_argument("--quick", action="store_true", help="one size, three repetitions (smoke run)")
    parser.add_argument("--threads", type=int, help="torch intra-op threads (default: one per core)")
    parser.add_argument("--results-dir", type=Path, default=common.RESULTS_DIR)
    args = parser.parse_args()
    if args.repeats < 1:
        parser.error("--repeats must be at least 1.")
    return args


def sustained_rate(device: torch.device, dtype: str, n: int, seconds: float) -> dict[str, Any]:
    """GEMMs of size n back to back for `seconds`, timed in chunks of about a quarter second; the
    median chunk rate of the second half, after clocks and temperature have settled."""
    gemm = common.gemm(device, dtype, n)
    one_call = common.time_call(gemm, device)[0]  # also the warm-up
    per_chunk = max(1, int(0.25 / max(one_call, 1e-6)))
    rates = []
    start = time.perf_counter()
    while time.perf_counter() - start < seconds:
        rates.append(2 * n**3 / common.time_call(gemm, device, per_chunk)[0])
    settled = rates[len(rates) // 2 :]
    return {"n": n, "seconds": seconds, "flops_per_s": statistics.median(settled), "chunk_rates": rates}


def main() -> None:
    args = parse_args()
    device = common.parse_device(args.device)
    common.set_threads(args.threads)
    on_gpu = device.type == "cuda"
    sizes = args.sizes or ([4096, 8192, 16384] if on_gpu else [1024, 2048, 4096])
    repeats = args.repeats
    if args.quick:
        sizes, repeats = sizes[1:2], 3
    inner = args.inner or (20 if on_gpu else 1)
    info = common.machine_info(device)
    with common.ContentionMeter() as contention:
        result = common.measure_matmul_peak(device, sizes, args.dtypes, repeats, inner)
    info["others_cpu_share"] = contention.others_share
    info["loadavg_end"] = list(os.getloadavg())

    rows = []
    for dtype, entries in result["by_size"].items():
        for n, entry in entries.items():
            rows.append((dtype, n, f"{entry['flops_per_s'] / 1e9:,.1f}"))
    print(common.markdown_table(("dtype", "n", "GFLOP/s (median)"), rows))
    for dtype, peak in result["peak_flops_per_s"].items():
        print(f"peak {dtype}: {peak / 1e9:,.1f} GFLOP/s")
    print(
        f"machine: {info['cpu_model']}, nproc {info['nproc']}, torch threads {info['torch_threads']}, "
        f"load average {info['loadavg_start'][0]:.2f} -> {info['loadavg_end'][0]:.2f}"
    )

    data = {"machine": info, "sizes": sizes, "repeats": repeats, "inner": inner, **result}
    if args.sustain_seconds > 0:
        data["sustained"] = {}
        for dtype, entries in result["by_size"].items():
            best = max(entries, key=lambda n: entries[n]["flops_per_s"])
            data["sustained"][dtype] = sustained_rate(device, dtype, int(best), args.sustain_seconds)
            print(
                f"sustained {dtype} (n={best}, {args.sustain_seconds:g} s back to back): "
                f"{data['sustained'][dtype]['flops_per_s'] / 1e9:,.1f} GFLOP/s"
            )
    path = common.matmul_peak_path(args.results_dir, device)
    if args.quick:
        path = path.with_name(path.stem + "_quick.json")
    common.write_json(path, data)
    print(f"wrote {path}")


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    main()
