#!/usr/bin/env bash
# GPU checks: the gpu-marked tests and the benchmarks with CUDA variants, with Triton kernels compiled for real
# (unified operator, 2-bit codec, int8/fp8 quantization, FP8 inference via _scaled_mm in the gpu tests, TF32).
# Results are written with the GPU named. Harmless without a GPU: says so and exits 0. Bounded: each step has its
# own timeout (< 11 minutes in all).
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  echo "gpu_check: no CUDA device here; nothing to do"
  exit 0
fi
"$PY" -c "import torch; print('gpu_check on', torch.cuda.get_device_name(0), 'sm', torch.cuda.get_device_capability(0))"
status=0
timeout 180 "$PY" -m pytest -q -m gpu tests || status=1
timeout 300 "$PY" -m bench.conv_bn --quick --device cuda --name conv_bn_cuda || status=1
timeout 120 "$PY" -m bench.gpu_kernels --quick || status=1
if "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.device_count() >= 2 else 1)"; then
  timeout 60 "$PY" -m pytest -q tests/collectives -k "cupy or nccl or gpu" || status=1
fi
"$PY" -m bench.claims > /dev/null || status=1
exit $status
