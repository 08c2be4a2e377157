"""The CUDA extension's BatchNorm head (spinalkern::cuda_head_bn_forward / _backward): its C++
CPU ops and its CUDA kernels on the CPU emulator (csrc/emu, see test_cuda_emu.py), against the
float64 reference with torch.nn.functional.batch_norm in training mode.

Checked: y, hidden, z, the batch statistics (mean, 1/sqrt(var + eps), unbiased variance), and
every gradient (x, each W_L and b_L, gamma, beta); a hidden layer's bias, right before
BatchNorm, has a true gradient of zero: it must be zero to rounding (measured against the sum
of |dz| it is a sum of).  Sizes are small (the emulator is slow): ragged B (partial row
tiles), odd widths (the packing path), dropout on and off, affine on and off, every dtype.
Bounds: max(2 x torch's own error at that precision, the per-dtype floor), as everywhere.
"""
from __future__ import annotations

import zlib

import pytest
import torch
import torch.nn.functional as F

from spinalkern import cuda_backend
from spinalkern import ops as skops
from spinalkern.reference import reference_forward
from spinalkern.spec import HeadSpec
from spinalkern.testing import (ERROR_FLOOR, GRAD_ERROR_FLOOR, poisoned_outputs,
                                random_params, rel_err)

from test_cuda_emu import emu, knobs  # noqa: F401  (emu: the emulator fixture)

needs_ext = pytest.mark.skipif(not cuda_backend.available(), reason=cuda_backend.build_hint())

EPS = 1e-5
# (B, D, H, n, C, S, dtype, dropout, affine, knobs)
CASES = [
    (37, 64, 16, 2, 10, 2, torch.float16, 0.0, True, {}),
    (33, 74, 10, 3, 26, 2, torch.bfloat16, 0.3, True, {}),        # odd widths: packed
    (20, 37, 24, 2, 70, 1, torch.float32, 0.25, False, {}),       # affine=False, 2 output blocks
    (19, 30, 8, 2, 5, 2, torch.float64, 0.2, True, {}),
    (2, 32, 16, 1, 10, 1, torch.float16, 0.0, True, {}),          # the smallest batch
    (70, 48, 80, 2, 10, 2, torch.bfloat16, 0.5, True,             # 64-row tiles, 2 tiles
     {"SPINALKERN_CUDA_BN_TILE_M": "64"}),
]


def case_id(c):
    B, D, H, n, C, S, dtype, p, affine, env = c
    return (f"B{B}-D{D}-H{H}-n{n}-C{C}-S{S}-{str(dtype)[6:]}-p{p}" + ("" if affine else "-noaffine")
            + "".join(f"-{k.split('_')[-2]}{v}" for k, v in env.items()))


def make_case(case):
    B, D, H, n, C, S, dtype, p, affine, _ = case
    spec = HeadSpec("spinal", D, H, n, C, S)
    gen = torch.Generator().manual_seed(zlib.crc32(case_id(case).encode()))
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    x = torch.randn(B, D, dtype=torch.float64, generator=gen).to(dtype)
    ws, bs = random_params(spec, dtype, "cpu", gen)
    gammas = [(torch.rand(H, dtype=torch.float64, generator=gen) + 0.5).to(acc) for _ in range(n)]
    betas = [(torch.randn(H, dtype=torch.float64, generator=gen) * 0.2).to(acc) for _ in range(n)]
    if not affine:
        gammas, betas = [], []
    gy = torch.randn(B, C, dtype=torch.float64, generator=gen).to(dtype)
    seed = torch.tensor([zlib.crc32(repr(case[:8]).encode())], dtype=torch.int64) if p else None
    return spec, x, ws, bs, gammas, betas, gy, seed


