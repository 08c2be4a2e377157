"""Every fused backend against the float64 reference, through the ops and through the modules.

The one conformance suite of the ops: every test is parametrised over the fused backends
present: "triton" always (CPU: Triton's interpreter), "cuda" when the extension is built (CPU:
its C++ implementation; GPU: its kernels).  The CUDA kernels themselves also run on CPU in the
emulator, which meets the op-level tests of this file (tests/test_cuda_emu.py).  One oracle
(``spinalkern.reference``, float64), one tolerance rule and error measure
(``spinalkern.testing``: max(2x torch's own error at the precision, a per-dtype floor)), one
input factory (:func:`make_inputs`), one poisoning mechanism (``poisoned_outputs``) and one list
of bad arguments (:func:`bad_forward_arguments`) for every backend.  Inputs are fresh random
tensors on every check.  Extension-only behaviour (its keep-mask op, C++ pairwise sums, C++
autograd) is in tests/test_cuda_build.py.
"""
from __future__ import annotations

import pytest
import torch

import spinalkern
from spinalkern import ProgressiveHead, SpinalHead
from spinalkern.ops import split_grad_params
from spinalkern.reference import reference_forward
from spinalkern.spec import HeadSpec
from spinalkern.testing import (ERROR_FLOOR, GRAD_ERROR_FLOOR, poisoned_outputs, random_params,
                                rel_err)

from conftest import HAS_CUDA, TRITON_DEVICE, load_emulator, requires_cuda


def _fused_backends():
    out = ["triton"]
    from spinalkern import cuda_backend
    if cuda_backend.available():
        out.append("cuda")
    return out


FUSED = _fused_backends()
# Every implementation of the ops: the fused backends, and the CUDA kernels on the CPU emulator
# ("emu", built on first use by conftest.load_emulator; op-level tests only).
OPS = FUSED + ["emu"]


def backend_device(backend: str) -> str:
    if backend == "triton":
        return TRITON_DEVICE
    return "cuda" if HAS_CUDA and backend == "cuda" else "cpu"


def op(backend, name="forward"):
    if backend == "emu":
        load_emulator()
    return getattr(torch.ops.spinalkern, f"{backend}_head_{name}")


# A covering grid of the sizes: every batch (1, 37, 1000), H (8, 10, 64, 128),
# n (1, 2, 4, 6), S (1, 2, 4) and C (10, 26, 62) appears, with D never a multiple of 16.
# (kind, B, D, H, n, S, C)
CASES = [
    ("spinal", 1, 74, 8, 1, 1, 10),
    ("spinal", 37, 37, 10, 2, 1, 26),
    ("spinal", 1000, 148, 64, 4, 4, 62),
    ("spinal", 37, 90, 128, 6, 2, 10),
    ("spinal", 1000, 53, 10, 6, 1, 62),
    ("spinal", 37, 52, 8, 4, 4, 26),
    ("progressive", 1, 37, 8, 1, 1, 10),
    ("progressive", 37, 53, 10, 2, 1, 26),
    ("progressive", 1000, 45, 64, 4, 1, 62),
    ("progressive", 37, 90, 128, 6, 1, 26),
    ("progressive", 1000, 37, 10, 6, 1, 10),
]
CASE_IDS = [f"{k[:4]}-B{B}-D{D}-H{H}-n{n}-S{S}-C{C}" for k, B, D, H, n, S, C in CASES]


def make_inputs(spec: HeadSpec, B: int, dtype, device):
    x = torch.randn(B, spec.D, dtype=torch.float64).to(device=device, dtype=dtype)
    ws, bs = random_params(spec, dtype, device)
    return x, ws, bs


def run_fused(backend, spec, x, ws, bs, dropout=0.0, seed=None, grad_y=None):
    """Forward (and backward if grad_y) through the op's autograd; returns y, hidden, grads."""
    leaves = [t.detach().clone().requires_grad_() for t in (x, *ws, *bs)]
    xl, wl, bl = leaves[0], leaves[1:1 + len(ws)], leaves[1 + len(ws):]
    with poisoned_outputs():
        y, hidden = op(backend)(xl, wl, bl, seed, spec.kind_code, spec.num_splits, dropout, True)
        if grad_y is None:
            return y, hidden, None
        y.backward(grad_y)
    return y, hidden, [t.grad for t in leaves]


def run_reference(spec, x, ws, bs, dropout=0.0, seed=None, grad_y=None, hidden=None):
    """The float64 oracle: y, hidden and every gradient.

    With ``hidden`` (a fused backend's activations) the gradients are those of the reference
    whose h_i are teacher-forced to them (``reference_forward(hidden=...)``): the backend's
    ReLU masks.  A unit whose pre-activation rounding puts on the other side of zero changes
    the gradients by O(1) (two correct implementations flip different units), so without this
    a rare flip would fail a correct backend; y and hidden are always the plain reference's
    (the forward is continuous)."""
    seed = seed.cpu() if seed is not None else None
    leaves = [t.detach().double().cpu().requires_grad_() for t in (x, *ws, *bs)]
    xl, wl, bl = leaves[0], leaves[1:1 + len(ws)], leaves[1 + len(ws):]
    y, h = reference_forward(spec, xl, wl, bl, dropout, seed, return_hidden=True)
    if hidden is not None:
        y_forced = reference_forward(spec, xl, wl, bl, dropout, seed,
                                     hidden=hidden.detach().double().cpu())
        y_forced.backward(grad_y.detach().double().cpu())
    else:
        y.backward(grad_y.detach().double().cpu())
    return y, h, [t.grad for t in leaves]


def torch_at_precision(spec, x, ws, bs, dropout, seed, grad_y):
    """torch eager (the reference formulas) at the inputs' own precision, on CPU: the
    yardstick for the error bounds.  Returns y and all gradients."""
    leaves = [t.detach().cpu().requires_grad_() for t in (x, *ws, *bs)]
    n1 = len(ws)
    y = reference_forward(spec, leaves[0], leaves[1:1 + n1], leaves[1 + n1:], dropout,
                          seed.cpu() if seed is not None else None)
    y.backward(grad_y.cpu())
    return y, [t.grad for t in leaves]


def check_all(spec, fused, ref, yard, dtype):
    """Compare y and every gradient: error <= max(2 x torch's error, per-dtype floor)."""
    (y, grads), (y_ref, g_ref), (y_t, g_t) = fused, ref, yard
    check("y", y, y_ref, dtype, rel_err(y_t, y_ref))
    names = ["x"] + [f"W{i}" for i in range(spec.n + 1)] + [f"b{i}" for i in range(spec.n + 1)]
    for name, got, want, t in zip(names, grads, g_ref, g_t):
        check(f"grad {name}", got, want, dtype, rel_err(t, want), GRAD_ERROR_FLOOR)


