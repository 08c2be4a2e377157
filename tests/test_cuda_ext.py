"""The CUDA C++ extension ``spinalkern._C`` (csrc/): its C++ CPU ops and (when a GPU is
present) its CUDA kernels.

* CPU (CI): the ops ``spinalkern::cuda_head_{forward,backward}`` on CPU tensors (the C++ CPU
  implementation) against the float64 reference, forward and all gradients, dropout masks
  bit-identical to ``spinalkern.rng``; opcheck, gradcheck, torch.compile, determinism,
  poisoned outputs, NaN propagation, bad input, pairwise sums, the C++ autograd (no Python
  in backward, gradients as views of one buffer).  (The emulator and build-product tests are in
  tests/test_cuda_emu.py and tests/test_cuda_sass.py.)
* GPU (skipped without CUDA): the same comparisons at real sizes, all dtypes, autocast, CUDA
  vs Triton, CUDA-graph capture/replay, redrawn dropout masks.

The CUDA kernels on the CPU emulator (and every kernel configuration on the GPU):
tests/test_cuda_emu.py; the build products and their SASS: tests/test_cuda_sass.py.

Tests that need the built extension skip (with the build command) when it is not built.
"""
from __future__ import annotations

import contextlib
import math
import os
import sys
import zlib

import numpy as np
import pytest
import torch

from spinalkern import cuda_backend
from spinalkern import ops as skops
from spinalkern.reference import reference_forward
from spinalkern.rng import keep_mask, new_seed
from spinalkern.spec import HeadSpec
from spinalkern.testing import poisoned_outputs

HAVE_EXT = cuda_backend.available()
HAVE_GPU = HAVE_EXT and cuda_backend.has_cuda_kernels() and torch.cuda.is_available()

needs_ext = pytest.mark.skipif(
    not HAVE_EXT, reason="spinalkern._C is not built: " + cuda_backend.build_hint())
needs_gpu = pytest.mark.skipif(
    not HAVE_GPU, reason="needs a CUDA GPU and spinalkern._C built with its CUDA kernels")

# relative-error bounds ||out - ref|| / ||ref|| (ref: float64 on the same rounded inputs)
FWD_TOL = {torch.float64: 1e-12, torch.float32: 2e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}
# gradients are compared with the teacher-forced reference (see reference_grads)
GRAD_TOL = {torch.float64: 1e-12, torch.float32: 5e-5, torch.float16: 1e-2, torch.bfloat16: 6e-2}


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------
def make_spec(kind, D, H, n, C, S):
    return HeadSpec(kind, D, H, n, C, S if kind == "spinal" else 1)


def make_inputs(spec, B, dtype, device="cpu", gen=None):
    """Fresh random x, weights, biases (never zeros), in `dtype` on `device`."""
    def cast(t):
        return t.to(dtype).to(device)
    x = torch.randn(B, spec.D, dtype=torch.float64, generator=gen)
    ws = [torch.randn(N, K, dtype=torch.float64, generator=gen) / math.sqrt(K)
          for N, K in spec.weight_shapes()]
    bs = [0.1 * torch.randn(N, dtype=torch.float64, generator=gen) for N, _ in spec.weight_shapes()]
    return cast(x), [cast(w) for w in ws], [cast(b) for b in bs]


def f64(t):
    return t.detach().to(torch.float64)


def rel_err(out, ref):
    out, ref = f64(out), f64(ref).to(out.device)
    den = ref.norm().item()
    return (out - ref).norm().item() / (den if den > 0 else 1.0)


def flat_grads(dws, dbs):
    return torch.cat([torch.cat([dw.reshape(-1), db.reshape(-1)]) for dw, db in zip(dws, dbs)])


