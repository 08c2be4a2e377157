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

Every op accepts tensors of any strides (it copies what it needs contiguous) and checks all
of its arguments (ValueError / TypeError naming the argument); the backward op checks
everything the forward op does.  The outputs are always new contiguous tensors.

This module holds the schemas, the argument checks (the Python ones; the CUDA extension has
the same checks in C++, csrc/op_checks.h), the fake (meta) implementations and the Python
autograd formula (used by the Triton backend; the CUDA extension registers its autograd in
C++, csrc/head_autograd.cpp).  Differentiating a backward again (``create_graph=True``)
recomputes it with differentiable torch ops (:func:`differentiable_backward`); the backward
ops themselves are not differentiable and say so.
"""
from __future__ import annotations

import functools

import torch

from .reference import reference_forward
from .spec import KINDS, HeadSpec

FORWARD_SCHEMA = ("(Tensor x, Tensor[] weights, Tensor[] biases, Tensor? seed, int kind, "
                  "int num_splits, float dropout, bool save_hidden) -> (Tensor, Tensor)")
BACKWARD_SCHEMA = ("(Tensor grad_y, Tensor x, Tensor[] weights, Tensor hidden, Tensor? seed, "
                   "int kind, int num_splits, float dropout) -> (Tensor, Tensor)")
# The spinal head with training-mode BatchNorm1d after every hidden Linear (see
# define_bn_ops; the C++ copies of all schemas are in csrc/op_schemas.h)
BN_FORWARD_SCHEMA = ("(Tensor x, Tensor[] weights, Tensor[] biases, Tensor[] bn_weights, "
                     "Tensor[] bn_biases, Tensor? seed, int num_splits, float dropout, "
                     "float eps, bool save_for_backward) -> (Tensor, Tensor, Tensor, Tensor)")
BN_BACKWARD_SCHEMA = ("(Tensor grad_y, Tensor x, Tensor[] weights, Tensor[] bn_weights, "
                      "Tensor hidden, Tensor z, Tensor stats, Tensor? seed, int num_splits, "
                      "float dropout) -> (Tensor, Tensor, Tensor)")

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


@functools.lru_cache(maxsize=256)
def head_spec(kind: int, D: int, H: int, n: int, C: int, num_splits: int) -> HeadSpec:
    """The HeadSpec of an op call (cached: ops rebuild it from their arguments' shapes)."""
    if kind not in (0, 1):
        raise ValueError(f"kind must be 0 (spinal) or 1 (progressive), got {kind}")
    return HeadSpec(KINDS[kind], D, H, n, C, num_splits)


def spec_from_args(x, weights, kind: int, num_splits: int) -> HeadSpec:
    """Rebuild the HeadSpec from the op's arguments, checking x's and every weight's shape."""
    if kind not in (0, 1):
        raise ValueError(f"kind must be 0 (spinal) or 1 (progressive), got {kind}")
    if len(weights) < 2:
        raise ValueError("weights must hold at least one hidden layer and the output layer")
    if x.dim() != 2:
        raise ValueError(f"x must be 2-D (batch, in_features), got shape {tuple(x.shape)}")
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"x must be float16, bfloat16, float32 or float64, got {x.dtype}")
    for L, w in enumerate(weights):
        if w.dim() != 2:
            raise ValueError(f"weights[{L}] must be 2-D, got shape {tuple(w.shape)}")
    spec = head_spec(kind, int(x.shape[1]), int(weights[0].shape[0]), len(weights) - 1,
                     int(weights[-1].shape[0]), num_splits)
    for L, (w, shape) in enumerate(zip(weights, spec.weight_shapes())):
        if tuple(w.shape) != shape:
            raise ValueError(f"weights[{L}] has shape {tuple(w.shape)}, expected {shape} "
                             f"for {spec}")
    return spec


@functools.lru_cache(maxsize=256)
def param_offsets(spec: HeadSpec) -> tuple[tuple[int, int, int], ...]:
    """(weight offset, bias offset, end) of each layer in the flat grad_params tensor."""
    out, off = [], 0
    for N, K in spec.weight_shapes():
        out.append((off, off + N * K, off + N * K + N))
        off += N * K + N
    return tuple(out)


def split_grad_params(spec: HeadSpec, flat: torch.Tensor):
    """Views of the flat gradient: ([dW_0..dW_out], [db_0..db_out])."""
    dws, dbs = [], []
    for (wo, bo, end), (N, K) in zip(param_offsets(spec), spec.weight_shapes()):
        dws.append(flat[wo:bo].view(N, K))
        dbs.append(flat[bo:end])
    return dws, dbs


