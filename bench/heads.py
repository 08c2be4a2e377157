"""Kernel microbenchmark of the spinalkern heads: speed, correctness, roofline and memory.

    python bench/heads.py --out bench/results            # full sweep on a GPU (~4 min on H100)
    python bench/heads.py --quick --out DIR              # bf16, B in {128, 1024, 65536}
    python bench/heads.py --smoke --out DIR              # a few tiny sizes; runs on CPU (CI)

One JSON file ``DIR/heads-<UTC time>.json`` is written per run: environment facts, the device
peaks measured in the same run (copy bandwidth, matmul rate per dtype) and one row per
(head config, backend variant, pass, batch, dtype).

What is measured (see docs/benchmarks.md for the why):

* Variants: ``torch`` (eager reference), ``torch+graph`` (the same eager code captured once and
  replayed as a CUDA graph), ``torch+compile`` (``torch.compile(mode="max-autotune")`` of the
  eager module), ``triton`` and ``cuda`` (the fused kernels), and ``triton+graph`` /
  ``cuda+graph``.  A backend missing here (e.g. the CUDA extension not built) is listed under
  ``skipped`` in the JSON with the reason.
* Timing: each timed call runs the variant once on each of ``rotate`` different input buffers
  (fresh ``randn`` data; together more than twice the L2 cache where that needs at most 256
  buffers) so that the inputs do not sit in L2; ``median_ms`` is the median per-buffer time.
  GPU: CUDA events after warm-up.  CPU: time.perf_counter.
* Correctness: every row compares buffer 0's output (and for ``fwd+bwd`` also dx and every
  weight and bias gradient) with the float64 reference ``spinalkern.reference``:
  ``max_rel_err`` = max over those tensors of ||out - ref|| / ||ref|| (``rel_err_out``: y
  only); ``correct`` = both within the dtype's tolerances (TOLERANCE below).
* Roofline: FLOPs and minimum bytes of the config, the floor max(flops / matmul rate,
  bytes / copy bandwidth) with both rates measured in this run; ``roofline_fraction`` =
  floor / median (1.0 = at the floor).
* Memory (plain variants, not +graph / +compile whose private CUDA-graph pools hide it):
  ``peak_mem_bytes`` (GPU) = max_memory_allocated during one call minus what was allocated
  before it (inputs, weights and dy are already resident), and for ``fwd+bwd`` the
  ``saved_bytes`` that autograd keeps for backward (saved_tensors_hooks; inputs and
  parameters excluded).
"""
from __future__ import annotations

import argparse
import gc
import math
import os
import sys
import time
import zlib
from dataclasses import asdict, dataclass

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import benchlib as common  # noqa: E402

common.add_repo_to_path()

import torch  # noqa: E402


# --------------------------------------------------------------------------------------------
# What to sweep
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class HeadConfig:
    name: str
    kind: str          # "spinal" or "progressive"
    D: int             # in_features
    H: int             # hidden_features
    n: int             # num_layers
    C: int             # out_features
    S: int = 1         # num_splits (spinal only)


CONFIGS = [
    HeadConfig("spinal_vgg5", "spinal", 256, 128, 4, 62, 2),
    HeadConfig("spinal_resnet18_s2", "spinal", 512, 128, 4, 26, 2),
    HeadConfig("spinal_resnet18_s4", "spinal", 512, 128, 4, 26, 4),
    HeadConfig("progressive_vgg5", "progressive", 256, 128, 4, 62),
    HeadConfig("wide_spinal", "spinal", 2048, 512, 4, 100, 2),
    HeadConfig("wide_progressive", "progressive", 2048, 512, 4, 100),
]
BATCHES = [64, 128, 256, 1024, 4096, 16384, 65536]
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
PASSES = ["fwd", "fwd+bwd"]
VARIANTS = ["torch", "torch+graph", "torch+compile", "triton", "triton+graph", "cuda", "cuda+graph"]

# Relative-error bounds per dtype (output y, and all of y / dx / dW / db) above which a row
# counts as wrong: its speed is then not used for any goal.  They are there to catch broken
# results, not to rank accuracy.  fp32 is tight (with room for TF32 dots, which the fused
# kernels use only when torch's float32 matmul precision allows TF32) and catches logic
# errors; in 16-bit the gradients differ from float64 by several percent even for eager torch
# at small batches (hidden units whose pre-activation rounds across 0 flip their ReLU).
TOLERANCE = {"fp32": {"out": 1e-2, "all": 2e-2},
             "fp16": {"out": 1e-2, "all": 1e-1},
             "bf16": {"out": 4e-2, "all": 2.5e-1}}


