#!/usr/bin/env bash
# hf_clip vs open_clip vs transformers on one CUDA GPU (written for an H200): bf16 autocast, SDPA attention
# (PyTorch picks its flash kernel for bf16, head dim 64, no mask), plus the ViT-B/16 training MFU.
#
# Needs only what `pip install -e .[test]` installs; installs and downloads nothing (random weights).
# About 4-6 minutes on an H200, most of it model construction and warm-up.
#
#   bash benchmarks/gpu_bench.sh [RESULTS_DIR]     # default benchmarks/results
#   PYTHON=/path/to/venv/bin/python bash benchmarks/gpu_bench.sh   # if `python` is not the project's
#
# Writes matmul_peak_cuda.json, inference_cuda.{json,png} and training_cuda.{json,png} to RESULTS_DIR.
set -euo pipefail
cd "$(dirname "$0")/.."
RESULTS="${1:-benchmarks/results}"
mkdir -p "$RESULTS"
export PYTHONPATH="src${PYTHONPATH:+:$PYTHONPATH}"
export TOKENIZERS_PARALLELISM=false
PYTHON="${PYTHON:-python}"

"$PYTHON" - <<'EOF'
import sys

import torch

if not torch.cuda.is_available():
    sys.exit("gpu_bench.sh needs a CUDA GPU; on a CPU machine run the benchmark scripts directly.")
print(f"{torch.cuda.get_device_name()} | torch {torch.__version__} | flash SDPA enabled: "
      f"{torch.backends.cuda.flash_sdp_enabled()}")
EOF

step() { echo; echo "=== $* ==="; SECONDS=0; "$@"; echo "(${SECONDS}s)"; }

# Denominator of every "% of peak": the measured dense bf16 / fp32 GEMM rate of this GPU.
step "$PYTHON" benchmarks/bench_matmul_peak.py --device cuda --repeats 5 --results-dir "$RESULTS"

# Embedding throughput, batch 1 (latency-bound) and 256 (throughput-bound). Each timed repetition makes
# enough calls to last 0.1 s, so batch-1 kernel-launch noise averages out.
step "$PYTHON" benchmarks/bench_inference.py --device cuda --dtypes bf16 --batch-sizes 1 256 \
    --warmup 3 --repeats 7 --inner 3 --min-rep-seconds 0.1 --results-dir "$RESULTS"

# Training steps; ViT-B/16 at batch 256 gives the MFU figure.
step "$PYTHON" benchmarks/bench_training.py --device cuda --models ViT-B-32 ViT-B-16 RN50 --dtypes bf16 \
    --batch-size 256 --warmup 3 --repeats 10 --inner 2 --results-dir "$RESULTS"

"$PYTHON" - "$RESULTS" <<'EOF'
import json
import sys
from pathlib import Path

results = Path(sys.argv[1])
training = json.loads((results / "training_cuda.json").read_text())
gpu = training["machine"]["gpu"]
SPEC_BF16_DENSE = {"H200": 989e12, "H100 80GB HBM3": 989e12}  # SXM dense bf16, from NVIDIA's data sheets
spec = next((value for key, value in SPEC_BF16_DENSE.items() if key in gpu), None)
for row in training["results"]:
    if row["model"] != "ViT-B-16":
        continue
    peak = row["gemm_probe"]["flops_per_s"]
    print(f"\nViT-B/16 training, bf16 autocast ({gpu}; bf16 GEMM probe in the same rounds: "
          f"{peak / 1e12:.0f} TFLOP/s):")
    for impl, entry in row["implementations"].items():
        line = (f"  {impl:12s} {entry['samples_per_s']:8.1f} samples/s  {entry['flops_per_s'] / 1e12:6.1f} TFLOP/s"
                f"  MFU {entry['pct_peak']:5.1f}% of the measured GEMM peak")
        if spec:
            line += f", {100 * entry['flops_per_s'] / spec:5.1f}% of the {spec / 1e12:.0f} TFLOP/s spec"
        print(line)
EOF
