"""Helpers for verifying backends: poisoned outputs, error measures, random heads."""
from __future__ import annotations

import contextlib

import torch
import torch.utils.deterministic

from .spec import HeadSpec


@contextlib.contextmanager
def poisoned_outputs():
    """Within this block every uninitialised allocation (torch.empty in the Triton launchers,
    at::empty in the C++ ops) is filled with NaN, so any element a kernel fails to write is
    caught by the comparison with the reference.

    This is torch's own switch (``torch.utils.deterministic.fill_uninitialized_memory``, in
    effect while deterministic algorithms are on, here in warn-only mode); the launchers
    simply allocate with torch.empty and know nothing of it."""
    det = torch.utils.deterministic
    old_mode = torch.are_deterministic_algorithms_enabled()
    old_warn = torch.is_deterministic_algorithms_warn_only_enabled()
    old_fill = det.fill_uninitialized_memory
    torch.use_deterministic_algorithms(True, warn_only=True)
    det.fill_uninitialized_memory = True
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(old_mode, warn_only=old_warn)
        det.fill_uninitialized_memory = old_fill


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref|| in float64; NaN anywhere in ``out`` gives inf (never passes)."""
    out = out.detach().double()
    ref = ref.detach().double().to(out.device)
    if out.shape != ref.shape:
        raise AssertionError(f"shape {tuple(out.shape)} != reference {tuple(ref.shape)}")
    if not torch.isfinite(out).all():
        return float("inf")
    denom = ref.norm().item()
    diff = (out - ref).norm().item()
    return diff / denom if denom > 0 else diff


# Floors of the per-dtype relative-error bounds: a backend passes if its error is within
# max(2 x torch's own error at that precision, this floor).
ERROR_FLOOR = {torch.float64: 1e-12, torch.float32: 2e-5, torch.float16: 2e-3,
               torch.bfloat16: 1.6e-2}
# Gradients come out of a chain of up to n layers whose ReLU masks flip where rounding moves a
# pre-activation across zero, so their floors are wider (torch's own errors are of this size).
# Which units flip differs between two correct implementations, and so does the size of the
# error: in fp16, torch's own gradient error on a progressive head (B=1000, D=45, H=64, n=4,
# C=62) ranged from 4e-3 to 2.9e-2 over 30 fresh draws, so a draw where torch is lucky cannot
# set a bound below that range.
GRAD_ERROR_FLOOR = {torch.float64: 1e-12, torch.float32: 5e-5, torch.float16: 3e-2,
                    torch.bfloat16: 5e-2}


def random_params(spec: HeadSpec, dtype=torch.float32, device="cpu", generator=None):
    """Fresh random weights and biases shaped like nn.Linear's default init (never zeros)."""
    ws, bs = [], []
    for N, K in spec.weight_shapes():
        bound = K ** -0.5
        ws.append((torch.rand(N, K, generator=generator, dtype=torch.float64) * 2 - 1) * bound)
        bs.append((torch.rand(N, generator=generator, dtype=torch.float64) * 2 - 1) * bound)
    return ([w.to(device=device, dtype=dtype) for w in ws],
            [b.to(device=device, dtype=dtype) for b in bs])