def is_correct(dtype_name: str, rel_err_out: float, max_rel_err_: float) -> bool:
    tol = TOLERANCE[dtype_name]
    return rel_err_out <= tol["out"] and max_rel_err_ <= tol["all"]


QUICK = dict(batches=[128, 1024, 65536], dtypes=["bf16"])
SMOKE = dict(batches=[8, 64], dtypes=["fp32", "bf16"])
MAX_ROTATE = 256


def make_head(cfg: HeadConfig, backend: str) -> torch.nn.Module:
    from spinalkern import ProgressiveHead, SpinalHead
    if cfg.kind == "spinal":
        return SpinalHead(cfg.D, cfg.C, hidden_features=cfg.H, num_layers=cfg.n,
                          num_splits=cfg.S, backend=backend)
    return ProgressiveHead(cfg.D, cfg.C, hidden_features=cfg.H, num_layers=cfg.n,
                           backend=backend)


# --------------------------------------------------------------------------------------------
# FLOPs and minimum bytes
# --------------------------------------------------------------------------------------------
def head_counts(spec, batch: int, pass_: str, elem_bytes: int) -> tuple[int, int]:
    """(FLOPs, minimum DRAM bytes) of one call.

    Forward: 2*B*N*K per layer.  Backward adds dX and dW products: twice the forward.
    Bytes: read x and all weights/biases, write y; fwd+bwd also reads dy and writes dx and
    every weight/bias gradient.  Hidden activations are not counted (a fused kernel keeps
    them on chip), so this is a floor.
    """
    shapes = spec.weight_shapes()
    fwd_flops = sum(2 * batch * N * K for N, K in shapes)
    params = sum(N * K + N for N, K in shapes)
    x, y = batch * spec.D, batch * spec.C
    if pass_ == "fwd":
        return fwd_flops, elem_bytes * (x + params + y)
    return 3 * fwd_flops, elem_bytes * (x + params + y + y + x + params)


