"""The Triton kernels' own tests: every kernel variant against the float64 reference, the launch
plan shared by launcher and resource checker, 64-bit addressing, the backward op's checks and
the tuning table.  Without a GPU the kernels run in Triton's interpreter (tests/conftest.py)."""
from __future__ import annotations

import json
import mmap

import pytest
import torch

import spinalkern  # noqa: F401  (registers the ops)
from spinalkern import triton_head as th
from spinalkern import triton_plan as tp
from spinalkern.reference import reference_forward
from spinalkern.spec import HeadSpec
from spinalkern.testing import ERROR_FLOOR, GRAD_ERROR_FLOOR, random_params, rel_err

from conftest import HAS_CUDA, TRITON_DEVICE

DEV = TRITON_DEVICE
FWD = torch.ops.spinalkern.triton_head_forward
BWD = torch.ops.spinalkern.triton_head_backward


@pytest.fixture
def poisoned():
    """torch.empty returns NaN-filled memory: an output element a kernel does not write
    shows up as NaN in the comparison."""
    old_det = torch.are_deterministic_algorithms_enabled()
    old_fill = torch.utils.deterministic.fill_uninitialized_memory
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    yield
    torch.use_deterministic_algorithms(old_det)
    torch.utils.deterministic.fill_uninitialized_memory = old_fill


def _config(fwd_variant, bwd_variant):
    # one program per 128 rows (the interpreter's cost is per program), 32-wide chunks so
    # that every layer runs several chunks
    k = tp.KernelConfig(128, 32, 32, 4)
    return tp.HeadConfig(fwd_variant, bwd_variant, k, k, k)


def _check_against_reference(spec, B, dropout, dtype=torch.float32, save_hidden=True):
    x = torch.randn(B, spec.D, dtype=torch.float64).to(DEV, dtype)
    ws, bs = random_params(spec, dtype, DEV)
    seed = torch.randint(0, 2 ** 62, (1,), dtype=torch.int64, device=DEV) if dropout else None
    y, hidden = FWD(x, ws, bs, seed, spec.kind_code, spec.num_splits, dropout, save_hidden)
    leaves = [t.detach().double().cpu().requires_grad_() for t in (x, *ws, *bs)]
    n1 = spec.n + 1
    y_ref, h_ref = reference_forward(spec, leaves[0], leaves[1:1 + n1], leaves[1 + n1:],
                                     dropout, seed.cpu() if seed is not None else None,
                                     return_hidden=True)
    assert rel_err(y, y_ref) <= ERROR_FLOOR[dtype]
    if not save_hidden:
        assert hidden.shape == (0,)
        return
    assert rel_err(hidden, h_ref) <= ERROR_FLOOR[dtype]
    g = torch.randn(B, spec.C, dtype=torch.float64)
    y_ref.backward(g)
    grad_x, flat = BWD(g.to(DEV, dtype), x, ws, hidden, seed, spec.kind_code, spec.num_splits,
                       dropout)
    assert rel_err(grad_x, leaves[0].grad) <= GRAD_ERROR_FLOOR[dtype]
    off = 0
    for L, (N, K) in enumerate(spec.weight_shapes()):
        dw, db = flat[off:off + N * K].view(N, K), flat[off + N * K:off + N * K + N]
        off += N * K + N
        assert rel_err(dw, leaves[1 + L].grad) <= GRAD_ERROR_FLOOR[dtype], f"dW{L}"
        assert rel_err(db, leaves[1 + n1 + L].grad) <= GRAD_ERROR_FLOOR[dtype], f"db{L}"


# (kind, B, D, H, n, S, C): widths that are not multiples of the chunks; B spans two row
# tiles of 128 so that the weight gradients run two batch slices and their reduction
SPINAL = ("spinal", 150, 74, 40, 3, 2, 26)
PROGRESSIVE = ("progressive", 150, 37, 24, 3, 1, 10)
SPINAL_S3 = ("spinal", 33, 96, 16, 3, 3, 62)
VARIANTS = [("fused", "fused"), ("fused", "chunked"), ("chunked", "fused"),
            ("chunked", "chunked")]