def _check_like_x(name: str, t, x, dtype=True):
    if dtype and t.dtype != x.dtype:
        raise TypeError(f"{name} has dtype {t.dtype} but x has {x.dtype}; the fused heads "
                        "compute in one dtype (use torch.autocast for mixed precision)")
    if t.device != x.device:
        raise ValueError(f"{name} is on {t.device} but x is on {x.device}")


def _check_dropout_and_seed(x, seed, dropout):
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {dropout}")
    if dropout > 0.0:
        if seed is None:
            raise ValueError("seed is required when dropout > 0")
        if seed.dtype != torch.int64 or seed.numel() != 1:
            raise ValueError(f"seed must be a one-element int64 tensor, got dtype {seed.dtype} "
                             f"with {seed.numel()} elements")
        if seed.device != x.device:
            raise ValueError(f"seed is on {seed.device} but x is on {x.device}")


def check_forward_args(x, weights, biases, seed, kind, num_splits, dropout) -> HeadSpec:
    """Every check of the forward op; returns the call's HeadSpec."""
    spec = spec_from_args(x, weights, kind, num_splits)
    if len(biases) != len(weights):
        raise ValueError(f"got {len(weights)} weights but {len(biases)} biases")
    for L, (w, b) in enumerate(zip(weights, biases)):
        if tuple(b.shape) != (w.shape[0],):
            raise ValueError(f"biases[{L}] has shape {tuple(b.shape)}, expected ({w.shape[0]},)")
        _check_like_x(f"weights[{L}]", w, x)
        _check_like_x(f"biases[{L}]", b, x)
    _check_dropout_and_seed(x, seed, dropout)
    return spec


def check_backward_args(grad_y, x, weights, hidden, seed, kind, num_splits,
                        dropout) -> HeadSpec:
    """Every check of the backward op (all that the forward checks, plus grad_y and hidden);
    returns the call's HeadSpec."""
    spec = spec_from_args(x, weights, kind, num_splits)
    for L, w in enumerate(weights):
        _check_like_x(f"weights[{L}]", w, x)
    B = x.shape[0]
    if tuple(grad_y.shape) != (B, spec.C):
        raise ValueError(f"grad_y has shape {tuple(grad_y.shape)}, expected ({B}, {spec.C})")
    if tuple(hidden.shape) != (B, spec.n * spec.H):
        raise ValueError(f"hidden has shape {tuple(hidden.shape)}, expected "
                         f"({B}, {spec.n * spec.H}) (the forward must run with save_hidden=True)")
    _check_like_x("grad_y", grad_y, x)
    _check_like_x("hidden", hidden, x)
    _check_dropout_and_seed(x, seed, dropout)
    return spec


# -- the same checks, remembered per argument signature (for the Python launchers) -------------
_checked: dict = {}


def _sig(t):
    return None if t is None else (t.shape, t.dtype, t.device)


def _remember(key, check, args) -> HeadSpec:
    spec = _checked.get(key)
    if spec is None:
        spec = check(*args)  # raises for bad arguments; only good signatures are remembered
        if len(_checked) >= 1024:
            _checked.clear()
        _checked[key] = spec
    return spec


def checked_forward_args(x, weights, biases, seed, kind, num_splits, dropout) -> HeadSpec:
    """:func:`check_forward_args`, run once per signature (shapes, dtypes, devices, scalars)
    of the arguments and remembered.  Real tensors only (not under fake/symbolic shapes)."""
    key = ("fwd", kind, num_splits, dropout, _sig(x), tuple(map(_sig, weights)),
           tuple(map(_sig, biases)), _sig(seed))
    return _remember(key, check_forward_args,
                     (x, weights, biases, seed, kind, num_splits, dropout))


def checked_backward_args(grad_y, x, weights, hidden, seed, kind, num_splits,
                          dropout) -> HeadSpec:
    """:func:`check_backward_args`, remembered per argument signature."""
    key = ("bwd", kind, num_splits, dropout, _sig(grad_y), _sig(x), tuple(map(_sig, weights)),
           _sig(hidden), _sig(seed))
    return _remember(key, check_backward_args,
                     (grad_y, x, weights, hidden, seed, kind, num_splits, dropout))


