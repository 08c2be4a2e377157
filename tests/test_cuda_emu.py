"""The CUDA kernels, unchanged, on the CPU emulator (csrc/emu), against the float64 reference.

csrc/emu/emu_ops.cpp compiles the kernels and their host launch code (csrc/head_launch.h)
against csrc/emu/cuda_emu.h, which runs every CUDA thread as a coroutine with real barrier
semantics, models cp.async (data lands only at the issuing thread's wait; read before, it is
NaN), ldmatrix and mma.sync as warp collectives, and poisons shared memory.  The cases cover
every compiled kernel (dtype x row tile), both heads, dropout, ragged widths (the packing
path) and aligned ones, the interleaved spinal output and the plain output layer, several
output blocks, every shared-memory fallback (chosen through the launch planner), split batch
chunks of the weight gradients; plus injected faults (a cp.async wait one group too early, a
missing barrier) that the emulator must catch.  The same configurations run on the GPU when
one is present.  (The op contract itself -- the conformance suite of tests/test_heads.py --
runs on the emulated ops as the test backend "emu".)

Error bounds: max(2 x torch's own error at that precision, a per-dtype floor), as every
backend (spinalkern.testing); outputs and workspaces are NaN-poisoned before each run.
"""
from __future__ import annotations

import contextlib
import json
import os
import zlib

import pytest
import torch

from spinalkern.reference import reference_forward
from spinalkern.rng import keep_mask
from spinalkern.spec import HeadSpec
from spinalkern.testing import (ERROR_FLOOR, GRAD_ERROR_FLOOR, poisoned_outputs,
                                random_params, rel_err)

from conftest import HAS_CUDA, load_emulator

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="session")
def emu():
    """The CUDA kernels + host code compiled against the emulator (conftest.load_emulator)."""
    return load_emulator()


@contextlib.contextmanager
def knobs(env: dict):
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def plan(emu, spec, B, dtype, p, smem=232448):
    return json.loads(emu.launch_plan(spec.kind_code, B, spec.D, spec.H, spec.n, spec.C,
                                      spec.num_splits, dtype, p, 132, smem))


def smem_limit_for(emu, spec, B, dtype, p, kernel, **want):
    """The largest shared-memory budget (bytes, 256-byte steps) under which the planner picks
    the wanted residency flags for `kernel` ("forward" / "chain")."""
    for limit in range(232448, 8192, -256):
        try:
            got = plan(emu, spec, B, dtype, p, limit)[kernel]
        except (RuntimeError, ValueError):  # nothing fits any more
            break
        if all(got[k] == v for k, v in want.items()):
            return limit
    raise AssertionError(f"no shared-memory budget gives {want} for {spec}")