def check(name, out, ref, dtype, torch_err=0.0, floors=ERROR_FLOOR):
    bound = max(2 * torch_err, floors[dtype])
    err = rel_err(out, ref)
    assert err <= bound, f"{name}: relative error {err:.3g} > bound {bound:.3g}"


@pytest.mark.parametrize("backend", OPS)
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("dropout", [0.0, 0.25])
def test_forward_and_all_gradients_fp32(backend, case, dropout):
    kind, B, D, H, n, S, C = case
    spec = HeadSpec(kind, D, H, n, C, S)
    device = backend_device(backend)
    x, ws, bs = make_inputs(spec, B, torch.float32, device)
    seed = spinalkern.rng.new_seed(device) if dropout else None
    g = torch.randn(B, C, dtype=torch.float32, device=device)
    y, hidden, grads = run_fused(backend, spec, x, ws, bs, dropout, seed, g)
    y_ref, h_ref, g_ref = run_reference(spec, x, ws, bs, dropout, seed, g, hidden)
    check("hidden", hidden, h_ref, torch.float32)
    check_all(spec, (y, grads), (y_ref, g_ref),
              torch_at_precision(spec, x, ws, bs, dropout, seed, g), torch.float32)


@pytest.mark.parametrize("backend", OPS)
@pytest.mark.parametrize("case", [CASES[1], CASES[5], CASES[7]], ids=[CASE_IDS[i] for i in (1, 5, 7)])
def test_forward_and_all_gradients_fp64(backend, case):
    kind, B, D, H, n, S, C = case
    spec = HeadSpec(kind, D, H, n, C, S)
    device = backend_device(backend)
    x, ws, bs = make_inputs(spec, B, torch.float64, device)
    seed = spinalkern.rng.new_seed(device)
    g = torch.randn(B, C, dtype=torch.float64, device=device)
    y, hidden, grads = run_fused(backend, spec, x, ws, bs, 0.3, seed, g)
    y_ref, h_ref, g_ref = run_reference(spec, x, ws, bs, 0.3, seed, g, hidden)
    check("hidden", hidden, h_ref, torch.float64)
    check_all(spec, (y, grads), (y_ref, g_ref), (y_ref, g_ref), torch.float64)


@pytest.mark.parametrize("backend", OPS)
def test_schemas_match_the_contract(backend):
    from spinalkern import _backends, ops
    for name, schema in (("forward", ops.FORWARD_SCHEMA), ("backward", ops.BACKWARD_SCHEMA)):
        got = op(backend, name).default._schema
        want = torch._C.parse_schema(f"spinalkern::{backend}_head_{name}{schema}")
        assert str(got) == str(want)
    if backend in _backends.fused_names():   # (the emulator is a test backend, not registered)
        assert _backends.get(backend).forward_op is op(backend).default