# --------------------------------------------------------------------------------------------
# Device peaks measured in the same run
# --------------------------------------------------------------------------------------------
def measure_peaks(device, dtypes: list[str], small: bool) -> dict:
    """Copy bandwidth (bytes/s, read+write counted) and matmul FLOP/s per dtype.

    GPU: a 1 GiB device-to-device copy and 8192^3 matmuls on random data (zeros run faster).
    fp32 is measured with TF32 allowed, the fastest the hardware does for fp32 inputs, so the
    fp32 floor is not flattering (the fused kernels' fp32 dots are exact, "ieee", unless
    torch's float32 matmul precision allows TF32, as for torch's own matmuls).
    """
    gpu = torch.device(device).type == "cuda"
    nbytes = (32 << 20) if small or not gpu else (1 << 30)
    a = torch.randn(nbytes // 4, device=device)
    b = torch.empty_like(a)
    t = common.median(common.time_fn(lambda: b.copy_(a), device, target_ms=50, min_reps=5))
    peaks = {"copy_bytes_per_s": 2 * nbytes / (t * 1e-3), "copy_size_bytes": nbytes,
             "matmul_flops_per_s": {}}
    del a, b
    size = 256 if small or not gpu else 8192
    old_tf32 = torch.backends.cuda.matmul.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32 = True
        for name in dtypes:
            m1 = torch.randn(size, size, device=device, dtype=DTYPES[name])
            m2 = torch.randn(size, size, device=device, dtype=DTYPES[name])
            t = common.median(common.time_fn(lambda: m1 @ m2, device, target_ms=100,
                                             min_reps=5))
            peaks["matmul_flops_per_s"][name] = 2 * size ** 3 / (t * 1e-3)
            del m1, m2
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old_tf32
    peaks["matmul_size"] = size
    if gpu:
        torch.cuda.empty_cache()
    return peaks


# --------------------------------------------------------------------------------------------
# One call of a variant, and the float64 reference
# --------------------------------------------------------------------------------------------
def make_step(module, params, pass_: str):
    """step(x, dy) -> tuple of outputs: (y,) or (y, dx, dW_0.., db_0..)."""
    if pass_ == "fwd":
        def step(x, dy):
            with torch.no_grad():
                return (module(x),)
    else:
        def step(x, dy):
            y = module(x)
            return (y, *torch.autograd.grad(y, [x, *params], dy))
    return step


def reference_outputs(module, x, dy, pass_: str):
    """Float64 ground truth for buffer 0: same order as make_step's outputs."""
    from spinalkern.reference import reference_forward
    ws = [w.detach().double().requires_grad_() for w in module.weights()]
    bs = [b.detach().double().requires_grad_() for b in module.biases()]
    x64 = x.detach().double().requires_grad_()
    with torch.enable_grad():
        y = reference_forward(module.spec, x64, ws, bs)
        if pass_ == "fwd":
            return (y.detach(),)
        grads = torch.autograd.grad(y, [x64, *ws, *bs], dy.double())
    return (y.detach(), *grads)


def max_rel_err(outs, refs) -> float:
    worst = 0.0
    for o, r in zip(outs, refs, strict=True):
        o = o.detach().double()
        denom = r.norm().item()
        err = (o - r).norm().item() / (denom if denom > 0 else 1.0)
        worst = max(worst, err if math.isfinite(err) else float("inf"))
    return worst


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
# The sweep
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


def run_cell(cfg, batch, dtype_name, pass_, variants, device, peaks, opts, state):
    """All variants of one (config, batch, dtype, pass): returns rows."""
    dtype = DTYPES[dtype_name]
    gpu = torch.device(device).type == "cuda"
    torch.manual_seed(zlib.crc32(f"{cfg.name} {batch} {dtype_name} {pass_}".encode()))
    ref_module = make_head(cfg, "torch").to(device=device, dtype=dtype)
    spec = ref_module.spec
    elem = torch.empty((), dtype=dtype).element_size()
    bwd = pass_ == "fwd+bwd"
    per_call = elem * batch * (spec.D + (spec.C if bwd else 0))
    k = rotation_count(per_call, device, opts.smoke)
    xs = [torch.randn(batch, spec.D, device=device, dtype=dtype, requires_grad=bwd)
          for _ in range(k)]
    dys = [torch.randn(batch, spec.C, device=device, dtype=dtype) if bwd else None
           for _ in range(k)]
    refs = reference_outputs(ref_module, xs[0], dys[0], pass_)
    flops, nbytes = head_counts(spec, batch, pass_, elem)
    floor_s = max(flops / peaks["matmul_flops_per_s"][dtype_name],
                  nbytes / peaks["copy_bytes_per_s"])
    base_row = {"head": cfg.name, "kind": cfg.kind, "D": cfg.D, "H": cfg.H, "n": cfg.n,
                "C": cfg.C, "S": cfg.S, "pass": pass_, "batch": batch, "dtype": dtype_name,
                "rotate": k, "flops": flops, "min_bytes": nbytes,
                "roofline_floor_ms": floor_s * 1e3}
    rows = []
    for variant in variants:
        base, _, mode = variant.partition("+")
        row = dict(base_row, backend=variant, base_backend=base, graph=mode == "graph",
                   compiled=mode == "compile", median_ms=None, max_rel_err=None)
        if mode == "compile" and not compile_wanted(cfg, batch, dtype_name, pass_, opts, state):
            continue
        if not gpu and base == "triton" and batch > min(opts.batches):
            continue  # Triton's CPU interpreter is slow: smallest size only
        module = runner = None
        try:
            module = make_head(cfg, base).to(device=device, dtype=dtype)
            module.load_state_dict(ref_module.state_dict())
            params = module.weights() + module.biases()
            target = module
            if mode == "compile":
                torch._dynamo.reset()  # one compile per cell: no recompile limit, no reuse
                target = torch.compile(module, mode=opts.compile_mode, dynamic=False)
            step = make_step(target, params, pass_)
            t0 = time.perf_counter()
            runner = Runner(step, xs, dys, graph=mode == "graph", compiled=mode == "compile",
                            device=device)
            if mode == "compile":
                row["compile_s"] = round(time.perf_counter() - t0, 2)
                state["compile_s"] += row["compile_s"]
            row["max_rel_err"] = max_rel_err(runner.outputs0, refs)
            row["rel_err_out"] = max_rel_err(runner.outputs0[:1], refs[:1])
            row["correct"] = is_correct(dtype_name, row["rel_err_out"], row["max_rel_err"])
            if not gpu and base == "triton":  # the interpreter: one timed call is plenty
                times = common.time_fn(runner.run_all, device, target_ms=0, min_reps=1,
                                       warmup=0)
            else:
                times = common.time_fn(runner.run_all, device, target_ms=opts.target_ms,
                                       min_reps=opts.min_reps, warmup=1)
            per = sorted(t / k for t in times)
            row.update(median_ms=common.median(per), min_ms=per[0],
                       p80_ms=per[min(len(per) - 1, int(0.8 * len(per)))], reps=len(per))
            row["roofline_fraction"] = row["roofline_floor_ms"] / row["median_ms"]
            row["tflops"] = flops / (row["median_ms"] * 1e-3) / 1e12
            row["gbytes_per_s"] = nbytes / (row["median_ms"] * 1e-3) / 1e9
            if mode == "":
                if bwd:
                    row["saved_bytes"] = saved_for_backward_bytes(module, xs[0],
                                                                  [xs[0], *params])
                if gpu:
                    row["peak_mem_bytes"] = peak_memory_bytes(step, xs[0], dys[0], device)
        except Exception as e:  # noqa: BLE001 - one failing variant must not end the sweep
            row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
        finally:
            del runner, module
            if gpu:
                torch.cuda.synchronize(device)
        rows.append(row)
    del xs, dys, refs
    if gpu:
        torch.cuda.empty_cache()
    add_speedups(rows)
    return rows


def compile_wanted(cfg, batch, dtype_name, pass_, opts, state) -> bool:
    if opts.no_compile or dtype_name not in opts.compile_dtypes:
        return False
    if opts.smoke:  # one small forward cell exercises the code path (compiling is slow on CPU)
        return cfg.name == CONFIGS[0].name and batch == min(opts.batches) and pass_ == "fwd"
    if batch not in opts.compile_batches:
        return False
    if state["compile_s"] > opts.compile_budget_s:
        state["compile_skipped"] += 1
        return False
    return True


def add_speedups(rows):
    """speedup_vs_<baseline> = baseline median / this median, within one cell."""
    times = {r["backend"]: r["median_ms"] for r in rows if r["median_ms"]}
    for r in rows:
        for base in ("torch", "torch+graph", "torch+compile"):
            if r["median_ms"] and base in times:
                r["speedup_vs_" + base.replace("+", "_")] = times[base] / r["median_ms"]
    eager = next((r for r in rows if r["backend"] == "torch"), None)
    if eager and eager.get("peak_mem_bytes"):
        for r in rows:
            if r.get("peak_mem_bytes") is not None:
                r["peak_mem_vs_torch"] = r["peak_mem_bytes"] / eager["peak_mem_bytes"]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=common.RESULTS_DIR, help="folder for the JSON file")
    p.add_argument("--smoke", action="store_true", help="tiny sizes, CPU friendly (CI)")
    p.add_argument("--quick", action="store_true", help="bf16 only, B in {128, 1024, 65536}")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda if present)")
    p.add_argument("--configs", nargs="*", default=None, choices=[c.name for c in CONFIGS])
    p.add_argument("--batches", nargs="*", type=int, default=None)
    p.add_argument("--dtypes", nargs="*", default=None, choices=list(DTYPES))
    p.add_argument("--passes", nargs="*", default=PASSES, choices=PASSES)
    p.add_argument("--variants", nargs="*", default=None, choices=VARIANTS)
    p.add_argument("--target-ms", type=float, default=None,
                   help="measured time per variant and cell (default 15 GPU, 2 smoke)")
    p.add_argument("--min-reps", type=int, default=None)
    p.add_argument("--no-compile", action="store_true", help="leave out torch+compile")
    p.add_argument("--compile-mode", default="max-autotune")
    p.add_argument("--compile-dtypes", nargs="*", default=None, choices=list(DTYPES),
                   help="dtypes that get a torch+compile row (default bf16; smoke fp32)")
    p.add_argument("--compile-batches", nargs="*", type=int, default=[128, 1024],
                   help="batches that get a torch+compile row (max-autotune costs 10-60 s "
                        "per compile)")
    p.add_argument("--compile-budget-s", type=float, default=150.0,
                   help="stop adding compile rows once compiling took this long")
    p.add_argument("--budget-s", type=float, default=None,
                   help="stop starting new cells after this many seconds (rest is skipped)")
    p.add_argument("--no-progress", action="store_true")
    opts = p.parse_args(argv)
    if opts.device is None:
        opts.device = "cuda" if torch.cuda.is_available() else "cpu"
    preset = SMOKE if opts.smoke else QUICK if opts.quick else {}
    opts.batches = opts.batches or preset.get("batches", BATCHES)
    opts.dtypes = opts.dtypes or preset.get("dtypes", list(DTYPES))
    opts.compile_dtypes = opts.compile_dtypes or (["fp32"] if opts.smoke else ["bf16"])
    gpu = torch.device(opts.device).type == "cuda"
    opts.target_ms = opts.target_ms or (15.0 if gpu and not opts.smoke else 2.0)
    opts.min_reps = opts.min_reps or (5 if gpu and not opts.smoke else 2)
    return opts