# (kind, B, D, H, n, C, S, dtype, dropout, knobs): every compiled kernel, both heads, every path.
# Knob "smem" entries are residency flags; the test turns them into SPINALKERN_CUDA_SMEM_LIMIT.
CASES = [
    # aligned widths (no packing), interleaved spinal output, 16-row tiles
    ("spinal", 37, 64, 16, 2, 10, 2, torch.float16, 0.0, {}),
    ("spinal", 70, 128, 64, 4, 62, 4, torch.bfloat16, 0.5, {}),
    ("progressive", 45, 48, 32, 2, 26, 1, torch.float32, 0.25, {}),
    # ragged widths (weights, x and hidden packed), 1000 classes, several output blocks
    ("spinal", 37, 74, 10, 3, 26, 2, torch.float32, 0.3, {}),
    ("spinal", 33, 111, 40, 2, 200, 1, torch.bfloat16, 0.3, {}),
    ("spinal", 20, 74, 72, 2, 1000, 2, torch.float16, 0.2, {}),
    ("spinal", 65, 74, 8, 6, 10, 2, torch.float64, 0.3, {}),
    ("progressive", 37, 37, 10, 2, 10, 1, torch.float64, 0.3, {}),
    ("progressive", 30, 40, 200, 2, 100, 1, torch.bfloat16, 0.4, {}),   # H over one 128 block
    ("progressive", 40, 37, 100, 2, 70, 1, torch.float32, 0.0, {}),     # fp32: 2 blocks of 64
    ("spinal", 1, 37, 10, 1, 10, 1, torch.float16, 0.0, {}),
    # larger row tiles (forward 64 / 128, chain 64), several CTAs, a partial last tile
    ("spinal", 150, 128, 64, 3, 26, 2, torch.bfloat16, 0.3,
     {"SPINALKERN_CUDA_TILE_M": "64", "SPINALKERN_CUDA_CHAIN_TILE_M": "64"}),
    ("spinal", 150, 64, 32, 3, 10, 2, torch.float16, 0.0, {"SPINALKERN_CUDA_TILE_M": "128"}),
    ("spinal", 130, 64, 48, 2, 100, 2, torch.bfloat16, 0.0, {"SPINALKERN_CUDA_TILE_M": "128"}),
    ("progressive", 80, 48, 32, 2, 10, 1, torch.float16, 0.2,
     {"SPINALKERN_CUDA_TILE_M": "64", "SPINALKERN_CUDA_CHAIN_TILE_M": "64"}),
    ("progressive", 100, 37, 48, 2, 10, 1, torch.float32, 0.0,
     {"SPINALKERN_CUDA_TILE_M": "64", "SPINALKERN_CUDA_CHAIN_TILE_M": "64"}),
    # shared-memory fallbacks: x read from global memory; h in a global scratch too;
    # chain without the hidden tile, with grad_x and then dh accumulators in global memory
    ("spinal", 70, 512, 16, 3, 26, 2, torch.float16, 0.0,
     {"smem": ("forward", dict(x_resident=False, h_resident=True))}),
    ("spinal", 37, 64, 64, 3, 100, 2, torch.bfloat16, 0.0,
     {"smem": ("forward", dict(x_resident=False, h_resident=False))}),
    ("progressive", 37, 37, 10, 3, 10, 1, torch.float32, 0.2,
     {"smem": ("forward", dict(x_resident=False, h_resident=False))}),
    ("spinal", 20, 2048, 64, 3, 26, 2, torch.float16, 0.3,
     {"smem": ("chain", dict(hidden_tile_smem=False, gx_smem=False, dh_smem=True))}),
    ("progressive", 16, 48, 384, 4, 10, 1, torch.float16, 0.0,
     {"smem": ("chain", dict(hidden_tile_smem=False, gx_smem=False, dh_smem=False))}),
    # weight gradients summed over several batch chunks
    ("spinal", 100, 74, 10, 2, 26, 2, torch.float32, 0.3, {"SPINALKERN_CUDA_DW_CHUNK_ROWS": "17"}),
    ("progressive", 90, 37, 64, 2, 10, 1, torch.bfloat16, 0.0, {"SPINALKERN_CUDA_DW_CHUNK_ROWS": "32"}),
]


def case_id(c):
    kind, B, D, H, n, C, S, dtype, p, env = c
    tag = ",".join(f"{k.replace('SPINALKERN_CUDA_', '')}={v}" for k, v in env.items()
                   if k != "smem")
    if "smem" in env:
        tag += f"smem:{env['smem'][0]}" + "".join(
            f"-{k.split('_')[0]}{int(v)}" for k, v in env["smem"][1].items())
    return f"{kind[:4]}-B{B}-D{D}-H{H}-n{n}-C{C}-S{S}-{str(dtype)[6:]}-p{p}" + (f"-{tag}" if tag else "")


def make_case(case):
    kind, B, D, H, n, C, S, dtype, p, _ = case
    spec = HeadSpec(kind, D, H, n, C, S)
    gen = torch.Generator().manual_seed(zlib.crc32(case_id(case).encode()))
    x = torch.randn(B, D, dtype=torch.float64, generator=gen).to(dtype)
    ws, bs = random_params(spec, dtype, "cpu", gen)
    gy = torch.randn(B, C, dtype=torch.float64, generator=gen).to(dtype)
    seed = torch.tensor([zlib.crc32(repr(case[:7]).encode())], dtype=torch.int64) if p else None
    return spec, x, ws, bs, gy, seed


def case_env(emu, case):
    kind, B, D, H, n, C, S, dtype, p, env = case
    env = dict(env)
    if "smem" in env:
        kernel, want = env.pop("smem")
        spec = HeadSpec(kind, D, H, n, C, S)
        env["SPINALKERN_CUDA_SMEM_LIMIT"] = str(smem_limit_for(emu, spec, B, dtype, p, kernel, **want))
    return env


def reference(spec, x, ws, bs, p, seed, gy, dtype):
    """(y, hidden, grads) in float64, and torch's own errors at the inputs' precision."""
    def run(cast):
        leaves = [cast(t).requires_grad_() for t in (x, *ws, *bs)]
        n1 = len(ws)
        y, h = reference_forward(spec, leaves[0], leaves[1:1 + n1], leaves[1 + n1:], p, seed,
                                 return_hidden=True)
        y.backward(cast(gy))
        return y.detach(), h.detach(), [t.grad for t in leaves]
    ref = run(lambda t: t.detach().double())
    own = run(lambda t: t.detach().clone())
    y_err = rel_err(own[0], ref[0])
    g_err = [rel_err(a, b) for a, b in zip(own[2], ref[2])]
    return ref, y_err, g_err


def flat(spec, grads):
    n1 = spec.n + 1
    return torch.cat([torch.cat([dw.reshape(-1), db.reshape(-1)])
                      for dw, db in zip(grads[1:1 + n1], grads[1 + n1:])])


