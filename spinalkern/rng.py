"""Counter-based dropout masks (Philox4x32-10), shared by every backend.

``keep_mask(seed, stream, rows, cols, p)`` is the definition; the Triton and CUDA kernels
compute the same function element by element, so a mask is never stored: backward recomputes
it from the seed.  Philox4x32-10 is the generator of Salmon et al., "Parallel random numbers:
as easy as 1, 2, 3" (SC 2011); its constants are the published ones.
"""
from __future__ import annotations

import torch

PHILOX_M0 = 0xD2511F53
PHILOX_M1 = 0xCD9E8D57
PHILOX_W0 = 0x9E3779B9
PHILOX_W1 = 0xBB67AE85
MASK32 = 0xFFFFFFFF
ROUNDS = 10
SEED_HIGH = 2 ** 62  # seeds are drawn from [0, SEED_HIGH)


def keep_threshold(p: float) -> int:
    """An element is kept iff its 32-bit random word is >= this threshold."""
    if not 0.0 <= p < 1.0:
        raise ValueError(f"dropout probability must be in [0, 1), got {p}")
    return min(int(p * 4294967296.0), MASK32)


def philox_first_word(seed: int | torch.Tensor, c0, c1, c2, c3=0) -> torch.Tensor:
    """First 32-bit output word of Philox4x32-10 for int64 counter tensors (broadcast)."""
    seed = torch.as_tensor(seed, dtype=torch.int64)
    k0 = seed & MASK32
    k1 = (seed >> 32) & MASK32
    c0, c1, c2, c3 = (torch.as_tensor(c, dtype=torch.int64) & MASK32 for c in (c0, c1, c2, c3))
    c0, c1, c2, c3 = torch.broadcast_tensors(c0, c1, c2, c3)
    for _ in range(ROUNDS):
        hi0, lo0 = _mul32(PHILOX_M0, c0)
        hi1, lo1 = _mul32(PHILOX_M1, c2)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
        k0 = (k0 + PHILOX_W0) & MASK32
        k1 = (k1 + PHILOX_W1) & MASK32
    return c0


def _mul32(a: int, b: torch.Tensor):
    """(hi, lo) 32-bit words of the 64-bit product a * b for a, b < 2**32, in int64 arithmetic."""
    b_lo = b & 0xFFFF
    b_hi = b >> 16
    lo_part = a * b_lo                    # < 2**48
    hi_part = a * b_hi                    # < 2**48; a * b = lo_part + hi_part * 2**16
    low = lo_part + ((hi_part & 0xFFFF) << 16)
    hi = (hi_part >> 16) + (low >> 32)
    return hi & MASK32, low & MASK32


def keep_mask(seed, stream: int, rows: int, cols: int, p: float, device=None) -> torch.Tensor:
    """Boolean (rows, cols) mask: True where the element is kept."""
    thr = keep_threshold(p)
    r = torch.arange(rows, dtype=torch.int64, device=device).view(-1, 1)
    c = torch.arange(cols, dtype=torch.int64, device=device).view(1, -1)
    if isinstance(seed, torch.Tensor):
        seed = seed.to(device=device if device is not None else seed.device).reshape(())
    return philox_first_word(seed, c, r, stream) >= thr


def new_seed(device) -> torch.Tensor:
    """A fresh seed drawn from torch's generator for ``device``, as a (1,) int64 tensor.

    Drawn on the device itself, so inside a captured CUDA graph every replay draws a new seed
    (torch's CUDA generator is graph-safe) and nothing synchronises with the host.
    """
    return torch.randint(0, SEED_HIGH, (1,), dtype=torch.int64, device=device)
