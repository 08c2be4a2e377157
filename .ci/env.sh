# Source this: creates (once) and activates the pinned virtual environment.
# The venv lives outside the checkout, keyed by a hash of requirements-dev.txt, so a machine
# that already built it reuses it while a fresh machine builds it from nothing.
set -e
_root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
_key=$( (cat "$_root/requirements-dev.txt"; python3 --version) | sha256sum | cut -c1-16)
_venv="${SPINALKERN_VENV_ROOT:-$HOME/.cache/spinalkern-venv}/$_key"
mkdir -p "$(dirname "$_venv")"
exec 9>"$_venv.lock"
flock 9  # one creator at a time; others wait and then reuse it
if [ ! -f "$_venv/.complete" ]; then
  echo "[env] creating the pinned environment in $_venv"
  echo "[env] (once per requirements-dev.txt: about 4.8 GB, ~2.6 GB of it downloaded; a few"
  echo "[env]  minutes; SPINALKERN_VENV_ROOT chooses another folder)"
  rm -rf "$_venv"
  python3 -m venv "$_venv"
  "$_venv/bin/python" -m pip install -q --upgrade pip 2>&1 | grep -v "is ignored: it is neither" || true
  echo "[env] installing torch 2.11.0 (CUDA build), triton, torchvision and the tools ..."
  "$_venv/bin/python" -m pip install -q -r "$_root/requirements-dev.txt" 2>&1 | grep -v "is ignored: it is neither" || true
  "$_venv/bin/python" -c "import torch, triton, torchvision" || { echo "[env] install failed"; exit 1; }
  touch "$_venv/.complete"
  echo "[env] done"
fi
flock -u 9
# shellcheck disable=SC1091
source "$_venv/bin/activate"
set +e
