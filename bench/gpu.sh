#!/usr/bin/env bash
# GPU benchmark of snnc: builds tvm:cuda and checks it against the reference, then times the
# bench net, ResNet-19 (T=4, N=64) and the Open Neuromorphic task (n=16384) against torch eager,
# torch.compile and spikingjelly's CUDA kernels. Meant to finish in under 8 minutes.
#
#   bench/gpu.sh [OUT.jsonl]          (default bench/out/gpu.jsonl)
#
# Needs an NVIDIA GPU. Uses $PYTHON if given, else the first of .venv-gpu/bin/python and
# python3 whose torch sees CUDA; if none does, creates .venv-gpu and installs a CUDA torch,
# apache-tvm, cupy, spikingjelly/norse (--no-deps) and snnc itself there (needs PyPI access).
# The CPU-only parts of the driver run anywhere with: python bench/gpu.py --device cpu --quick
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-bench/out/gpu.jsonl}
BUDGET=${SNNC_GPU_BUDGET_S:-420}   # the driver starts no new section after this (8 min total)

if ! command -v nvidia-smi >/dev/null || ! nvidia-smi -L >/dev/null 2>&1; then
    echo "gpu.sh: no NVIDIA GPU here (nvidia-smi failed); nothing measured" >&2
    exit 1
fi

has_cuda_torch() { "$1" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; }

PY=${PYTHON:-}
if [ -z "$PY" ]; then
    for cand in .venv-gpu/bin/python python3; do
        if command -v "$cand" >/dev/null && has_cuda_torch "$cand"; then PY=$cand; break; fi
    done
fi
if [ -z "$PY" ]; then
    echo "gpu.sh: no python with a CUDA torch; creating .venv-gpu" >&2
    python3 -m venv .venv-gpu
    PY=.venv-gpu/bin/python
    "$PY" -m pip install -q --upgrade pip
    "$PY" -m pip install -q torch                        # the default PyPI wheel is the CUDA build
    "$PY" -m pip install -q "apache-tvm==0.27.*" "apache-tvm-ffi==0.1.14.post1" onnx onnxruntime \
        cupy-cuda12x triton snntorch nir nirtorch
    "$PY" -m pip install -q --no-deps spikingjelly norse sinabs
    "$PY" -m pip install -q loguru scipy requests h5py packaging tqdm pbr
    "$PY" -m pip install -q --no-deps -e .
fi
has_cuda_torch "$PY" || { echo "gpu.sh: $PY has no CUDA torch" >&2; exit 1; }

mkdir -p "$(dirname "$OUT")"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader >&2
# the driver prints JSON lines; keep them, and the log on stderr
timeout 480 "$PY" bench/gpu.py --device cuda --budget-s "$BUDGET" | tee "$OUT"
echo "gpu.sh: results in $OUT" >&2