CASES = ([(v, shape, 0.0) for v in VARIANTS for shape in (SPINAL, PROGRESSIVE, SPINAL_S3)]
         + [(v, shape, 0.3) for v in (VARIANTS[0], VARIANTS[3])
            for shape in (SPINAL, PROGRESSIVE)])


@pytest.mark.parametrize("variants,shape,dropout", CASES,
                         ids=[f"{'-'.join(v)}-{s[0][:4]}-S{s[5]}-p{p}" for v, s, p in CASES])
def test_every_variant_matches_reference(poisoned, variants, shape, dropout):
    kind, B, D, H, n, S, C = shape
    spec = HeadSpec(kind, D, H, n, C, S)
    with tp.override(spec, torch.float32, B, _config(*variants)):
        plan = tp.plan_for(spec, torch.float32, B, dropout, True, torch.device(DEV))
        assert (plan.config.fwd_variant, plan.config.bwd_variant) == variants
        _check_against_reference(spec, B, dropout)


@pytest.mark.parametrize("variant", ["fused", "chunked"])
def test_inference_forward_without_hidden(poisoned, variant):
    spec = HeadSpec("spinal", 64, 32, 3, 10, 2)
    with tp.override(spec, torch.float32, 50, _config(variant, variant)):
        _check_against_reference(spec, 50, 0.2, save_hidden=False)


def test_bf16_fused_kernels_round_like_the_gpu(poisoned):
    spec = HeadSpec("progressive", 48, 32, 2, 10)
    with tp.override(spec, torch.bfloat16, 40, _config("fused", "fused")):
        _check_against_reference(spec, 40, 0.0, torch.bfloat16)


def test_wide_head_takes_the_chunked_kernels():
    spec = HeadSpec("spinal", 64, 200, 2, 10, 2)
    assert not tp.fused_fits(spec)
    cfg = tp.default_config(spec, torch.bfloat16, 1024, interpreting=False)
    assert (cfg.fwd_variant, cfg.bwd_variant) == ("chunked", "chunked")
    with pytest.raises(ValueError, match="too wide"):
        tp.build_plan(spec, torch.float32, 8, 0.0, True, config=_config("fused", "fused"))


# ---------------------------------------------------------------------------------------------
# One launch plan for launcher and checker
# ---------------------------------------------------------------------------------------------
def test_launcher_passes_what_the_plan_describes(monkeypatch):
    """Every launch gets exactly the plan's runtime parameters, tensors of the plan's dtypes:
    so the resource checker, which compiles from the plan, compiles what runs."""
    seen = []
    real = th.run_launch

    def spy(launch, args):
        seen.append(launch.name)
        assert len(args) == len(launch.params)
        for name, a in zip(launch.params, args):
            want = launch.tensor_dtypes.get(name)
            if isinstance(want, tuple):
                assert tuple(t.dtype for t in a) == want, name
            elif want is not None:
                assert a.dtype == want, name
            else:
                assert a == launch.scalars[name], name
        return real(launch, args)

    monkeypatch.setattr(th, "run_launch", spy)
    spec = HeadSpec("spinal", 40, 16, 2, 10, 2)
    x = torch.randn(300, 40, device=DEV)  # two batch slices of the weight gradients
    ws, bs = random_params(spec, torch.float32, DEV)
    seed = torch.tensor([5], dtype=torch.int64, device=DEV)
    y, hidden = FWD(x, ws, bs, seed, 0, 2, 0.5, True)
    BWD(torch.randn_like(y), x, ws, hidden, seed, 0, 2, 0.5)
    assert seen == ["fwd", "bwd_chain", "wgrad", "reduce"]