def _teacher_forced_forward(spec, x, ws, bs, p, seed, hidden):
    """y of the head built from spec's layout of u_L, with every h_i teacher-forced to the
    op's saved activations: value hidden_i, gradient dz * (hidden_i > 0) (ReLU backward as
    torch: zero where h <= 0)."""
    H, hs = spec.H, []

    def drop(t, stream):
        keep = keep_mask(seed, stream, t.shape[0], t.shape[1], p, device=t.device)
        return torch.where(keep, t / (1.0 - p), torch.zeros_like(t))

    for L in range(spec.n + 1):
        xpart = x[:, spec.x_offset(L):spec.x_offset(L) + spec.x_width(L)]
        hcat = torch.cat(hs, 1) if hs else x[:, :0]
        hpart = hcat[:, spec.h_offset(L):spec.h_offset(L) + spec.h_width(L)]
        if p > 0 and spec.kind == "spinal":
            u = drop(torch.cat([xpart, hpart], 1), L)      # all of u_L, stream L
        elif p > 0 and L > 0:
            u = torch.cat([drop(xpart, 0), hpart], 1)     # x~ = drop(x), stream 0
        else:
            u = torch.cat([xpart, hpart], 1)
        z = torch.nn.functional.linear(u, ws[L], bs[L])
        if L == spec.n:
            return z
        hv = hidden[:, L * H:(L + 1) * H]
        hs.append(hv + (z - z.detach()) * ~(hv <= 0))


def reference_grads(spec, x, ws, bs, p, seed, gy, hidden=None):
    """float64 reference (grad_x, flat grad_params) for upstream gradient gy.

    Without ``hidden``: autograd through reference_forward.  With ``hidden`` (the op's saved
    activations): autograd through _teacher_forced_forward, whose h_i take the op's values and
    ReLU masks.  The derivative of ReLU is discontinuous at 0: entries with |z| below the op's
    rounding error (~1e-6 in fp32, a few per million entries; far more in fp16/bf16, whose h
    is rounded to 16 bits) get the opposite mask in a float64 re-computation, so an untethered
    comparison would measure those flips (O(1) each) instead of the backward kernels.  The
    forward is continuous and is compared without teacher forcing;
    test_teacher_forced_oracle_is_the_reference checks this oracle against autograd of
    reference_forward, and gradcheck checks the op's exact derivative."""
    xr = f64(x).requires_grad_()
    wr = [f64(w).requires_grad_() for w in ws]
    br = [f64(b).requires_grad_() for b in bs]
    if hidden is None:
        y = reference_forward(spec, xr, wr, br, p, seed if p > 0 else None)
    else:
        y = _teacher_forced_forward(spec, xr, wr, br, p, seed, f64(hidden).to(xr.device))
    grads = torch.autograd.grad(y, [xr] + wr + br, f64(gy).to(xr.device))
    return grads[0], flat_grads(grads[1:spec.n + 2], grads[spec.n + 2:])


@pytest.mark.parametrize("kind", ["spinal", "progressive"])
@pytest.mark.parametrize("p", [0.0, 0.4])
def test_teacher_forced_oracle_is_the_reference(kind, p):
    spec = make_spec(kind, 24, 8, 3, 5, 3)
    x, ws, bs = make_inputs(spec, 17, torch.float64)
    seed = seed_tensor("cpu")
    y_ref, h_ref = reference_forward(spec, x, ws, bs, p, seed, return_hidden=True)
    y_tf = _teacher_forced_forward(spec, x, ws, bs, p, seed, h_ref)
    assert torch.allclose(y_tf, y_ref, rtol=1e-13, atol=1e-13)
    gy = torch.randn_like(y_ref)
    for a, b in zip(reference_grads(spec, x, ws, bs, p, seed, gy),
                    reference_grads(spec, x, ws, bs, p, seed, gy, h_ref)):
        assert torch.allclose(a, b, rtol=1e-12, atol=1e-13)


# torch.empty / at::empty fill with NaN inside: every output or workspace element the op does
# not write shows up as NaN.
poisoned_empty = poisoned_outputs


def seed_tensor(device, value=0x1234_5678_9ABC):
    return torch.tensor([value], dtype=torch.int64, device=device)


