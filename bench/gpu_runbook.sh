#!/usr/bin/env bash
# The GPU runbook: one call on a bare GPU machine (no network) that brings back the evidence
# every GPU claim of this project waits for, within a global deadline, in at most 6 files.
#
#   bash bench/gpu_runbook.sh OUTDIR
#
# Steps, most valuable first; each writes its results as soon as it has them, and summary.md
# and runbook.tgz are rewritten after every step, so a run cut off still returns evidence:
#   (build)   from t=0 in the background: the CUDA extension for the GPU present only
#             (TORCH_CUDA_ARCH_LIST of that GPU, MAX_JOBS = cores), installed when done
#   facts     machine facts, measured copy bandwidth and bf16 matmul rate (bench.machine)
#   tests-triton  GPU-only tests (pytest -m gpu) that need no extension, in parallel (-n)
#   train     if the build is still running: the quick training benchmark (bench.train_throughput)
#   build     waits for the extension (reported with its own duration)
#   tests-cuda    the remaining GPU-only tests (the CUDA extension's), in parallel
#   heads     kernel benchmark, goal cells first; torch.compile cells in a subprocess under a
#             hard timeout ("compile timed out"); heads.json rewritten after every cell
#   host      host-overhead benchmark (bench.host_overhead)
#   train     here, if it did not run during the build
#   sanitize  one small case per compute-sanitizer tool (bench/sanitize.sh --quick)
#   tune      only when RUNBOOK_TUNE_S > 0: the Triton tuning sweep (bench.tune sweep), its
#             table into the archive (triton_table.json)
#   plots     PNGs of the results (into the archive)
#   tail      summary.md (step table + generated goal tables), runbook.tgz (logs, plots,
#             machine.json, pytest XML, sanitizer logs)
# OUTDIR ends with: summary.md steps.tsv heads.json train.json host.json runbook.tgz.
# Without a GPU (CI's rehearsal) the same steps run at smoke sizes; GPU-only steps are
# recorded as "skipped (no GPU)" with the reason.  Exit status: 0 when every step is ok or
# skipped, 1 when one failed or timed out, 2 when the interpreter cannot import torch.
#
# Environment:
#   PYTHON                     interpreter (default python3)
#   RUNBOOK_BUDGET_S           global deadline in seconds, the tail included (default 420)
#   RUNBOOK_TAIL_S             seconds kept for the tail (default 20)
#   RUNBOOK_COMPILE_TIMEOUT_S  hard limit of one torch.compile cell (default 75)
#   RUNBOOK_TUNE_S             seconds for the Triton tuning sweep (default 0: not run; the
#                              default budget has no room for it, give it a call of its own)
#   SPINALKERN_DATA            folder holding mnist/ for the training step (default data)
# The exact call for the project's GPU machine: docs/benchmarks.md.
set -u -o pipefail

OUT=${1:?usage: bash bench/gpu_runbook.sh OUTDIR}
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PY=${PYTHON:-python3}
BUDGET=${RUNBOOK_BUDGET_S:-420}
TAIL=${RUNBOOK_TAIL_S:-20}
COMPILE_TIMEOUT=${RUNBOOK_COMPILE_TIMEOUT_S:-75}
TUNE_S=${RUNBOOK_TUNE_S:-0}
DATA=${SPINALKERN_DATA:-data}
SECONDS=0
START_EPOCH=$(date +%s)

if ! command -v "$PY" > /dev/null 2>&1; then
  echo "gpu_runbook: no interpreter '$PY' on PATH; set PYTHON to one that has torch" >&2
  exit 2
fi
# One probe: can it import torch, and which GPU (compute capability) is there, if any
PROBE="import torch; print('%d.%d' % torch.cuda.get_device_capability() if torch.cuda.is_available() else 'none')"
if ! GPU=$("$PY" -c "$PROBE" 2>&1); then
  echo "gpu_runbook: '$PY' ($(command -v "$PY")) cannot import torch: ${GPU##*$'\n'}" >&2
  echo "gpu_runbook: set PYTHON to the interpreter that has torch; stopping" >&2
  exit 2