def run_reference(spec, x, ws, bs, gammas, betas, p, seed, gy, cast):
    """Forward and backward of the reference head with BatchNorm, inputs cast by `cast`
    (gamma/beta stay in the accumulation dtype)."""
    n1 = spec.n + 1
    leaves = [cast(t).requires_grad_() for t in (x, *ws, *bs)]
    bn = [t.detach().clone().requires_grad_() for t in (*gammas, *betas)]
    zs = []

    def norm(i):
        def f(z):
            z.retain_grad()
            zs.append(z)
            g = bn[i].to(z.dtype) if bn else None
            b = bn[spec.n + i].to(z.dtype) if bn else None
            return F.batch_norm(z, None, None, g, b, True, 0.0, EPS)
        return f
    y, h = reference_forward(spec, leaves[0], leaves[1:1 + n1], leaves[1 + n1:], p, seed,
                             norms=[norm(i) for i in range(spec.n)], return_hidden=True)
    y.backward(cast(gy))
    z = torch.cat([t.detach() for t in zs], 1)
    zd = z.double()
    stats = torch.stack([torch.stack([c.mean(0), (c.var(0, unbiased=False) + EPS).rsqrt(),
                                      c.var(0, unbiased=True)])
                         for c in zd.split(spec.H, 1)])
    return dict(y=y.detach(), hidden=h.detach(), z=z, stats=stats,
                grads=[t.grad for t in leaves] + [t.grad for t in bn],
                dz_sums=[t.grad.double().abs().sum(0).norm().item() for t in zs])


def to(device, *args):
    """args with every tensor (also inside lists) moved to device."""
    def mv(a):
        if isinstance(a, list):
            return [t.to(device) for t in a]
        return a.to(device) if isinstance(a, torch.Tensor) else a
    return [mv(a) for a in args]


def check_against_reference(fwd, bwd, case, device="cpu"):
    spec, x, ws, bs, gammas, betas, gy, seed = make_case(case)
    dtype, p = case[6], case[7]
    n, n1 = spec.n, spec.n + 1
    S = spec.num_splits
    with poisoned_outputs():
        y, hidden, z, stats = fwd(*to(device, x, ws, bs, gammas, betas, seed), S, p, EPS, True)
        gx, gp, gbn = bwd(*to(device, gy, x, ws, gammas), hidden, z, stats, *to(device, seed), S, p)
    ref = run_reference(spec, x, ws, bs, gammas, betas, p, seed, gy, lambda t: t.detach().double())
    own = run_reference(spec, x, ws, bs, gammas, betas, p, seed, gy, lambda t: t.detach().clone())
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    assert stats.dtype == acc and stats.shape == (n, 3, spec.H)
    assert gbn.dtype == acc and gbn.shape == (n, 2, spec.H)
    for name, out in (("y", y), ("hidden", hidden), ("z", z)):
        assert out.dtype == dtype and out.shape == ref[name].shape, name
        bound = max(2 * rel_err(own[name], ref[name]), ERROR_FLOOR[dtype])
        e = rel_err(out, ref[name])
        assert e <= bound, f"{name}: relative error {e:.3g} > {bound:.3g}"
    for k, name in enumerate(("mean", "r", "unbiased var")):
        bound = max(2 * rel_err(own["stats"][:, k], ref["stats"][:, k]), ERROR_FLOOR[dtype])
        e = rel_err(stats[:, k], ref["stats"][:, k])
        assert e <= bound, f"stats {name}: relative error {e:.3g} > {bound:.3g}"

    dws, dbs = skops.split_grad_params(spec, gp)
    got = [gx, *dws, *dbs]
    if gammas:
        got += [gbn[:, 0, :].unbind(0)[i] for i in range(n)] + [gbn[:, 1, :].unbind(0)[i] for i in range(n)]
    names = (["grad_x"] + [f"dW{L}" for L in range(n1)] + [f"db{L}" for L in range(n1)]
             + [f"dgamma{i}" for i in range(n)] + [f"dbeta{i}" for i in range(n)])
    for i, (name, g) in enumerate(zip(names, got)):
        bound = max(2 * rel_err(own["grads"][i], ref["grads"][i]), GRAD_ERROR_FLOOR[dtype])
        if name[:2] == "db" and name[2:].isdigit() and int(name[2:]) < n:  # true gradient 0
            e = g.double().norm().item() / ref["dz_sums"][int(name[2:])]
            assert e <= GRAD_ERROR_FLOOR[dtype], f"{name}: {e:.3g} of sum |dz| (should be 0)"
            continue
        e = rel_err(g, ref["grads"][i])
        assert e <= bound, f"{name}: relative error {e:.3g} > {bound:.3g}"


