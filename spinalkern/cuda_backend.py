"""The CUDA C++ extension backend (``spinalkern._C``, built from ``csrc/`` by ``setup.py``).

Importing this module never fails: when the extension is not built, :func:`available` is
False and :func:`build_hint` says how to build it.  When it is built, loading it registers
``torch.ops.spinalkern.cuda_head_forward`` / ``cuda_head_backward`` (and the BatchNorm head's
``cuda_head_bn_forward`` / ``cuda_head_bn_backward``) with their C++ CPU
implementation, their CUDA kernels (when the build had nvcc) and their autograd (in C++,
csrc/head_autograd.cpp: backward runs in the C++ autograd engine); this module adds their
fake (meta) implementations and registers the backend ``"cuda"`` in
``spinalkern._backends`` (also when the extension is missing, so that ``backend="cuda"``
says how to build it).
"""
from __future__ import annotations

import importlib.util

import torch

from . import _backends, ops

_C = None
_import_error: BaseException | None = None
if importlib.util.find_spec(f"{__package__}._C") is not None:
    try:
        from . import _C  # noqa: F811  (the compiled extension; registers the ops on import)
    except ImportError as e:  # e.g. built against another torch
        _import_error = e

forward_op = bn_forward_op = None
if _C is not None:
    forward_op = ops.register_fakes("cuda")
    bn_forward_op = ops.register_bn_fakes("cuda")

    @torch.library.register_fake("spinalkern::cuda_keep_mask")
    def _keep_mask_fake(seed, stream, rows, cols, p):
        return seed.new_empty((rows, cols), dtype=torch.bool)


def available() -> bool:
    """True when the extension is built and loaded (its C++ CPU ops are usable)."""
    return _C is not None


def has_cuda_kernels() -> bool:
    """True when the extension was built with its CUDA kernels (not a CPU-only build)."""
    if _C is None:
        return False
    return bool(getattr(_C, "WITH_CUDA", 0)) and torch._C._dispatch_has_kernel_for_dispatch_key(
        "spinalkern::cuda_head_forward", "CUDA")


def available_on(device: torch.device) -> bool:
    """Can the extension run on tensors of ``device`` here?"""
    if device.type == "cpu":
        return available()
    return device.type == "cuda" and has_cuda_kernels()


def build_hint() -> str:
    """How to build the extension (shown when ``backend="cuda"`` cannot run)."""
    hint = ("Build the CUDA extension from the repository root with "
            "`pip install --no-build-isolation -e .` or `python setup.py build_ext --inplace` "
            "(needs a CUDA build of torch and nvcc for the CUDA kernels; without nvcc it builds "
            "the C++ CPU ops only). Knobs: TORCH_CUDA_ARCH_LIST (default \"8.0;9.0\"), "
            "SPINALKERN_FORCE_CUDA=1, SPINALKERN_SKIP_CUDA=1, MAX_JOBS. "
            "See docs/cuda.md.")
    if _import_error is not None:
        hint += f" (spinalkern._C exists but failed to load: {_import_error})"
    elif _C is not None and not has_cuda_kernels():
        hint = "spinalkern._C was built without its CUDA kernels (a CPU-only build). " + hint
    return hint


BACKEND = _backends.register(_backends.Backend(
    name="cuda", available=available_on, forward_op=forward_op, bn_forward_op=bn_forward_op,
    build_hint=build_hint,
    # the forward op straight from Python, without torch.ops' argument parsing
    # (csrc/python_module.cpp)
    forward_fast=_C.head_forward if _C is not None else None))