def test_checker_builds_the_launchers_plan():
    from bench import check_triton_kernels as checker
    sc = dict(head="spinal-vgg", dtype="bf16", B=1024, dropout=0.5, save_hidden=True)
    plan, launches = checker.plan_launches(sc)
    mine = tp.build_plan(HeadSpec(*checker.HEADS["spinal-vgg"]), torch.bfloat16, 1024, 0.5,
                         True, sms=checker.SM90_SMS, interpreting=False)
    assert [(ln.kernel, ln.grid, ln.constexprs, ln.num_warps) for ln in launches] == \
        [(ln.kernel, ln.grid, ln.constexprs, ln.num_warps)
         for ln in (mine.fwd, mine.chain, mine.wgrad, mine.reduce) if ln is not None]
    args = checker.launch_args(launches[0], misaligned=("x_ptr",))
    assert args[0].data_ptr() % 16 == 2 and args[1].data_ptr() % 16 == 0


def test_plans_are_cached_per_call_shape():
    spec = HeadSpec("spinal", 40, 16, 2, 10, 2)
    dev = torch.device(DEV)
    a = tp.plan_for(spec, torch.float32, 37, 0.0, True, dev)
    assert tp.plan_for(spec, torch.float32, 37, 0.0, True, dev) is a
    assert tp.plan_for(spec, torch.float32, 38, 0.0, True, dev) is not a


# ---------------------------------------------------------------------------------------------
# 64-bit addressing
# ---------------------------------------------------------------------------------------------
if th.HAVE_TRITON:
    import triton
    import triton.language as tl

    from spinalkern.triton_kernels import _rows64

    @triton.jit
    def _probe_kernel(x_ptr, out_ptr, tile, D: tl.constexpr, BLOCK_M: tl.constexpr):
        """Loads the last 16 columns of one row tile of a (rows, D) matrix the way the head
        kernels address x, hidden and y."""
        rows, r64 = _rows64(tile, BLOCK_M)
        cols = D - 16 + tl.arange(0, 16)
        v = tl.load(x_ptr + r64[:, None] * D + cols[None, :])
        tl.store(out_ptr + tl.arange(0, BLOCK_M)[:, None] * 16 + tl.arange(0, 16)[None, :], v)


def test_row_offsets_past_2_31_elements():
    """A (rows, D) fp16 matrix of more than 2**31 elements: the last row tile is read where a
    32-bit rows * D would wrap.  On CPU (Triton's interpreter) the matrix lives in a sparse
    mapping, so only the pages touched take memory; on a GPU it is allocated (4.3 GB)."""
    D, BM = 4096, 16
    rows = 2 ** 31 // D + 2 * BM           # rows * D > 2**31
    tile = rows // BM - 1
    assert tile * BM * D >= 2 ** 31
    want = torch.randn(BM, 16).half()
    mm = None
    if HAS_CUDA:
        x = torch.empty(rows, D, dtype=torch.float16, device="cuda")
    else:
        mm = mmap.mmap(-1, rows * D * 2, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS
                       | getattr(mmap, "MAP_NORESERVE", 0))
        x = torch.frombuffer(mm, dtype=torch.float16).view(rows, D)
    try:
        x[tile * BM:(tile + 1) * BM, D - 16:] = want.to(x.device)
        out = torch.zeros(BM, 16, dtype=torch.float16, device=x.device)
        _probe_kernel[(1,)](x, out, tile, D=D, BLOCK_M=BM)
        assert torch.equal(out.cpu(), want)
    finally:
        del x
        if mm is not None:
            mm.close()


def test_kernels_scale_rows_only_in_64_bits():
    """Every row-scaled offset in the kernels uses the 64-bit rows (r64) of _rows64."""
    import inspect
    import re
    from spinalkern import triton_kernels
    src = inspect.getsource(triton_kernels)
    assert re.findall(r"\brows\[:, None\] \*", src) == []
    assert len(re.findall(r"\br64\[:, None\] \*", src)) >= 15


def test_weights_too_large_for_32_bit_offsets_are_refused():
    spec = HeadSpec("spinal", 2 ** 17, 2 ** 15, 2, 10, 1)  # W_0 has 2**32 elements
    with pytest.raises(ValueError, match="32-bit"):
        tp.build_plan(spec, torch.float16, 16, 0.0, True)