# the CPU ops are fast: also larger heads (4 splits, 6 layers, B = 1000)
CPU_CASES = CASES + [
    (1000, 64, 128, 4, 62, 4, torch.float32, 0.0, True, {}),
    (300, 90, 10, 6, 10, 2, torch.bfloat16, 0.3, True, {}),
    (129, 45, 64, 1, 7, 1, torch.float16, 0.0, False, {}),
]


@needs_ext
@pytest.mark.parametrize("case", CPU_CASES, ids=case_id)
def test_cpu_ops_match_reference(case):
    check_against_reference(torch.ops.spinalkern.cuda_head_bn_forward,
                            torch.ops.spinalkern.cuda_head_bn_backward, case)


@needs_ext
def test_cpu_autograd_and_saved_outputs():
    """The C++ autograd gives the backward op's gradients for every input (affine and not);
    save_for_backward=False hands out empty hidden/z; create_graph=True gives the same
    gradients, differentiable (tests/test_bn.py checks its second derivatives)."""
    case = CASES[1]
    spec, x, ws, bs, gammas, betas, gy, seed = make_case(case)
    p = case[7]
    fwd = torch.ops.spinalkern.cuda_head_bn_forward
    y, hidden, z, stats = fwd(x, ws, bs, gammas, betas, seed, 2, p, EPS, True)
    gx, gp, gbn = torch.ops.spinalkern.cuda_head_bn_backward(gy, x, ws, gammas, hidden, z, stats,
                                                              seed, 2, p)
    leaves = [t.clone().requires_grad_() for t in (x, *ws, *bs, *gammas, *betas)]
    n1 = spec.n + 1
    out = fwd(leaves[0], leaves[1:1 + n1], leaves[1 + n1:1 + 2 * n1], leaves[1 + 2 * n1:1 + 2 * n1 + spec.n],
              leaves[1 + 2 * n1 + spec.n:], seed, 2, p, EPS, False)
    assert out[1].shape == (0,) and out[2].shape == (0,)
    assert torch.equal(out[0], y) and torch.equal(out[3], stats)
    out[0].backward(gy)
    dws, dbs = skops.split_grad_params(spec, gp)
    want = [gx, *dws, *dbs, *gbn[:, 0].unbind(0), *gbn[:, 1].unbind(0)]
    for t, w in zip(leaves, want):
        assert torch.equal(t.grad, w)
    out = fwd(leaves[0], leaves[1:1 + n1], leaves[1 + n1:1 + 2 * n1], [], [], seed, 2, p, EPS, True)
    (g,) = torch.autograd.grad(out[0], leaves[0], gy, create_graph=False)
    assert torch.isfinite(g).all()
    out = fwd(leaves[0], leaves[1:1 + n1], leaves[1 + n1:1 + 2 * n1], [], [], seed, 2, p, EPS, True)
    (g2,) = torch.autograd.grad(out[0], leaves[0], gy, create_graph=True)  # differentiable
    assert g2.requires_grad and rel_err(g2, g) <= ERROR_FLOOR[g.dtype]


