"""Kernel microbenchmark of the spinalkern heads: speed, correctness, roofline and memory.

    python -m bench.heads                          # full sweep on a GPU
    python -m bench.heads --quick --json F.json    # bf16, B in {128, 1024, 65536}
    python -m bench.heads --smoke --out DIR        # a few tiny sizes; runs on CPU (CI)

One JSON file (``--json PATH``, or ``DIR/heads-<UTC time>.json`` with ``--out DIR``) holds
environment facts, the device peaks (measured in the same run, or read from ``--peaks``, the
file of ``python -m bench.machine``) and one row per (head, backend variant, pass, batch,
dtype).  It is rewritten atomically after every cell, so a run cut short keeps every number
measured so far.

What is measured (see docs/benchmarks.md for the why):

* Heads: the papers' configurations (``HEADS``), each a ``spinalkern.spec.HeadSpec`` plus
  the module options that change what runs (BatchNorm, dropout, train mode).  The Spinal
  VGG-5 head with BatchNorm and dropout 0.5 in training mode is measured forward+backward at
  training batches (128-1024).
* Variants: ``torch`` (eager reference), ``torch+graph`` (the same eager code captured once and
  replayed as a CUDA graph), ``torch+compile`` (``torch.compile(mode="max-autotune")`` of the
  eager module, compiled and timed in a subprocess under a hard timeout: a compile that
  overruns is recorded as "compile timed out"), ``triton`` and ``cuda`` (the fused kernels),
  and ``triton+graph`` / ``cuda+graph``.  A backend missing here is listed under ``skipped``
  with the reason.  ``path`` says what actually ran: ``fused`` when a spinalkern op ran,
  ``eager`` when a fused backend fell back to the eager reference (training-mode BatchNorm
  on a backend without a BatchNorm op).
* Order: the goal cells first (bf16; B = 128 and 1024 forward+backward, B = 65,536 forward),
  then their torch.compile rows, then the other cells, so that a time budget (``--budget-s``)
  cuts the least useful ones.
* Timing: each timed call runs the variant once on each of ``rotate`` different input buffers
  (fresh ``randn`` data; together more than twice the L2 cache where that needs at most 256
  buffers) so that the inputs do not sit in L2; ``median_ms`` is the median per-buffer time.
  GPU: CUDA events after warm-up.  CPU: time.perf_counter.
* Correctness: buffer 0's output (and for ``fwd+bwd`` dx and every parameter's gradient) is
  compared with the float64 reference (spinalkern's eager reference in float64) with
  ``spinalkern.testing.rel_err``; a tensor passes within max(2 x eager torch's own error at
  that dtype, the per-dtype floor of ``spinalkern.testing``), the project's rule.  Heads with
  dropout are checked on a call with dropout off (``checked``).
* Roofline: FLOPs and minimum bytes of the config, the floor max(flops / matmul rate,
  bytes / copy bandwidth); ``roofline_fraction`` = floor / median (1.0 = at the floor).
* Memory (plain variants): ``peak_mem_bytes`` (GPU) = max_memory_allocated during one call
  minus what was allocated before it, and for ``fwd+bwd`` the ``saved_bytes`` that autograd
  keeps for backward (saved_tensors_hooks; inputs and parameters excluded).
"""
from __future__ import annotations

import argparse
import gc
import math
import os
import signal
import subprocess
import sys
import tempfile
import time
import zlib
from dataclasses import dataclass

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from spinalkern.spec import HeadSpec
from spinalkern.testing import ERROR_FLOOR, GRAD_ERROR_FLOOR, random_params, rel_err

from . import benchlib as common
from .machine import DTYPES, measure_peaks


# --------------------------------------------------------------------------------------------
# What to sweep
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class BenchHead:
    """A named head to benchmark: the specification plus the module options that change
    which code runs (BatchNorm, dropout, training mode)."""
    name: str
    spec: HeadSpec
    batch_norm: bool = False
    dropout: float = 0.0
    training: bool = False   # train mode: BatchNorm normalises with the batch's statistics

    @property
    def passes(self) -> tuple[str, ...]:
        return ("fwd+bwd",) if self.training else tuple(PASSES)

    def batches(self, batches: list[int]) -> list[int]:
        """Training-mode heads run at training batches only (128-1024; the smallest else)."""
        if not self.training:
            return batches
        inside = [b for b in batches if TRAIN_BATCHES[0] <= b <= TRAIN_BATCHES[1]]
        return inside or [min(batches)]

    def describe(self) -> dict:
        s = self.spec
        return {"name": self.name, "kind": s.kind, "D": s.D, "H": s.H, "n": s.n, "C": s.C,
                "S": s.num_splits, "batch_norm": self.batch_norm, "dropout": self.dropout,
                "training": self.training}


