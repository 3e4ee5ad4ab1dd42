#!/usr/bin/env bash
# The GPU benchmark (benchmarks/bench_gpu.py): training steps/s and sampling time of the ddpm-cifar10 U-Net, ours
# beside diffusers' UNet2DModel on equal weights, in fp32, bf16 and bf16 + torch.compile. Fits in 8 minutes on one
# H100 (an estimate of about 6 minutes, not yet measured there; rows that would run past --budget, 450 s by
# default, are skipped and say so).
#
#   bash benchmarks/gpu.sh              # on a CUDA GPU
#   bash benchmarks/gpu.sh --smoke      # anywhere, a tiny U-Net, seconds (what CI runs)
#   bash benchmarks/gpu.sh --help       # every option
#
# Python: $PYTHON, else .venv/bin/python, else python3; hf_ddpm is imported from src/ (no install needed), and
# torch, diffusers and accelerate must be importable. Writes nothing outside the temporary folder (inductor's and
# triton's caches) and $OUT: when $OUT is set, the output is also copied to $OUT/bench_gpu.log.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -n "${PYTHON:-}" ]; then
  py="$PYTHON"
elif [ -x .venv/bin/python ]; then
  py=.venv/bin/python
else
  py=python3
fi
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
tmp="${TMPDIR:-/tmp}"
export TORCHINDUCTOR_CACHE_DIR="${TORCHINDUCTOR_CACHE_DIR:-$tmp/torchinductor_$(id -un 2>/dev/null || echo user)}"
export TRITON_CACHE_DIR="${TRITON_CACHE_DIR:-$TORCHINDUCTOR_CACHE_DIR/triton}"
export CUDA_CACHE_PATH="${CUDA_CACHE_PATH:-$tmp/cuda-cache-$(id -u)}"
if [ -n "${OUT:-}" ] && [ -d "$OUT" ]; then
  "$py" benchmarks/bench_gpu.py "$@" 2>&1 | tee "$OUT/bench_gpu.log"
else
  exec "$py" benchmarks/bench_gpu.py "$@"
fi
