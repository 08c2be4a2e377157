"""torch.library ops for the fused heads, shared by every fused backend.

Each fused backend ``B`` (``"triton"``, ``"cuda"``) provides two ops with the same schemas:

``spinalkern::B_head_forward(x, weights, biases, seed, kind, num_splits, dropout, save_hidden)
-> (y, hidden)``
    ``weights``/``biases`` are ``[W_0..W_{n-1}, W_out]`` and their biases, all in x's dtype.
    ``hidden`` is ``[h_0; ...; h_{n-1}]`` (B, n*H), post-ReLU, in x's dtype, when
    ``save_hidden``; otherwise an empty (0,) tensor (and autograd recomputes hidden in
    backward, see ``RECOMPUTE_HIDDEN_FROM_BATCH``).  ``seed``: (1,) int64 tensor on x's
    device, read only when ``dropout > 0``.
``spinalkern::B_head_backward(grad_y, x, weights, hidden, seed, kind, num_splits, dropout)
-> (grad_x, grad_params)``
    ``grad_params`` is one flat tensor in the weights' dtype holding, for L = 0..n, ``dW_L``
    (row-major) then ``db_L``.

This module defines the schemas, the shape checks, the fake (meta) implementations and the
autograd formula once; a backend only supplies its kernels (see ``register_backend``).
"""
from __future__ import annotations

import torch

from .spec import KINDS, HeadSpec

FORWARD_SCHEMA = ("(Tensor x, Tensor[] weights, Tensor[] biases, Tensor? seed, int kind, "
                  "int num_splits, float dropout, bool save_hidden) -> (Tensor, Tensor)")
BACKWARD_SCHEMA = ("(Tensor grad_y, Tensor x, Tensor[] weights, Tensor hidden, Tensor? seed, "
                   "int kind, int num_splits, float dropout) -> (Tensor, Tensor)")


def spec_from_args(x, weights, kind: int, num_splits: int) -> HeadSpec:
    """Rebuild the HeadSpec from the op's arguments, checking every shape."""
    if kind not in (0, 1):
        raise ValueError(f"kind must be 0 (spinal) or 1 (progressive), got {kind}")
    if len(weights) < 2:
        raise ValueError("weights must hold at least one hidden layer and the output layer")
    if x.dim() != 2:
        raise ValueError(f"x must be 2-D (batch, in_features), got shape {tuple(x.shape)}")
    spec = HeadSpec(KINDS[kind], int(x.shape[1]), int(weights[0].shape[0]), len(weights) - 1,
                    int(weights[-1].shape[0]), num_splits)
    for L, (w, shape) in enumerate(zip(weights, spec.weight_shapes())):
        if tuple(w.shape) != shape:
            raise ValueError(f"weights[{L}] has shape {tuple(w.shape)}, expected {shape} "
                             f"for {spec}")
    return spec


def param_offsets(spec: HeadSpec) -> list[tuple[int, int, int]]:
    """(weight offset, bias offset, end) of each layer in the flat grad_params tensor."""
    out, off = [], 0
    for N, K in spec.weight_shapes():
        out.append((off, off + N * K, off + N * K + N))
        off += N * K + N
    return out


def split_grad_params(spec: HeadSpec, flat: torch.Tensor):
    """Views of the flat gradient: ([dW_0..dW_out], [db_0..db_out])."""
    dws, dbs = [], []
    for (wo, bo, end), (N, K) in zip(param_offsets(spec), spec.weight_shapes()):
        dws.append(flat[wo:bo].view(N, K))
        dbs.append(flat[bo:end])
    return dws, dbs


def check_forward_args(x, weights, biases, seed, kind, num_splits, dropout) -> HeadSpec:
    spec = spec_from_args(x, weights, kind, num_splits)
    if len(biases) != len(weights):
        raise ValueError(f"got {len(weights)} weights but {len(biases)} biases")
    for L, (w, b) in enumerate(zip(weights, biases)):
        if tuple(b.shape) != (w.shape[0],):
            raise ValueError(f"biases[{L}] has shape {tuple(b.shape)}, expected ({w.shape[0]},)")
        for name, t in ((f"weights[{L}]", w), (f"biases[{L}]", b)):
            if t.dtype != x.dtype:
                raise TypeError(f"{name} has dtype {t.dtype} but x has {x.dtype}; the fused "
                                "heads compute in one dtype (use torch.autocast for mixed precision)")
            if t.device != x.device:
                raise ValueError(f"{name} is on {t.device} but x is on {x.device}")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {dropout}")
    if dropout > 0.0:
        if seed is None:
            raise ValueError("seed is required when dropout > 0")
        if seed.dtype != torch.int64 or seed.numel() != 1 or seed.device != x.device:
            raise ValueError("seed must be a one-element int64 tensor on x's device")
    return spec


