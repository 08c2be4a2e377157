#!/usr/bin/env bash
# The main job: on a fresh machine it creates the pinned environment and trains.  With no
# arguments: the SpinalNet paper's MNIST setting (CNN + 6x8 spinal head, SGD, 8 epochs) on the
# real MNIST in ../shared/data, writing runs/spinal-cnn-8-mnist/summary.json.  Any arguments
# replace that setting and go to `python -m models.train` (see docs/training.md).
set -euo pipefail
cd "$(dirname "$0")/.."
source .ci/env.sh
set -euo pipefail
if [ $# -eq 0 ]; then
  set -- --model spinal-cnn-8 --data mnist --data-root ../shared/data --epochs 8 \
         --batch-size 64 --optimizer sgd --lr 0.01 --momentum 0.5 --no-augment \
         --out runs/spinal-cnn-8-mnist
fi
exec python -m models.train "$@"