VGG5 = HeadSpec("spinal", 256, 128, 4, 62, 2)
HEADS = [
    BenchHead("spinal_vgg5", VGG5),
    BenchHead("spinal_vgg5_bn_train", VGG5, batch_norm=True, dropout=0.5, training=True),
    BenchHead("spinal_resnet18_s2", HeadSpec("spinal", 512, 128, 4, 26, 2)),
    BenchHead("spinal_resnet18_s4", HeadSpec("spinal", 512, 128, 4, 26, 4)),
    BenchHead("progressive_vgg5", HeadSpec("progressive", 256, 128, 4, 62)),
    BenchHead("wide_spinal", HeadSpec("spinal", 2048, 512, 4, 100, 2)),
    BenchHead("wide_progressive", HeadSpec("progressive", 2048, 512, 4, 100)),
]
HEAD_NAMES = [h.name for h in HEADS]
BATCHES = [64, 128, 256, 1024, 4096, 16384, 65536]
PASSES = ["fwd", "fwd+bwd"]
VARIANTS = ["torch", "torch+graph", "torch+compile", "triton", "triton+graph", "cuda", "cuda+graph"]
TRAIN_BATCHES = (128, 1024)   # the goals' training batches (inclusive)
INFER_BATCH = 65536           # the goals' inference batch
GOAL_DTYPE = "bf16"

QUICK = dict(batches=[128, 1024, 65536], dtypes=["bf16"])
SMOKE = dict(batches=[8, 64], dtypes=["fp32", "bf16"])
MAX_ROTATE = 256


def head_by_name(name: str) -> BenchHead:
    for h in HEADS:
        if h.name == name:
            return h
    raise ValueError(f"unknown head {name!r}; choose from {HEAD_NAMES}")


def is_goal_cell(head: BenchHead, batch: int, dtype_name: str, pass_: str) -> bool:
    """The cells the project's speed goals are read from."""
    if dtype_name != GOAL_DTYPE:
        return False
    if pass_ == "fwd+bwd":
        return batch in TRAIN_BATCHES
    return batch == INFER_BATCH and not head.training


def bench_module(head: BenchHead, backend: str, dropout: float | None = None) -> torch.nn.Module:
    """The spinalkern module of ``head`` on ``backend``, in ``head``'s training mode."""
    from spinalkern import ProgressiveHead, SpinalHead
    s = head.spec
    p = head.dropout if dropout is None else dropout
    if s.kind == "spinal":
        m = SpinalHead(s.D, s.C, hidden_features=s.H, num_layers=s.n, num_splits=s.num_splits,
                       dropout=p, batch_norm=head.batch_norm, backend=backend)
    else:
        m = ProgressiveHead(s.D, s.C, hidden_features=s.H, num_layers=s.n, dropout=p,
                            backend=backend)
    return m.train(head.training)


def to_dtype(module: torch.nn.Module, device, dtype) -> torch.nn.Module:
    """The head in ``dtype``; BatchNorm parameters and statistics stay float32 (as under
    autocast) unless the head is float64."""
    module = module.to(device=device, dtype=dtype)
    if getattr(module, "norms", None) is not None and dtype != torch.float64:
        module.norms.float()
    return module


# --------------------------------------------------------------------------------------------
# FLOPs and minimum bytes
# --------------------------------------------------------------------------------------------
def head_counts(spec, batch: int, pass_: str, elem_bytes: int) -> tuple[int, int]:
    """(FLOPs, minimum DRAM bytes) of one call.

    Forward: 2*B*N*K per layer.  Backward adds dX and dW products: twice the forward.
    Bytes: read x and all weights/biases, write y; fwd+bwd also reads dy and writes dx and
    every weight/bias gradient.  Hidden activations are not counted (a fused kernel keeps
    them on chip), so this is a floor.  BatchNorm's elementwise work is not counted.
    """
    shapes = spec.weight_shapes()
    fwd_flops = sum(2 * batch * N * K for N, K in shapes)
    params = sum(N * K + N for N, K in shapes)
    x, y = batch * spec.D, batch * spec.C
    if pass_ == "fwd":
        return fwd_flops, elem_bytes * (x + params + y)
    return 3 * fwd_flops, elem_bytes * (x + params + y + y + x + params)


# --------------------------------------------------------------------------------------------
# One call of a variant, the float64 reference and the error bounds
# --------------------------------------------------------------------------------------------
def make_step(module, params, pass_: str):
    """step(x, dy) -> tuple of outputs: (y,) or (y, dx, d(param) for each param)."""
    if pass_ == "fwd":
        def step(x, dy):
            with torch.no_grad():
                return (module(x),)
    else:
        def step(x, dy):
            y = module(x)
            return (y, *torch.autograd.grad(y, [x, *params], dy))
    return step