def check_op(fwd, bwd, spec, B, dtype, p, device="cpu", fwd_tol=None, grad_tol=None, gen=None):
    """Runs forward + backward of an op pair and checks them against the float64 reference."""
    x, ws, bs = make_inputs(spec, B, dtype, device, gen)
    seed = seed_tensor(device) if p > 0 else None
    with poisoned_empty():
        y, hidden = fwd(x, ws, bs, seed, spec.kind_code, spec.num_splits, p, True)
    assert y.shape == (B, spec.C) and y.dtype == dtype and y.device == x.device
    assert hidden.shape == (B, spec.n * spec.H) and hidden.dtype == dtype
    assert not y.isnan().any() and not hidden.isnan().any(), "unwritten (poisoned) output"
    y_ref, h_ref = reference_forward(spec, f64(x), [f64(w) for w in ws], [f64(b) for b in bs], p,
                                     seed, return_hidden=True)
    tol = fwd_tol or FWD_TOL[dtype]
    assert rel_err(y, y_ref) <= tol, f"y: {rel_err(y, y_ref):.2e} > {tol:.0e}"
    assert rel_err(hidden, h_ref) <= tol, f"hidden: {rel_err(hidden, h_ref):.2e} > {tol:.0e}"

    gy = torch.randn(B, spec.C, dtype=torch.float64, generator=gen).to(dtype).to(device)
    with poisoned_empty():
        gx, gp = bwd(gy, x, ws, hidden, seed, spec.kind_code, spec.num_splits, p)
    assert gx.shape == (B, spec.D) and gx.dtype == dtype
    assert gp.shape == (spec.num_params(),) and gp.dtype == dtype
    assert not gx.isnan().any() and not gp.isnan().any(), "unwritten (poisoned) gradient"
    gx_ref, gp_ref = reference_grads(spec, x, ws, bs, p, seed, gy, hidden)
    tol = grad_tol or GRAD_TOL[dtype]
    assert rel_err(gx, gx_ref) <= tol, f"grad_x: {rel_err(gx, gx_ref):.2e} > {tol:.0e}"
    assert rel_err(gp, gp_ref) <= tol, f"grad_params: {rel_err(gp, gp_ref):.2e} > {tol:.0e}"
    # every layer's dW and db separately (a wrong small layer hides in the global norm)
    for L, (wo, bo, end) in enumerate(skops.param_offsets(spec)):
        for name, sl in (("dW", slice(wo, bo)), ("db", slice(bo, end))):
            e = rel_err(gp[sl], gp_ref[sl])
            assert e <= 4 * tol, f"{name}_{L}: {e:.2e} > {4 * tol:.0e}"


def cuda_fwd(*a):
    return torch.ops.spinalkern.cuda_head_forward(*a)


def cuda_bwd(*a):
    return torch.ops.spinalkern.cuda_head_backward(*a)


# kind, B, D, H, n, C, S: every value of the grid (batch 1/37/1000; D not a multiple of 16;
# H 8/10/64/128; n 1/2/4/6; S 1/2/4; C 10/26/62) appears for both heads.
GRID = [
    ("spinal", 1, 74, 8, 1, 10, 1),
    ("spinal", 37, 148, 10, 6, 26, 4),
    ("spinal", 1000, 37, 64, 2, 62, 1),
    ("spinal", 37, 74, 128, 4, 10, 2),
    ("progressive", 1, 37, 8, 2, 26, 1),
    ("progressive", 37, 37, 10, 6, 62, 1),
    ("progressive", 1000, 111, 64, 1, 10, 1),
    ("progressive", 37, 74, 128, 4, 26, 1),
]


def grid_id(c):
    return "{}-B{}-D{}-H{}-n{}-C{}-S{}".format(*c)


# ---------------------------------------------------------------------------------------------
# the C++ CPU implementation
# ---------------------------------------------------------------------------------------------
@needs_ext
def test_schemas_match_the_contract():
    for name, schema in (("cuda_head_forward", skops.FORWARD_SCHEMA),
                         ("cuda_head_backward", skops.BACKWARD_SCHEMA)):
        got = getattr(torch.ops.spinalkern, name).default._schema
        want = torch._C.parse_schema(f"spinalkern::{name}{schema}")
        assert str(got) == str(want)
    assert cuda_backend.forward_op is torch.ops.spinalkern.cuda_head_forward.default


@needs_ext
@pytest.mark.parametrize("p", [0.0, 0.3])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("case", GRID, ids=grid_id)
def test_cpu_op_matches_reference(case, dtype, p):
    kind, B, D, H, n, C, S = case
    gen = torch.Generator().manual_seed(zlib.crc32(repr((case, str(dtype), p)).encode()))
    check_op(cuda_fwd, cuda_bwd, make_spec(kind, D, H, n, C, S), B, dtype, p, gen=gen)


@needs_ext
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("case", [GRID[1], GRID[3], GRID[5], GRID[7]], ids=grid_id)
def test_cpu_op_low_precision(case, dtype):
    kind, B, D, H, n, C, S = case
    gen = torch.Generator().manual_seed(7)
    check_op(cuda_fwd, cuda_bwd, make_spec(kind, D, H, n, C, S), B, dtype, 0.25, gen=gen)