def main(argv=None) -> str:
    opts = parse_args(argv)
    started = time.perf_counter()
    device = torch.device(opts.device)
    if opts.smoke:  # no pool of compile worker processes for one tiny CPU compile
        os.environ.setdefault("TORCHINDUCTOR_COMPILE_THREADS", "1")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    configs = [c for c in CONFIGS if opts.configs is None or c.name in opts.configs]
    variants, skipped = available_variants(device)
    if opts.variants:
        variants = [v for v in variants if v in opts.variants]
    if opts.no_compile:
        variants = [v for v in variants if v != "torch+compile"]
    mode = "smoke" if opts.smoke else "quick" if opts.quick else "full"
    print(f"[heads] {mode} sweep on {device}: variants {variants}; "
          f"skipped {[s['backend'] for s in skipped]}", flush=True)
    env = common.environment(device)
    peaks = measure_peaks(device, opts.dtypes, small=opts.smoke)
    print(f"[heads] copy {peaks['copy_bytes_per_s'] / 1e9:.0f} GB/s, matmul " + ", ".join(
        f"{k} {v / 1e12:.1f} TFLOP/s" for k, v in peaks["matmul_flops_per_s"].items()),
        flush=True)

    # Goal-relevant cells first (bf16), so that a time budget cuts the least useful ones.
    dtype_order = [d for d in ("bf16", "fp16", "fp32") if d in opts.dtypes]
    cells = [(cfg, b, d, p) for d in dtype_order for cfg in configs
             for b in opts.batches for p in opts.passes]
    state = {"compile_s": 0.0, "compile_skipped": 0}
    rows, skipped_cells, cell_errors = [], 0, []
    try:
        from tqdm import tqdm
        bar = tqdm(cells, disable=opts.no_progress, mininterval=5, desc="heads", unit="cell")
    except ImportError:
        bar = cells
    for cfg, b, d, p in bar:
        if opts.budget_s is not None and time.perf_counter() - started > opts.budget_s:
            skipped_cells += 1
            continue
        if hasattr(bar, "set_postfix_str"):
            bar.set_postfix_str(f"{cfg.name} {d} B={b} {p}", refresh=False)
        try:
            rows.extend(run_cell(cfg, b, d, p, variants, device, peaks, opts, state))
        except Exception as e:  # noqa: BLE001 - e.g. out of memory making the inputs
            cell_errors.append({"head": cfg.name, "batch": b, "dtype": d, "pass": p,
                                "error": f"{type(e).__name__}: {str(e)[:300]}"})
            if device.type == "cuda":
                torch.cuda.empty_cache()

    result = {
        "kind": "heads", "mode": mode, "environment": env, "peaks": peaks,
        "settings": {"configs": [asdict(c) for c in configs], "batches": opts.batches,
                     "dtypes": opts.dtypes, "passes": opts.passes, "variants": variants,
                     "compile_mode": opts.compile_mode, "compile_dtypes": opts.compile_dtypes,
                     "compile_batches": opts.compile_batches, "target_ms": opts.target_ms,
                     "tolerance": TOLERANCE},
        "skipped": skipped,
        "skipped_cells": skipped_cells,
        "cell_errors": cell_errors,
        "compile_skipped_for_budget": state["compile_skipped"],
        "wall_s": round(time.perf_counter() - started, 1),
        "rows": rows,
    }
    path = common.write_json(os.path.join(opts.out, f"heads-{common.file_stamp()}.json"), result)
    bad = [r for r in rows if r.get("error") or r.get("correct") is False]
    print(f"[heads] {len(rows)} rows, {len(bad)} failed or wrong, {skipped_cells} cells "
          f"skipped for time, {result['wall_s']} s -> {path}", flush=True)
    for c in cell_errors:
        print(f"  cell {c['head']} {c['pass']} B={c['batch']} {c['dtype']}: {c['error']}")
    for r in bad[:20]:
        print(f"  {r['head']} {r['backend']} {r['pass']} B={r['batch']} {r['dtype']}: "
              f"{r.get('error') or 'max_rel_err %.3g' % r['max_rel_err']}", flush=True)
    return path


if __name__ == "__main__":
    main()
