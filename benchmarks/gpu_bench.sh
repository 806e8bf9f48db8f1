#!/usr/bin/env bash
# hf_clip vs open_clip vs transformers on one CUDA GPU (written for an H200): bf16 autocast, SDPA attention
# (PyTorch picks its fused kernel: cuDNN's flash attention on an H200 with torch 2.11), plus the ViT-B/16
# training MFU.
#
# Needs only what `pip install -e .[test]` installs; installs and downloads nothing (random weights).
# About 4-5 minutes on an H200 (each step is time-limited), most of it model construction, warm-up and
# compilation.
#
#   bash benchmarks/gpu_bench.sh [RESULTS_DIR]     # default benchmarks/results/cuda
#   PYTHON=/path/to/venv/bin/python bash benchmarks/gpu_bench.sh   # if `python` is not the project's
#
# Writes matmul_peak_cuda.json, training_cuda.{json,png}, training_compiled_blocks_cuda.{json,png} and
# inference_cuda.{json,png} and gpu_clocks.csv to RESULTS_DIR, then prints the ViT-B/16 training MFU.
set -uo pipefail
cd "$(dirname "$0")/.."
RESULTS="${1:-benchmarks/results/cuda}"
mkdir -p "$RESULTS"
export PYTHONPATH="src${PYTHONPATH:+:$PYTHONPATH}"
export TOKENIZERS_PARALLELISM=false
PYTHON="${PYTHON:-python}"

"$PYTHON" - <<'EOF' || exit 1
import sys

import torch

if not torch.cuda.is_available():
    sys.exit("gpu_bench.sh needs a CUDA GPU; on a CPU machine run the benchmark scripts directly.")
print(f"{torch.cuda.get_device_name()} | torch {torch.__version__} | flash SDPA enabled: "
      f"{torch.backends.cuda.flash_sdp_enabled()}")
EOF

# Each step has its own time limit and a failed step does not stop the rest: on a lent GPU every minute
# counts, and whatever finished is already saved (the scripts save after every model).
step() {
    local limit=$1; shift
    echo; echo "=== $* (limit ${limit}s) ==="; SECONDS=0
    timeout --kill-after=10 "$limit" "$@" || echo "!!! step failed or timed out (exit $?)"
    echo "(${SECONDS}s)"
}

# SM clock, power and temperature every half second: a GEMM probe slower between training steps than on its
# own (seen on the H200: 482-621 against 783 TFLOP/s) is then explained by the clocks or ruled out.
if command -v nvidia-smi >/dev/null; then
    nvidia-smi --query-gpu=timestamp,clocks.sm,clocks.mem,power.draw,temperature.gpu \
        --format=csv -lms 500 > "$RESULTS/gpu_clocks.csv" 2>/dev/null &
    CLOCKS_PID=$!
    trap 'kill $CLOCKS_PID 2>/dev/null' EXIT
fi

# Denominator of every "% of peak": the measured dense bf16 / fp32 GEMM rate of this GPU.
# Also its sustained rate (10 s back to back per dtype): the fair ceiling for a training step.
step 75 "$PYTHON" benchmarks/bench_matmul_peak.py --device cuda --repeats 5 --sustain-seconds 10 \
    --results-dir "$RESULTS"

# Training steps (forward, loss, backward, fused AdamW) at batch 256; ViT-B/16 first: it gives the MFU figure.
step 140 "$PYTHON" benchmarks/bench_training.py --device cuda --models ViT-B-16 ViT-B-32 RN50 --dtypes bf16 \
    --batch-size 256 --warmup 3 --repeats 10 --inner 2 --results-dir "$RESULTS"

# The same ViT-B/16 step with each implementation's repeated blocks torch.compile'd in place (regional
# compilation: fuses the element-wise work between the matmuls that eager mode runs as separate
# memory-bound kernels; about 1 minute for all three). Compiling the whole forward + loss instead
# (--compile graph) did not finish within 200 s on the H200 machine.
step 200 "$PYTHON" benchmarks/bench_training.py --device cuda --models ViT-B-16 --dtypes bf16 --compile blocks \
    --batch-size 256 --warmup 3 --repeats 10 --inner 2 --results-dir "$RESULTS"

# Embedding throughput, batch 1 (latency-bound) and 256 (throughput-bound). Each timed repetition makes
# enough calls to last 0.1 s, so batch-1 kernel-launch noise averages out.
step 150 "$PYTHON" benchmarks/bench_inference.py --device cuda --dtypes bf16 --batch-sizes 1 256 \
    --warmup 3 --repeats 7 --inner 3 --min-rep-seconds 0.1 --results-dir "$RESULTS"

"$PYTHON" - "$RESULTS" <<'EOF'
import json
import sys
from pathlib import Path

results = Path(sys.argv[1])
SPEC_BF16_DENSE = {"H200": 989e12, "H100 80GB HBM3": 989e12}  # SXM dense bf16, from NVIDIA's data sheets
peaks = {}
if (results / "matmul_peak_cuda.json").is_file():
    saved = json.loads((results / "matmul_peak_cuda.json").read_text())
    peaks["best GEMM"] = saved["peak_flops_per_s"]["bf16"]
    if "sustained" in saved:
        peaks["sustained GEMM"] = saved["sustained"]["bf16"]["flops_per_s"]
for name, how in (("training_cuda.json", "eager"), ("training_compiled_blocks_cuda.json", "torch.compile, blocks")):
    if not (results / name).is_file():
        print(f"\n(no {name}: that step failed or ran out of time)")
        continue
    training = json.loads((results / name).read_text())
    gpu = training["machine"]["gpu"]
    spec = next((value for key, value in SPEC_BF16_DENSE.items() if key in gpu), None)
    for row in training["results"]:
        if row["model"] != "ViT-B-16":
            continue
        peak = row["gemm_probe"]["flops_per_s"]
        print(f"\nViT-B/16 training, {how}, bf16 autocast, batch {row['batch']} ({gpu}; bf16 GEMM probe in "
              f"the same rounds: {peak / 1e12:.0f} TFLOP/s):")
        for impl, entry in row["implementations"].items():
            line = (f"  {impl:12s} {entry['samples_per_s']:8.1f} samples/s  {entry['flops_per_s'] / 1e12:6.1f} "
                    f"TFLOP/s  MFU {entry['pct_peak']:5.1f}% of the in-run GEMM probe")
            for label, value in peaks.items():
                line += f", {100 * entry['flops_per_s'] / value:5.1f}% of the {label} ({value / 1e12:.0f})"
            if spec:
                line += f", {100 * entry['flops_per_s'] / spec:5.1f}% of the {spec / 1e12:.0f} TFLOP/s spec"
            print(line)
EOF