def reference_outputs(head: BenchHead, state: dict, x, dy, pass_: str):
    """Float64 ground truth for buffer 0, in make_step's order: spinalkern's eager reference
    (``backend="torch"``, i.e. spinalkern.reference) on float64 copies of the head's state and
    inputs as the variants see them, with dropout off (the fused kernels' masks differ from
    torch's)."""
    ref = bench_module(head, "torch", dropout=0.0)
    ref.load_state_dict(state)
    ref = ref.to(device=x.device, dtype=torch.float64)
    x64 = x.detach().double().requires_grad_(pass_ != "fwd")
    dy64 = dy.double() if dy is not None else None
    with torch.enable_grad():
        outs = make_step(ref, list(ref.parameters()), pass_)(x64, dy64)
    return tuple(o.detach() for o in outs)


def error_bounds(torch_errs, dtype) -> list[float]:
    """The project's rule: max(2 x eager torch's own error at this dtype, the floor)."""
    return [max(2.0 * e, (ERROR_FLOOR if i == 0 else GRAD_ERROR_FLOOR)[dtype])
            for i, e in enumerate(torch_errs)]


def errors(outs, refs) -> list[float]:
    """``spinalkern.testing.rel_err`` of each output (NaN anywhere gives inf).

    A reference that is zero to rounding (the exact gradient of a bias right before
    training-mode BatchNorm is zero) has no meaningful relative error; it is measured as
    ||out - ref|| over the largest reference norm of the call instead."""
    norms = [r.detach().double().norm().item() for r in refs]
    scale = max(norms)
    errs = []
    for o, r, n in zip(outs, refs, norms, strict=True):
        e = rel_err(o, r)
        if math.isfinite(e) and n <= 1e-6 * scale:
            e = (o.detach().double() - r.to(o.device).double()).norm().item() / scale
        errs.append(e)
    return errs


def max_rel_err(outs, refs) -> float:
    return max(errors(outs, refs))


class OpRecorder(TorchDispatchMode):
    """Records the names of the ops that run below autograd (aten::..., spinalkern::...)."""

    def __init__(self):
        super().__init__()
        self.ops: set[str] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.add(func.name())
        return func(*args, **(kwargs or {}))


def path_taken(step, x, dy) -> str:
    """"fused" when a spinalkern op ran in one call of ``step``, else "eager"."""
    with OpRecorder() as rec:
        step(x, dy)
    return "fused" if any(op.startswith("spinalkern::") for op in rec.ops) else "eager"


class Runner:
    """Runs a variant over all rotation buffers; ``outputs0`` are buffer 0's results."""

    def __init__(self, step, xs, dys, graph: bool, compiled: bool, device):
        self.step, self.xs, self.dys, self.device = step, xs, dys, device
        self.compiled = compiled
        self.graph = None
        if graph:
            self._capture()
        else:
            self.outputs0 = self._call(xs[0], dys[0], keep=True)
            common.synchronize(device)

    def _call(self, x, dy, keep=False):
        if self.compiled and torch.device(self.device).type == "cuda":
            # max-autotune replays its own CUDA graphs: mark each call a new step, and copy
            # the results we keep (buffer 0's, once), because the next replay overwrites them.
            torch.compiler.cudagraph_mark_step_begin()
            out = self.step(x, dy)
            return tuple(t.clone() for t in out) if keep else out
        return self.step(x, dy)

    def _capture(self):
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up outside capture, as the CUDA-graph docs ask
            for _ in range(2):
                self.step(self.xs[0], self.dys[0])
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.outputs0 = self.step(self.xs[0], self.dys[0])
            for x, dy in zip(self.xs[1:], self.dys[1:]):
                self.step(x, dy)
        self.graph.replay()
        torch.cuda.synchronize()

    def run_all(self):
        if self.graph is not None:
            self.graph.replay()
            return
        for x, dy in zip(self.xs, self.dys):
            self._call(x, dy)


def saved_for_backward_bytes(module, x, exclude) -> int:
    """Bytes of the distinct storages autograd saves for backward (inputs/params excluded)."""
    storages = {}

    def pack(t):
        try:
            s = t.untyped_storage()
            storages[s.data_ptr()] = s.nbytes()
        except (RuntimeError, NotImplementedError):
            pass
        return t

    with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = module(x)
    skip = {t.untyped_storage().data_ptr() for t in exclude}
    del y
    return sum(n for ptr, n in storages.items() if ptr not in skip)