# -- the BatchNorm ops' checks ---------------------------------------------------------------------
def bn_accumulation_dtype(x) -> torch.dtype:
    """The dtype of the BN ops' statistics, gamma/beta and their gradients: float64 for
    float64 x, else float32."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _check_bn_params(x, spec: HeadSpec, bn_weights, bn_biases=None):
    acc = bn_accumulation_dtype(x)
    lists = (("bn_weights", bn_weights),) if bn_biases is None else \
        (("bn_weights", bn_weights), ("bn_biases", bn_biases))
    for name, ts in lists:
        if len(ts) not in (0, spec.n):
            raise ValueError(f"{name} must hold {spec.n} tensors (one per hidden layer) or none "
                             f"(affine=False), got {len(ts)}")
        for i, t in enumerate(ts):
            if tuple(t.shape) != (spec.H,):
                raise ValueError(f"{name}[{i}] has shape {tuple(t.shape)}, expected ({spec.H},)")
            if t.dtype != acc:
                raise TypeError(f"{name}[{i}] has dtype {t.dtype}, expected {acc} (BatchNorm "
                                f"parameters stay in {acc} for {x.dtype} x)")
            _check_like_x(f"{name}[{i}]", t, x, dtype=False)
    if bn_biases is not None and len(bn_weights) != len(bn_biases):
        raise ValueError(f"got {len(bn_weights)} bn_weights but {len(bn_biases)} bn_biases "
                         "(both n, or both empty for affine=False)")


def _check_bn_batch(x):
    if x.shape[0] < 2:
        raise ValueError("training-mode BatchNorm needs more than 1 row per batch (the batch "
                         f"variance of one row is undefined), got x of shape {tuple(x.shape)}")


def check_bn_forward_args(x, weights, biases, bn_weights, bn_biases, seed, num_splits,
                          dropout, eps) -> HeadSpec:
    """Every check of the BN forward op (the spinal head); returns the call's HeadSpec."""
    spec = check_forward_args(x, weights, biases, seed, 0, num_splits, dropout)
    _check_bn_batch(x)
    _check_bn_params(x, spec, bn_weights, bn_biases)
    if not eps > 0.0:
        raise ValueError(f"eps must be positive, got {eps}")
    return spec


def check_bn_backward_args(grad_y, x, weights, bn_weights, hidden, z, stats, seed, num_splits,
                           dropout) -> HeadSpec:
    """Every check of the BN backward op; returns the call's HeadSpec."""
    spec = check_backward_args(grad_y, x, weights, hidden, seed, 0, num_splits, dropout)
    _check_bn_batch(x)
    _check_bn_params(x, spec, bn_weights)
    if tuple(z.shape) != tuple(hidden.shape):
        raise ValueError(f"z has shape {tuple(z.shape)}, expected {tuple(hidden.shape)} "
                         "(the forward must run with save_for_backward=True)")
    _check_like_x("z", z, x)
    acc = bn_accumulation_dtype(x)
    if tuple(stats.shape) != (spec.n, 3, spec.H):
        raise ValueError(f"stats has shape {tuple(stats.shape)}, expected "
                         f"({spec.n}, 3, {spec.H})")
    if stats.dtype != acc:
        raise TypeError(f"stats has dtype {stats.dtype}, expected {acc}")
    _check_like_x("stats", stats, x, dtype=False)
    return spec


# -- fake (meta) implementations -----------------------------------------------------------------
def _fake_forward(x, weights, biases, seed, kind, num_splits, dropout, save_hidden):
    spec = check_forward_args(x, weights, biases, seed, kind, num_splits, dropout)
    y = x.new_empty((x.shape[0], spec.C))
    hidden = x.new_empty((x.shape[0], spec.n * spec.H) if save_hidden else (0,))
    return y, hidden


def _fake_backward(grad_y, x, weights, hidden, seed, kind, num_splits, dropout):
    spec = check_backward_args(grad_y, x, weights, hidden, seed, kind, num_splits, dropout)
    return x.new_empty(x.shape), weights[0].new_empty((spec.num_params(),))


def _fake_bn_forward(x, weights, biases, bn_weights, bn_biases, seed, num_splits, dropout, eps,
                     save_for_backward):
    spec = check_bn_forward_args(x, weights, biases, bn_weights, bn_biases, seed, num_splits,
                                 dropout, eps)
    B = x.shape[0]
    y = x.new_empty((B, spec.C))
    saved = (B, spec.n * spec.H) if save_for_backward else (0,)
    stats = x.new_empty((spec.n, 3, spec.H), dtype=bn_accumulation_dtype(x))
    return y, x.new_empty(saved), x.new_empty(saved), stats


