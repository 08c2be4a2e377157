#!/usr/bin/env bash
# One command for a bare GPU machine (no network), finishing within 10 minutes:
#   build the CUDA extension, run the GPU tests, the sanitizers (bench/sanitize.sh, if present),
#   the kernel sweep, a short training benchmark; write a summary table, the results JSON,
#   plots and logs into OUTDIR (a handful of files, each well under 16 MiB).
#
#   bench/gpu_runbook.sh OUTDIR
#
# Environment: PYTHON (default python), RUNBOOK_BUDGET_S (default 570: total seconds),
# SPINALKERN_DATA (a folder holding mnist/ and fashion-mnist/ IDX files; default: data/ in the
# checkout, else ../shared/data or shared/data, copied into data/).  See docs/benchmarks.md.
# Without a GPU it still runs every step, with the CPU smoke sizes (to test the runbook).
set -u -o pipefail

OUT=${1:?usage: bench/gpu_runbook.sh OUTDIR}
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
mkdir -p "$OUT/logs"
OUT=$(cd "$OUT" && pwd)
cd "$ROOT"
PY=${PYTHON:-python}
TOTAL=${RUNBOOK_BUDGET_S:-570}
T0=$(date +%s)
STEPS="$OUT/steps.tsv"
printf 'step\tresult\tseconds\n' > "$STEPS"

left() { echo $(( TOTAL - ($(date +%s) - T0) )); }

# step NAME MAX_SECONDS COMMAND...: run with a time limit, log to OUT/logs/NAME.log
step() {
  local name=$1 max=$2 l s rc result log
  shift 2
  l=$(left)
  (( max > l - 5 )) && max=$(( l - 5 ))
  if (( max < 10 )); then
    printf '%s\tskipped (no time left)\t0\n' "$name" >> "$STEPS"
    echo "== $name: skipped, no time left"
    return 0
  fi
  log="$OUT/logs/$name.log"
  echo "== $name (limit ${max}s, $(left)s left)"
  s=$(date +%s)
  timeout --kill-after=15 "$max" "$@" > "$log" 2>&1
  rc=$?
  case $rc in
    0) result=ok ;;
    124|137) result="timed out after ${max}s" ;;
    *) result="failed (exit $rc)" ;;
  esac
  printf '%s\t%s\t%s\n' "$name" "$result" "$(( $(date +%s) - s ))" >> "$STEPS"
  echo "   $result in $(( $(date +%s) - s ))s"
  tail -n 3 "$log" | sed 's/^/   | /'
  if [ "$(stat -c %s "$log")" -gt 4000000 ]; then   # keep logs small: the tail matters
    tail -c 4000000 "$log" > "$log.tmp" && mv "$log.tmp" "$log"
  fi
  return 0
}

if "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  GPU=1; SMOKE=()
else
  GPU=0; SMOKE=(--smoke); echo "!! no GPU: running the CPU smoke sizes"
fi

# 0. What machine is this
{
  date -u; echo; nvidia-smi 2>&1 || echo "no nvidia-smi"; echo
  "$PY" -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
  git rev-parse HEAD 2>/dev/null; git status --short 2>/dev/null | head -20
} > "$OUT/logs/machine.log" 2>&1

# 1. Data: the training benchmark reads data/mnist (git-ignored), copied from ../shared/data
if [ ! -f data/mnist/train-images-idx3-ubyte.gz ]; then
  for src in "${SPINALKERN_DATA:-}" ../shared/data shared/data; do
    if [ -n "$src" ] && [ -f "$src/mnist/train-images-idx3-ubyte.gz" ]; then
      mkdir -p data && cp -r "$src/mnist" data/ && { cp -r "$src/fashion-mnist" data/ 2>/dev/null || true; }
      echo "== data: copied from $src"
      break
    fi
  done
fi
[ -f data/mnist/train-images-idx3-ubyte.gz ] || echo "!! no MNIST files in data/mnist: training steps will fail"

# Steps 2-4 never eat into the last RESERVE seconds: kernel sweep (>= 120 s), training, summary.
RESERVE=250
cap() { local c=$1 l; l=$(( $(left) - RESERVE )); (( l < c )) && c=$l; echo "$c"; }

# 2. Build the CUDA extension
step build "$(cap 150)" "$PY" setup.py build_ext --inplace

# 3. GPU tests
step tests "$(cap 120)" "$PY" -m pytest -q -p no:cacheprovider tests --ignore=tests/test_bench.py

# 4. Sanitizers (compute-sanitizer memcheck + racecheck), if the script exists; then the
#    pytest-benchmark suite of the kernels, its timings kept
if [ -f bench/sanitize.sh ]; then
  step sanitize "$(cap 90)" bash bench/sanitize.sh "$OUT/sanitize"
else
  printf 'sanitize\tskipped (no bench/sanitize.sh)\t0\n' >> "$STEPS"
fi
step bench-suite "$(cap 40)" "$PY" -m pytest -q -p no:cacheprovider tests/test_bench.py \
  -k benchmark --benchmark-json "$OUT/pytest-benchmark.json"

# 5. Kernel sweep: at most 240 s, leaving ~110 s for training and the summary
SWEEP=$(( $(left) - 110 )); (( SWEEP > 240 )) && SWEEP=240; (( SWEEP < 60 )) && SWEEP=60
step heads $(( SWEEP + 60 )) "$PY" bench/heads.py "${SMOKE[@]}" --out "$OUT" --budget-s "$SWEEP" \
  --compile-budget-s $(( SWEEP / 2 ))

# 6. Short training benchmark (fused vs eager vs the papers' loop), ~90 s
TRAIN=$(( $(left) - 25 )); (( TRAIN > 150 )) && TRAIN=150
if (( GPU )); then
  step train $(( TRAIN + 20 )) "$PY" bench/train_throughput.py --quick --data-root data --out "$OUT" \
    --budget-s "$TRAIN" --run-timeout-s 90
else
  step train $(( TRAIN + 20 )) "$PY" bench/train_throughput.py --smoke --out "$OUT"
fi

# 7. Plots and the summary table
HEADS_JSON=$(ls -t "$OUT"/heads-*.json 2>/dev/null | head -1)
TRAIN_JSON=$(ls -t "$OUT"/train-*.json 2>/dev/null | head -1)
[ -n "$HEADS_JSON" ] && step plots 30 "$PY" bench/plots.py "$HEADS_JSON" --out "$OUT"
[ -n "$TRAIN_JSON" ] && step plots-train 30 "$PY" bench/plots.py "$TRAIN_JSON" --out "$OUT"
{
  echo "# GPU runbook summary"
  echo
  echo "| step | result | seconds |"
  echo "|---|---|---:|"
  tail -n +2 "$STEPS" | awk -F'\t' '{printf "| %s | %s | %s |\n", $1, $2, $3}'
  echo
  args=(--results-dir "$OUT" --allow-smoke)
  [ -n "$HEADS_JSON" ] && args+=(--heads "$HEADS_JSON")
  [ -n "$TRAIN_JSON" ] && args+=(--train "$TRAIN_JSON")
  "$PY" bench/readme_table.py "${args[@]}" 2>&1
} > "$OUT/summary.md"
echo "== done in $(( $(date +%s) - T0 ))s: $OUT/summary.md"
cat "$STEPS"
