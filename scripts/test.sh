#!/usr/bin/env bash
# The test command: on a fresh machine it creates the pinned environment, builds the C++/CUDA
# extension both ways (setup.py and CMake; CUDA code is compiled even without a GPU), builds
# the wheel and uses it from a fresh environment, checks every shipped kernel binary for
# register spills, runs the README's main training command and the test suite (GPU tests run
# where a GPU is present).
#
#   bash scripts/test.sh            # everything
#   bash scripts/test.sh -k triton  # extra arguments go to pytest
set -euo pipefail
cd "$(dirname "$0")/.."
source .ci/env.sh
set -euo pipefail
export MAX_JOBS=${MAX_JOBS:-$(nproc)}
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-"8.0;9.0+PTX"}

step() { printf '\n==> %s\n' "$*"; }

step "extension: python setup.py build_ext --inplace (sm_80 + sm_90 + PTX)"
SPINALKERN_FORCE_CUDA=1 python setup.py -q build_ext --inplace
python -m bench.check_cuda_build --arch 80 --arch 90 --ptx 90 --markdown build/cuda_resources.md

step "extension: CMake build for libtorch users (sm_90)"
cmake -S . -B build/cmake -DCMAKE_PREFIX_PATH="$(python -c 'import torch;print(torch.utils.cmake_prefix_path)')" \
      -DCMAKE_CUDA_ARCHITECTURES=90 > build/cmake-configure.log
cmake --build build/cmake -j"$MAX_JOBS" > build/cmake-build.log
python -m bench.check_cuda_build build/cmake/libspinalkern.so --arch 90

step "package: sdist -> wheel (CPU-only extension) -> fresh venv -> used outside the checkout"
python scripts/check_wheel.py

step "Triton kernels: ahead-of-time compile for sm_90; registers / spills / shared memory"
python -m bench.check_triton_kernels --out build/triton_resources.json

step "parameter table in README / docs matches the code"
python -m models.params --check docs/training.md README.md

step "the README's main command (real MNIST, CPU) reaches the paper's accuracy"
run_dir=$(mktemp -d)
python -m models.train --model spinal-cnn-8 --data mnist --epochs 8 \
    --batch-size 64 --optimizer sgd --lr 0.01 --momentum 0.5 --no-augment \
    --out "$run_dir/run" --threads 1 --progress off
python - "$run_dir/run/summary.json" <<'PY'
import json, sys
s = json.load(open(sys.argv[1]))
print(f"main command: test_accuracy {s['test_accuracy']:.2f} %, {s['images_per_s']:.0f} images/s")
assert s["test_accuracy"] >= 97.5, s["test_accuracy"]
PY

step "host overhead of a tiny head: fused (the extension's CPU ops) vs eager torch"
python -m bench.host_overhead --json build/host_overhead.json

step "pytest"
python -m pytest -q -p no:cacheprovider --benchmark-disable "$@" tests