# ---------------------------------------------------------------------------------------------
# The backward op checks everything the forward checks
# ---------------------------------------------------------------------------------------------
def _backward_args():
    spec = HeadSpec("spinal", 20, 8, 2, 5, 2)
    x = torch.randn(3, 20, device=DEV)
    ws, bs = random_params(spec, torch.float32, DEV)
    seed = torch.tensor([3], dtype=torch.int64, device=DEV)
    y, hidden = FWD(x, ws, bs, seed, 0, 2, 0.5, True)
    return [torch.randn_like(y), x, ws, hidden, seed, 0, 2, 0.5]


@pytest.mark.parametrize("change,error,match", [
    (lambda a: a.__setitem__(3, a[3].double()), TypeError, "hidden has dtype"),
    (lambda a: a.__setitem__(2, [a[2][0].double()] + a[2][1:]), TypeError, r"weights\[0\]"),
    (lambda a: a.__setitem__(2, [a[2][0][0, 0]] + a[2][1:]), ValueError, r"weights\[0\]"),
    (lambda a: a.__setitem__(4, None), ValueError, "seed is required"),
    (lambda a: a.__setitem__(4, a[4].int()), ValueError, "int64"),
    (lambda a: a.__setitem__(3, a[3][:, :5]), ValueError, "hidden has shape"),
    (lambda a: a.__setitem__(0, a[0][:, :3]), ValueError, "grad_y has shape"),
    (lambda a: a.__setitem__(0, a[0].long()), TypeError, "grad_y"),
    (lambda a: a.__setitem__(3, a[3].to("meta")), ValueError, "hidden is on meta"),
    (lambda a: a.__setitem__(7, 1.0), ValueError, "dropout"),
    (lambda a: a.__setitem__(6, 3), ValueError, "num_splits"),
], ids=["hidden-dtype", "weight-dtype", "0-d-weight", "no-seed", "int32-seed", "hidden-shape",
        "grad_y-shape", "grad_y-int", "meta-hidden", "dropout", "splits"])
def test_backward_rejects_what_forward_rejects(change, error, match):
    args = _backward_args()
    change(args)
    with pytest.raises(error, match=match):
        th.head_backward(*args)


def test_forward_rejects_0d_weight():
    args = _backward_args()
    x, ws = args[1], args[2]
    bs = [w[:, 0].clone() for w in ws]
    with pytest.raises(ValueError, match=r"weights\[1\] must be 2-D"):
        th.head_forward(x, [ws[0], ws[1][0, 0]] + ws[2:], bs, None, 0, 2, 0.0, True)


def test_non_contiguous_arguments_are_copied(poisoned):
    spec = HeadSpec("progressive", 24, 16, 2, 6)
    base = torch.randn(24, 30, device=DEV)
    x = base.t()[:20]                                  # (20, 24), column-major
    ws, bs = random_params(spec, torch.float32, DEV)
    wt = [w.t().contiguous().t() for w in ws]          # same values, transposed strides
    y, hidden = FWD(x, wt, bs, None, 1, 1, 0.0, True)
    y2, hidden2 = FWD(x.contiguous(), ws, bs, None, 1, 1, 0.0, True)
    assert torch.equal(y, y2) and torch.equal(hidden, hidden2)
    g = torch.randn(6, 20, device=DEV).t()
    a = BWD(g, x, wt, hidden.t().contiguous().t(), None, 1, 1, 0.0)
    b = BWD(g.contiguous(), x.contiguous(), ws, hidden, None, 1, 1, 0.0)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