@needs_ext
@pytest.mark.parametrize("stream", [0, 3])
@pytest.mark.parametrize("p", [0.1, 0.5, 0.999])
def test_cpu_keep_mask_is_rng_keep_mask(stream, p):
    for seed in (0, 1, 2**32 - 1, 2**32, 0x2F00_1234_5678_9ABC):
        got = torch.ops.spinalkern.cuda_keep_mask(seed_tensor("cpu", seed), stream, 41, 300, p)
        assert torch.equal(got, keep_mask(seed, stream, 41, 300, p))


@needs_ext
def test_keep_mask_op_compiles():
    f = torch.compile(lambda s: torch.ops.spinalkern.cuda_keep_mask(s, 1, 5, 7, 0.5), fullgraph=True,
                      backend="aot_eager")
    assert torch.equal(f(seed_tensor("cpu", 11)), keep_mask(11, 1, 5, 7, 0.5))


@needs_ext
def test_cpu_nan_propagates_like_reference():
    spec = make_spec("progressive", 37, 16, 3, 10, 1)
    x, ws, bs = make_inputs(spec, 20, torch.float64)
    x[3, 5] = float("nan")
    y, h = cuda_fwd(x, ws, bs, None, spec.kind_code, 1, 0.0, True)
    y_ref, h_ref = reference_forward(spec, x, ws, bs, 0.0, return_hidden=True)
    assert torch.equal(y.isnan(), y_ref.isnan()) and y.isnan()[3].all()
    assert torch.equal(h.isnan(), h_ref.isnan())
    gy = torch.randn(20, 10, dtype=torch.float64)
    gx, gp = cuda_bwd(gy, x, ws, h, None, spec.kind_code, 1, 0.0)
    gx_ref, gp_ref = reference_grads(spec, x, ws, bs, 0.0, None, gy)
    assert torch.equal(gx.isnan(), gx_ref.isnan()) and torch.equal(gp.isnan(), gp_ref.isnan())
    ok = ~gp_ref.isnan()
    assert rel_err(gp[ok], gp_ref[ok]) < 1e-12


@needs_ext
def test_cpu_batch_zero_and_no_hidden():
    spec = make_spec("spinal", 20, 8, 2, 5, 2)
    x, ws, bs = make_inputs(spec, 0, torch.float32)
    y, h = cuda_fwd(x, ws, bs, None, 0, 2, 0.0, True)
    assert y.shape == (0, 5) and h.shape == (0, 16)
    gx, gp = cuda_bwd(torch.zeros(0, 5), x, ws, h, None, 0, 2, 0.0)
    assert gx.shape == (0, 20) and gp.shape == (spec.num_params(),) and not gp.any()
    x, ws, bs = make_inputs(spec, 3, torch.float32)
    y, h = cuda_fwd(x, ws, bs, None, 0, 2, 0.0, False)
    assert h.shape == (0,) and torch.equal(y, cuda_fwd(x, ws, bs, None, 0, 2, 0.0, True)[0])


@needs_ext
def test_cpu_non_contiguous_inputs():
    spec = make_spec("spinal", 24, 16, 3, 7, 2)
    x, ws, bs = make_inputs(spec, 9, torch.float32)
    big = torch.zeros(9, 48)
    big[:, ::2] = x
    xs = big[:, ::2]
    assert not xs.is_contiguous() and torch.equal(xs, x)
    wst = [w.t().contiguous().t() for w in ws]
    y1, h1 = cuda_fwd(xs, wst, bs, None, 0, 2, 0.0, True)
    y2, h2 = cuda_fwd(x, ws, bs, None, 0, 2, 0.0, True)
    assert torch.equal(y1, y2) and torch.equal(h1, h2)


@needs_ext
def test_cpu_gradients_are_bitwise_reproducible():
    spec = make_spec("progressive", 37, 64, 4, 26, 1)
    x, ws, bs = make_inputs(spec, 300, torch.float32)
    seed = seed_tensor("cpu")
    y, h = cuda_fwd(x, ws, bs, seed, 1, 1, 0.2, True)
    gy = torch.randn_like(y)
    a = cuda_bwd(gy, x, ws, h, seed, 1, 1, 0.2)
    b = cuda_bwd(gy, x, ws, h, seed, 1, 1, 0.2)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


