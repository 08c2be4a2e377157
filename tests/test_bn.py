"""Training-mode BatchNorm in the fused spinal head: every backend with a BN op against the
float64 reference.

Parametrised over the registered fused backends that have a ``bn_forward_op`` and run here
(Triton: CPU tensors under its interpreter; the CUDA extension: its CPU ops when built).
Inputs are fresh random tensors; outputs are poisoned (NaN-filled) before the kernels run.
The reference is ``reference_forward`` with torch's functional batch_norm (batch statistics)
after every hidden Linear, in float64 on CPU.
"""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from spinalkern import SpinalHead, _backends, ops
from spinalkern.reference import reference_forward
from spinalkern.rng import new_seed
from spinalkern.spec import HeadSpec
from spinalkern.testing import (ERROR_FLOOR, GRAD_ERROR_FLOOR, poisoned_outputs, random_params,
                                rel_err)

from conftest import HAS_CUDA, load_emulator, requires_cuda

DEVICE = "cuda" if HAS_CUDA else "cpu"


def _bn_backends():
    out = []
    for name in _backends.names():
        if name in (_backends.AUTO, _backends.TORCH):
            continue
        b = _backends.get(name)
        if b.bn_forward_op is not None and b.available(torch.device(DEVICE)):
            out.append(name)
    return out


BN_BACKENDS = _bn_backends()
# The op-level tests also run the CUDA kernels on the CPU emulator ("emu", conftest), on CPU
# tensors: without a GPU (with one, the kernels themselves run as the "cuda" backend).
BN_OPS = BN_BACKENDS + ([] if HAS_CUDA else ["emu"])
EPS = 1e-5


def bn_ops(backend):
    if backend == "emu":
        load_emulator()
    return ops.bn_backend_ops(backend)


def make_inputs(spec: HeadSpec, B: int, dtype, affine=True, device=DEVICE):
    x = torch.randn(B, spec.D, dtype=torch.float64).to(device=device, dtype=dtype)
    ws, bs = random_params(spec, dtype, device)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    gammas = [(torch.rand(spec.H, dtype=torch.float64) + 0.5).to(device, acc)
              for _ in range(spec.n)] if affine else []
    betas = [(torch.randn(spec.H, dtype=torch.float64) * 0.2).to(device, acc)
             for _ in range(spec.n)] if affine else []
    return x, ws, bs, gammas, betas


def run_fused(backend, spec, x, ws, bs, gammas, betas, dropout, seed, grad_y, eps=EPS):
    """Forward and backward through the op's autograd: (y, hidden, z, stats, grads of x, ws,
    bs, gammas, betas)."""
    leaves = [t.detach().clone().requires_grad_() for t in (x, *ws, *bs, *gammas, *betas)]
    n1, nb = len(ws), len(gammas)
    xl, wl, bl = leaves[0], leaves[1:1 + n1], leaves[1 + n1:1 + 2 * n1]
    gl, el = leaves[1 + 2 * n1:1 + 2 * n1 + nb], leaves[1 + 2 * n1 + nb:]
    with poisoned_outputs():
        y, hidden, z, stats = bn_ops(backend)[0](xl, wl, bl, gl, el, seed, spec.num_splits,
                                                 dropout, eps, True)
        y.backward(grad_y)
    return y, hidden, z, stats, [t.grad for t in leaves]