def peak_memory_bytes(step, x, dy, device) -> int:
    """Peak allocated bytes of one call above what is allocated before it."""
    gc.collect()
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    outs = step(x, dy)
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) - before
    del outs
    return int(peak)


# --------------------------------------------------------------------------------------------
# Cells
# --------------------------------------------------------------------------------------------
def available_variants(device) -> tuple[list[str], list[dict]]:
    """Variants that can run on ``device`` and the reasons for the ones that cannot."""
    import spinalkern
    dev = torch.device(device)
    try:
        backends = spinalkern.available_backends(dev)
    except Exception as e:  # noqa: BLE001 - report, run the reference only
        backends = ["torch"]
        print(f"[heads] available_backends failed: {e}", file=sys.stderr)
    if dev.type == "cpu" and os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
        backends = [b for b in backends if b != "triton"]
    variants, skipped = [], []
    for v in VARIANTS:
        base = v.split("+")[0]
        if base not in backends:
            why = "not available on this device"
            if base == "cuda":
                why = "CUDA extension not built or has no kernels for this device " \
                      "(python setup.py build_ext --inplace)"
            elif base == "triton" and dev.type == "cpu":
                why = "Triton runs on CPU only in its interpreter (set TRITON_INTERPRET=1)"
            skipped.append({"backend": v, "reason": why})
        elif v.endswith("+graph") and dev.type != "cuda":
            skipped.append({"backend": v, "reason": "CUDA graphs need a GPU"})
        else:
            variants.append(v)
    return variants, skipped


def rotation_count(per_call_bytes: int, device, smoke: bool) -> int:
    if torch.device(device).type != "cuda":
        return 1  # no L2 to defeat worth the time on CPU
    if smoke:
        return 2
    l2 = getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 50 << 20)
    return int(min(MAX_ROTATE, max(2, math.ceil(2 * l2 / max(per_call_bytes, 1)))))


def cell_seed(head: BenchHead, batch: int, dtype_name: str, pass_: str) -> int:
    """Same data for the same cell in every process (the compile subprocess rebuilds it)."""
    return zlib.crc32(f"{head.name} {batch} {dtype_name} {pass_}".encode())


def cell_row(head, batch, dtype_name, pass_, device, peaks, smoke) -> dict:
    """The fields every row of a cell shares (computed without allocating the cell)."""
    spec = head.spec
    elem = torch.empty((), dtype=DTYPES[dtype_name]).element_size()
    bwd = pass_ == "fwd+bwd"
    k = rotation_count(elem * batch * (spec.D + (spec.C if bwd else 0)), device, smoke)
    flops, nbytes = head_counts(spec, batch, pass_, elem)
    floor_s = None if peaks is None else max(flops / peaks["matmul_flops_per_s"][dtype_name],
                                             nbytes / peaks["copy_bytes_per_s"])
    d = head.describe()
    return {"head": head.name, "kind": d["kind"], "D": d["D"], "H": d["H"], "n": d["n"],
            "C": d["C"], "S": d["S"], "batch_norm": head.batch_norm, "dropout": head.dropout,
            "training": head.training, "pass": pass_, "batch": batch, "dtype": dtype_name,
            "goal_cell": is_goal_cell(head, batch, dtype_name, pass_), "rotate": k,
            "flops": flops, "min_bytes": nbytes,
            "roofline_floor_ms": None if floor_s is None else floor_s * 1e3}


class Cell:
    """The data of one (head, batch, dtype, pass): weights, inputs, float64 reference and
    eager torch's own errors at this dtype (for the error bounds).  ``peaks`` (of
    measure_peaks) gives the roofline floor; None leaves it out."""

    def __init__(self, head, batch, dtype_name, pass_, device, peaks=None, smoke=False):
        self.head, self.batch, self.dtype_name, self.pass_ = head, batch, dtype_name, pass_
        self.device, self.dtype = torch.device(device), DTYPES[dtype_name]
        self.base_row = cell_row(head, batch, dtype_name, pass_, device, peaks, smoke)
        k, bwd, spec = self.base_row["rotate"], pass_ == "fwd+bwd", head.spec
        seed = cell_seed(head, batch, dtype_name, pass_)
        torch.manual_seed(seed)
        gen = torch.Generator().manual_seed(seed)
        ws, bs = random_params(spec, torch.float64, "cpu", generator=gen)
        self.state = bench_module(head, "torch").state_dict()
        for L in range(spec.n + 1):
            key = f"layers.{L}" if L < spec.n else "out"
            self.state[f"{key}.weight"], self.state[f"{key}.bias"] = ws[L], bs[L]
        self.xs = [torch.randn(batch, spec.D, device=device, dtype=self.dtype,
                               requires_grad=bwd) for _ in range(k)]
        self.dys = [torch.randn(batch, spec.C, device=device, dtype=self.dtype) if bwd else None
                    for _ in range(k)]
        # The reference (on the parameters and inputs as rounded to this dtype) and eager
        # torch's own error, with dropout off (masks differ).
        eager = self.module("torch", dropout=0.0)
        self.refs = reference_outputs(head, eager.state_dict(), self.xs[0], self.dys[0], pass_)
        outs = make_step(eager, list(eager.parameters()), pass_)(self.xs[0], self.dys[0])
        self.torch_errs = errors(outs, self.refs)
        self.bounds = error_bounds(self.torch_errs, self.dtype)

    def module(self, backend: str, dropout: float | None = None):
        m = bench_module(self.head, backend, dropout)
        m.load_state_dict(self.state)
        return to_dtype(m, self.device, self.dtype)

    def check(self, outs) -> dict:
        errs = errors(outs, self.refs)
        ratio = max(e / b for e, b in zip(errs, self.bounds))
        return {"rel_err_out": errs[0], "max_rel_err": max(errs), "error_vs_bound": ratio,
                "correct": all(e <= b for e, b in zip(errs, self.bounds))}


