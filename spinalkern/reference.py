"""The ground truth: both heads written straight from their formulas with plain torch ops.

``reference_forward`` is what every backend is tested against (in float64).  It builds each
layer's input by explicit concatenation, exactly as the papers' code does, and draws dropout
masks from :func:`spinalkern.rng.keep_mask` so that results are comparable with dropout on.
"""
from __future__ import annotations

import torch

from .rng import keep_mask
from .spec import HeadSpec


def _dropout(t: torch.Tensor, seed, stream: int, p: float) -> torch.Tensor:
    if p == 0.0:
        return t
    if seed is None:  # plain torch dropout (the eager "torch" backend): torch's own RNG
        return torch.nn.functional.dropout(t, p, training=True)
    keep = keep_mask(seed, stream, t.shape[0], t.shape[1], p, device=t.device)
    return torch.where(keep, t / (1.0 - p), torch.zeros_like(t))


def reference_forward(spec: HeadSpec, x: torch.Tensor, weights, biases, dropout: float = 0.0,
                      seed=None, norms=None, return_hidden: bool = False, hidden=None):
    """y = head(x).  ``weights``/``biases``: [W_0..W_{n-1}, W_out] and the matching biases.

    ``norms``: optional list of n callables applied to z_i before the ReLU (BatchNorm1d in the
    spinal head).  ``seed``: dropout seed (int or int64 tensor): masks from the shared
    counter-based RNG, identical to the fused kernels'; ``None``: torch's own dropout.
    ``hidden``: teacher forcing, for differentiating a fused backward: every h_i takes the
    value of the given activations ``hidden[:, i*H:(i+1)*H]`` (B, n*H) and the derivative of
    a ReLU whose output they are (zero where h_i <= 0), so derivatives equal the fused
    backward's whatever rounding did to z_i.
    """
    n = spec.n
    hs = []

    def relu(z, i):
        if hidden is None:
            return torch.relu(z)
        h = hidden[:, i * spec.H:(i + 1) * spec.H]
        return h + (z - z.detach()) * ~(h <= 0)
    if spec.kind == "spinal":
        for i in range(n):
            s = x[:, spec.x_offset(i): spec.x_offset(i) + spec.seg]
            u = s if i == 0 else torch.cat([s, hs[-1]], dim=1)
            z = torch.nn.functional.linear(_dropout(u, seed, i, dropout), weights[i], biases[i])
            if norms is not None:
                z = norms[i](z)
            hs.append(relu(z, i))
        u_out = _dropout(torch.cat(hs, dim=1), seed, n, dropout)
    else:
        xd = _dropout(x, seed, 0, dropout)
        for i in range(n):
            u = x if i == 0 else torch.cat([xd] + hs, dim=1)
            hs.append(relu(torch.nn.functional.linear(u, weights[i], biases[i]), i))
        u_out = torch.cat([xd] + hs, dim=1)
    y = torch.nn.functional.linear(u_out, weights[n], biases[n])
    if return_hidden:
        return y, torch.cat(hs, dim=1)
    return y