@needs_ext
@pytest.mark.parametrize("kind", ["spinal", "progressive"])
@pytest.mark.parametrize("p", [0.0, 0.4])
def test_cpu_opcheck(kind, p):
    spec = make_spec(kind, 12, 6, 3, 5, 2)
    x, ws, bs = make_inputs(spec, 7, torch.float64)
    for t in (x, *ws, *bs):
        t.requires_grad_()
    seed = seed_tensor("cpu") if p > 0 else None
    args = (x, ws, bs, seed, spec.kind_code, spec.num_splits, p, True)
    torch.library.opcheck(torch.ops.spinalkern.cuda_head_forward.default, args)
    y, h = cuda_fwd(*args)
    bargs = (torch.randn_like(y), x.detach(), [w.detach() for w in ws], h, seed,
             spec.kind_code, spec.num_splits, p)
    torch.library.opcheck(torch.ops.spinalkern.cuda_head_backward.default, bargs)


@needs_ext
@pytest.mark.parametrize("kind", ["spinal", "progressive"])
@pytest.mark.parametrize("p", [0.0, 0.3])
def test_cpu_gradcheck_through_op(kind, p):
    spec = make_spec(kind, 6, 4, 2, 3, 2)
    n = spec.n
    x, ws, bs = make_inputs(spec, 5, torch.float64)
    seed = seed_tensor("cpu") if p > 0 else None

    def f(x, *params):
        return cuda_fwd(x, list(params[:n + 1]), list(params[n + 1:]), seed, spec.kind_code,
                        spec.num_splits, p, True)[0]

    inputs = tuple(t.requires_grad_() for t in (x, *ws, *bs))
    assert torch.autograd.gradcheck(f, inputs, eps=1e-6, atol=1e-7, rtol=1e-5)


@needs_ext
def test_cpu_torch_compile_fullgraph():
    spec = make_spec("spinal", 20, 8, 3, 6, 2)
    x, ws, bs = make_inputs(spec, 11, torch.float32)
    seed = seed_tensor("cpu")

    def loss(x, ws, bs):
        y, _ = torch.ops.spinalkern.cuda_head_forward(x, ws, bs, seed, 0, 2, 0.25, True)
        return (y * y).sum()

    params = [t.clone().requires_grad_() for t in (x, *ws, *bs)]
    compiled = torch.compile(loss, fullgraph=True)
    out = compiled(params[0], params[1:5], params[5:])
    out.backward()
    eager = [t.clone().requires_grad_() for t in (x, *ws, *bs)]
    loss(eager[0], eager[1:5], eager[5:]).backward()
    assert torch.allclose(out, loss(x, ws, bs), rtol=1e-6)
    for a, b in zip(params, eager):
        assert torch.allclose(a.grad, b.grad, rtol=1e-5, atol=1e-6)


@needs_ext
def test_cpu_op_sums_pairwise():
    """Long sums (a dot product over D, the batch sum of dW/db, the sum over a layer's outputs
    in grad_x) of equal terms 0.1: sequential fp32 summation is off by 6e-4 at 2^16 terms; the
    op's pairwise sums stay at rounding level (float64 reference)."""
    N = 2 ** 16
    terms = np.full(N, 0.1, dtype=np.float32)
    sequential = float(np.cumsum(terms, dtype=np.float32)[-1])
    assert abs(sequential - N * float(terms[0])) / (N * float(terms[0])) > 1e-4

    def check(B, D, H, x, w0, w1, gy):
        spec = make_spec("spinal", D, H, 1, 1, 1)
        ws = [torch.full((H, D), w0), torch.full((1, H), w1)]
        bs = [torch.zeros(H), torch.zeros(1)]
        xs = torch.full((B, D), x)
        g = torch.full((B, 1), gy)
        y, h = cuda_fwd(xs, ws, bs, None, 0, 1, 0.0, True)
        gx, gp = cuda_bwd(g, xs, ws, h, None, 0, 1, 0.0)
        y_ref, h_ref = reference_forward(spec, f64(xs), [f64(w) for w in ws],
                                         [f64(b) for b in bs], return_hidden=True)
        gx_ref, gp_ref = reference_grads(spec, xs, ws, bs, 0.0, None, g)
        for name, got, want in (("y", y, y_ref), ("hidden", h, h_ref), ("grad_x", gx, gx_ref),
                                ("grad_params", gp, gp_ref)):
            assert rel_err(got, want) < 1e-6, (name, B, D, H, rel_err(got, want))

    check(B=1, D=N, H=1, x=1.0, w0=0.1, w1=1.0, gy=1.0)   # forward: dot product over D
    check(B=N, D=1, H=1, x=1.0, w0=1.0, w1=1.0, gy=0.1)   # dW, db: sums over the batch
    check(B=1, D=1, H=N, x=1.0, w0=1.0, w1=0.1, gy=1.0)   # y over H; grad_x over H outputs