def check_against_reference(fwd, bwd, case, device="cpu"):
    spec, x, ws, bs, gy, seed = make_case(case)
    dtype, p = case[7], case[8]
    dev = lambda t: t.to(device) if t is not None else None  # noqa: E731
    with poisoned_outputs():
        y, hidden = fwd(dev(x), [dev(w) for w in ws], [dev(b) for b in bs], dev(seed),
                        spec.kind_code, spec.num_splits, p, True)
        gx, gp = bwd(dev(gy), dev(x), [dev(w) for w in ws], hidden, dev(seed), spec.kind_code,
                     spec.num_splits, p)
    (y_ref, h_ref, g_ref), y_err, g_err = reference(spec, x, ws, bs, p, seed, gy, dtype)
    bound = max(2 * y_err, ERROR_FLOOR[dtype])
    for name, out, ref in (("y", y, y_ref), ("hidden", hidden, h_ref)):
        assert out.dtype == dtype and out.shape == ref.shape
        e = rel_err(out, ref)
        assert e <= bound, f"{name}: relative error {e:.3g} > {bound:.3g}"
    gbound = lambda i: max(2 * g_err[i], GRAD_ERROR_FLOOR[dtype])  # noqa: E731
    e = rel_err(gx, g_ref[0])
    assert e <= gbound(0), f"grad_x: relative error {e:.3g} > {gbound(0):.3g}"
    assert gp.shape == (spec.num_params(),) and gp.dtype == dtype
    n1 = spec.n + 1
    dws, dbs = [], []
    off = 0
    for N, K in spec.weight_shapes():
        dws.append(gp[off:off + N * K].view(N, K))
        dbs.append(gp[off + N * K:off + N * K + N])
        off += N * K + N
    for L in range(n1):  # every layer's dW and db separately
        for name, got, i in ((f"dW{L}", dws[L], 1 + L), (f"db{L}", dbs[L], 1 + n1 + L)):
            e = rel_err(got, g_ref[i])
            assert e <= gbound(i), f"{name}: relative error {e:.3g} > {gbound(i):.3g}"


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_emulated_kernels_match_reference(emu, case):
    with knobs(case_env(emu, case)):
        check_against_reference(emu.head_forward, emu.head_backward, case)


def test_cases_cover_every_compiled_kernel_and_path(emu):
    """The launch plans of CASES (with their knobs) reach every forward/chain kernel and
    every residency choice (a guard against the case list silently losing coverage)."""
    seen = set()
    for case in CASES:
        kind, B, D, H, n, C, S, dtype, p, _ = case
        spec = HeadSpec(kind, D, H, n, C, S)
        env = case_env(emu, case)
        limit = int(env.get("SPINALKERN_CUDA_SMEM_LIMIT", 232448))
        pl = plan(emu, spec, B, dtype, p, limit)
        f, c = pl["forward"], pl["chain"]
        fk = f["kernel"] if "SPINALKERN_CUDA_TILE_M" not in env else \
            f"head_forward_kernel<{f['kernel'].split('<')[1].split(',')[0]}, {env['SPINALKERN_CUDA_TILE_M']}>"
        ck = c["kernel"] if "SPINALKERN_CUDA_CHAIN_TILE_M" not in env else \
            f"head_backward_chain_kernel<{c['kernel'].split('<')[1].split(',')[0]}, {env['SPINALKERN_CUDA_CHAIN_TILE_M']}>"
        seen |= {fk, ck, ("x", f["x_resident"]), ("h", f["h_resident"]), ("u", f["u_buffer"]),
                 ("interleave", f["interleaved_output"]), ("ht", c["hidden_tile_smem"]),
                 ("gx", c["gx_smem"]), ("dh", c["dh_smem"])}
    for t in ("half", "bf16"):
        for bm in (16, 64, 128):
            assert f"head_forward_kernel<{t}, {bm}>" in seen
        for bm in (16, 64):
            assert f"head_backward_chain_kernel<{t}, {bm}>" in seen
    for bm in (16, 64):
        assert f"head_forward_kernel<float, {bm}>" in seen
        assert f"head_backward_chain_kernel<float, {bm}>" in seen
    assert "head_forward_kernel<double, 16>" in seen and "head_backward_chain_kernel<double, 16>" in seen
    for flag in ("x", "h", "u", "interleave", "ht", "gx", "dh"):
        assert (flag, True) in seen and (flag, False) in seen, flag