def _fake_bn_backward(grad_y, x, weights, bn_weights, hidden, z, stats, seed, num_splits,
                      dropout):
    spec = check_bn_backward_args(grad_y, x, weights, bn_weights, hidden, z, stats, seed,
                                  num_splits, dropout)
    return (x.new_empty(x.shape), weights[0].new_empty((spec.num_params(),)),
            stats.new_empty((spec.n, 2, spec.H)))


# -- double backward -----------------------------------------------------------------------------
def differentiable_backward(grad_y, x, weights, biases, hidden, seed, kind, num_splits,
                            dropout, bn=None):
    """(grad_x, [dW_L], [db_L]) of the backward op, computed with differentiable torch ops so
    that autograd can differentiate it again (``create_graph=True``, e.g. a gradient penalty).

    The forward is recomputed from the reference formulas with every h_i teacher-forced to the
    saved activations (``reference_forward(..., hidden=...)``): the first derivatives are the
    backward op's, ReLU masks and dropout masks included; second derivatives flow through x,
    the weights, the biases (layer L+1's dW depends on b_L through h_L) and grad_y.

    ``bn``: ``(bn_weights, bn_biases, eps)`` of the BatchNorm head: its hidden layers normalise
    with torch's batch_norm on the batch statistics, and ([dgamma_i], [dbeta_i]) follow."""
    spec = check_backward_args(grad_y, x, weights, hidden, seed, kind, num_splits, dropout)
    bn_weights, bn_biases, eps = bn if bn is not None else ((), (), 0.0)
    with torch.enable_grad():
        leaves = [t if t.requires_grad else t.detach().requires_grad_()
                  for t in (x, *weights, *biases, *bn_weights, *bn_biases)]
        n1, nb = len(weights), len(bn_weights)
        ws, bs = leaves[1:1 + n1], leaves[1 + n1:1 + 2 * n1]
        gammas, betas = leaves[1 + 2 * n1:1 + 2 * n1 + nb], leaves[1 + 2 * n1 + nb:]
        norms = None
        if bn is not None:
            acc = bn_accumulation_dtype(x)

            def norm(i):
                return lambda z: torch.nn.functional.batch_norm(
                    z.to(acc), None, None, gammas[i] if nb else None, betas[i] if nb else None,
                    True, 0.0, eps).to(z.dtype)
            norms = [norm(i) for i in range(spec.n)]
        y = reference_forward(spec, leaves[0], ws, bs, dropout, seed if dropout > 0.0 else None,
                              norms=norms, hidden=hidden)
        g = list(torch.autograd.grad(y, leaves, grad_y, create_graph=True, allow_unused=True))
    g = [torch.zeros_like(t) if d is None else d for d, t in zip(g, leaves)]
    grads = (g[0], g[1:1 + n1], g[1 + n1:1 + 2 * n1])
    if bn is None:
        return grads
    return grads + (g[1 + 2 * n1:1 + 2 * n1 + nb], g[1 + 2 * n1 + nb:])


# -- saving or recomputing hidden ------------------------------------------------------------------
# From this batch size on, the fused heads keep only their inputs from forward to backward and
# recompute hidden (B x n*H) in backward with one more forward launch, instead of saving it.
# None (the default until GPU benchmarks show where it pays): always save hidden.
RECOMPUTE_HIDDEN_FROM_BATCH: int | None = None


def recompute_hidden(batch: int) -> bool:
    return RECOMPUTE_HIDDEN_FROM_BATCH is not None and batch >= RECOMPUTE_HIDDEN_FROM_BATCH


# -- registration ---------------------------------------------------------------------------------
def define_backend_ops(backend: str, lib: torch.library.Library | None = None):
    """Define the two op schemas for ``backend`` from Python (the Triton backend does this;
    the CUDA extension defines the same schemas in C++)."""
    torch.library.define(f"spinalkern::{backend}_head_forward", FORWARD_SCHEMA, lib=lib)
    torch.library.define(f"spinalkern::{backend}_head_backward", BACKWARD_SCHEMA, lib=lib)


