"""Recomputing hidden in backward instead of saving it (spinalkern.ops.RECOMPUTE_HIDDEN_FROM_BATCH):
the same gradients, bit for bit, with only the inputs kept from forward to backward."""
from __future__ import annotations

import pytest
import torch

from spinalkern import SpinalHead, ops
from spinalkern.rng import new_seed

from conftest import HAS_CUDA, TRITON_DEVICE


def _backends():
    from spinalkern import cuda_backend
    out = [("triton", TRITON_DEVICE)]
    if cuda_backend.available():
        out.append(("cuda", "cuda" if HAS_CUDA else "cpu"))
    return out


@pytest.mark.parametrize("backend,device", _backends(), ids=lambda v: str(v))
def test_recomputed_hidden_gives_the_same_gradients(backend, device, monkeypatch):
    torch.manual_seed(0)
    head = SpinalHead(24, 5, 16, 3, 2, dropout=0.25, backend=backend).to(device)
    x = torch.randn(19, 24, device=device)
    seed = new_seed(device)
    monkeypatch.setattr("spinalkern.modules.new_seed", lambda dev: seed.clone())

    def grads(recompute_from):
        monkeypatch.setattr(ops, "RECOMPUTE_HIDDEN_FROM_BATCH", recompute_from)
        head.zero_grad()
        xl = x.clone().requires_grad_()
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.shape) or t,
                                                      lambda t: t):
            y = head(xl)
        y.square().sum().backward()
        return saved, [xl.grad] + [p.grad.clone() for p in head.parameters()]

    saved_keep, g_keep = grads(None)
    saved_rec, g_rec = grads(19)
    assert (19, 3 * 16) in saved_keep and (19, 3 * 16) not in saved_rec
    for a, b in zip(g_keep, g_rec):
        assert torch.equal(a, b)
    assert not ops.recompute_hidden(18) and ops.recompute_hidden(19)
