#!/usr/bin/env bash
# GPU checks: the gpu-marked tests and the benchmarks with CUDA variants, with Triton kernels compiled for real.
# Harmless without a GPU: says so and exits 0. Bounded: each step has its own timeout (< 5 minutes in all).
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
timeout 90 "$PY" -m bench.conv_bn --quick --device cuda --name conv_bn_cuda || status=1
exit $status
