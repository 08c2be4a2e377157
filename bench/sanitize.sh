#!/usr/bin/env bash
# compute-sanitizer on small runs of the CUDA extension's kernels (GPU only):
#   memcheck  - out-of-bounds / misaligned global and shared memory accesses
#   racecheck - shared-memory data races (missing __syncthreads / __syncwarp)
#   synccheck - illegal barrier use
#
#   bench/sanitize.sh [--quick] [LOGDIR]     (default LOGDIR: build/sanitize)
#
# Full: both heads, every dtype, dropout on/off, the 64- and 128-row tiles, the shared-memory
# fallbacks (x / h / accumulators in global memory) and multi-chunk weight gradients.  --quick: one small case per tool (the GPU runbook).
# Interpreter: python3, or $PYTHON.
# Exit status: 0 every tool clean; 1 a tool reported an error; 2 the interpreter cannot
# import torch; 77 skipped, with the reason on the last line ("skipped (...): ..."): no GPU,
# no compute-sanitizer, or an extension without CUDA kernels.  Never 0 when nothing ran.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
QUICK=0
if [ "${1:-}" = "--quick" ]; then QUICK=1; shift; fi
OUT=${1:-build/sanitize}
PY=${PYTHON:-python3}

skip() { echo "skipped ($1): $2"; exit 77; }

# One probe (importing torch and spinalkern is the slow part): 3 no torch, 4 no GPU,
# 5 no CUDA kernels in the extension.
"$PY" - <<'PY' > /dev/null 2>&1
import sys
try:
    import torch
except ImportError:
    sys.exit(3)
if not torch.cuda.is_available():
    sys.exit(4)
from spinalkern import cuda_backend
sys.exit(0 if cuda_backend.has_cuda_kernels() else 5)
PY
case $? in
  0) ;;
  3) echo "sanitize.sh: '$PY' cannot import torch; set PYTHON to the interpreter that has it"
     exit 2 ;;
  4) skip "no GPU" "torch sees no CUDA GPU here, so there is nothing to sanitize" ;;
  5) skip "no CUDA kernels" "spinalkern._C is not built with its CUDA kernels (python3 setup.py build_ext --inplace)" ;;
  *) echo "sanitize.sh: the probe of torch / spinalkern failed; run: $PY -c 'import spinalkern'"
     exit 2 ;;
esac
SAN=$(command -v compute-sanitizer || echo /usr/local/cuda/bin/compute-sanitizer)
[ -x "$SAN" ] || skip "no compute-sanitizer" "not on PATH nor in /usr/local/cuda/bin"
mkdir -p "$OUT"

read -r -d '' RUN <<'PY'
import os, sys, torch
from spinalkern import cuda_backend  # noqa: F401  (loads the ops)
from spinalkern.spec import HeadSpec
torch.manual_seed(0)
quick = sys.argv[1] == "1"
if quick:
    cases = [("spinal", 74, 64, 3, 26, 2, 37)]
    knobs, dtypes, ps = [{}], (torch.bfloat16,), (0.3,)
else:
    cases = [("spinal", 74, 64, 3, 26, 2, 37), ("progressive", 37, 128, 2, 10, 1, 70),
             ("spinal", 256, 256, 2, 100, 2, 40)]
    knobs = [{}, {"SPINALKERN_CUDA_TILE_M": "64", "SPINALKERN_CUDA_CHAIN_TILE_M": "64"},
             {"SPINALKERN_CUDA_TILE_M": "128"}, {"SPINALKERN_CUDA_SMEM_LIMIT": "110000"},
             {"SPINALKERN_CUDA_DW_CHUNK_ROWS": "17"}]
    dtypes = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
    ps = (0.0, 0.3)
for env in knobs:
    os.environ.update(env)
    for kind, D, H, n, C, S, B in cases:
        spec = HeadSpec(kind, D, H, n, C, S)
        for dtype in dtypes:
            for p in ps:
                x = torch.randn(B, D, device="cuda", dtype=dtype)
                ws = [torch.randn(N, K, device="cuda", dtype=dtype) / K ** 0.5 for N, K in spec.weight_shapes()]
                bs = [torch.randn(N, device="cuda", dtype=dtype) for N, _ in spec.weight_shapes()]
                seed = torch.randint(0, 2**62, (1,), device="cuda") if p else None
                y, h = torch.ops.spinalkern.cuda_head_forward(x, ws, bs, seed, spec.kind_code, S, p, True)
                gx, gp = torch.ops.spinalkern.cuda_head_backward(torch.randn_like(y), x, ws, h, seed,
                                                                 spec.kind_code, S, p)
    for k in env:
        del os.environ[k]
torch.ops.spinalkern.cuda_keep_mask(torch.tensor([7], device="cuda"), 1, 100, 33, 0.5)
torch.cuda.synchronize()
print("sanitize run done")
PY

status=0
for tool in memcheck racecheck synccheck; do
  echo "== compute-sanitizer --tool $tool$( ((QUICK)) && echo ' (quick: one small case)')"
  # no caching allocator: memcheck sees every allocation's real bounds
  PYTORCH_NO_CUDA_MEMORY_CACHING=1 "$SAN" --tool "$tool" --error-exitcode 17 --print-limit 50 \
    "$PY" -c "$RUN" "$QUICK" > "$OUT/$tool.log" 2>&1
  rc=$?
  tail -n 3 "$OUT/$tool.log"
  if [ $rc -ne 0 ]; then echo "   -> $tool FAILED (exit $rc), see $OUT/$tool.log"; status=1; else echo "   -> $tool clean"; fi
done
exit $status
