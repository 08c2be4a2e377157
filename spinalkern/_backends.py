"""Which fused backends exist here, and which one ``backend="auto"`` picks."""
from __future__ import annotations

import os

import torch

BACKENDS = ("auto", "torch", "triton", "cuda")


def interpreting() -> bool:
    """True when Triton runs its CPU interpreter (TRITON_INTERPRET=1 set before import)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def triton_available(device: torch.device) -> bool:
    from . import triton_head
    if not triton_head.HAVE_TRITON:
        return False
    return device.type == "cuda" or (device.type == "cpu" and interpreting())


def cuda_available(device: torch.device) -> bool:
    from . import cuda_backend
    if not cuda_backend.available():
        return False
    return device.type == "cpu" or (device.type == "cuda" and cuda_backend.has_cuda_kernels())


def available_backends(device) -> list[str]:
    """The backends that can run on ``device`` here (always includes "torch")."""
    device = torch.device(device)
    out = ["torch"]
    if triton_available(device):
        out.append("triton")
    try:
        if cuda_available(device):
            out.append("cuda")
    except ImportError:
        pass
    return out


def resolve(backend: str, device: torch.device) -> str:
    """Turn a requested backend into the one to run, or raise a clear error.

    ``auto``: on a CUDA device the fused Triton kernels, else the CUDA extension, else torch;
    on CPU the eager torch reference (the interpreter and the extension's C++ CPU ops exist
    for verification, not speed).
    """
    if backend == "torch":
        return "torch"
    if backend == "auto":
        if device.type == "cuda":
            for b in ("triton", "cuda"):
                if b in available_backends(device):
                    return b
        return "torch"
    if backend == "triton":
        if not triton_available(device):
            raise RuntimeError(
                f"backend='triton' cannot run on {device}: it needs a CUDA tensor and the triton "
                "package (or TRITON_INTERPRET=1 set before importing triton, to run the kernels "
                "on CPU tensors in Triton's interpreter)")
        return "triton"
    if backend == "cuda":
        from . import cuda_backend
        if not cuda_backend.available():
            raise RuntimeError("backend='cuda' needs the compiled extension spinalkern._C, "
                               "which is not built. " + cuda_backend.build_hint())
        if device.type == "cuda" and not cuda_backend.has_cuda_kernels():
            raise RuntimeError("spinalkern._C was built without CUDA kernels (CPU-only build). "
                               + cuda_backend.build_hint())
        return "cuda"
    raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