def define_bn_ops(backend: str, lib: torch.library.Library | None = None):
    """Define ``spinalkern::{backend}_head_bn_forward`` / ``_bn_backward`` from Python: the
    spinal head with training-mode BatchNorm1d after every hidden Linear.

    ``bn_forward(x, weights, biases, bn_weights, bn_biases, seed, num_splits, dropout, eps,
    save_for_backward) -> (y, hidden, z, stats)``: layer i < n computes
    ``z_i = W_i drop(u_i) + b_i``, normalises it with the batch mean and biased variance
    (``r_i = 1 / sqrt(var_i + eps)``), then ``h_i = ReLU(gamma_i (z_i - mu_i) r_i + beta_i)``;
    ``y = W_out drop([h_0..h_{n-1}]) + b_out``.  ``bn_weights`` / ``bn_biases``: n (H,) tensors
    (gamma, beta) or two empty lists (affine=False), float32 (float64 for float64 x).
    ``hidden`` and ``z``: (B, n*H) in x's dtype, (0,) when not ``save_for_backward``;
    ``stats``: (n, 3, H) in the accumulation dtype, [mu_i, r_i, unbiased var_i].  B >= 2.
    The op does not touch running statistics: the module updates them from ``stats``.
    ``bn_backward(grad_y, x, weights, bn_weights, hidden, z, stats, seed, num_splits,
    dropout) -> (grad_x, grad_params, grad_bn)``: ``grad_params`` as the plain backward op,
    ``grad_bn`` (n, 2, H) in the accumulation dtype, [dgamma_i, dbeta_i]."""
    torch.library.define(f"spinalkern::{backend}_head_bn_forward", BN_FORWARD_SCHEMA, lib=lib)
    torch.library.define(f"spinalkern::{backend}_head_bn_backward", BN_BACKWARD_SCHEMA, lib=lib)


def backend_ops(backend: str):
    """(forward, backward) OpOverloads of ``spinalkern::{backend}_head_*``."""
    ns = torch.ops.spinalkern
    return (getattr(ns, f"{backend}_head_forward").default,
            getattr(ns, f"{backend}_head_backward").default)


def register_fakes(backend: str):
    """Register the fake (meta) implementations of ``spinalkern::{backend}_head_*``; returns
    the forward op.  Every backend uses these (the CUDA extension's autograd is in C++)."""
    fwd, bwd = backend_ops(backend)
    torch.library.register_fake(fwd, _fake_forward)
    torch.library.register_fake(bwd, _fake_backward)
    return fwd


def bn_backend_ops(backend: str):
    """(bn forward, bn backward) OpOverloads of ``spinalkern::{backend}_head_bn_*``."""
    ns = torch.ops.spinalkern
    return (getattr(ns, f"{backend}_head_bn_forward").default,
            getattr(ns, f"{backend}_head_bn_backward").default)


def register_bn_fakes(backend: str):
    """Register the fake (meta) implementations of ``spinalkern::{backend}_head_bn_*``;
    returns the BN forward op."""
    fwd, bwd = bn_backend_ops(backend)
    torch.library.register_fake(fwd, _fake_bn_forward)
    torch.library.register_fake(bwd, _fake_bn_backward)
    return fwd


def _make_autograd(forward_op, backward_op):
    def setup_context(ctx, inputs, output):
        x, weights, biases, seed, kind, num_splits, dropout, save_hidden = inputs
        ctx.mark_non_differentiable(output[1])  # hidden is a by-product saved for backward
        ctx.args = (kind, num_splits, dropout, save_hidden, len(weights))
        # the biases: to recompute hidden (save_hidden=False) and for a differentiable
        # backward (create_graph=True)
        if save_hidden:
            ctx.save_for_backward(x, output[1], seed, *weights, *biases)
        else:  # backward recomputes hidden with the forward op: keep the inputs only
            ctx.save_for_backward(x, seed, *weights, *biases)

    def backward(ctx, grad_y, grad_hidden):
        kind, num_splits, dropout, save_hidden, n_weights = ctx.args
        if save_hidden:
            x, hidden, seed, *params = ctx.saved_tensors
            weights, biases = params[:n_weights], params[n_weights:]
        else:
            x, seed, *params = ctx.saved_tensors
            weights, biases = params[:n_weights], params[n_weights:]
            with torch.no_grad():
                hidden = forward_op(x, weights, biases, seed, kind, num_splits, dropout, True)[1]
        if torch.is_grad_enabled():  # create_graph=True: a backward that is differentiable
            grad_x, dws, dbs = differentiable_backward(grad_y, x, weights, biases, hidden, seed,
                                                       kind, num_splits, dropout)
            return grad_x, dws, dbs, None, None, None, None, None
        grad_x, flat = backward_op(grad_y, x, weights, hidden, seed, kind, num_splits, dropout)
        dws, dbs, off = [], [], 0
        for w in weights:  # views of the flat gradient
            N, K = w.shape
            dws.append(flat[off:off + N * K].view(N, K))
            dbs.append(flat[off + N * K:off + N * K + N])
            off += N * K + N
        return grad_x, dws, dbs, None, None, None, None, None

    return setup_context, backward