def run_variant(cell: Cell, variant: str, opts, paths: dict) -> dict:
    """One row: build, (compile / capture), check against the reference, time."""
    base, _, mode = variant.partition("+")
    gpu = cell.device.type == "cuda"
    row = dict(cell.base_row, backend=variant, base_backend=base, graph=mode == "graph",
               compiled=mode == "compile", median_ms=None, max_rel_err=None)
    module = runner = None
    try:
        module = cell.module(base)
        params = list(module.parameters())
        target = module
        if mode == "compile":
            target = torch.compile(module, mode=opts.compile_mode, dynamic=False)
        step = make_step(target, params, cell.pass_)
        if mode == "compile":
            row["path"] = "inductor"
        else:  # which code ran: the same for the plain call and its CUDA graph
            if base not in paths:
                paths[base] = path_taken(step, cell.xs[0], cell.dys[0])
            row["path"] = paths[base]
        t0 = time.perf_counter()
        runner = Runner(step, cell.xs, cell.dys, graph=mode == "graph",
                        compiled=mode == "compile", device=cell.device)
        if mode == "compile":
            row["compile_s"] = round(time.perf_counter() - t0, 2)
        if cell.head.dropout == 0.0:
            row.update(cell.check(runner.outputs0))
            row["checked"] = "this variant, buffer 0"
        else:  # dropout draws masks the reference cannot know: check a dropout-off call
            plain = cell.module(base, dropout=0.0)
            outs = make_step(plain, list(plain.parameters()), cell.pass_)(cell.xs[0],
                                                                          cell.dys[0])
            row.update(cell.check(outs))
            row["checked"] = f"plain {base} call with dropout off"
        if not gpu and base == "triton":  # the interpreter: one timed call is plenty
            times = common.time_fn(runner.run_all, cell.device, target_ms=0, min_reps=1,
                                   warmup=0)
        else:
            times = common.time_fn(runner.run_all, cell.device, target_ms=opts.target_ms,
                                   min_reps=opts.min_reps, warmup=1)
        k = len(cell.xs)
        per = sorted(t / k for t in times)
        row.update(median_ms=common.median(per), min_ms=per[0],
                   p80_ms=per[min(len(per) - 1, int(0.8 * len(per)))], reps=len(per))
        if row["roofline_floor_ms"] is not None:
            row["roofline_fraction"] = row["roofline_floor_ms"] / row["median_ms"]
        row["tflops"] = row["flops"] / (row["median_ms"] * 1e-3) / 1e12
        row["gbytes_per_s"] = row["min_bytes"] / (row["median_ms"] * 1e-3) / 1e9
        if mode == "":
            if cell.pass_ == "fwd+bwd":
                row["saved_bytes"] = saved_for_backward_bytes(module, cell.xs[0],
                                                              [cell.xs[0], *params])
            if gpu:
                row["peak_mem_bytes"] = peak_memory_bytes(step, cell.xs[0], cell.dys[0],
                                                          cell.device)
    except Exception as e:  # noqa: BLE001 - one failing variant must not end the sweep
        row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
    finally:
        del runner, module
        if gpu:
            torch.cuda.synchronize(cell.device)
    return row