# ---------------------------------------------------------------------------------------------
# Tuning table
# ---------------------------------------------------------------------------------------------
def test_table_entry_is_used_and_missing_entries_fall_back(tmp_path):
    spec = HeadSpec("spinal", 256, 128, 4, 62, 2)
    cfg = tp.HeadConfig("fused", "chunked", tp.KernelConfig(32, 64, 64, 8, 3),
                        tp.KernelConfig(16, 32, 32, 4), tp.KernelConfig(64, 64, 64, 8),
                        persistent=True)
    table = {"gpus": {"NVIDIA H200": {tp.head_key(spec): {"bf16": {
        "1024": {"config": cfg.to_json(), "time_us": 1.0}}}}}}
    path = tmp_path / "table.json"
    path.write_text(json.dumps(table))
    loaded = tp.load_table(str(path))
    assert tp.table_config("NVIDIA H200", spec, torch.bfloat16, 600, loaded) == cfg
    assert tp.table_config("NVIDIA H200", spec, torch.bfloat16, 5000, loaded) is None
    assert tp.table_config("NVIDIA H100", spec, torch.bfloat16, 600, loaded) is None
    assert tp.table_config("NVIDIA H200", spec, torch.float16, 600, loaded) is None
    wide = HeadSpec("spinal", 256, 512, 4, 62, 2)
    bad = {"gpus": {"G": {tp.head_key(wide): {"bf16": {"1024": {"config": cfg.to_json()}}}}}}
    with pytest.raises(ValueError, match="too wide"):
        tp.table_config("G", wide, torch.bfloat16, 1024, bad)


def test_shipped_table_is_well_formed():
    table = tp.load_table(str(tp.TABLE_PATH))
    for gpu, heads in table.get("gpus", {}).items():
        for key, by_dtype in heads.items():
            for dt, by_bucket in by_dtype.items():
                assert dt in tp.DTYPE_NAMES.values()
                for bucket, entry in by_bucket.items():
                    assert int(bucket) == tp.batch_bucket(int(bucket))
                    tp.HeadConfig.from_json(entry["config"])


def test_batch_buckets():
    assert [tp.batch_bucket(b) for b in (1, 16, 17, 1000, 1024, 1025, 10 ** 6)] == \
        [16, 16, 32, 1024, 1024, 2048, 65536]


# ---------------------------------------------------------------------------------------------
# The direct launch path (GPU only at run time; its bookkeeping is checked here with stand-ins)
# ---------------------------------------------------------------------------------------------
class _FakeCompiled:
    def __init__(self):
        self.calls = []
        self.function, self.packed_metadata = "fn-handle", "meta"

    @property
    def run(self):
        return lambda *a: self.calls.append(a)

    def launch_metadata(self, grid, stream, *args):
        return ("metadata of", grid, stream, len(args))


class _FakeKernel:
    arg_names = ["a_ptr", "ws", "B", "X", "Y"]

    def __init__(self):
        self.binder_calls, self.compiled = [], _FakeCompiled()

    def __getitem__(self, grid):
        def launch(*args, **kw):
            self.binder_calls.append((grid, args, kw))
            return self.compiled
        return launch


class _CudaLike:
    """Stands in for a CUDA tensor: the launcher reads its device and data pointer."""

    def __init__(self, ptr):
        self.device, self._ptr = torch.device("cuda", 0), ptr

    def data_ptr(self):
        return self._ptr


def test_direct_launch_after_the_first_and_binder_for_misaligned(monkeypatch):
    class _Stream:
        cuda_stream = 1234
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: _Stream())
    kernel = _FakeKernel()
    launch = tp.Launch("k", kernel, (3, 2, 1), ("a_ptr", "ws", "B"), {}, {}, {"X": 7, "Y": "ieee"},
                       num_warps=8, num_stages=3)
    a, w = _CudaLike(4096), (_CudaLike(8192), _CudaLike(16384))
    th.run_launch(launch, (a, w, 5))             # first: Triton's launcher (compiles)
    assert kernel.binder_calls == [((3, 2, 1), (a, w, 5),
                                    {"X": 7, "Y": "ieee", "num_warps": 8, "num_stages": 3})]
    th.run_launch(launch, (a, w, 6))             # then: the compiled kernel directly
    [call] = kernel.compiled.calls
    from triton import knobs
    assert call[:9] == (3, 2, 1, 1234, "fn-handle", "meta", ("metadata of", (3, 2, 1), 1234, 5),
                        knobs.runtime.launch_enter_hook, knobs.runtime.launch_exit_hook)
    assert call[9:] == (a, w, 6, 7, "ieee")      # runtime args, then constexprs in order
    odd = _CudaLike(4098)                        # not 16-byte aligned: Triton's launcher again
    th.run_launch(launch, (odd, w, 5))
    assert len(kernel.binder_calls) == 2 and len(kernel.compiled.calls) == 1