@needs_ext
def test_cpu_autograd_runs_in_cpp_and_hands_out_views():
    """Backward of the cuda ops runs in the C++ autograd engine (no Python function of
    spinalkern is called) and every weight/bias gradient is a view of one flat buffer."""
    spec = make_spec("spinal", 20, 8, 3, 6, 2)
    x, ws, bs = make_inputs(spec, 5, torch.float32)
    leaves = [t.requires_grad_() for t in (x, *ws, *bs)]
    y, _ = cuda_fwd(x, ws, bs, seed_tensor("cpu"), 0, 2, 0.2, True)
    assert "CppNode" in y.grad_fn.name()
    called = []

    def profiler(frame, event, arg):
        if event == "call" and f"{os.sep}spinalkern{os.sep}" in frame.f_code.co_filename:
            called.append(frame.f_code.co_name)

    sys.setprofile(profiler)
    try:
        y.square().sum().backward()
    finally:
        sys.setprofile(None)
    assert called == []
    storages = {t.grad.untyped_storage().data_ptr() for t in leaves[1:]}
    assert len(storages) == 1
    assert leaves[0].grad.shape == x.shape


def _bad_inputs():
    spec = make_spec("spinal", 12, 6, 3, 5, 2)
    x, ws, bs = make_inputs(spec, 4, torch.float32)
    seed = seed_tensor("cpu")
    good = dict(x=x, weights=ws, biases=bs, seed=None, kind=0, num_splits=2, dropout=0.0)
    cases = [
        (dict(x=x[0]), ValueError, "x must be 2-D"),
        (dict(x=torch.randn(4, 13)), ValueError, "divisible by num_splits"),
        (dict(x=torch.randn(4, 14)), ValueError, "weights[0] has shape"),
        (dict(x=x.to(torch.int64)), TypeError, "x must be float16"),
        (dict(x=x.double()), TypeError, "weights[0] has dtype"),
        (dict(weights=ws[:-2] + [ws[-1]]), ValueError, "weights["),
        (dict(weights=[ws[0]]), ValueError, "at least one hidden layer"),
        (dict(biases=bs[:-1]), ValueError, "biases"),
        (dict(biases=bs[:-1] + [bs[-1][:-1]]), ValueError, "biases[3] has shape"),
        (dict(biases=bs[:-1] + [bs[-1].double()]), TypeError, "biases[3] has dtype"),
        (dict(kind=2), ValueError, "kind must be"),
        (dict(kind=1), ValueError, "num_splits applies to the spinal head only"),
        (dict(num_splits=0), ValueError, "num_splits must be positive"),
        (dict(dropout=0.5), ValueError, "seed is required"),
        (dict(dropout=1.0, seed=seed), ValueError, "dropout must be in [0, 1)"),
        (dict(dropout=0.5, seed=seed.int()), ValueError, "seed must be a one-element int64"),
    ]
    return good, cases


@needs_ext
def test_cpu_bad_input_errors_name_the_argument():
    good, cases = _bad_inputs()
    for change, exc, msg in cases:
        a = {**good, **change}
        with pytest.raises(exc, match=None) as info:
            cuda_fwd(a["x"], a["weights"], a["biases"], a["seed"], a["kind"], a["num_splits"],
                     a["dropout"], True)
        assert msg in str(info.value), (change.keys(), str(info.value))
    x, ws, bs = good["x"], good["weights"], good["biases"]
    y, h = cuda_fwd(x, ws, bs, None, 0, 2, 0.0, True)
    with pytest.raises(ValueError, match="grad_y has shape"):
        cuda_bwd(y[:, :-1], x, ws, h, None, 0, 2, 0.0)
    with pytest.raises(ValueError, match="hidden has shape"):
        cuda_bwd(y, x, ws, torch.empty(0), None, 0, 2, 0.0)
    with pytest.raises(TypeError, match="grad_y has dtype"):
        cuda_bwd(y.double(), x, ws, h, None, 0, 2, 0.0)