def _fake_forward(x, weights, biases, seed, kind, num_splits, dropout, save_hidden):
    spec = check_forward_args(x, weights, biases, seed, kind, num_splits, dropout)
    y = x.new_empty((x.shape[0], spec.C))
    hidden = x.new_empty((x.shape[0], spec.n * spec.H) if save_hidden else (0,))
    return y, hidden


def _fake_backward(grad_y, x, weights, hidden, seed, kind, num_splits, dropout):
    spec = spec_from_args(x, weights, kind, num_splits)
    return torch.empty_like(x), weights[0].new_empty((spec.num_params(),))


# From this batch size on, the fused heads keep only their inputs from forward to backward and
# recompute hidden (B x n*H) in backward with one more forward launch, instead of saving it.
# None (the default until GPU benchmarks show where it pays): always save hidden.
RECOMPUTE_HIDDEN_FROM_BATCH: int | None = None


def recompute_hidden(batch: int) -> bool:
    return RECOMPUTE_HIDDEN_FROM_BATCH is not None and batch >= RECOMPUTE_HIDDEN_FROM_BATCH


def _make_autograd(forward_op, backward_op):
    def setup_context(ctx, inputs, output):
        x, weights, biases, seed, kind, num_splits, dropout, save_hidden = inputs
        ctx.mark_non_differentiable(output[1])  # hidden is a by-product saved for backward
        # save_hidden=False: backward recomputes hidden with the forward op (biases kept)
        ctx.recompute = not save_hidden
        ctx.n_weights = len(weights)
        ctx.save_for_backward(x, x.new_empty(0) if ctx.recompute else output[1],
                              seed if seed is not None else x.new_empty(0), *weights,
                              *(biases if ctx.recompute else ()))
        ctx.args = (kind, num_splits, dropout, seed is not None)

    def backward(ctx, grad_y, grad_hidden):
        x, hidden, seed, *params = ctx.saved_tensors
        weights, biases = params[:ctx.n_weights], params[ctx.n_weights:]
        kind, num_splits, dropout, has_seed = ctx.args
        seed = seed if has_seed else None
        if ctx.recompute:
            _, hidden = forward_op(x, weights, biases, seed, kind, num_splits, dropout, True)
        grad_x, flat = backward_op(grad_y.contiguous(), x, weights, hidden, seed, kind,
                                   num_splits, dropout)
        dws, dbs = split_grad_params(spec_from_args(x, weights, kind, num_splits), flat)
        return grad_x, dws, dbs, None, None, None, None, None

    return setup_context, backward


def define_backend_ops(backend: str, lib: torch.library.Library | None = None):
    """Define the two op schemas for ``backend`` from Python (the Triton backend does this;
    the CUDA extension defines the same schemas in C++)."""
    torch.library.define(f"spinalkern::{backend}_head_forward", FORWARD_SCHEMA, lib=lib)
    torch.library.define(f"spinalkern::{backend}_head_backward", BACKWARD_SCHEMA, lib=lib)


def register_backend(backend: str):
    """Register fake implementations and autograd for ``spinalkern::{backend}_head_*``.

    Returns the forward op (an OpOverloadPacket's default overload)."""
    fwd = getattr(torch.ops.spinalkern, f"{backend}_head_forward").default
    bwd = getattr(torch.ops.spinalkern, f"{backend}_head_backward").default
    torch.library.register_fake(fwd, _fake_forward)
    torch.library.register_fake(bwd, _fake_backward)
    setup_context, backward = _make_autograd(fwd, bwd)
    torch.library.register_autograd(fwd, backward, setup_context=setup_context)
    return fwd
