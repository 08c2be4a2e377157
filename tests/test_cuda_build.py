"""What only the CUDA C++ extension (``spinalkern._C``) has: its keep-mask op, the pairwise
sums of its C++ CPU ops, its autograd in C++, the hint when it is not built.

Everything the ops promise (the reference at every size and dtype, NaN, determinism, opcheck,
gradcheck, compile, strides, bad arguments, modules, GPU sizes, autocast, CUDA graphs) is
tested once for every backend in tests/test_heads.py; the CUDA kernels on the CPU emulator in
tests/test_cuda_emu.py; the binaries' SASS in tests/test_cuda_sass.py.
"""
from __future__ import annotations

import os
import sys

import numpy as np
import pytest
import torch

from spinalkern import cuda_backend
from spinalkern.reference import reference_forward
from spinalkern.rng import keep_mask
from spinalkern.spec import HeadSpec
from spinalkern.testing import rel_err

HAVE_EXT = cuda_backend.available()
HAVE_GPU = HAVE_EXT and cuda_backend.has_cuda_kernels() and torch.cuda.is_available()
needs_ext = pytest.mark.skipif(
    not HAVE_EXT, reason="spinalkern._C is not built: " + cuda_backend.build_hint())
needs_gpu = pytest.mark.skipif(
    not HAVE_GPU, reason="needs a CUDA GPU and spinalkern._C built with its CUDA kernels")


def seed_tensor(device, value):
    return torch.tensor([value], dtype=torch.int64, device=device)


@needs_ext
@pytest.mark.parametrize("stream", [0, 3])
@pytest.mark.parametrize("p", [0.1, 0.5, 0.999])
def test_cpu_keep_mask_is_rng_keep_mask(stream, p):
    for seed in (0, 1, 2**32 - 1, 2**32, 0x2F00_1234_5678_9ABC):
        got = torch.ops.spinalkern.cuda_keep_mask(seed_tensor("cpu", seed), stream, 41, 300, p)
        assert torch.equal(got, keep_mask(seed, stream, 41, 300, p))


@needs_ext
def test_keep_mask_op_compiles():
    f = torch.compile(lambda s: torch.ops.spinalkern.cuda_keep_mask(s, 1, 5, 7, 0.5),
                      fullgraph=True, backend="aot_eager")
    assert torch.equal(f(seed_tensor("cpu", 11)), keep_mask(11, 1, 5, 7, 0.5))


@needs_gpu
def test_gpu_keep_mask_is_rng_keep_mask():
    for seed in (0, 2**32 + 7, 0x2F00_1234_5678_9ABC):
        got = torch.ops.spinalkern.cuda_keep_mask(seed_tensor("cuda", seed), 5, 1000, 777, 0.3)
        assert torch.equal(got.cpu(), keep_mask(seed, 5, 1000, 777, 0.3))


@needs_ext
def test_cpu_op_sums_pairwise():
    """Long sums (a dot product over D, the batch sum of dW/db, the sum over a layer's outputs
    in grad_x) of equal terms 0.1: sequential fp32 summation is off by 6e-4 at 2^16 terms; the
    C++ CPU op's pairwise sums stay at rounding level (float64 reference)."""
    N = 2 ** 16
    terms = np.full(N, 0.1, dtype=np.float32)
    sequential = float(np.cumsum(terms, dtype=np.float32)[-1])
    assert abs(sequential - N * float(terms[0])) / (N * float(terms[0])) > 1e-4
    fwd, bwd = torch.ops.spinalkern.cuda_head_forward, torch.ops.spinalkern.cuda_head_backward

    def check(B, D, H, x, w0, w1, gy):
        spec = HeadSpec("spinal", D, H, 1, 1, 1)
        ws = [torch.full((H, D), w0), torch.full((1, H), w1)]
        bs = [torch.zeros(H), torch.zeros(1)]
        xs = torch.full((B, D), x)
        g = torch.full((B, 1), gy)
        y, h = fwd(xs, ws, bs, None, 0, 1, 0.0, True)
        gx, gp = bwd(g, xs, ws, h, None, 0, 1, 0.0)
        leaves = [t.double().requires_grad_() for t in (xs, *ws, *bs)]
        y_ref, h_ref = reference_forward(spec, leaves[0], leaves[1:3], leaves[3:],
                                         return_hidden=True)
        grads = torch.autograd.grad(y_ref, leaves, g.double())
        gp_ref = torch.cat([grads[1].flatten(), grads[3], grads[2].flatten(), grads[4]])
        for name, got, want in (("y", y, y_ref), ("hidden", h, h_ref), ("grad_x", gx, grads[0]),
                                ("grad_params", gp, gp_ref)):
            assert rel_err(got, want) < 1e-6, (name, B, D, H, rel_err(got, want))

    check(B=1, D=N, H=1, x=1.0, w0=0.1, w1=1.0, gy=1.0)   # forward: dot product over D
    check(B=N, D=1, H=1, x=1.0, w0=1.0, w1=1.0, gy=0.1)   # dW, db: sums over the batch
    check(B=1, D=1, H=N, x=1.0, w0=1.0, w1=0.1, gy=1.0)   # y over H; grad_x over H outputs