@needs_ext
def test_module_backend_cuda_on_cpu():
    from spinalkern import SpinalHead
    head = SpinalHead(20, 7, 16, 3, 2, dropout=0.0, backend="cuda").double()
    ref = SpinalHead(20, 7, 16, 3, 2, dropout=0.0, backend="torch").double()
    ref.load_state_dict(head.state_dict())
    x = torch.randn(13, 20, dtype=torch.float64, requires_grad=True)
    y = head(x)
    y.square().sum().backward()
    g = x.grad.clone()
    x.grad = None
    y_ref = ref(x)
    y_ref.square().sum().backward()
    assert rel_err(y, y_ref) < 1e-12 and rel_err(g, x.grad) < 1e-12
    for a, b in zip(head.parameters(), ref.parameters()):
        assert rel_err(a.grad, b.grad) < 1e-12


def test_import_and_hint_without_extension():
    # importing never fails; the hint names the build commands and the knobs
    hint = cuda_backend.build_hint()
    assert "setup.py build_ext --inplace" in hint and "--no-build-isolation" in hint
    assert "TORCH_CUDA_ARCH_LIST" in hint
    assert isinstance(cuda_backend.available(), bool)
    assert cuda_backend.available() or cuda_backend.forward_op is None


# ---------------------------------------------------------------------------------------------
# GPU
# ---------------------------------------------------------------------------------------------
GPU_SHAPES = [
    # kind, D, H, n, C, S
    ("spinal", 256, 128, 4, 10, 2),        # SpinalNet VGG-5 head
    ("spinal", 320, 10, 6, 10, 2),         # MNIST head
    ("spinal", 512, 128, 4, 100, 4),       # Spinal-ResNet18 head, 4 segments
    ("spinal", 2048, 256, 4, 1000, 2),     # wide head, ImageNet classes
    ("progressive", 256, 128, 4, 10, 1),   # ProgressiveSpinalNet VGG-5 head
    ("progressive", 111, 64, 6, 62, 1),
    ("progressive", 512, 256, 3, 1000, 1),
]
GPU_DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]


@needs_gpu
@pytest.mark.parametrize("dtype", GPU_DTYPES, ids=str)
@pytest.mark.parametrize("B", [1, 37, 1000, 65536])
@pytest.mark.parametrize("shape", GPU_SHAPES, ids=lambda s: "{}-D{}-H{}-n{}-C{}-S{}".format(*s))
def test_gpu_matches_reference(shape, B, dtype):
    kind, D, H, n, C, S = shape
    if B == 65536 and (dtype == torch.float64 or D * H > 2048 * 128):
        B = 16384  # keep the float64 reference within memory and time
    gen = torch.Generator().manual_seed(B + H)
    check_op(cuda_fwd, cuda_bwd, make_spec(kind, D, H, n, C, S), B, dtype, 0.3, "cuda", gen=gen)


@needs_gpu
def test_gpu_keep_mask_is_rng_keep_mask():
    for seed in (0, 2**32 + 7, 0x2F00_1234_5678_9ABC):
        got = torch.ops.spinalkern.cuda_keep_mask(seed_tensor("cuda", seed), 5, 1000, 777, 0.3)
        assert torch.equal(got.cpu(), keep_mask(seed, 5, 1000, 777, 0.3))


@needs_gpu
def test_gpu_nan_batch_zero_and_reproducible():
    spec = make_spec("spinal", 256, 128, 4, 10, 2)
    x, ws, bs = make_inputs(spec, 4096, torch.float16, "cuda")
    xn = x.clone()
    xn[100, 3] = float("nan")
    y, h = cuda_fwd(xn, ws, bs, None, 0, 2, 0.0, True)
    y_ref, h_ref = reference_forward(spec, f64(xn), [f64(w) for w in ws], [f64(b) for b in bs],
                                     0.0, return_hidden=True)
    assert torch.equal(y.isnan(), y_ref.isnan()) and torch.equal(h.isnan(), h_ref.isnan())
    y0, h0 = cuda_fwd(x[:0], ws, bs, None, 0, 2, 0.0, True)
    assert y0.shape == (0, 10) and h0.shape == (0, 512)
    seed = new_seed("cuda")
    y, h = cuda_fwd(x, ws, bs, seed, 0, 2, 0.5, True)
    gy = torch.randn_like(y)
    a = cuda_bwd(gy, x, ws, h, seed, 0, 2, 0.5)
    b = cuda_bwd(gy, x, ws, h, seed, 0, 2, 0.5)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