@pytest.mark.parametrize("backend", OPS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("case", [CASES[2], CASES[3], CASES[8]], ids=[CASE_IDS[i] for i in (2, 3, 8)])
def test_half_precision(backend, dtype, case):
    kind, B, D, H, n, S, C = case
    spec = HeadSpec(kind, D, H, n, C, S)
    device = backend_device(backend)
    x, ws, bs = make_inputs(spec, B, dtype, device)
    g = torch.randn(B, C, device=device).to(dtype)
    y, hidden, grads = run_fused(backend, spec, x, ws, bs, 0.0, None, g)
    assert y.dtype == dtype and grads[0].dtype == dtype
    y_ref, _, g_ref = run_reference(spec, x, ws, bs, 0.0, None, g, hidden)
    check_all(spec, (y, grads), (y_ref, g_ref),
              torch_at_precision(spec, x, ws, bs, 0.0, None, g), dtype)


@pytest.mark.parametrize("backend", OPS)
def test_nan_propagates_like_reference(backend):
    spec = HeadSpec("spinal", 74, 10, 3, 26, 2)
    device = backend_device(backend)
    x, ws, bs = make_inputs(spec, 37, torch.float32, device)
    x[5, 3] = float("nan")      # segment 0: reaches every layer through the chain
    x[11, 40] = float("nan")    # segment 1
    g = torch.randn(37, 26, device=device)
    y, hidden, grads = run_fused(backend, spec, x, ws, bs, grad_y=g)
    y_ref, h_ref, g_ref = run_reference(spec, x, ws, bs, grad_y=g)
    assert torch.equal(torch.isnan(y.cpu()), torch.isnan(y_ref))
    assert torch.equal(torch.isnan(hidden.cpu()), torch.isnan(h_ref))
    assert torch.isnan(y_ref).any() and not torch.isnan(y_ref[0]).any()
    for got, want in zip(grads, g_ref):   # NaN where torch has NaN, the rest right
        assert torch.equal(torch.isnan(got.cpu()), torch.isnan(want))
        ok = ~torch.isnan(want)
        assert rel_err(got.cpu()[ok], want[ok]) <= 2 * GRAD_ERROR_FLOOR[torch.float32]


@pytest.mark.parametrize("backend", OPS)
@pytest.mark.parametrize("kind", ["spinal", "progressive"])
def test_gradients_bitwise_deterministic(backend, kind):
    spec = HeadSpec(kind, 90, 64, 4, 26, 2 if kind == "spinal" else 1)
    device = backend_device(backend)
    x, ws, bs = make_inputs(spec, 1000, torch.float32, device)
    seed = spinalkern.rng.new_seed(device)
    g = torch.randn(1000, 26, device=device)
    first = run_fused(backend, spec, x, ws, bs, 0.3, seed, g)[2]
    second = run_fused(backend, spec, x, ws, bs, 0.3, seed, g)[2]
    for a, b in zip(first, second):
        assert torch.equal(a, b)


@pytest.mark.parametrize("backend", OPS)
@pytest.mark.parametrize("kind", ["spinal", "progressive"])
def test_gradcheck_float64_through_op(backend, kind):
    spec = HeadSpec(kind, 6, 4, 2, 3, 2 if kind == "spinal" else 1)
    device = backend_device(backend)
    x, ws, bs = make_inputs(spec, 3, torch.float64, device)
    seed = torch.tensor([987654321], dtype=torch.int64, device=device)
    f = op(backend)

    def fn(x, *params):
        n = len(params) // 2
        return f(x, list(params[:n]), list(params[n:]), seed, spec.kind_code,
                 spec.num_splits, 0.3, True)[0]

    inputs = [t.requires_grad_() for t in (x, *ws, *bs)]
    assert torch.autograd.gradcheck(fn, inputs, fast_mode=True)


@pytest.mark.parametrize("kind", ["spinal", "progressive"])
@pytest.mark.parametrize("p", [0.0, 0.4])
def test_teacher_forced_reference_is_the_reference(kind, p):
    """The gradient oracle (reference_forward with hidden teacher-forced) is the reference
    itself when forced to the reference's own activations: same y, same gradients."""
    spec = HeadSpec(kind, 24, 8, 3, 5, 3 if kind == "spinal" else 1)
    x, ws, bs = make_inputs(spec, 17, torch.float64, "cpu")
    g = torch.randn(17, 5, dtype=torch.float64)
    seed = torch.tensor([1234], dtype=torch.int64)
    y, h, grads = run_reference(spec, x, ws, bs, p, seed, g)
    y_f, h_f, grads_f = run_reference(spec, x, ws, bs, p, seed, g, hidden=h)
    assert torch.equal(y, y_f) and torch.equal(h, h_f)
    y_forced = reference_forward(spec, x, ws, bs, p, seed, hidden=h)
    assert torch.allclose(y_forced, y, rtol=1e-13, atol=1e-13)
    for a, b in zip(grads, grads_f):
        assert torch.allclose(a, b, rtol=1e-12, atol=1e-13)


@pytest.mark.parametrize("kind", ["spinal", "progressive"])
def test_gradcheck_float64_reference(kind):
    spec = HeadSpec(kind, 6, 4, 3, 3, 2 if kind == "spinal" else 1)
    x, ws, bs = make_inputs(spec, 4, torch.float64, "cpu")

    def fn(x, *params):
        n = len(params) // 2
        return reference_forward(spec, x, list(params[:n]), list(params[n:]), 0.3, seed=1234)

    assert torch.autograd.gradcheck(fn, [t.requires_grad_() for t in (x, *ws, *bs)])


@pytest.mark.parametrize("backend", OPS)
@pytest.mark.parametrize("kind", ["spinal", "progressive"])
def test_opcheck(backend, kind):
    spec = HeadSpec(kind, 20, 8, 2, 5, 2 if kind == "spinal" else 1)
    device = backend_device(backend)
    x, ws, bs = make_inputs(spec, 7, torch.float32, device)
    seed = spinalkern.rng.new_seed(device)
    args = (x.requires_grad_(), [w.requires_grad_() for w in ws],
            [b.requires_grad_() for b in bs], seed, spec.kind_code, spec.num_splits, 0.2, True)
    torch.library.opcheck(op(backend), args)
    y, hidden = op(backend)(*args)
    g = torch.randn_like(y)
    torch.library.opcheck(op(backend, "backward"),
                          (g, x.detach(), [w.detach() for w in ws], hidden.detach(), seed,
                           spec.kind_code, spec.num_splits, 0.2))


@pytest.mark.parametrize("backend", FUSED)
def test_torch_compile_fullgraph(backend):
    torch._dynamo.reset()
    device = backend_device(backend)
    head = SpinalHead(40, 10, 16, 3, 2, dropout=0.0, backend=backend).to(device)
    x = torch.randn(9, 40, device=device, requires_grad=True)
    compiled = torch.compile(head, fullgraph=True)
    y = compiled(x)
    y.square().sum().backward()
    gx = x.grad.clone()
    x.grad = None
    ref = head(x)
    ref.square().sum().backward()
    assert rel_err(y, ref) < 1e-5 and rel_err(gx, x.grad) < 1e-5


@pytest.mark.parametrize("backend", OPS)
def test_torch_compile_op_with_dropout_and_backward(backend):
    torch._dynamo.reset()
    spec = HeadSpec("spinal", 20, 8, 3, 6, 2)
    device = backend_device(backend)
    x, ws, bs = make_inputs(spec, 11, torch.float32, device)
    seed = spinalkern.rng.new_seed(device)

    def loss(x, ws, bs):
        y, _ = op(backend)(x, ws, bs, seed, 0, 2, 0.25, True)
        return (y * y).sum()

    params = [t.clone().requires_grad_() for t in (x, *ws, *bs)]
    out = torch.compile(loss, fullgraph=True)(params[0], params[1:5], params[5:])
    out.backward()
    eager = [t.clone().requires_grad_() for t in (x, *ws, *bs)]
    want = loss(eager[0], eager[1:5], eager[5:])
    want.backward()
    assert rel_err(out, want) < 1e-6
    for a, b in zip(params, eager):
        assert rel_err(a.grad, b.grad) < 1e-5


@pytest.mark.parametrize("backend", FUSED)
def test_dropout_mask_matches_reference_and_changes_per_call(backend):
    spec = HeadSpec("progressive", 45, 16, 2, 10)
    device = backend_device(backend)
    head = ProgressiveHead(45, 10, 16, 2, dropout=0.5, backend=backend).to(device).train()
    x = torch.randn(64, 45, device=device)
    torch.manual_seed(7)
    y1 = head(x)
    torch.manual_seed(7)
    seed = spinalkern.rng.new_seed(device)  # the same draw the module made
    y_ref = reference_forward(spec, x.double().cpu(), [w.double().cpu() for w in head.weights()],
                              [b.double().cpu() for b in head.biases()], 0.5, seed.cpu())
    assert rel_err(y1, y_ref) < 1e-5
    assert rel_err(head(x), y1) > 1e-2          # a new mask on the next call
    head.eval()
    assert rel_err(head(x), reference_forward(spec, x, head.weights(), head.biases())) < 1e-5


# ---------------------------------------------------------------------------------------------
# The op contract: any strides, every argument checked, double backward
# ---------------------------------------------------------------------------------------------
def _transposed(t):
    """t with column-major strides (same values)."""
    return t.t().contiguous().t()


def _every_other(t, dim):
    """t as every other row (dim 0) or column (dim 1) of a tensor twice as large."""
    shape = list(t.shape)
    shape[dim] *= 2
    big = torch.full(shape, float("nan"), dtype=t.dtype, device=t.device)
    view = big[::2] if dim == 0 else big[:, ::2]
    view.copy_(t)
    return view


def _contig(ts):
    return [t.contiguous() for t in ts]


def _small_head(kind):
    return HeadSpec(kind, 20, 8, 3, 5, 2 if kind == "spinal" else 1)


@pytest.mark.parametrize("backend", OPS)
@pytest.mark.parametrize("kind", ["spinal", "progressive"])
def test_ops_accept_any_strides(backend, kind):
    """Transposed, row- and column-strided and expanded arguments (x, weights, biases, hidden,
    grad_y) give exactly what their contiguous copies give, forward and backward."""
    spec = _small_head(kind)
    device = backend_device(backend)
    x, ws, bs = make_inputs(spec, 7, torch.float32, device)
    seed = spinalkern.rng.new_seed(device)
    args = (seed, spec.kind_code, spec.num_splits, 0.3)
    fwd, bwd = op(backend), op(backend, "backward")
    row = x[:1]
    forward_cases = [
        (_transposed(x), [_transposed(w) for w in ws], [_every_other(b, 0) for b in bs]),
        (_every_other(x, 0), [_every_other(w, 1) for w in ws], bs),
        (_every_other(x, 1), [_every_other(w, 0) for w in ws], bs),
        (row.expand(7, spec.D), ws, [b[:1].expand(b.shape[0]) for b in bs]),
    ]
    dense = fwd(x, ws, bs, *args, True)  # what the first three cases must give
    for i, (xs, wss, bss) in enumerate(forward_cases):
        assert not xs.is_contiguous()
        with poisoned_outputs():
            got = fwd(xs, wss, bss, *args, True)
            want = dense if i < 3 else fwd(xs.contiguous(), _contig(wss), _contig(bss), *args,
                                           True)
        for a, b in zip(got, want):
            assert a.is_contiguous() and torch.equal(a, b)
    y, hidden = dense
    g = torch.randn_like(y)
    backward_cases = [
        (_transposed(g), _transposed(x), [_transposed(w) for w in ws], _every_other(hidden, 1)),
        (g[:1].expand_as(g), _every_other(x, 1), [_every_other(w, 1) for w in ws],
         _transposed(hidden)),
        (_every_other(g, 0), row.expand(7, spec.D), ws, _every_other(hidden, 0)),
    ]
    for gs, xs, wss, hs in backward_cases:
        with poisoned_outputs():
            got = bwd(gs, xs, wss, hs, *args)
            want = bwd(gs.contiguous(), xs.contiguous(), _contig(wss), hs.contiguous(), *args)
        for a, b in zip(got, want):
            assert a.is_contiguous() and torch.equal(a, b)
    # through autograd: sum()'s backward hands the op an expanded grad_y
    leaves = [_transposed(x).requires_grad_()] + [_transposed(w).requires_grad_() for w in ws]
    fwd(leaves[0], leaves[1:], bs, *args, True)[0].sum().backward()
    dense = [t.detach().clone().requires_grad_() for t in (x, *ws)]
    fwd(dense[0], dense[1:], bs, *args, True)[0].sum().backward()
    for a, b in zip(leaves, dense):
        assert torch.equal(a.grad, b.grad)


@pytest.mark.parametrize("backend", OPS)
def test_opcheck_non_contiguous(backend):
    spec = _small_head("spinal")
    device = backend_device(backend)
    x, ws, bs = make_inputs(spec, 7, torch.float32, device)
    seed = spinalkern.rng.new_seed(device)
    xs = _transposed(x).requires_grad_()
    wss = [_transposed(w).requires_grad_() for w in ws]
    bss = [_every_other(b, 0).requires_grad_() for b in bs]
    args = (xs, wss, bss, seed, spec.kind_code, spec.num_splits, 0.2, True)
    torch.library.opcheck(op(backend), args)
    y, hidden = op(backend)(*args)
    torch.library.opcheck(op(backend, "backward"),
                          (_transposed(torch.randn_like(y)), _every_other(x, 1),
                           [w.detach() for w in wss], _transposed(hidden.detach()), seed, spec.kind_code, spec.num_splits,
                           0.2))


@pytest.mark.parametrize("backend", OPS)
def test_backward_op_checks_everything_the_forward_checks(backend):
    spec = _small_head("spinal")
    device = backend_device(backend)
    x, ws, bs = make_inputs(spec, 4, torch.float32, device)
    fwd, bwd = op(backend), op(backend, "backward")
    y, h = fwd(x, ws, bs, None, 0, 2, 0.0, True)
    g = torch.randn_like(y)
    meta = torch.device("meta")
    bad_backward = [
        (dict(hidden=h.double()), TypeError, "hidden has dtype"),
        (dict(grad_y=g.double()), TypeError, "grad_y has dtype"),
        (dict(weights=[ws[0].double()] + ws[1:]), TypeError, "weights[0] has dtype"),
        (dict(weights=[ws[0], torch.tensor(1.0, device=device)] + ws[2:]), ValueError,
         "weights[1] must be 2-D"),
        (dict(dropout=0.5), ValueError, "seed is required"),
        (dict(dropout=0.5, seed=torch.ones(1, dtype=torch.int32, device=device)), ValueError,
         "seed must be a one-element int64"),
        (dict(num_splits=4), ValueError, "must not exceed num_layers"),
        (dict(hidden=h[:, 1:]), ValueError, "hidden has shape"),
        (dict(hidden=torch.empty(0, device=device)), ValueError, "hidden has shape"),
        (dict(grad_y=g[:, :-1]), ValueError, "grad_y has shape"),
        # one argument on the meta device: an error, never uninitialised real tensors
        (dict(x=x.to(meta)), ValueError, "is on"),
        (dict(hidden=h.to(meta)), ValueError, "hidden is on meta"),
        (dict(grad_y=g.to(meta)), ValueError, "grad_y is on meta"),
        (dict(weights=[ws[0].to(meta)] + ws[1:]), ValueError, "weights[0] is on meta"),
    ]
    good = dict(grad_y=g, x=x, weights=ws, hidden=h, seed=None, kind=0, num_splits=2,
                dropout=0.0)
    for change, exc, msg in bad_backward:
        a = {**good, **change}
        with pytest.raises(exc) as info:
            bwd(*a.values())
        assert msg in str(info.value), (list(change), str(info.value))
    bad_forward = [
        (dict(weights=[ws[0], torch.tensor(1.0, device=device)] + ws[2:]), ValueError,
         "weights[1] must be 2-D"),
        (dict(biases=[bs[0].to(meta)] + bs[1:]), ValueError, "biases[0] is on meta"),
        (dict(x=x.to(meta)), ValueError, "is on"),
    ]
    good = dict(x=x, weights=ws, biases=bs, seed=None, kind=0, num_splits=2, dropout=0.0,
                save_hidden=True)
    for change, exc, msg in bad_forward:
        a = {**good, **change}
        with pytest.raises(exc) as info:
            fwd(*a.values())
        assert msg in str(info.value), (list(change), str(info.value))
    # every argument on meta is a legitimate shape computation
    y_meta, h_meta = fwd(x.to(meta), [w.to(meta) for w in ws], [b.to(meta) for b in bs], None,
                         0, 2, 0.0, True)
    assert y_meta.device == meta and y_meta.shape == y.shape and h_meta.shape == h.shape


def _penalty_grads(forward, spec, x, ws, bs):
    """Second derivatives: d/d(x, W, b) of |dL/dx|^2 + |dL/dW_0|^2 + |dL/dW_1|^2 with
    L = sum(c * y) (dW_1 depends on b_0 through h_0)."""
    leaves = [t.detach().clone().requires_grad_() for t in (x, *ws, *bs)]
    n1 = len(ws)
    y = forward(leaves[0], leaves[1:1 + n1], leaves[1 + n1:])
    c = torch.linspace(-1, 1, y.numel(), dtype=y.dtype, device=y.device).view_as(y)
    gx, gw0, gw1 = torch.autograd.grad((c * y).sum(), leaves[:3], create_graph=True)
    penalty = gx.square().sum() + gw0.square().sum() + gw1.square().sum()
    grads = torch.autograd.grad(penalty, leaves, allow_unused=True)
    return [torch.zeros_like(t) if g is None else g for g, t in zip(grads, leaves)]


@pytest.mark.parametrize("backend", OPS)
@pytest.mark.parametrize("kind", ["spinal", "progressive"])
def test_double_backward_matches_reference(backend, kind):
    """create_graph=True through a fused op (a gradient penalty) gives torch's second
    derivatives (float64 reference), never silent zeros."""
    spec = HeadSpec(kind, 12, 6, 3, 4, 2 if kind == "spinal" else 1)
    device = backend_device(backend)
    x, ws, bs = make_inputs(spec, 5, torch.float64, device)
    seed = spinalkern.rng.new_seed(device)

    def fused(x, ws, bs):
        return op(backend)(x, ws, bs, seed, spec.kind_code, spec.num_splits, 0.3, True)[0]

    def ref(x, ws, bs):
        return reference_forward(spec, x, ws, bs, 0.3, seed)

    got = _penalty_grads(fused, spec, x, ws, bs)
    want = _penalty_grads(ref, spec, x, ws, bs)
    names = ["x"] + [f"W{i}" for i in range(spec.n + 1)] + [f"b{i}" for i in range(spec.n + 1)]
    for name, a, b in zip(names, got, want):
        assert rel_err(a, b) < 1e-10, f"second derivative wrt {name}: {rel_err(a, b):.2e}"
    assert all(want[i].abs().sum() > 0 for i in range(spec.n + 2))  # x and every W: non-zero
    assert want[spec.n + 2].abs().sum() > 0  # b_0 (through dW_1): the biases take part


@pytest.mark.parametrize("backend", OPS)
def test_forward_without_saved_hidden_recomputes_it_in_backward(backend):
    """save_hidden=False keeps only the inputs for backward, which recomputes hidden: the same
    gradients as with hidden saved, dropout masks included."""
    spec = _small_head("spinal")
    device = backend_device(backend)
    x, ws, bs = make_inputs(spec, 4, torch.float32, device)
    seed = spinalkern.rng.new_seed(device)
    grads, ys = [], []
    for save_hidden in (True, False):
        leaves = [t.detach().clone().requires_grad_() for t in (x, *ws, *bs)]
        n1 = len(ws)
        y, h = op(backend)(leaves[0], leaves[1:1 + n1], leaves[1 + n1:], seed, 0, 2, 0.3,
                           save_hidden)
        assert h.shape == ((4, spec.n * spec.H) if save_hidden else (0,))
        (y * torch.arange(y.numel(), device=device).view_as(y)).sum().backward()
        grads.append([t.grad for t in leaves])
        ys.append(y.detach())
    assert torch.equal(ys[0], ys[1])
    for a, b in zip(*grads):
        assert torch.equal(a, b)


@pytest.mark.parametrize("backend", OPS)
def test_differentiating_the_backward_op_raises(backend):
    spec = _small_head("spinal")
    device = backend_device(backend)
    x, ws, bs = make_inputs(spec, 4, torch.float32, device)
    y, h = op(backend)(x, ws, bs, None, 0, 2, 0.0, True)
    g = torch.randn_like(y).requires_grad_()
    gx, gp = op(backend, "backward")(g, x, ws, h, None, 0, 2, 0.0)
    with pytest.raises(RuntimeError, match="not differentiable"):
        (gx.sum() + gp.sum()).backward()


# ---------------------------------------------------------------------------------------------
# The backend registry and the module's path to a kernel
# ---------------------------------------------------------------------------------------------
def test_registry_lists_every_backend_and_resolves_once(monkeypatch):
    from spinalkern import _backends
    assert _backends.names() == ("auto", "torch", "triton", "cuda") == spinalkern.backend_names()
    for name in ("triton", "cuda"):
        b = _backends.get(name)
        assert b.name == name and isinstance(b.available(torch.device("cpu")), bool)
        assert isinstance(b.build_hint(), str) and len(b.build_hint()) > 20
    assert _backends.get("triton").forward_op is torch.ops.spinalkern.triton_head_forward.default
    with pytest.raises(ValueError, match="backend must be one of"):
        _backends.get("cudnn")
    cpu = torch.device("cpu")
    assert _backends.resolve("torch", cpu) is None and _backends.resolve("auto", cpu) is None
    calls = []
    real = _backends._resolve
    monkeypatch.setattr(_backends, "_resolved", {})
    monkeypatch.setattr(_backends, "_resolve", lambda *a: calls.append(a) or real(*a))
    for _ in range(3):
        assert _backends.resolve(FUSED[0], torch.device(backend_device(FUSED[0]))) \
            is _backends.get(FUSED[0])
    assert len(calls) == 1


def test_backends_module_imports_no_backend():
    import ast
    import inspect
    from spinalkern import _backends
    tree = ast.parse(inspect.getsource(_backends))
    imported = [n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
    imported += [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
    assert not [m for m in imported if "triton_head" in m or "cuda_backend" in m or
                m.startswith(".")], imported


def test_production_code_does_not_import_testing_helpers():
    import subprocess
    import sys
    code = "import sys, spinalkern; print('spinalkern.testing' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout.strip()
    assert out == "False"


def test_module_calls_the_registered_op_object(monkeypatch):
    """The module runs the resolved backend's op object (no lookup by name)."""
    import dataclasses
    from spinalkern import _backends
    calls = []
    real = _backends.get(FUSED[0])

    def recording_op(*args):
        calls.append(args)
        return real.forward_op(*args)

    fake = dataclasses.replace(real, name="recording", forward_op=recording_op)
    monkeypatch.setattr(_backends, "_registry", {**_backends._registry, "recording": fake})
    monkeypatch.setattr(_backends, "_resolved", {})
    device = backend_device(FUSED[0])
    head = SpinalHead(20, 5, 8, 2, 2, backend="recording").to(device)
    head(torch.randn(3, 20, device=device))
    assert len(calls) == 1 and calls[0][4:] == (0, 2, 0.0, True)


def test_poisoned_outputs_fills_new_tensors_with_nan():
    from spinalkern.testing import poisoned_outputs as poisoned
    was = torch.are_deterministic_algorithms_enabled()
    with poisoned():
        assert torch.empty(5).isnan().all()
        assert torch.empty(3, 4, dtype=torch.float16).isnan().all()
    assert torch.are_deterministic_algorithms_enabled() == was


def test_op_argument_checks_are_remembered_per_signature(monkeypatch):
    from spinalkern import ops as skops
    calls = []
    real = skops.check_forward_args
    monkeypatch.setattr(skops, "check_forward_args", lambda *a: calls.append(1) or real(*a))
    monkeypatch.setattr(skops, "_checked", {})
    spec = _small_head("spinal")
    x, ws, bs = make_inputs(spec, 4, torch.float32, "cpu")
    for _ in range(3):
        assert skops.checked_forward_args(x, ws, bs, None, 0, 2, 0.0) == spec
    assert len(calls) == 1
    with pytest.raises(TypeError, match="weights"):  # a new signature is checked again
        skops.checked_forward_args(x, [ws[0].double()] + ws[1:], bs, None, 0, 2, 0.0)


# ---------------------------------------------------------------------------------------------
# Modules
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", FUSED)
def test_module_matches_torch_backend(backend):
    device = backend_device(backend)
    for make in (lambda b: SpinalHead(74, 26, 32, 4, 2, backend=b),
                 lambda b: ProgressiveHead(37, 26, 32, 3, backend=b)):
        head_t = make("torch").to(device)
        head_f = make(backend).to(device)
        head_f.load_state_dict(head_t.state_dict())
        x = torch.randn(50, head_t.spec.D, device=device, requires_grad=True)
        y_t = head_t(x)
        g = torch.randn_like(y_t)
        (gx_t, *gp_t) = torch.autograd.grad(y_t, [x, *head_t.parameters()], g)
        y_f = head_f(x)
        (gx_f, *gp_f) = torch.autograd.grad(y_f, [x, *head_f.parameters()], g)
        assert rel_err(y_f, y_t) < 1e-5 and rel_err(gx_f, gx_t) < 1e-5
        for a, b in zip(gp_f, gp_t):
            assert rel_err(a, b) < 1e-5


@pytest.mark.parametrize("backend", FUSED)
def test_batchnorm_eval_is_folded_and_training_uses_batch_statistics(backend):
    device = backend_device(backend)
    head = SpinalHead(64, 10, 16, 4, 2, dropout=0.0, batch_norm=True, backend=backend).to(device)
    for bn in head.norms:  # non-trivial running statistics and affine parameters
        bn.running_mean.uniform_(-0.5, 0.5)
        bn.running_var.uniform_(0.5, 2.0)
        bn.weight.data.uniform_(0.5, 1.5)
        bn.bias.data.uniform_(-0.2, 0.2)
    x = torch.randn(33, 64, device=device)
    head.eval()
    y = head(x)
    y_ref = reference_forward(head.spec, x, head.weights(), head.biases(),
                              norms=list(head.norms))
    assert rel_err(y, y_ref) < 1e-5
    head.train()
    before = head.norms[0].running_mean.clone()
    head(x)
    assert not torch.equal(before, head.norms[0].running_mean)  # batch statistics were used


@pytest.mark.parametrize("backend", FUSED)
def test_autocast_bf16(backend):
    device = backend_device(backend)
    head = SpinalHead(74, 26, 32, 4, 2, backend=backend).to(device)
    x = torch.randn(40, 74, device=device)
    with torch.autocast(device_type=device, dtype=torch.bfloat16):
        y = head(x)
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert head.layers[0].weight.grad.dtype == torch.float32
    y_ref = reference_forward(head.spec, x.double(), [w.double() for w in head.weights()],
                              [b.double() for b in head.biases()])
    assert rel_err(y, y_ref) < ERROR_FLOOR[torch.bfloat16]


@pytest.mark.parametrize("backend", OPS)
def test_op_zero_batch(backend):
    spec = HeadSpec("spinal", 20, 8, 2, 5, 2)
    device = backend_device(backend)
    x, ws, bs = make_inputs(spec, 0, torch.float32, device)
    with poisoned_outputs():
        y, h = op(backend)(x, ws, bs, None, 0, 2, 0.0, True)
        gx, gp = op(backend, "backward")(torch.zeros(0, 5, device=device), x, ws, h, None, 0,
                                         2, 0.0)
    assert y.shape == (0, 5) and h.shape == (0, 16) and gx.shape == (0, 20)
    assert gp.shape == (spec.num_params(),) and torch.equal(gp, torch.zeros_like(gp))


def test_zero_batch():
    for backend in FUSED:
        device = backend_device(backend)
        head = SpinalHead(20, 5, 8, 2, 2, backend=backend).to(device)
        x = torch.randn(0, 20, device=device, requires_grad=True)
        y = head(x)
        assert y.shape == (0, 5)
        y.sum().backward()
        assert x.grad.shape == (0, 20)


@pytest.mark.parametrize("backend", ["torch"] + FUSED)
def test_non_contiguous_input(backend):
    device = backend_device(backend) if backend != "torch" else "cpu"
    head = ProgressiveHead(30, 7, 16, 2, backend=backend).to(device)
    base = torch.randn(30, 50, device=device)
    x = base.t()[:, :30]  # (50, 30), not contiguous
    assert not x.is_contiguous()
    assert rel_err(head(x), head(x.contiguous())) == 0.0


# ---------------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", ["torch"] + FUSED)
def test_bad_input_errors_name_the_problem(backend):
    device = backend_device(backend) if backend != "torch" else "cpu"
    head = SpinalHead(20, 5, 8, 2, 2, backend=backend).to(device)
    with pytest.raises(ValueError, match="x must have shape"):
        head(torch.randn(4, 20, 1, device=device))
    with pytest.raises(ValueError, match="in_features=20"):
        head(torch.randn(4, 21, device=device))
    with pytest.raises(TypeError, match="floating-point"):
        head(torch.ones(4, 20, dtype=torch.int64, device=device))
    with pytest.raises(TypeError, match="dtype"):
        head(torch.randn(4, 20, dtype=torch.float64, device=device))
    with pytest.raises(TypeError, match="torch.Tensor"):
        head([[0.0] * 20])


def test_bad_construction_errors():
    with pytest.raises(ValueError, match="divisible by num_splits"):
        SpinalHead(21, 5, num_splits=2)
    with pytest.raises(ValueError, match="num_splits .3. must not exceed num_layers .2."):
        SpinalHead(24, 5, num_layers=2, num_splits=3)   # segment 2 would never be read
    with pytest.raises(ValueError, match="must not exceed num_layers"):
        HeadSpec("spinal", 24, 8, 2, 5, 3)
    for bn in ("yes", 1, None):
        with pytest.raises(TypeError, match="batch_norm must be a bool"):
            SpinalHead(20, 5, batch_norm=bn)
    for kw in ("in_features", "out_features", "hidden_features", "num_layers"):
        args = dict(in_features=20, out_features=5, hidden_features=8, num_layers=2)
        args[kw] = 0
        with pytest.raises(ValueError, match=kw):
            SpinalHead(**args)
    with pytest.raises(ValueError, match="num_splits"):
        SpinalHead(20, 5, num_splits=-1)
    with pytest.raises(TypeError, match="hidden_features"):
        ProgressiveHead(20, 5, hidden_features=8.0)
    with pytest.raises(ValueError, match="dropout"):
        SpinalHead(20, 5, dropout=1.0)
    with pytest.raises(ValueError, match="backend"):
        SpinalHead(20, 5, backend="cudnn")


def bad_forward_arguments(device):
    """(good arguments, [(change, exception, message)]): every argument check of the forward
    op, met by every backend."""
    spec = HeadSpec("spinal", 12, 6, 3, 5, 2)
    x, ws, bs = make_inputs(spec, 4, torch.float32, device)
    seed = spinalkern.rng.new_seed(device)
    good = dict(x=x, weights=ws, biases=bs, seed=None, kind=0, num_splits=2, dropout=0.0,
                save_hidden=True)
    cases = [
        (dict(x=x[0]), ValueError, "x must be 2-D"),
        (dict(x=torch.randn(4, 13, device=device)), ValueError, "divisible by num_splits"),
        (dict(x=torch.randn(4, 14, device=device)), ValueError, "weights[0] has shape"),
        (dict(x=x.to(torch.int64)), TypeError, "x must be float16"),
        (dict(x=x.double()), TypeError, "weights[0] has dtype"),
        (dict(weights=[ws[0], ws[0]] + ws[2:]), ValueError, "weights[1] has shape"),
        (dict(weights=ws[:-2] + [ws[-1]]), ValueError, "weights["),
        (dict(weights=[ws[0]]), ValueError, "at least one hidden layer"),
        (dict(weights=[ws[0].double()] + ws[1:]), TypeError, "weights[0] has dtype"),
        (dict(biases=bs[:-1]), ValueError, "biases"),
        (dict(biases=bs[:-1] + [bs[-1][:-1]]), ValueError, "biases[3] has shape"),
        (dict(biases=bs[:-1] + [bs[-1].double()]), TypeError, "biases[3] has dtype"),
        (dict(kind=2), ValueError, "kind must be"),
        (dict(kind=1), ValueError, "num_splits applies to the spinal head only"),
        (dict(num_splits=0), ValueError, "num_splits must be positive"),
        (dict(num_splits=4), ValueError, "must not exceed num_layers"),
        (dict(dropout=0.5), ValueError, "seed is required"),
        (dict(dropout=1.0, seed=seed), ValueError, "dropout must be in [0, 1)"),
        (dict(dropout=1.5, seed=seed), ValueError, "dropout must be in [0, 1)"),
        (dict(dropout=0.5, seed=seed.int()), ValueError, "seed must be a one-element int64"),
    ]
    if device != "cpu":
        cases.append((dict(weights=[ws[0].cpu()] + ws[1:]), ValueError, "is on"))
    return good, cases


@pytest.mark.parametrize("backend", OPS)
def test_ops_reject_bad_arguments(backend):
    device = backend_device(backend)
    good, cases = bad_forward_arguments(device)
    for change, exc, msg in cases:
        a = {**good, **change}
        with pytest.raises(exc) as info:
            op(backend)(*a.values())
        assert msg in str(info.value), (list(change), str(info.value))


def test_cuda_backend_missing_says_how_to_build(monkeypatch):
    import dataclasses
    from spinalkern import _backends, cuda_backend
    # as on an install without the compiled extension
    missing = dataclasses.replace(_backends.get("cuda"), available=lambda device: False,
                                  forward_op=None)
    monkeypatch.setattr(_backends, "_registry", {**_backends._registry, "cuda": missing})
    monkeypatch.setattr(_backends, "_resolved", {})
    head = SpinalHead(20, 5, 8, 2, 2, backend="cuda")
    with pytest.raises(RuntimeError, match="build_ext"):
        head(torch.randn(2, 20))
    assert "cuda" not in spinalkern.available_backends("cpu")
    assert "build_ext" in cuda_backend.build_hint()


# ---------------------------------------------------------------------------------------------
# Original-script weights
# ---------------------------------------------------------------------------------------------
class _OriginalSpinalVGGHead(torch.nn.Module):
    """The layer structure of the original SpinalNet VGG-5 head (names as in its scripts)."""

    def __init__(self, half=128, width=64, classes=10):
        super().__init__()
        nn = torch.nn

        def block(k):
            return nn.Sequential(nn.Dropout(0.5), nn.Linear(k, width), nn.BatchNorm1d(width),
                                 nn.ReLU(inplace=True))
        self.half = half
        self.fc_spinal_layer1 = block(half)
        self.fc_spinal_layer2 = block(half + width)
        self.fc_spinal_layer3 = block(half + width)
        self.fc_spinal_layer4 = block(half + width)
        self.fc_out = nn.Sequential(nn.Dropout(0.5), nn.Linear(width * 4, classes))

    def forward(self, x):
        h = self.half
        x1 = self.fc_spinal_layer1(x[:, 0:h])
        x2 = self.fc_spinal_layer2(torch.cat([x[:, h:2 * h], x1], dim=1))
        x3 = self.fc_spinal_layer3(torch.cat([x[:, 0:h], x2], dim=1))
        x4 = self.fc_spinal_layer4(torch.cat([x[:, h:2 * h], x3], dim=1))
        return self.fc_out(torch.cat([x1, x2, x3, x4], dim=1))


def test_load_original_spinalnet_weights():
    orig = _OriginalSpinalVGGHead()
    for m in orig.modules():
        if isinstance(m, torch.nn.BatchNorm1d):
            m.running_mean.uniform_(-0.3, 0.3)
            m.running_var.uniform_(0.5, 1.5)
    orig.eval()
    sd = {f"model.{k}": v for k, v in orig.state_dict().items()}  # prefixed, as in a full net
    head = SpinalHead(256, 10, 64, 4, 2, dropout=0.5, batch_norm=True, backend="torch").eval()
    spinalkern.load_original_state_dict(head, sd)
    x = torch.randn(16, 256)
    assert rel_err(head(x), orig(x)) < 1e-6
    with pytest.raises(ValueError, match="batch_norm=False"):
        spinalkern.load_original_state_dict(SpinalHead(256, 10, 64, 4, 2), sd)
    with pytest.raises(ValueError, match="fc_spinal_layer1..6"):
        spinalkern.load_original_state_dict(SpinalHead(256, 10, 64, 6, 2, batch_norm=True), sd)


# ---------------------------------------------------------------------------------------------
# Property-based: random shapes
# ---------------------------------------------------------------------------------------------
hypothesis = pytest.importorskip("hypothesis")
from hypothesis import given, settings, strategies as st  # noqa: E402


@settings(max_examples=12, deadline=None)
@given(kind=st.sampled_from(["spinal", "progressive"]), B=st.integers(1, 70),
       seg=st.integers(1, 40), H=st.integers(1, 40), n=st.integers(1, 5),
       S=st.integers(1, 3), C=st.integers(1, 40), dropout=st.sampled_from([0.0, 0.4]))
def test_property_random_shapes(kind, B, seg, H, n, S, C, dropout):
    S = min(S, n) if kind == "spinal" else 1
    spec = HeadSpec(kind, seg * S, H, n, C, S)
    for backend in FUSED:
        device = backend_device(backend)
        x, ws, bs = make_inputs(spec, B, torch.float32, device)
        seed = spinalkern.rng.new_seed(device)
        g = torch.randn(B, C, device=device)
        y, hidden, grads = run_fused(backend, spec, x, ws, bs, dropout, seed, g)
        y_ref, _, g_ref = run_reference(spec, x, ws, bs, dropout, seed, g, hidden)
        check_all(spec, (y, grads), (y_ref, g_ref),
                  torch_at_precision(spec, x, ws, bs, dropout, seed, g), torch.float32)


# ---------------------------------------------------------------------------------------------
# GPU only: real sizes, every dtype, autocast, CUDA graphs
# ---------------------------------------------------------------------------------------------
REAL = [("spinal", 256, 128, 4, 62, 2), ("spinal", 512, 128, 4, 26, 4),
        ("progressive", 256, 128, 4, 62, 1), ("spinal", 2048, 512, 4, 100, 2),
        ("progressive", 2048, 512, 4, 100, 1)]


@requires_cuda
@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("cfg", REAL, ids=lambda c: f"{c[0]}-D{c[1]}-H{c[2]}-S{c[5]}")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16],
                         ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("B", [64, 1024, 65536])
def test_gpu_real_sizes(backend, cfg, dtype, B):
    kind, D, H, n, C, S = cfg
    spec = HeadSpec(kind, D, H, n, C, S)
    x, ws, bs = make_inputs(spec, B, dtype, "cuda")
    g = torch.randn(B, C, device="cuda").to(dtype)
    seed = spinalkern.rng.new_seed("cuda")
    y, hidden, grads = run_fused(backend, spec, x, ws, bs, 0.2, seed, g)
    # torch's own error at this precision, on the same GPU
    leaves = [t.detach().clone().requires_grad_() for t in (x, *ws, *bs)]
    y_t = reference_forward(spec, leaves[0], leaves[1:n + 2], leaves[n + 2:], 0.2, seed)
    y_t.backward(g)
    leaves64 = [t.detach().double().requires_grad_() for t in (x, *ws, *bs)]
    y_ref = reference_forward(spec, leaves64[0], leaves64[1:n + 2], leaves64[n + 2:], 0.2, seed)
    y_ref.backward(g.double())
    check("y", y, y_ref, dtype, rel_err(y_t, y_ref))
    for t_f, t_t, t_r in zip(grads, leaves, leaves64):
        check("grad", t_f, t_r.grad, dtype, rel_err(t_t.grad, t_r.grad), GRAD_ERROR_FLOOR)


@requires_cuda
@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_gpu_autocast(backend, dtype):
    head = ProgressiveHead(256, 62, 128, 4, backend=backend).cuda()
    x = torch.randn(512, 256, device="cuda")
    with torch.autocast("cuda", dtype=dtype):
        y = head(x)
    assert y.dtype == dtype
    y.float().sum().backward()
    y_ref = reference_forward(head.spec, x.double(), [w.double() for w in head.weights()],
                              [b.double() for b in head.biases()])
    assert rel_err(y, y_ref) < ERROR_FLOOR[dtype]


@requires_cuda
@pytest.mark.parametrize("backend", FUSED)
def test_gpu_cuda_graph_replay_equals_eager_and_redraws_dropout(backend):
    head = SpinalHead(256, 62, 128, 4, 2, dropout=0.5, backend=backend).cuda()
    static_x = torch.randn(256, 256, device="cuda")
    # eval: replay == eager
    head.eval()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            head(static_x)
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_y = head(static_x)
    static_x.copy_(torch.randn_like(static_x))
    graph.replay()
    assert rel_err(static_y, head(static_x)) < 1e-6
    # train: every replay draws a new dropout mask, forward and backward
    head.train()
    with torch.cuda.stream(s):
        for _ in range(3):
            head(static_x).sum().backward()
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = head(static_x)
        out.sum().backward()
    graph.replay()
    first = out.clone()
    graph.replay()
    assert rel_err(out, first) > 1e-2


@requires_cuda
@pytest.mark.skipif(len(FUSED) < 2, reason="needs a CUDA GPU and both fused backends")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16],
                         ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("cfg", REAL[:3], ids=lambda c: f"{c[0]}-D{c[1]}-H{c[2]}-S{c[5]}")
def test_gpu_fused_backends_agree(cfg, dtype):
    """Every fused backend gives the same y, hidden and gradients (same seed) within the
    rule's bound for two implementations, each within it of the reference."""
    kind, D, H, n, C, S = cfg
    spec = HeadSpec(kind, D, H, n, C, S)
    x, ws, bs = make_inputs(spec, 2048, dtype, "cuda")
    g = torch.randn(2048, C, device="cuda").to(dtype)
    seed = spinalkern.rng.new_seed("cuda")
    outs = [run_fused(b, spec, x, ws, bs, 0.3, seed, g) for b in FUSED]
    first = outs[0]
    for other in outs[1:]:
        check("y", other[0], first[0], dtype, floors={k: 2 * v for k, v in ERROR_FLOOR.items()})
        for a, b in zip(other[2], first[2]):
            check("grad", a, b, dtype, floors={k: 2 * v for k, v in GRAD_ERROR_FLOOR.items()})


def test_weight_gradient_split_and_reduce_path_is_exercised():
    """The B=1000 cases above must run the per-slice partials + fixed-order reduction."""
    from spinalkern import triton_head as th
    spec = HeadSpec("progressive", 45, 64, 4, 62)
    cfg = th.kernel_config("wgrad", 1000, torch.float32)
    assert th.wgrad_splits(spec, 1000, cfg, torch.device(TRITON_DEVICE)) > 1