@needs_ext
def test_cpu_ops_pass_opcheck_and_compile():
    """Schemas, fakes (spinalkern.ops), autograd registration and torch.compile agree."""
    spec, x, ws, bs, gammas, betas, gy, seed = make_case(CASES[1])
    fwd = torch.ops.spinalkern.cuda_head_bn_forward.default
    bwd = torch.ops.spinalkern.cuda_head_bn_backward.default
    leaves = [t.clone().requires_grad_() for t in (x, *ws, *gammas)]
    n1 = spec.n + 1
    torch.library.opcheck(fwd, (leaves[0], leaves[1:1 + n1], bs, leaves[1 + n1:], betas, seed, 2,
                                0.3, EPS, True))
    y, hidden, z, stats = fwd(x, ws, bs, gammas, betas, seed, 2, 0.3, EPS, True)
    torch.library.opcheck(bwd, (gy, x, ws, gammas, hidden, z, stats, seed, 2, 0.3))
    compiled = torch.compile(lambda x: fwd(x, ws, bs, gammas, betas, seed, 2, 0.3, EPS, False)[0],
                             fullgraph=True)
    assert torch.equal(compiled(x), y)


def bad_calls(x, ws, bs, gammas, betas, seed):
    """(description, forward args) that every implementation must reject, as Python does."""
    S = 2
    g64 = [g.double() for g in gammas]
    return [
        ("one row", (x[:1], ws, bs, gammas, betas, seed, S, 0.3, EPS, True)),
        ("gamma dtype", (x, ws, bs, g64, betas, seed, S, 0.3, EPS, True)),
        ("gamma count", (x, ws, bs, gammas[:1], betas[:1], seed, S, 0.3, EPS, True)),
        ("gamma/beta mismatch", (x, ws, bs, gammas, [], seed, S, 0.3, EPS, True)),
        ("gamma shape", (x, ws, bs, [g[:-1] for g in gammas], betas, seed, S, 0.3, EPS, True)),
        ("eps", (x, ws, bs, gammas, betas, seed, S, 0.3, -0.001, True)),
        ("no seed", (x, ws, bs, gammas, betas, None, S, 0.3, EPS, True)),
    ]


def cpp_spelling(msg: str) -> str:
    """A Python check's message with dtypes spelled as c10 prints them (torch.float32: Float)."""
    for t, name in ((torch.float16, "Half"), (torch.bfloat16, "BFloat16"),
                    (torch.float32, "Float"), (torch.float64, "Double")):
        msg = msg.replace(str(t), name)
    return msg


def check_rejects_like_python(fwd, bwd):
    spec, x, ws, bs, gammas, betas, gy, seed = make_case(CASES[1])
    for what, args in bad_calls(x, ws, bs, gammas, betas, seed):
        with pytest.raises((ValueError, TypeError)) as want:
            skops.check_bn_forward_args(*args[:-1])
        with pytest.raises(want.type) as got:
            fwd(*args)
        assert cpp_spelling(str(want.value)) in str(got.value), what
    y, hidden, z, stats = fwd(x, ws, bs, gammas, betas, seed, 2, 0.3, EPS, True)
    bad = [("stats shape", (gy, x, ws, gammas, hidden, z, stats[:, :2], seed, 2, 0.3)),
           ("stats dtype", (gy, x, ws, gammas, hidden, z, stats.double(), seed, 2, 0.3)),
           ("z shape", (gy, x, ws, gammas, hidden, z[:, 1:], stats, seed, 2, 0.3)),
           ("one row", (gy[:1], x[:1], ws, gammas, hidden[:1], z[:1], stats, seed, 2, 0.3))]
    for what, args in bad:
        with pytest.raises((ValueError, TypeError)) as want:
            skops.check_bn_backward_args(*args)
        with pytest.raises(want.type) as got:
            bwd(*args)
        assert cpp_spelling(str(want.value)) in str(got.value), what


@needs_ext
def test_cpu_ops_reject_bad_arguments_like_python():
    check_rejects_like_python(torch.ops.spinalkern.cuda_head_bn_forward,
                              torch.ops.spinalkern.cuda_head_bn_backward)


# ---------------------------------------------------------------------------------------------
# the CUDA kernels on the emulator
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_emulated_kernels_match_reference(emu, case):
    with knobs(case[9]):
        check_against_reference(emu.head_bn_forward, emu.head_bn_backward, case)