def differentiable_bn_backward(grad_y, x, weights, biases, bn_weights, bn_biases, hidden, seed,
                               num_splits, dropout, eps):
    """(grad_x, [dW_L], [db_L], [dgamma_i], [dbeta_i]) of the BN backward op with
    differentiable torch ops (``create_graph=True``): :func:`differentiable_backward` of the
    spinal head with its BatchNorm."""
    return differentiable_backward(grad_y, x, weights, biases, hidden, seed, 0, num_splits,
                                   dropout, bn=(bn_weights, bn_biases, eps))


def _backward_op_backward(ctx, *grads):
    raise RuntimeError(
        "spinalkern: the backward ops are not differentiable; to differentiate a gradient "
        "(create_graph=True), differentiate through the forward op, whose backward is then "
        "computed with differentiable torch ops")


def register_python_autograd(backend: str):
    """Register the Python autograd of ``spinalkern::{backend}_head_forward`` (and make its
    backward op raise a clear error when differentiated)."""
    fwd, bwd = backend_ops(backend)
    setup_context, backward = _make_autograd(fwd, bwd)
    torch.library.register_autograd(fwd, backward, setup_context=setup_context)
    torch.library.register_autograd(bwd, _backward_op_backward)
    return fwd


def register_python_bn_autograd(backend: str):
    """Register the Python autograd of ``spinalkern::{backend}_head_bn_forward`` (gradients
    of x, weights, biases, bn_weights, bn_biases; differentiable again through
    :func:`differentiable_bn_backward`) and make its backward op raise a clear error when
    differentiated; returns the BN forward op."""
    fwd, bwd = bn_backend_ops(backend)

    def setup_context(ctx, inputs, output):
        x, weights, biases, bn_weights, bn_biases, seed, num_splits, dropout, eps, save = inputs
        ctx.mark_non_differentiable(*output[1:])  # hidden, z, stats: by-products
        ctx.args = (num_splits, dropout, eps, save, len(weights), len(bn_weights))
        params = (*weights, *biases, *bn_weights, *bn_biases)  # (the biases: for create_graph)
        if save:
            ctx.save_for_backward(x, seed, *params, *output[1:])
        else:  # backward recomputes hidden, z and stats with the forward op
            ctx.save_for_backward(x, seed, *params)

    def backward(ctx, grad_y, *unused):
        num_splits, dropout, eps, save, nw, nbn = ctx.args
        x, seed, *saved = ctx.saved_tensors
        weights, biases = saved[:nw], saved[nw:2 * nw]
        bn_weights, bn_biases = saved[2 * nw:2 * nw + nbn], saved[2 * nw + nbn:2 * nw + 2 * nbn]
        if save:
            hidden, z, stats = saved[2 * nw + 2 * nbn:]
        else:
            with torch.no_grad():
                _, hidden, z, stats = fwd(x, weights, biases, bn_weights, bn_biases, seed,
                                          num_splits, dropout, eps, True)
        if torch.is_grad_enabled():  # create_graph=True: a backward that is differentiable
            grad_x, dws, dbs, dgammas, dbetas = differentiable_bn_backward(
                grad_y, x, weights, biases, bn_weights, bn_biases, hidden, seed, num_splits,
                dropout, eps)
        else:
            grad_x, flat, grad_bn = bwd(grad_y, x, weights, bn_weights, hidden, z, stats, seed,
                                        num_splits, dropout)
            spec = head_spec(0, int(x.shape[1]), int(weights[0].shape[0]), nw - 1,
                             int(weights[-1].shape[0]), num_splits)
            dws, dbs = split_grad_params(spec, flat)
            dgammas = list(grad_bn[:, 0]) if nbn else []
            dbetas = list(grad_bn[:, 1]) if nbn else []
        return grad_x, dws, dbs, dgammas, dbetas, None, None, None, None, None

    torch.library.register_autograd(fwd, backward, setup_context=setup_context)
    torch.library.register_autograd(bwd, _backward_op_backward)
    return fwd