def run_reference(spec, x, ws, bs, gammas, betas, dropout, seed, grad_y, dtype=torch.float64,
                  eps=EPS):
    """The reference at ``dtype`` on CPU: y, hidden, each (z_i, xhat_i) (with their
    gradients) and the gradients of every input."""
    leaves = [t.detach().cpu().to(dtype).requires_grad_() for t in (x, *ws, *bs, *gammas,
                                                                      *betas)]
    n1, nb = len(ws), len(gammas)
    gl, el = leaves[1 + 2 * n1:1 + 2 * n1 + nb], leaves[1 + 2 * n1 + nb:]
    zs = []

    def norm(i):
        def f(z):
            xhat = F.batch_norm(z, None, None, None, None, True, 0.0, eps)
            for t in (z, xhat):
                t.retain_grad()
            zs.append((z, xhat))
            return xhat * gl[i] + el[i] if nb else xhat
        return f
    y, hidden = reference_forward(spec, leaves[0], leaves[1:1 + n1], leaves[1 + n1:1 + 2 * n1],
                                  dropout, seed.cpu() if seed is not None else None,
                                  norms=[norm(i) for i in range(spec.n)], return_hidden=True)
    y.backward(grad_y.detach().cpu().to(dtype))
    return y, hidden, zs, [t.grad for t in leaves]


def check(name, out, ref, dtype, torch_err=0.0, floors=ERROR_FLOOR):
    bound = max(2 * torch_err, floors[dtype])
    err = rel_err(out, ref)
    assert err <= bound, f"{name}: relative error {err:.3g} > bound {bound:.3g}"


def grad_names(spec, affine=True):
    n = spec.n
    return (["x"] + [f"W{i}" for i in range(n + 1)] + [f"b{i}" for i in range(n + 1)]
            + ([f"gamma{i}" for i in range(n)] + [f"beta{i}" for i in range(n)]
               if affine else []))


# (B, D, H, n, S, C, eps): batches 2, 7, 37 (a partial second row tile), 64; H 8 and 10; n 1,
# 2, 4; S 1, 2; D odd (or an odd segment width).  With two rows the normalised values are
# +-1 / sqrt(1 + eps / var) whatever the input, so the gradients through the statistics are
# what eps leaves of them, a cancellation that amplifies rounding by ~var / eps in any
# implementation (torch's own fp32 error reaches 1e-4 at eps = 1e-5): B = 2 runs with a
# large eps, where they are well conditioned.
CASES = [(2, 37, 8, 1, 1, 5, 0.5), (7, 38, 10, 2, 2, 7, EPS), (64, 21, 8, 4, 1, 10, EPS),
         (37, 38, 10, 4, 2, 6, EPS)]
CASE_IDS = [f"B{B}-D{D}-H{H}-n{n}-S{S}-C{C}" for B, D, H, n, S, C, _ in CASES]


@pytest.mark.parametrize("backend", BN_OPS)
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_op_forward_stats_and_all_gradients_fp32(backend, case, dropout):
    B, D, H, n, S, C, eps = case
    spec = HeadSpec("spinal", D, H, n, C, S)
    x, ws, bs, gammas, betas = make_inputs(spec, B, torch.float32)
    seed = new_seed(DEVICE) if dropout else None
    gy = torch.randn(B, C, device=DEVICE)
    y, hidden, z, stats, grads = run_fused(backend, spec, x, ws, bs, gammas, betas, dropout,
                                           seed, gy, eps)
    y_ref, h_ref, zs, g_ref = run_reference(spec, x, ws, bs, gammas, betas, dropout, seed, gy,
                                            eps=eps)
    # the yardstick: torch's own error in fp32
    y_t, _, _, g_t = run_reference(spec, x, ws, bs, gammas, betas, dropout, seed, gy,
                                   dtype=torch.float32, eps=eps)
    f32 = torch.float32
    check("y", y, y_ref, f32, rel_err(y_t, y_ref))
    check("hidden", hidden, h_ref, f32)
    check("z", z, torch.cat([zi for zi, _ in zs], dim=1), f32)
    assert stats.shape == (n, 3, H) and stats.dtype == torch.float32
    for i, (zi, _) in enumerate(zs):
        var = zi.detach().var(dim=0, unbiased=False)
        check(f"mean{i}", stats[i, 0], zi.detach().mean(dim=0), f32)
        check(f"r{i}", stats[i, 1], (var + eps).rsqrt(), f32)
        check(f"unbiased var{i}", stats[i, 2], zi.detach().var(dim=0, unbiased=True), f32)
    for name, got, want, t in zip(grad_names(spec), grads, g_ref, g_t):
        if name in [f"b{i}" for i in range(n)]:
            continue  # the true gradient of a bias right before BatchNorm is zero: below
        check(f"grad {name}", got, want, f32, rel_err(t, want), GRAD_ERROR_FLOOR)
    for i, (zi, xhat) in enumerate(zs):
        # zero to rounding: db_i sums dz_i = r (dxhat - mean(dxhat) - xhat mean(dxhat xhat))
        # over the batch, whose terms cancel exactly; rounding leaves a fraction of r |dxhat|
        db = grads[1 + (n + 1) + i]  # after x and the n + 1 weights
        assert db.norm() <= 1e-5 * (stats[i, 1].cpu() * xhat.grad).norm(), f"grad b{i} = {db}"