def test_emulated_kernels_are_deterministic_and_reject_bad_arguments(emu):
    spec, x, ws, bs, gammas, betas, gy, seed = make_case(CASES[1])
    a = emu.head_bn_forward(x, ws, bs, gammas, betas, seed, 2, 0.3, EPS, True)
    b = emu.head_bn_forward(x, ws, bs, gammas, betas, seed, 2, 0.3, EPS, False)
    assert torch.equal(a[0], b[0]) and torch.equal(a[3], b[3])
    assert b[1].shape == (0,) and b[2].shape == (0,)
    ga = emu.head_bn_backward(gy, x, ws, gammas, *a[1:], seed, 2, 0.3)
    gb = emu.head_bn_backward(gy, x, ws, gammas, *a[1:], seed, 2, 0.3)
    for u, v in zip(ga, gb):
        assert torch.equal(u, v)
    check_rejects_like_python(emu.head_bn_forward, emu.head_bn_backward)


@pytest.mark.parametrize("fault", ["cp_async_wait_early", "skip_syncthreads"])
def test_emulator_catches_pipeline_faults_in_bn_kernels(emu, fault):
    """A W tile read one cp.async group early, or without the barrier after its wait, must
    show up (NaN from the poisoned stage) in both layer kernels."""
    spec, x, ws, bs, gammas, betas, gy, seed = make_case(CASES[0])
    y, hidden, z, stats = emu.head_bn_forward(x, ws, bs, gammas, betas, seed, 2, 0.0, EPS, True)
    emu.set_fault(fault)
    try:
        yf = emu.head_bn_forward(x, ws, bs, gammas, betas, seed, 2, 0.0, EPS, True)[0]
        gxf = emu.head_bn_backward(gy, x, ws, gammas, hidden, z, stats, seed, 2, 0.0)[0]
    finally:
        emu.set_fault("")
    assert yf.isnan().any(), "forward"
    assert gxf.isnan().any(), "backward"


# ---------------------------------------------------------------------------------------------
# the same on the GPU
# ---------------------------------------------------------------------------------------------
def _gpu_ops():
    return torch.cuda.is_available() and cuda_backend.has_cuda_kernels()


GPU_CASES = CASES + [
    (1024, 256, 128, 4, 62, 2, torch.bfloat16, 0.5, True, {}),   # the head
    (4096, 256, 128, 4, 62, 2, torch.float16, 0.0, True, {}),    # 64-row tiles
    (1000, 45, 64, 6, 10, 2, torch.float32, 0.3, False, {}),
]


@pytest.mark.skipif(not _gpu_ops(), reason="needs a CUDA GPU and spinalkern._C with its kernels")
@pytest.mark.parametrize("case", GPU_CASES, ids=case_id)
def test_gpu_kernels_match_reference(case):
    with knobs(case[9]):
        check_against_reference(torch.ops.spinalkern.cuda_head_bn_forward,
                                torch.ops.spinalkern.cuda_head_bn_backward, case, "cuda")


@pytest.mark.skipif(not _gpu_ops(), reason="needs a CUDA GPU and spinalkern._C with its kernels")
def test_gpu_graph_capture_replays_like_eager():
    """Both ops captured in one CUDA graph (no host synchronisation): a replay on new inputs
    gives exactly the eager results (the kernels are deterministic)."""
    case = GPU_CASES[-3]
    spec, x, ws, bs, gammas, betas, gy, seed = make_case(case)
    x, ws, bs, gammas, betas, gy, seed = to("cuda", x, ws, bs, gammas, betas, gy, seed)
    fwd = torch.ops.spinalkern.cuda_head_bn_forward
    bwd = torch.ops.spinalkern.cuda_head_bn_backward

    def step():
        y, hidden, z, stats = fwd(x, ws, bs, gammas, betas, seed, 2, 0.5, EPS, True)
        return (y, stats, *bwd(gy, x, ws, gammas, hidden, z, stats, seed, 2, 0.5))
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step()  # warm-up outside the capture
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = step()
    x.copy_(torch.randn_like(x))
    seed.fill_(seed.item() + 1)
    graph.replay()
    want = step()
    for a, b in zip(out, want):
        assert torch.equal(a, b)
