#!/usr/bin/env bash
# compute-sanitizer on a small run of the CUDA extension's kernels (GPU only):
#   memcheck  - out-of-bounds / misaligned global and shared memory accesses
#   racecheck - shared-memory data races (missing __syncthreads / __syncwarp)
#   synccheck - illegal barrier use
# Covers both heads, every dtype, dropout on/off, the 64- and 128-row tiles, the shared-memory
# fallbacks (x / h / accumulators in global memory) and multi-chunk weight gradients.  Usage: bench/sanitize.sh [output dir]
# Exit status: non-zero when a tool reports an error.  Without a GPU it prints why and exits 0.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-bench/results/sanitize}
mkdir -p "$OUT"
SAN=$(command -v compute-sanitizer || echo /usr/local/cuda/bin/compute-sanitizer)
if ! python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo "sanitize.sh: no CUDA GPU here, nothing to check"; exit 0
fi
if [ ! -x "$SAN" ]; then echo "sanitize.sh: compute-sanitizer not found"; exit 1; fi
python -c "from spinalkern import cuda_backend as c; import sys; sys.exit(0 if c.has_cuda_kernels() else 1)" || {
  echo "sanitize.sh: spinalkern._C has no CUDA kernels; build it: python setup.py build_ext --inplace"; exit 1; }

read -r -d '' RUN <<'PY'
import os, torch
from spinalkern import cuda_backend  # noqa: F401  (loads the ops)
from spinalkern.spec import HeadSpec
torch.manual_seed(0)
cases = [("spinal", 74, 64, 3, 26, 2, 37), ("progressive", 37, 128, 2, 10, 1, 70),
         ("spinal", 256, 256, 2, 100, 2, 40)]
knobs = [{}, {"SPINALKERN_CUDA_TILE_M": "64", "SPINALKERN_CUDA_CHAIN_TILE_M": "64"},
         {"SPINALKERN_CUDA_TILE_M": "128"}, {"SPINALKERN_CUDA_SMEM_LIMIT": "110000"},
         {"SPINALKERN_CUDA_DW_CHUNK_ROWS": "17"}]
for env in knobs:
    os.environ.update(env)
    for kind, D, H, n, C, S, B in cases:
        spec = HeadSpec(kind, D, H, n, C, S)
        for dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
            for p in (0.0, 0.3):
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
  echo "== compute-sanitizer --tool $tool"
  # no caching allocator: memcheck sees every allocation's real bounds
  PYTORCH_NO_CUDA_MEMORY_CACHING=1 "$SAN" --tool "$tool" --error-exitcode 17 --print-limit 50 \
    python -c "$RUN" > "$OUT/$tool.log" 2>&1
  rc=$?
  tail -n 3 "$OUT/$tool.log"
  if [ $rc -ne 0 ]; then echo "   -> $tool FAILED (exit $rc), see $OUT/$tool.log"; status=1; else echo "   -> $tool clean"; fi
done
exit $status
