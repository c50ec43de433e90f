#!/usr/bin/env bash
# The whole GPU check in one call (docs/design.md, "Testing"), on a machine with a GPU and no
# package index: build the extension from source, run the CUDA and Triton tests on CUDA
# tensors, compute-sanitizer memcheck on small cases of every CUDA-device kernel, then the
# benchmarks. Logs and bench/gpu.py's JSON go to the folder given as $1 (or $OUT); the
# short table comes last on stdout.
#
#   bash bench/gpu_check.sh OUT_DIR
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-${OUT:-gpu_out}}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
# Only the GPU's own architecture: the build is the slowest step before the tests.
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-$($PY -c 'import torch; c = torch.cuda.get_device_capability(); print(f"{c[0]}.{c[1]}" + ("a" if c[0] == 9 else ""))')}
status=0
step() {  # step NAME COMMAND...: run, log to $OUT/NAME.log, report time and result
  local name=$1; shift
  local t0=$SECONDS
  "$@" >"$OUT/$name.log" 2>&1
  local rc=$?
  printf '%-10s rc=%d  %4ds  (%s)\n' "$name" "$rc" $((SECONDS - t0)) "$OUT/$name.log" | tee -a "$OUT/summary.txt"
  [ "$rc" -eq 0 ] || { status=1; tail -n 30 "$OUT/$name.log"; }
  return "$rc"
}
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem --format=csv >"$OUT/gpu.txt" 2>&1
step build $PY -m pip install --no-build-isolation --no-deps -C cmake.define.LOWBIT_TEST_MODELS=ON -e . || exit 1
# Tests compile one config per shape (the every-config tests cover the rest); the bench tunes.
step tests env LOWBIT_TRITON_AUTOTUNE=0 $PY -m pytest tests/test_cuda_kernels.py tests/test_triton_kernels.py tests/test_ops.py tests/test_backends.py \
  -q -x -p no:cacheprovider
if command -v compute-sanitizer >/dev/null; then
  step memcheck compute-sanitizer --tool memcheck --error-exitcode 3 $PY bench/gpu_sanitize.py
else
  echo "memcheck  skipped: compute-sanitizer is not on the PATH" | tee -a "$OUT/summary.txt"
fi
step bench $PY bench/gpu.py --out "$OUT"
cat "$OUT/summary.txt"
tail -n 120 "$OUT/bench.log"
exit $status