fi
GPU=${GPU##*$'\n'}   # the last line (warnings may come first)
[ "$GPU" = none ] && GPU=
export PYTHON=$PY PYTHONUNBUFFERED=1

mkdir -p "$OUT" && OUT=$(cd "$OUT" && pwd)
cd "$ROOT"
rm -f "$OUT"/summary.md "$OUT"/steps.tsv "$OUT"/heads.json "$OUT"/train.json \
      "$OUT"/host.json "$OUT"/runbook.tgz
WORK=$(mktemp -d "${TMPDIR:-/tmp}/spinalkern-runbook.XXXXXX")     # packed into runbook.tgz
BUILD_DIR=$(mktemp -d "${TMPDIR:-/tmp}/spinalkern-build.XXXXXX")  # not packed
LOGS=$WORK/logs
mkdir -p "$LOGS"
STEPS=$OUT/steps.tsv
printf 'step\tresult\tseconds\tdetail\n' > "$STEPS"
FAILED=0

left() { echo $(( BUDGET - TAIL - SECONDS )); }

# summary.md and runbook.tgz, both replaced atomically
refresh() {
  "$PY" -m bench.runbook_summary "$OUT" --machine "$WORK/machine.json" --budget-s "$BUDGET" \
    --elapsed-s "$SECONDS" > "$LOGS/summary.log" 2>&1
  local f
  for f in "$LOGS"/*.log; do   # the end of a log matters; keep the archive small
    if [ "$(stat -c %s "$f")" -gt 2000000 ]; then tail -c 2000000 "$f" > "$f.cut" && mv "$f.cut" "$f"; fi
  done
  tar -czf "$OUT/.runbook.tgz.tmp" -C "$WORK" . && mv -f "$OUT/.runbook.tgz.tmp" "$OUT/runbook.tgz"
}

# record NAME RESULT SECONDS [DETAIL]
record() {
  local detail=${4:-}
  detail=${detail//$'\t'/ }
  printf '%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "${detail:0:200}" >> "$STEPS"
  echo "== $1: $2 (${3} s) ${detail:0:200}"
  case $2 in failed*|timed*) FAILED=1 ;; esac
  refresh
}

# step NAME CAP COMMAND...: run with a limit of min(CAP, what the deadline leaves)
step() {
  local name=$1 cap=$2 l max s rc result detail log
  shift 2
  l=$(left)
  max=$(( cap < l - 5 ? cap : l - 5 ))   # timeout -k 5 below: never past the deadline
  if (( max < 5 )); then
    record "$name" "skipped (no time left)" 0 "deadline ${BUDGET} s"
    return 0
  fi
  log=$LOGS/$name.log
  echo "== $name (limit ${max} s, $(left) s left before the tail)"
  s=$SECONDS
  timeout -k 5 "$max" "$@" > "$log" 2>&1
  rc=$?
  detail=$(grep -v '^[[:space:]]*$' "$log" | tail -n 1)
  case $rc in
    0) result=ok ;;
    77) result=$(grep -o '^skipped ([^)]*)' "$log" | tail -n 1); result=${result:-skipped} ;;
    124|137) result="timed out after ${max} s" ;;
    126|127) result="failed (exit $rc: command not found or not executable)" ;;
    *) result="failed (exit $rc)" ;;
  esac
  record "$name" "$result" $(( SECONDS - s )) "$detail"
}

# --- what is here ------------------------------------------------------------------------
NCPU=$(nproc 2>/dev/null || echo 4)
NO_GPU="torch sees no CUDA GPU here"
# Time limits (s) of the steps after the kernel benchmark, which it leaves time for, and the
# least time the kernel benchmark keeps when the build or the tests run long.
if [ -n "$GPU" ]; then
  HOST_CAP=20 SANITIZE_CAP=40 PLOTS_CAP=15 TRAIN_CAP=60 HEADS_MIN=90
else
  echo "!! no GPU: the CPU rehearsal (smoke sizes; GPU-only steps skipped)"
  HOST_CAP=30 SANITIZE_CAP=20 PLOTS_CAP=45 TRAIN_CAP=60 HEADS_MIN=30
fi
after_heads() { echo $(( HOST_CAP + SANITIZE_CAP + PLOTS_CAP + (TRAIN_DONE ? 0 : TRAIN_CAP) )); }

# --- t=0: the extension, for this GPU only, in the background -----------------------------
BUILD_PID=
if [ -n "$GPU" ]; then
  TORCH_CUDA_ARCH_LIST=$GPU MAX_JOBS=$NCPU SPINALKERN_FORCE_CUDA=1 \
    timeout -k 5 $(( BUDGET - TAIL - 30 )) "$PY" setup.py build_ext \
    --build-lib "$BUILD_DIR/lib" --build-temp "$BUILD_DIR/tmp" > "$LOGS/build.log" 2>&1 &
  BUILD_PID=$!
fi

# --- facts -----------------------------------------------------------------------------
{
  date -u
  if command -v nvidia-smi > /dev/null 2>&1; then timeout 20 nvidia-smi; else echo "no nvidia-smi on PATH"; fi
  "$PY" -m bench.commit --show
} > "$LOGS/nvidia-smi.log" 2>&1
if [ -n "$GPU" ]; then
  step facts 45 "$PY" -m bench.machine --json "$WORK/machine.json"
else
  step facts 45 "$PY" -m bench.machine --json "$WORK/machine.json" --small
fi

# --- GPU-only tests: those that need no extension first (the build is still running) -------
KERNEL_TESTS=$(ls tests/test_heads.py tests/test_cuda*.py tests/test_triton*.py 2>/dev/null | tr '\n' ' ')
XDIST=()
if "$PY" -c "import xdist" > /dev/null 2>&1; then XDIST=(-n "$(( NCPU < 8 ? NCPU : 8 ))"); fi
PYTEST=("$PY" -m pytest -q -p no:cacheprovider -m gpu "${XDIST[@]}")
if [ -n "$GPU" ]; then
  # shellcheck disable=SC2086
  step tests-triton 75 "${PYTEST[@]}" -k "triton and not cuda" --junitxml="$WORK/tests-triton.xml" $KERNEL_TESTS
else
  record tests-triton "skipped (no GPU)" 0 "$NO_GPU; pytest -m gpu runs them on a GPU"
fi

# --- training benchmark, while the build is still running ----------------------------------
train() {
  if [ -z "$GPU" ]; then
    step train "$TRAIN_CAP" "$PY" -m bench.train_throughput --smoke --json "$OUT/train.json"
  elif [ ! -f "$DATA/mnist/train-images-idx3-ubyte.gz" ]; then
    record train "skipped (no data)" 0 "no $DATA/mnist/*.gz: carry data/ with the call (docs/benchmarks.md)"
  else
    step train "$TRAIN_CAP" "$PY" -m bench.train_throughput --quick --models spinal-vgg5 \
      --train-subset 5000 --test-subset 2000 --data-root "$DATA" --json "$OUT/train.json" \
      --budget-s $(( TRAIN_CAP - 15 )) --run-timeout-s 40
  fi
}
TRAIN_DONE=0
if [ -n "$BUILD_PID" ] && kill -0 "$BUILD_PID" 2> /dev/null; then
  train
  TRAIN_DONE=1
fi

# --- the extension ---------------------------------------------------------------------
BUILD_OK=0
if [ -z "$GPU" ]; then
  record build "skipped (no GPU)" 0 "$NO_GPU: nothing to build for"
else
  while kill -0 "$BUILD_PID" 2> /dev/null && (( $(left) > $(after_heads) + HEADS_MIN + 30 )); do
    sleep 2
  done
  if kill -0 "$BUILD_PID" 2> /dev/null; then
    kill "$BUILD_PID" 2> /dev/null
    record build "timed out after ${SECONDS} s" "$SECONDS" "$(tail -n 1 "$LOGS/build.log")"
  else
    wait "$BUILD_PID"
    rc=$?
    took=$(( $(stat -c %Y "$LOGS/build.log") - START_EPOCH ))
    so=$(ls "$BUILD_DIR"/lib/spinalkern/_C*.so 2> /dev/null | head -n 1)
    if [ "$rc" -eq 0 ] && [ -n "$so" ]; then
      for f in "$so" "$BUILD_DIR/lib/spinalkern/_build_info.py"; do   # moved in atomically
        [ -f "$f" ] && cp "$f" "spinalkern/.$(basename "$f").tmp" &&
          mv -f "spinalkern/.$(basename "$f").tmp" "spinalkern/$(basename "$f")"
      done
      "$PY" -m spinalkern.info > "$LOGS/spinalkern-info.log" 2>&1
      if "$PY" -c "from spinalkern import cuda_backend as c; import sys; sys.exit(0 if c.has_cuda_kernels() else 1)" >> "$LOGS/build.log" 2>&1; then
        BUILD_OK=1
        record build ok "$took" "sm_${GPU/./} only, MAX_JOBS=$NCPU, in the background from t=0"
      else
        record build "failed (built, but has no CUDA kernels)" "$took" "$(tail -n 1 "$LOGS/build.log")"
      fi
    else
      record build "failed (exit $rc)" "$took" "$(grep -v '^[[:space:]]*$' "$LOGS/build.log" | tail -n 1)"
    fi
  fi
fi

if [ -z "$GPU" ]; then
  record tests-cuda "skipped (no GPU)" 0 "$NO_GPU; pytest -m gpu runs them on a GPU"
elif (( BUILD_OK )); then
  # shellcheck disable=SC2086
  step tests-cuda $(( $(left) - $(after_heads) - HEADS_MIN < 60 ? $(left) - $(after_heads) - HEADS_MIN : 60 )) "${PYTEST[@]}" -k "not (triton and not cuda)" --junitxml="$WORK/tests-cuda.xml" $KERNEL_TESTS
else
  record tests-cuda "skipped (no extension)" 0 "the build step failed: see logs/build.log"
fi

# --- kernel benchmark: goal cells first --------------------------------------------------
HEADS_CAP=$(( $(left) - $(after_heads) ))
if [ -n "$GPU" ]; then
  step heads "$HEADS_CAP" "$PY" -m bench.heads --quick --peaks "$WORK/machine.json" \
    --json "$OUT/heads.json" --budget-s $(( HEADS_CAP - 15 )) \
    --compile-timeout-s "$COMPILE_TIMEOUT" --no-progress
else
  step heads "$HEADS_CAP" "$PY" -m bench.heads --smoke --heads spinal_vgg5 spinal_vgg5_bn_train \
    --batches 8 --dtypes fp32 --peaks "$WORK/machine.json" --json "$OUT/heads.json" \
    --budget-s $(( HEADS_CAP - 15 )) --compile-timeout-s "$COMPILE_TIMEOUT" --no-progress
fi

# --- host overhead -------------------------------------------------------------------------
if [ -n "$GPU" ]; then
  step host "$HOST_CAP" "$PY" -m bench.host_overhead --json "$OUT/host.json"
else
  step host "$HOST_CAP" "$PY" -m bench.host_overhead --json "$OUT/host.json" --rounds 11
fi

(( TRAIN_DONE )) || train

# --- compute-sanitizer -------------------------------------------------------------------
step sanitize "$SANITIZE_CAP" bash bench/sanitize.sh --quick "$WORK/sanitize"

# --- the Triton tuning sweep, when asked --------------------------------------------------
if (( TUNE_S <= 0 )); then
  record tune "skipped (not asked)" 0 "RUNBOOK_TUNE_S=0"
elif [ -z "$GPU" ]; then
  record tune "skipped (no GPU)" 0 "$NO_GPU"
else
  step tune "$TUNE_S" "$PY" -m bench.tune sweep --out "$WORK/triton_table.json" \
    --budget-s $(( TUNE_S - 15 > 10 ? TUNE_S - 15 : 10 ))
fi

# --- plots -------------------------------------------------------------------------------
if [ -f "$OUT/heads.json" ] || [ -f "$OUT/train.json" ]; then
  step plots "$PLOTS_CAP" bash -c 'for f in "$1"/heads.json "$1"/train.json; do
      [ -f "$f" ] && { "$PYTHON" -m bench.plots "$f" --out "$2" || exit 1; }; done; exit 0' \
    plots "$OUT" "$WORK/plots"
else
  record plots "skipped (no results)" 0 "neither heads.json nor train.json was written"
fi

# --- tail --------------------------------------------------------------------------------
refresh
rm -rf "$WORK" "$BUILD_DIR"
echo "== done in ${SECONDS} s (budget ${BUDGET} s): $OUT"
ls -l "$OUT"
column -t -s $'\t' "$STEPS" 2> /dev/null || cat "$STEPS"
exit $FAILED