@needs_ext
def test_cpu_autograd_runs_in_cpp_and_hands_out_views():
    """Backward of the cuda ops runs in the C++ autograd engine (no Python function of
    spinalkern is called) and every weight/bias gradient is a view of one flat buffer."""
    from spinalkern.testing import random_params
    spec = HeadSpec("spinal", 20, 8, 3, 6, 2)
    ws, bs = random_params(spec)
    x = torch.randn(5, 20)
    leaves = [t.requires_grad_() for t in (x, *ws, *bs)]
    y, _ = torch.ops.spinalkern.cuda_head_forward(x, ws, bs, seed_tensor("cpu", 1234), 0, 2,
                                                  0.2, True)
    assert y.grad_fn.name() == "SpinalkernHeadBackward"
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


def _bn_call(spec, x, ws, bs):
    gammas = [torch.rand(spec.H, requires_grad=True) + 0.5 for _ in range(spec.n)]
    betas = [torch.randn(spec.H, requires_grad=True) for _ in range(spec.n)]
    return torch.ops.spinalkern.cuda_head_bn_forward(x, ws, bs, gammas, betas, None,
                                                     spec.num_splits, 0.0, 1e-5, False)[0]


def _plain_call(spec, x, ws, bs):
    return torch.ops.spinalkern.cuda_head_forward(x, ws, bs, None, 0, spec.num_splits, 0.0,
                                                  True)[0]


@needs_ext
@pytest.mark.parametrize("call", [_plain_call, _bn_call], ids=["plain", "bn"])
def test_cpu_autograd_node_keeps_autograds_rules(call):
    """The C++ gradient nodes are plain autograd Nodes: autograd's own errors for a second
    backward without retain_graph and for a saved input modified in place, retain_graph
    works, and forward-mode AD (which they do not implement) raises instead of dropping the
    tangent."""
    from spinalkern.testing import random_params
    spec = HeadSpec("spinal", 20, 8, 3, 6, 2)
    ws, bs = random_params(spec)
    ws = [w.requires_grad_() for w in ws]
    x = torch.randn(5, 20)

    y = call(spec, x, ws, bs)
    assert y.grad_fn.name() in ("SpinalkernHeadBackward", "SpinalkernBnHeadBackward")
    y.sum().backward(retain_graph=True)
    first = [w.grad.clone() for w in ws]
    y.sum().backward()                      # retained: runs again, same gradients added
    for w, g in zip(ws, first):
        torch.testing.assert_close(w.grad, 2 * g)
    with pytest.raises(RuntimeError, match="backward through the graph a second time"):
        y.sum().backward()

    y = call(spec, x, ws, bs)
    with torch.no_grad():
        ws[0].add_(1.0)                     # a saved input changes before backward
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.sum().backward()

    import torch.autograd.forward_ad as fwAD
    with fwAD.dual_level():
        dual = fwAD.make_dual(x, torch.randn_like(x))
        with pytest.raises(RuntimeError, match="no forward-mode AD formula"):
            call(spec, dual, ws, bs)


@needs_ext
def test_compiled_autograd_says_it_cannot_trace_the_node():
    """Compiled autograd cannot trace the C++ gradient node: it must raise, not train on
    wrong gradients (docs/cuda.md says so and what to use instead)."""
    from torch._dynamo import compiled_autograd

    from spinalkern import SpinalHead
    head = SpinalHead(20, 6, 8, 3, 2, backend="cuda")
    with pytest.raises(NotImplementedError, match="SpinalkernHeadBackward"):
        with compiled_autograd._enable(lambda gm: gm):
            head(torch.randn(4, 20)).sum().backward()


@needs_ext
def test_fast_forward_entry_is_the_op():
    """spinalkern._C.head_forward (the modules' eager entry) returns the op's y bit for bit,
    raises the op's errors, and hands Tensor subclasses and TorchFunctionModes back
    (NotImplemented) to torch.ops, which the module then calls."""
    from torch.overrides import TorchFunctionMode

    from spinalkern import SpinalHead, _C
    from spinalkern.testing import random_params
    spec = HeadSpec("spinal", 20, 8, 3, 6, 2)
    ws, bs = random_params(spec)
    x = torch.randn(5, 20)
    op = torch.ops.spinalkern.cuda_head_forward.default
    for p, seed in ((0.0, None), (0.3, seed_tensor("cpu", 77))):
        want = op(x, ws, bs, seed, 0, 2, p, False)[0]
        assert torch.equal(_C.head_forward(x, ws, bs, seed, 0, 2, p, False), want)
    bad = [ws[0], ws[1][:, :-1], *ws[2:]]
    for call in (op, _C.head_forward):
        with pytest.raises(ValueError, match=r"weights\[1\] has shape"):
            call(x, bad, bs, None, 0, 2, 0.0, False)

    class Sub(torch.Tensor):
        pass

    assert _C.head_forward(x.as_subclass(Sub), ws, bs, None, 0, 2, 0.0, False) \
        is NotImplemented
    seen = []

    class Spy(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            seen.append(str(func))
            return func(*args, **(kwargs or {}))

    head = SpinalHead(20, 6, 8, 3, 2, backend="cuda")
    with torch.no_grad():
        y = head(x)
        with Spy():
            assert _C.head_forward(x, ws, bs, None, 0, 2, 0.0, False) is NotImplemented
            y_mode = head(x)
    assert "spinalkern.cuda_head_forward.default" in seen
    assert torch.equal(y, y_mode)


def test_import_and_hint_without_extension():
    # importing never fails; the hint names the build commands and the knobs
    hint = cuda_backend.build_hint()
    assert "setup.py build_ext --inplace" in hint and "--no-build-isolation" in hint
    assert "TORCH_CUDA_ARCH_LIST" in hint
    assert isinstance(cuda_backend.available(), bool)
    assert cuda_backend.available() or cuda_backend.forward_op is None