def add_speedups(rows):
    """speedup_vs_<baseline> = baseline median / this median, within one cell."""
    times = {r["backend"]: r["median_ms"] for r in rows if r.get("median_ms")}
    for r in rows:
        for base in ("torch", "torch+graph", "torch+compile"):
            key = "speedup_vs_" + base.replace("+", "_")
            r.pop(key, None)
            if r.get("median_ms") and base in times:
                r[key] = times[base] / r["median_ms"]
    eager = next((r for r in rows if r["backend"] == "torch"), None)
    if eager and eager.get("peak_mem_bytes"):
        for r in rows:
            if r.get("peak_mem_bytes") is not None:
                r["peak_mem_vs_torch"] = r["peak_mem_bytes"] / eager["peak_mem_bytes"]


# --------------------------------------------------------------------------------------------
# torch.compile in a subprocess under a hard timeout
# --------------------------------------------------------------------------------------------
def compile_in_subprocess(key, opts, peaks, timeout_s: float) -> dict:
    """The torch+compile row of cell ``key``, compiled and timed in a child process that is
    killed (with its compile workers) after ``timeout_s``."""
    head, batch, dtype_name, pass_ = key
    with tempfile.TemporaryDirectory(prefix="spinalkern-compile-") as tmp:
        peaks_path, row_path = os.path.join(tmp, "peaks.json"), os.path.join(tmp, "row.json")
        common.write_json(peaks_path, peaks)
        cmd = [sys.executable, "-m", "bench.heads", "--compile-cell", head.name, str(batch),
               dtype_name, pass_, "--peaks", peaks_path, "--cell-json", row_path,
               "--device", str(opts.device), "--compile-mode", opts.compile_mode,
               "--target-ms", str(opts.target_ms), "--min-reps", str(opts.min_reps)]
        if opts.smoke:
            cmd.append("--smoke")
        env = dict(os.environ)
        if torch.device(opts.device).type == "cpu":
            env.setdefault("TORCHINDUCTOR_COMPILE_THREADS", "1")
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=common.REPO_ROOT, env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, start_new_session=True)
        try:
            log, _ = proc.communicate(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # the child and its compile workers
            proc.communicate()
            row = cell_row(head, batch, dtype_name, pass_, opts.device, peaks, opts.smoke)
            return dict(row, backend="torch+compile", base_backend="torch", graph=False,
                        compiled=True, median_ms=None, max_rel_err=None, path="inductor",
                        compile_timed_out=True,
                        error=f"compile timed out after {timeout_s:.0f} s")
        wall = round(time.perf_counter() - t0, 1)
        if proc.returncode == 0 and os.path.exists(row_path):
            row = common.read_json(row_path)
            row["subprocess_s"] = wall
            return row
        row = cell_row(head, batch, dtype_name, pass_, opts.device, peaks, opts.smoke)
        tail = " | ".join(log.strip().splitlines()[-3:])[-300:]
        return dict(row, backend="torch+compile", base_backend="torch", graph=False,
                    compiled=True, median_ms=None, max_rel_err=None, path="inductor",
                    error=f"compile subprocess exit {proc.returncode}: {tail}")


def compile_child(opts) -> None:
    """--compile-cell: build one cell, run only torch+compile, write the row."""
    name, batch, dtype_name, pass_ = opts.compile_cell
    head, batch = head_by_name(name), int(batch)
    peaks = common.read_json(opts.peaks)
    if opts.device.type == "cuda":
        torch.cuda.set_device(opts.device)
    cell = Cell(head, batch, dtype_name, pass_, opts.device, peaks, opts.smoke)
    row = run_variant(cell, "torch+compile", opts, {})
    common.write_json(opts.cell_json, row)


# --------------------------------------------------------------------------------------------
# The sweep
# --------------------------------------------------------------------------------------------
def plan(heads, opts, variants) -> list[tuple[str, tuple, list[str]]]:
    """Tasks in run order: ("cell", key, variants) and ("compile", key, ["torch+compile"]).

    Goal cells first (without compile), then the goal cells' compile rows, then the other
    cells with their compile rows."""
    dtype_order = [d for d in ("bf16", "fp16", "fp32") if d in opts.dtypes]
    keys = [(h, b, d, p) for d in dtype_order for h in heads for b in h.batches(opts.batches)
            for p in h.passes if p in opts.passes]
    plain = [v for v in variants if v != "torch+compile"]
    with_compile = "torch+compile" in variants
    goal = [k for k in keys if is_goal_cell(*k)]
    rest = [k for k in keys if not is_goal_cell(*k)]
    tasks = [("cell", k, plain) for k in goal]
    if with_compile:
        # the training-batch cells matter most (the compile goal is read there)
        tasks += [("compile", k, ["torch+compile"])
                  for k in sorted(goal, key=lambda k: k[3] != "fwd+bwd") if compile_wanted(k, opts)]
    for k in rest:
        tasks.append(("cell", k, plain))
        if with_compile and compile_wanted(k, opts):
            tasks.append(("compile", k, ["torch+compile"]))
    return tasks


def compile_wanted(key, opts) -> bool:
    head, batch, dtype_name, pass_ = key
    if dtype_name not in opts.compile_dtypes:
        return False
    if opts.smoke:  # one small forward cell exercises the code path (compiling is slow on CPU)
        return head.name == HEADS[0].name and batch == min(opts.batches) and pass_ == "fwd"
    return batch in opts.compile_batches or is_goal_cell(*key)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=common.RESULTS_DIR,
                   help="folder for heads-<UTC time>.json (default results/bench)")
    p.add_argument("--json", default=None, help="write exactly this file instead")
    p.add_argument("--smoke", action="store_true", help="tiny sizes, CPU friendly (CI)")
    p.add_argument("--quick", action="store_true", help="bf16 only, B in {128, 1024, 65536}")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda if present)")
    p.add_argument("--heads", "--configs", dest="heads", nargs="*", default=None,
                   choices=HEAD_NAMES)
    p.add_argument("--batches", nargs="*", type=int, default=None)
    p.add_argument("--dtypes", nargs="*", default=None, choices=list(DTYPES))
    p.add_argument("--passes", nargs="*", default=PASSES, choices=PASSES)
    p.add_argument("--variants", nargs="*", default=None, choices=VARIANTS)
    p.add_argument("--peaks", default=None,
                   help="machine.json of `python -m bench.machine` (else measured here)")
    p.add_argument("--target-ms", type=float, default=None,
                   help="measured time per variant and cell (default 15 GPU, 2 smoke)")
    p.add_argument("--min-reps", type=int, default=None)
    p.add_argument("--no-compile", action="store_true", help="leave out torch+compile")
    p.add_argument("--compile-mode", default="max-autotune")
    p.add_argument("--compile-dtypes", nargs="*", default=None, choices=list(DTYPES),
                   help="dtypes that get a torch+compile row (default bf16; smoke fp32)")
    p.add_argument("--compile-batches", nargs="*", type=int, default=[128, 1024],
                   help="batches that get a torch+compile row besides the goal cells")
    p.add_argument("--compile-timeout-s", type=float, default=180.0,
                   help="hard limit of one compile (+ its timing), in a subprocess")
    p.add_argument("--compile-budget-s", type=float, default=600.0,
                   help="start no compile once compiling took this long in total")
    p.add_argument("--budget-s", type=float, default=None,
                   help="start no new cell after this many seconds (the rest is skipped)")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--compile-cell", nargs=4, metavar=("HEAD", "B", "DTYPE", "PASS"),
                   default=None, help=argparse.SUPPRESS)
    p.add_argument("--cell-json", default=None, help=argparse.SUPPRESS)
    opts = p.parse_args(argv)
    opts.device = torch.device(opts.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    preset = SMOKE if opts.smoke else QUICK if opts.quick else {}
    opts.batches = opts.batches or preset.get("batches", BATCHES)
    opts.dtypes = opts.dtypes or preset.get("dtypes", list(DTYPES))
    opts.compile_dtypes = opts.compile_dtypes or (["fp32"] if opts.smoke else ["bf16"])
    gpu = opts.device.type == "cuda"
    opts.target_ms = opts.target_ms or (15.0 if gpu and not opts.smoke else 2.0)
    opts.min_reps = opts.min_reps or (5 if gpu and not opts.smoke else 2)
    return opts


def main(argv=None) -> str | None:
    opts = parse_args(argv)
    if opts.compile_cell:
        compile_child(opts)
        return None
    started = time.perf_counter()
    device = opts.device
    if device.type == "cuda":
        torch.cuda.set_device(device)
    heads = [h for h in HEADS if opts.heads is None or h.name in opts.heads]
    variants, skipped = available_variants(device)
    if opts.variants:
        variants = [v for v in variants if v in opts.variants]
    if opts.no_compile:
        variants = [v for v in variants if v != "torch+compile"]
    mode = "smoke" if opts.smoke else "quick" if opts.quick else "full"
    path = opts.json or os.path.join(opts.out, f"heads-{common.file_stamp()}.json")
    print(f"[heads] {mode} sweep on {device}: variants {variants}; "
          f"skipped {[s['backend'] for s in skipped]} -> {path}", flush=True)
    if opts.peaks:
        peaks = common.read_json(opts.peaks)["peaks"]
        missing = [d for d in opts.dtypes if d not in peaks["matmul_flops_per_s"]]
        if missing:
            peaks["matmul_flops_per_s"].update(
                measure_peaks(device, missing, small=opts.smoke)["matmul_flops_per_s"])
    else:
        peaks = measure_peaks(device, opts.dtypes, small=opts.smoke)
    print(f"[heads] copy {peaks['copy_bytes_per_s'] / 1e9:.0f} GB/s, matmul " + ", ".join(
        f"{k} {v / 1e12:.1f} TFLOP/s" for k, v in peaks["matmul_flops_per_s"].items()),
        flush=True)

    tasks = plan(heads, opts, variants)
    result = {
        "kind": "heads", "mode": mode, "environment": common.environment(device),
        "peaks": peaks,
        "settings": {"heads": [h.describe() for h in heads], "batches": opts.batches,
                     "dtypes": opts.dtypes, "passes": opts.passes, "variants": variants,
                     "compile_mode": opts.compile_mode, "compile_dtypes": opts.compile_dtypes,
                     "compile_batches": opts.compile_batches,
                     "compile_timeout_s": opts.compile_timeout_s, "target_ms": opts.target_ms,
                     "error_rule": "max(2 x eager torch's error at the dtype, "
                                   "spinalkern.testing floor)",
                     "error_floor": {str(k).replace("torch.", ""): v
                                     for k, v in ERROR_FLOOR.items()},
                     "grad_error_floor": {str(k).replace("torch.", ""): v
                                          for k, v in GRAD_ERROR_FLOOR.items()}},
        "skipped": skipped, "tasks": len(tasks), "tasks_done": 0, "skipped_cells": 0,
        "compile_skipped": 0, "cell_errors": [], "complete": False, "wall_s": 0.0, "rows": [],
    }
    cells: dict[tuple, list[dict]] = {}
    compile_s = 0.0
    tqdm = None if opts.no_progress else common.optional_import(
        "tqdm", "no progress bar (pip install tqdm)")
    bar = tqdm.tqdm(tasks, mininterval=5, desc="heads", unit="task") if tqdm else tasks
    for kind, key, task_variants in bar:
        head, b, d, p = key
        elapsed = time.perf_counter() - started
        left = None if opts.budget_s is None else opts.budget_s - elapsed
        if left is not None and left <= 0:
            result["skipped_cells" if kind == "cell" else "compile_skipped"] += 1
            continue
        if hasattr(bar, "set_postfix_str"):
            bar.set_postfix_str(f"{head.name} {d} B={b} {p} {kind}", refresh=False)
        try:
            if kind == "compile":
                limit = opts.compile_timeout_s if left is None else min(opts.compile_timeout_s,
                                                                        left)
                if compile_s > opts.compile_budget_s or limit < min(5.0, opts.compile_timeout_s):
                    result["compile_skipped"] += 1
                    continue
                t0 = time.perf_counter()
                new = [compile_in_subprocess(key, opts, peaks, limit)]
                compile_s += time.perf_counter() - t0
            else:
                cell = Cell(head, b, d, p, device, peaks, opts.smoke)
                paths: dict[str, str] = {}
                new = [run_variant(cell, v, opts, paths) for v in task_variants]
                del cell
        except Exception as e:  # noqa: BLE001 - e.g. out of memory making the inputs
            result["cell_errors"].append({"head": head.name, "batch": b, "dtype": d, "pass": p,
                                          "error": f"{type(e).__name__}: {str(e)[:300]}"})
            new = []
        finally:
            if device.type == "cuda":
                torch.cuda.empty_cache()
        rows = cells.setdefault((head.name, b, d, p), [])
        rows.extend(new)
        add_speedups(rows)
        result["rows"] = [r for rs in cells.values() for r in rs]
        result["tasks_done"] += 1
        result["compile_s"] = round(compile_s, 1)
        result["wall_s"] = round(time.perf_counter() - started, 1)
        common.write_json(path, result)   # atomic: a cut-off run keeps every finished cell
    result["complete"] = True
    result["wall_s"] = round(time.perf_counter() - started, 1)
    common.write_json(path, result)
    rows = result["rows"]
    bad = [r for r in rows if r.get("error") or r.get("correct") is False]
    print(f"[heads] {len(rows)} rows, {len(bad)} failed or wrong, {result['skipped_cells']} "
          f"cells and {result['compile_skipped']} compiles skipped for time, "
          f"{result['wall_s']} s -> {path}", flush=True)
    for c in result["cell_errors"]:
        print(f"  cell {c['head']} {c['pass']} B={c['batch']} {c['dtype']}: {c['error']}")
    for r in bad[:20]:
        print(f"  {r['head']} {r['backend']} {r['pass']} B={r['batch']} {r['dtype']}: "
              f"{r.get('error') or 'error %.3g of its bound' % r['error_vs_bound']}",
              flush=True)
    return path


if __name__ == "__main__":
    main()