@pytest.mark.parametrize("backend", BN_OPS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_op_half_precision(backend, dtype):
    B, D, H, n, S, C = 64, 38, 10, 4, 2, 6
    spec = HeadSpec("spinal", D, H, n, C, S)
    x, ws, bs, gammas, betas = make_inputs(spec, B, dtype)
    seed = new_seed(DEVICE)
    gy = torch.randn(B, C, device=DEVICE).to(dtype)
    y, hidden, z, stats, grads = run_fused(backend, spec, x, ws, bs, gammas, betas, 0.3, seed,
                                           gy)
    assert y.dtype == hidden.dtype == z.dtype == grads[0].dtype == dtype
    assert stats.dtype == grads[-1].dtype == torch.float32
    y_ref = run_reference(spec, x, ws, bs, gammas, betas, 0.3, seed, gy)[0]
    # the yardstick: the same formulas in torch at the inputs' precision
    y_t = run_reference(spec, x, ws, bs, gammas, betas, 0.3, seed, gy, dtype=dtype)[0]
    check("y", y, y_ref, dtype, rel_err(y_t, y_ref))
    check_half_grads(spec, (x, ws, bs, gammas, betas), hidden, seed, 0.3, gy, grads, dtype)


def check_half_grads(spec, inputs, hidden, seed, dropout, grad_y, grads, dtype):
    """Every gradient against the float64 reference teacher-forced to the fused forward's own
    activations (same ReLU masks), within the dtype's floor.

    Against the plain reference a half-precision gradient is dominated by units whose ReLU
    flips under rounding (with batch statistics, pre-activations cluster around zero): torch's
    own worst gradient error on this head ranged from 1e-3 to 0.12 (fp16) and from 7e-3 to
    0.22 (bf16) over 30 draws, which would leave no useful bound.  With the masks forced the
    remaining error is rounding only."""
    x, ws, bs, gammas, betas = ([t.detach().cpu().double() for t in ts] if isinstance(ts, list)
                                else ts.detach().cpu().double() for ts in inputs)
    gx, dws, dbs, dgs, dbts = ops.differentiable_bn_backward(
        grad_y.cpu().double(), x, ws, bs, gammas, betas, hidden.cpu().double(),
        seed.cpu() if seed is not None else None, spec.num_splits, dropout, EPS)
    want = [gx, *dws, *dbs, *dgs, *dbts]
    hidden_biases = [f"b{i}" for i in range(spec.n)]  # zero to rounding, checked in fp32
    for name, got, ref in zip(grad_names(spec), grads, want):
        if name not in hidden_biases:
            check(f"grad {name}", got, ref, dtype)  # the value floors: no flips left


@pytest.mark.parametrize("backend", BN_OPS)
def test_op_affine_false_and_deterministic(backend):
    B, D, H, n, S, C = 37, 21, 10, 2, 1, 5
    spec = HeadSpec("spinal", D, H, n, C, S)
    x, ws, bs, _, _ = make_inputs(spec, B, torch.float32, affine=False)
    seed = new_seed(DEVICE)
    gy = torch.randn(B, C, device=DEVICE)
    first = run_fused(backend, spec, x, ws, bs, [], [], 0.2, seed, gy)
    y_ref, _, _, g_ref = run_reference(spec, x, ws, bs, [], [], 0.2, seed, gy)
    check("y", first[0], y_ref, torch.float32)
    for name, got, want in zip(grad_names(spec, affine=False), first[4], g_ref):
        if name not in ("b0", "b1"):
            check(f"grad {name}", got, want, torch.float32, floors=GRAD_ERROR_FLOOR)
    second = run_fused(backend, spec, x, ws, bs, [], [], 0.2, seed, gy)
    for a, b in zip(first[4], second[4]):  # fixed-order reductions: bitwise the same
        assert torch.equal(a, b)


@pytest.mark.parametrize("backend", BN_OPS)
def test_op_gradcheck_float64(backend):
    spec = HeadSpec("spinal", 6, 4, 2, 3, 2)
    x, ws, bs, gammas, betas = make_inputs(spec, 5, torch.float64)
    seed = torch.tensor([987654321], dtype=torch.int64, device=DEVICE)
    fwd = bn_ops(backend)[0]

    def fn(x, *p):
        return fwd(x, list(p[:3]), list(p[3:6]), list(p[6:8]), list(p[8:]), seed, 2, 0.3, EPS,
                   True)[0]

    inputs = [t.requires_grad_() for t in (x, *ws, *bs, *gammas, *betas)]
    assert torch.autograd.gradcheck(fn, inputs, fast_mode=True)


@pytest.mark.parametrize("backend", BN_OPS)
def test_double_backward_matches_reference(backend):
    """create_graph=True through the BN op (a gradient penalty) gives torch's second
    derivatives (float64 reference), never silent zeros."""
    spec = HeadSpec("spinal", 6, 4, 3, 3, 2)
    x, ws, bs, gammas, betas = make_inputs(spec, 5, torch.float64)
    seed = torch.tensor([987654321], dtype=torch.int64, device=DEVICE)
    n1, n = len(ws), spec.n

    def fused(x, p):
        return bn_ops(backend)[0](x, p[:n1], p[n1:2 * n1], p[2 * n1:2 * n1 + n],
                                  p[2 * n1 + n:], seed, 2, 0.3, EPS, True)[0]

    def ref(x, p):
        norms = [(lambda z, i=i: F.batch_norm(z, None, None, p[2 * n1 + i], p[2 * n1 + n + i],
                                               True, 0.0, EPS)) for i in range(n)]
        return reference_forward(spec, x, p[:n1], p[n1:2 * n1], 0.3, seed.cpu(), norms=norms)

    def penalty_grads(forward):
        """d/d(every input) of |dL/dx|^2 + |dL/dW_out|^2 + |dL/dgamma_0|^2, L = sum(c * y)."""
        leaves = [t.detach().cpu().clone().requires_grad_()
                  if forward is ref else t.detach().clone().requires_grad_()
                  for t in (x, *ws, *bs, *gammas, *betas)]
        y = forward(leaves[0], leaves[1:])
        c = torch.linspace(-1, 1, y.numel(), dtype=y.dtype, device=y.device).view_as(y)
        firsts = torch.autograd.grad((c * y).sum(), [leaves[0], leaves[n1], leaves[1 + 2 * n1]],
                                     create_graph=True)
        penalty = sum(f.square().sum() for f in firsts)
        grads = torch.autograd.grad(penalty, leaves, allow_unused=True)
        return [torch.zeros_like(t) if g is None else g for g, t in zip(grads, leaves)]

    got, want = penalty_grads(fused), penalty_grads(ref)
    for name, a, b in zip(grad_names(spec), got, want):
        assert rel_err(a, b) < 1e-9 or (a - b.to(a.device)).abs().max() < 1e-12, \
            f"second derivative wrt {name}: {rel_err(a, b):.2e}"
    for name, w in zip(grad_names(spec), want):  # every W, gamma and beta: non-zero
        if name[0] in "Wgb" and not (name[0] == "b" and name[1:].isdigit()):
            assert w.abs().sum() > 0, name


@pytest.mark.parametrize("backend", BN_OPS)
def test_backward_op_is_not_differentiable_and_bad_batch(backend):
    spec = HeadSpec("spinal", 6, 4, 2, 3, 2)
    fwd, bwd = bn_ops(backend)
    x, ws, bs, gammas, betas = make_inputs(spec, 4, torch.float32)
    _, hidden, z, stats = fwd(x, ws, bs, gammas, betas, None, 2, 0.0, EPS, True)
    gy = torch.randn(4, 3, device=DEVICE, requires_grad=True)
    gx = bwd(gy, x, ws, gammas, hidden, z, stats, None, 2, 0.0)[0]
    with pytest.raises(RuntimeError, match="not differentiable"):
        gx.sum().backward()
    with pytest.raises(ValueError, match="more than 1 row"):
        fwd(x[:1], ws, bs, gammas, betas, None, 2, 0.0, EPS, False)


@pytest.mark.parametrize("backend", BN_OPS)
def test_opcheck(backend):
    spec = HeadSpec("spinal", 6, 4, 2, 3, 2)
    fwd, bwd = bn_ops(backend)
    x, ws, bs, gammas, betas = make_inputs(spec, 4, torch.float32)
    seed = torch.tensor([12345], dtype=torch.int64, device=DEVICE)
    leaves = [t.requires_grad_() for t in (x, *ws, *bs, *gammas, *betas)]
    args = (leaves[0], leaves[1:4], leaves[4:7], leaves[7:9], leaves[9:11], seed, 2, 0.25, EPS,
            True)
    torch.library.opcheck(fwd, args)
    with torch.no_grad():
        _, hidden, z, stats = fwd(*args)
    gy = torch.randn(4, 3, device=DEVICE)
    torch.library.opcheck(bwd, (gy, x.detach(), [w.detach() for w in ws],
                                [g.detach() for g in gammas], hidden, z, stats, seed, 2, 0.25))


def test_triton_launcher_passes_what_the_plan_describes(monkeypatch):
    """Every BN launch gets exactly its plan's runtime parameters, tensors of the plan's
    dtypes (eps aside: a run-time float), so bench/check_triton_kernels.py, which compiles
    from the plan, compiles what runs."""
    assert "triton" in BN_BACKENDS  # Triton runs everywhere the tests do (CPU: interpreter)
    from spinalkern import triton_head
    seen = []
    real = triton_head.run_launch

    def spy(launch, args):
        seen.append(launch.name)
        assert len(args) == len(launch.params)
        # the launcher's fast path appends the constexprs after the run-time arguments
        names = launch.kernel.arg_names
        assert tuple(names[:len(args)]) == launch.params
        assert set(names[len(args):]) == set(launch.constexprs)
        for name, a in zip(launch.params, args):
            want = launch.tensor_dtypes.get(name)
            if isinstance(want, tuple):
                assert tuple(t.dtype for t in a) == want, name
            elif want is not None:
                assert a.dtype == want, name
            elif name != "eps":
                assert a == launch.scalars[name], name
        return real(launch, args)

    monkeypatch.setattr(triton_head, "run_launch", spy)
    spec = HeadSpec("spinal", 6, 4, 2, 3, 2)
    x, ws, bs, gammas, betas = make_inputs(spec, 300, torch.float32)  # two wgrad slices
    seed = new_seed(DEVICE)
    run_fused("triton", spec, x, ws, bs, gammas, betas, 0.5, seed, torch.randn(300, 3))
    assert seen == ["linear0", "apply0", "linear1", "apply1", "linear_out",
                    "dgrad1", "dz1", "dgrad0", "dz0", "dx", "wgrad", "reduce"]


# -- the module -----------------------------------------------------------------------------------
def make_heads(backend, dropout=0.0, affine=True, momentum=0.1, track=True):
    """A fused SpinalHead and its float64 eager copy, with non-trivial gamma/beta."""
    torch.manual_seed(0)
    head = SpinalHead(38, 6, 10, 4, 2, dropout=dropout, batch_norm=True, backend=backend)
    for i, bn in enumerate(head.norms):
        head.norms[i] = torch.nn.BatchNorm1d(10, affine=affine, momentum=momentum,
                                             track_running_stats=track)
        if affine:
            with torch.no_grad():
                head.norms[i].weight.uniform_(0.5, 1.5)
                head.norms[i].bias.normal_(0.0, 0.2)
    ref = copy.deepcopy(head).double()
    ref.backend = "torch"
    return head.to(DEVICE), ref


def reference_step(ref, x, seed, dropout):
    """One call of the float64 eager copy with the fused call's dropout masks."""
    if dropout == 0.0 or not ref.training:
        return ref(x.cpu().double())
    ws, bs = ref._params()
    return reference_forward(ref.spec, x.cpu().double(), ws, bs, dropout, seed.cpu(),
                             norms=list(ref.norms))


def check_running_stats(head, ref):
    for i, (bn, bn_ref) in enumerate(zip(head.norms, ref.norms)):
        check(f"running_mean{i}", bn.running_mean, bn_ref.running_mean, torch.float32)
        check(f"running_var{i}", bn.running_var, bn_ref.running_var, torch.float32)
        assert bn.num_batches_tracked.item() == bn_ref.num_batches_tracked.item()


@pytest.mark.parametrize("backend", BN_BACKENDS)
@pytest.mark.parametrize("momentum,dropout", [(0.1, 0.0), (None, 0.3)])
def test_module_training_steps_and_running_stats(backend, momentum, dropout):
    head, ref = make_heads(backend, dropout, momentum=momentum)
    for step in range(3):
        x = torch.randn(37, 38, device=DEVICE)
        gy = torch.randn(37, 6, device=DEVICE)
        torch.manual_seed(100 + step)
        with poisoned_outputs():
            y = head(x)
            y.backward(gy)
        torch.manual_seed(100 + step)  # the seed the head drew for its dropout masks
        seed = new_seed(DEVICE) if dropout else None
        y_ref = reference_step(ref, x, seed, dropout)
        check("y", y, y_ref, torch.float32)
        y_ref.backward(gy.cpu().double())
        if step in (0, 2):  # after one and after three steps
            check_running_stats(head, ref)
    for (name, p), p_ref in zip(head.named_parameters(), ref.parameters()):
        if name.startswith("layers.") and name.endswith(".bias"):
            continue  # zero to rounding (test_op_...)
        check(f"grad {name}", p.grad, p_ref.grad, torch.float32, floors=GRAD_ERROR_FLOOR)


@pytest.mark.parametrize("backend", BN_BACKENDS)
def test_training_run_tracks_the_reference_with_the_same_masks(backend):
    """A training run (the VGG-5 head with BN and dropout 0.5, Adam, fresh batches) through
    the fused BN op follows the eager reference given the same dropout masks: the losses agree
    step after step and so do the parameters at the end (the hidden biases aside: their true
    gradient is zero, so Adam moves them by rounding noise, which BN removes).  Dropout masks
    of the eager "torch" backend come from torch's own RNG, so two runs on the two paths are
    different random runs; this pins the fused run to the reference step by step."""
    steps = 100 if backend == "cuda" and DEVICE == "cpu" else 6  # (Triton: its interpreter)
    torch.manual_seed(0)
    head = SpinalHead(64, 10, 32, 4, 2, dropout=0.5, batch_norm=True, backend=backend).to(DEVICE)
    ref = copy.deepcopy(head).cpu().double()
    opt = torch.optim.Adam(head.parameters(), 1e-3)
    opt_ref = torch.optim.Adam(ref.parameters(), 1e-3)
    w = torch.randn(64, 10)
    losses = []
    for k in range(steps):
        x = torch.randn(64, 64)
        target = (x @ w + 0.5 * torch.randn(64, 10)).argmax(1)
        torch.manual_seed(1000 + k)
        loss = F.cross_entropy(head(x.to(DEVICE)), target.to(DEVICE))
        opt.zero_grad()
        loss.backward()
        opt.step()
        torch.manual_seed(1000 + k)  # the seed the head drew for its dropout masks
        seed = new_seed(DEVICE).cpu()
        y_ref = reference_forward(ref.spec, x.double(), ref.weights(), ref.biases(), 0.5, seed,
                                  norms=list(ref.norms))
        loss_ref = F.cross_entropy(y_ref, target)
        opt_ref.zero_grad()
        loss_ref.backward()
        opt_ref.step()
        losses.append((loss.item(), loss_ref.item()))
    assert all(abs(a - b) <= 1e-2 * b for a, b in losses), losses
    if steps >= 100:
        assert losses[-1][1] < 0.9 * losses[0][1]  # it learned something
    for (name, p), p_ref in zip(head.named_parameters(), ref.parameters()):
        if not (name.startswith("layers.") and name.endswith(".bias")):
            assert rel_err(p, p_ref) < 1e-2, (name, rel_err(p, p_ref))
    for bn, bn_ref in zip(head.norms, ref.norms):
        assert rel_err(bn.running_var, bn_ref.running_var) < 1e-2


@pytest.mark.parametrize("backend", BN_BACKENDS)
def test_module_train_eval_switching_and_affine_false(backend):
    head, ref = make_heads(backend, affine=False)
    x = torch.randn(7, 38, device=DEVICE)
    for mode in ("train", "eval", "train", "eval"):
        head.train(mode == "train")
        ref.train(mode == "train")
        with torch.no_grad():
            check(f"y ({mode})", head(x), ref(x.cpu().double()), torch.float32)
    check_running_stats(head, ref)


@pytest.mark.parametrize("backend", BN_BACKENDS)
def test_module_without_running_stats_uses_batch_stats_in_eval(backend):
    head, ref = make_heads(backend, track=False)
    head.eval()
    ref.eval()
    x = torch.randn(7, 38, device=DEVICE)
    with Trace() as trace:
        y = head(x)
    check("y", y, ref(x.cpu().double()), torch.float32)
    assert f"spinalkern.{backend}_head_bn_forward.default" in trace.names


def test_module_batch_of_one_raises_like_batchnorm1d():
    with pytest.raises(ValueError) as expected:
        torch.nn.BatchNorm1d(10).train()(torch.randn(1, 10))
    for backend in ["torch", *BN_BACKENDS]:
        head, _ = make_heads(backend)
        with pytest.raises(ValueError) as got:
            head(torch.randn(1, 38, device=DEVICE))
        assert str(got.value) == str(expected.value)


class Trace(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(str(func))
        return func(*args, **(kwargs or {}))


FORBIDDEN = ("aten.cat", "aten.mm", "aten.addmm", "aten.batch_norm", "aten.native_batch_norm",
             "aten._native_batch_norm_legit", "aten.linear")


@pytest.mark.parametrize("backend", BN_BACKENDS)
def test_training_forward_runs_the_fused_op(backend):
    head, _ = make_heads(backend, dropout=0.5)
    x = torch.randn(7, 38, device=DEVICE)
    with Trace() as trace:
        head(x).sum().backward()
    assert f"spinalkern.{backend}_head_bn_forward.default" in trace.names
    assert f"spinalkern.{backend}_head_bn_backward.default" in trace.names
    bad = [n for n in trace.names if n.split(".")[0] + "." + n.split(".")[1] in FORBIDDEN]
    assert not bad, bad


@pytest.mark.parametrize("backend", BN_BACKENDS)
def test_module_autocast_keeps_bn_params_fp32(backend):
    head, ref = make_heads(backend)
    x = torch.randn(7, 38, device=DEVICE)
    dtype = torch.bfloat16
    with torch.autocast(DEVICE, dtype=dtype):
        y = head(x)
    assert y.dtype == dtype
    y.float().sum().backward()
    assert all(bn.weight.grad.dtype == torch.float32 for bn in head.norms)
    y_ref = ref(x.cpu().double())
    y_t = ref.to(dtype)(x.cpu().to(dtype))  # torch's own error at this precision
    check("y", y, y_ref, dtype, rel_err(y_t, y_ref))


# -- GPU only ------------------------------------------------------------------------------------
@requires_cuda
@pytest.mark.parametrize("backend", BN_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_gpu_real_sizes(backend, dtype):
    B, D, H, n, S, C = 1000, 256, 128, 4, 2, 62
    spec = HeadSpec("spinal", D, H, n, C, S)
    x, ws, bs, gammas, betas = make_inputs(spec, B, dtype)
    seed = new_seed(DEVICE)
    gy = torch.randn(B, C, device=DEVICE).to(dtype)
    y, hidden, _, _, grads = run_fused(backend, spec, x, ws, bs, gammas, betas, 0.5, seed, gy)
    y_ref, _, _, g_ref = run_reference(spec, x, ws, bs, gammas, betas, 0.5, seed, gy)
    y_t, _, _, g_t = run_reference(spec, x, ws, bs, gammas, betas, 0.5, seed, gy, dtype=dtype)
    check("y", y, y_ref, dtype, rel_err(y_t, y_ref))
    if dtype == torch.float32:
        for name, got, want, t in zip(grad_names(spec), grads, g_ref, g_t):
            if name not in [f"b{i}" for i in range(n)]:
                check(f"grad {name}", got, want, dtype, rel_err(t, want), GRAD_ERROR_FLOOR)
    else:
        check_half_grads(spec, (x, ws, bs, gammas, betas), hidden, seed, 0.5, gy, grads,
                         dtype)


@requires_cuda
@pytest.mark.parametrize("backend", BN_BACKENDS)
def test_gpu_cuda_graph_replay_advances_running_stats(backend):
    head, _ = make_heads(backend)
    x = torch.randn(256, 38, device=DEVICE)
    eager = copy.deepcopy(head)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):  # warm-up (compiles the kernels) on a side stream
        head(x)
    torch.cuda.current_stream().wait_stream(s)
    for bn in head.norms:
        bn.reset_running_stats()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = head(x)
    for bn in head.norms:  # capture ran nothing; count from zero
        bn.reset_running_stats()
    for bn in eager.norms:
        bn.reset_running_stats()
    for _ in range(3):
        graph.replay()
        eager(x)
    torch.cuda.synchronize()
    for bn, bn_e in zip(head.norms, eager.norms):
        assert bn.num_batches_tracked.item() == 3
        check("running_mean", bn.running_mean, bn_e.running_mean, torch.float32)
        check("running_var", bn.running_var, bn_e.running_var, torch.float32)
    assert torch.isfinite(y).all()


@pytest.mark.parametrize("backend", BN_BACKENDS)
def test_torch_compile_fullgraph_training_step(backend):
    torch._dynamo.reset()
    head, _ = make_heads(backend, momentum=None)
    eager = copy.deepcopy(head)
    compiled = torch.compile(head, fullgraph=True)
    for step in range(2):
        x = torch.randn(7, 38, device=DEVICE, requires_grad=True)
        x_e = x.detach().clone().requires_grad_()
        y, y_e = compiled(x), eager(x_e)
        y.square().sum().backward()
        y_e.square().sum().backward()
        check("y", y, y_e, torch.float32)
        check("grad x", x.grad, x_e.grad, torch.float32)
    for (name, p), p_e in zip(head.named_parameters(), eager.parameters()):
        if not (name.startswith("layers.") and name.endswith(".bias")):
            check(f"grad {name}", p.grad, p_e.grad, torch.float32)
    for bn, bn_e in zip(head.norms, eager.norms):
        assert bn.num_batches_tracked.item() == bn_e.num_batches_tracked.item() == 2
        check("running_mean", bn.running_mean, bn_e.running_mean, torch.float32)
        check("running_var", bn.running_var, bn_e.running_var, torch.float32)