@needs_gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("kind", ["spinal", "progressive"])
def test_gpu_autocast_module(kind, dtype):
    from spinalkern import ProgressiveHead, SpinalHead
    mk = (lambda b: SpinalHead(256, 10, 128, 4, 2, backend=b)) if kind == "spinal" else \
        (lambda b: ProgressiveHead(256, 10, 128, 4, backend=b))
    head = mk("cuda").cuda()
    x = torch.randn(4096, 256, device="cuda", requires_grad=True)
    with torch.autocast("cuda", dtype=dtype):
        y = head(x)
    assert y.dtype == dtype
    spec = head.spec
    y_ref = reference_forward(spec, f64(x.to(dtype)), [f64(w.to(dtype)) for w in head.weights()],
                              [f64(b.to(dtype)) for b in head.biases()], 0.0)
    assert rel_err(y, y_ref) <= FWD_TOL[dtype]
    y.float().square().sum().backward()
    assert x.grad is not None and x.grad.dtype == torch.float32 and x.grad.isfinite().all()
    for prm in head.parameters():
        assert prm.grad is not None and prm.grad.dtype == torch.float32


@needs_gpu
@pytest.mark.skipif(not hasattr(torch.ops.spinalkern, "triton_head_forward"),
                    reason="the Triton backend ops are not registered")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", [GPU_SHAPES[0], GPU_SHAPES[1], GPU_SHAPES[4], GPU_SHAPES[5]],
                         ids=lambda s: "{}-D{}-H{}-n{}-C{}-S{}".format(*s))
def test_gpu_cuda_matches_triton(shape, dtype):
    kind, D, H, n, C, S = shape
    spec = make_spec(kind, D, H, n, C, S)
    x, ws, bs = make_inputs(spec, 2048, dtype, "cuda")
    seed = new_seed("cuda")
    args = (x, ws, bs, seed, spec.kind_code, spec.num_splits, 0.3, True)
    yc, hc = torch.ops.spinalkern.cuda_head_forward(*args)
    yt, ht = torch.ops.spinalkern.triton_head_forward(*args)
    # fp32: room for TF32, which Triton's dots use only when the float32 matmul precision
    # allows it (the default, "highest", gives exact fp32 dots)
    tol = 5e-3 if dtype == torch.float32 else 2 * FWD_TOL[dtype]
    assert rel_err(yc, yt) <= tol and rel_err(hc, ht) <= tol
    gy = torch.randn_like(yc)
    gc = torch.ops.spinalkern.cuda_head_backward(gy, x, ws, hc, seed, spec.kind_code,
                                                 spec.num_splits, 0.3)
    gt = torch.ops.spinalkern.triton_head_backward(gy, x, ws, hc, seed, spec.kind_code,
                                                   spec.num_splits, 0.3)
    gtol = 1e-2 if dtype == torch.float32 else 2 * GRAD_TOL[dtype]
    assert rel_err(gc[0], gt[0]) <= gtol and rel_err(gc[1], gt[1]) <= gtol


@needs_gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_gpu_cuda_graph_replay(dtype):
    spec = make_spec("spinal", 256, 128, 4, 10, 2)
    x, ws, bs = make_inputs(spec, 1024, dtype, "cuda")
    gy = torch.randn(1024, 10, device="cuda").to(dtype)
    seed_out = torch.zeros(1, dtype=torch.int64, device="cuda")

    def step():
        seed = new_seed("cuda")  # drawn on the device: a new seed on every replay
        seed_out.copy_(seed)
        y, h = cuda_fwd(x, ws, bs, seed, 0, 2, 0.5, True)
        gx, gp = cuda_bwd(gy, x, ws, h, seed, 0, 2, 0.5)
        return y, h, gx, gp

    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(2):
            step()
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outs = step()
    results = []
    for _ in range(2):
        graph.replay()
        torch.cuda.synchronize()
        seed = seed_out.clone()
        got = [t.clone() for t in outs]
        y, h = cuda_fwd(x, ws, bs, seed, 0, 2, 0.5, True)
        gx, gp = cuda_bwd(gy, x, ws, h, seed, 0, 2, 0.5)
        for a, b in zip(got, (y, h, gx, gp)):
            assert torch.equal(a, b), "replay differs from eager with the same seed"
        results.append((seed, got))
    (s1, r1), (s2, r2) = results
    assert s1.item() != s2.item(), "the seed was not redrawn on replay"
    assert not torch.equal(r1[0], r2[0]), "the dropout mask did not change between replays"