@pytest.mark.parametrize("fault", ["cp_async_wait_early", "skip_syncthreads"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_emulator_catches_pipeline_faults(emu, fault, dtype):
    """Reading a stage one cp.async group before it landed, or without the barrier after the
    wait, must give wrong results (NaN from the poisoned destination) in every kernel."""
    case = ("spinal", 37, 64, 32, 2, 10, 2, dtype, 0.0, {})
    spec, x, ws, bs, gy, seed = make_case(case)
    y, h = emu.head_forward(x, ws, bs, None, 0, 2, 0.0, True)
    good = emu.head_backward(gy, x, ws, h, None, 0, 2, 0.0)
    assert torch.isfinite(y).all() and torch.isfinite(good[1]).all()
    emu.set_fault(fault)
    try:
        yf, hf = emu.head_forward(x, ws, bs, None, 0, 2, 0.0, True)
        gxf, gpf = emu.head_backward(gy, x, ws, h, None, 0, 2, 0.0)
    finally:
        emu.set_fault("")
    assert yf.isnan().any(), "forward"
    assert gxf.isnan().any(), "chain (grad_x)"
    assert gpf.isnan().any(), "weight gradients"


def test_launch_plans_fit_and_follow_the_budget(emu):
    """The planner's layouts fit the budget it is given, fall back step by step as it
    shrinks, and reject (ValueError) what cannot fit."""
    spec = HeadSpec("spinal", 256, 128, 4, 10, 2)
    big = plan(emu, spec, 65536, torch.bfloat16, 0.0)
    assert big["forward"]["kernel"] == "head_forward_kernel<bf16, 128>"
    assert big["forward"]["x_resident"] and big["forward"]["interleaved_output"]
    assert not big["forward"]["u_buffer"]
    small = plan(emu, spec, 1024, torch.bfloat16, 0.5)
    assert small["forward"]["kernel"] == "head_forward_kernel<bf16, 16>"  # 64 CTAs, not 32
    assert small["forward"]["ctas"] == 64 and small["forward"]["u_buffer"]
    for limit in (232448, 150000, 100000):
        pl = plan(emu, spec, 1024, torch.bfloat16, 0.5, limit)
        for k in ("forward", "chain", "wgrad"):
            assert pl[k]["smem"]["total"] <= limit
    with pytest.raises(ValueError, match="too large"):
        plan(emu, spec, 1024, torch.bfloat16, 0.5, 20000)


def test_emulated_keep_mask_nan_and_empty_batch(emu):
    for seed in (0, 2**32 + 7, 0x2F00_1234_5678_9ABC):
        got = emu.keep_mask(torch.tensor([seed], dtype=torch.int64), 2, 33, 70, 0.35)
        assert torch.equal(got, keep_mask(seed, 2, 33, 70, 0.35))
    spec = HeadSpec("spinal", 64, 32, 2, 10, 2)
    x = torch.randn(37, 64).half()
    ws, bs = random_params(spec, torch.float16)
    x[4, 7] = float("nan")
    y, h = emu.head_forward(x, ws, bs, None, 0, 2, 0.0, True)
    y_ref, h_ref = reference_forward(spec, x.double(), [w.double() for w in ws],
                                     [b.double() for b in bs], 0.0, return_hidden=True)
    assert torch.equal(y.isnan(), y_ref.isnan()) and torch.equal(h.isnan(), h_ref.isnan())
    y, h = emu.head_forward(x[:0], ws, bs, None, 0, 2, 0.0, True)
    assert y.shape == (0, 10) and h.shape == (0, 64)


def test_emulated_inference_writes_only_y_and_gradients_are_reproducible(emu):
    spec = HeadSpec("spinal", 74, 64, 3, 26, 2)
    x = torch.randn(70, 74).bfloat16()
    ws, bs = random_params(spec, torch.bfloat16)
    seed = torch.tensor([1234], dtype=torch.int64)
    y0, h0 = emu.head_forward(x, ws, bs, seed, 0, 2, 0.3, False)
    assert h0.shape == (0,)
    y, h = emu.head_forward(x, ws, bs, seed, 0, 2, 0.3, True)
    assert torch.equal(y0, y)
    gy = torch.randn_like(y)
    a = emu.head_backward(gy, x, ws, h, seed, 0, 2, 0.3)
    b = emu.head_backward(gy, x, ws, h, seed, 0, 2, 0.3)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


# ---------------------------------------------------------------------------------------------
# the same configurations on the GPU
# ---------------------------------------------------------------------------------------------
def _gpu_ops():
    from spinalkern import cuda_backend
    return HAS_CUDA and cuda_backend.has_cuda_kernels()


@pytest.mark.skipif(not _gpu_ops(), reason="needs a CUDA GPU and spinalkern._C with its kernels")
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_gpu_kernels_match_reference_in_every_configuration(emu, case):
    with knobs(case_env(emu, case)):
        check_against_reference(torch.ops.spinalkern.cuda_head_forward,
                                torch.ops.spinalkern.cuda_head_backward, case, "cuda")
