#!/usr/bin/env bash
# The main job: on a fresh machine it creates the pinned environment and trains.  With no
# arguments: the SpinalNet paper's MNIST setting (CNN + 6x8 spinal head, SGD, 8 epochs) on the
# real MNIST (the checkout's data/, else ../shared/data, else downloaded into data/), writing
# runs/spinal-cnn-8-mnist/summary.json in the checkout.
#
# Arguments that only say where or how to run (--resume, --overwrite, --out, --data-root,
# --threads, --device, --progress, --no-plot, --download, --no-verify, checkpoint intervals,
# --stop-after-steps) are added to the main job, so `bash scripts/train.sh --resume` continues
# it.  Any other argument replaces the main job: everything then goes to
# `python -m models.train` (see docs/training.md).  Relative paths are taken from the folder
# you run this from.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
source "$root/.ci/env.sh"
set -euo pipefail
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"

main_job=(--model spinal-cnn-8 --data mnist --epochs 8 --batch-size 64 --optimizer sgd
          --lr 0.01 --momentum 0.5 --no-augment --out "$root/runs/spinal-cnn-8-mnist")

only_where_and_how=1
args=("$@")
i=0
while [ $i -lt ${#args[@]} ]; do
  case "${args[$i]}" in
    --resume|--overwrite|--no-plot|--download|--no-verify) ;;
    --out|--data-root|--threads|--device|--progress|--checkpoint-every-steps|\
    --checkpoint-every-epochs|--stop-after-steps) i=$((i + 1)) ;;
    --out=*|--data-root=*|--threads=*|--device=*|--progress=*|--checkpoint-every-*=*|\
    --stop-after-steps=*) ;;
    *) only_where_and_how=0 ;;
  esac
  i=$((i + 1))
done
if [ "$only_where_and_how" = 1 ]; then
  set -- "${main_job[@]}" "$@"
fi
exec python -m models.train "$@"
