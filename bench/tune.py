"""Tuning table of the Triton kernels: sweep candidate tile configurations per (head, dtype, batch
bucket) and keep the fastest correct one per GPU name.

    python -m bench.tune compile [--jobs 16]            # compile every candidate for sm_90
    python -m bench.tune sweep --out TABLE.json [--budget-s 280] [--heads ...] [--batches ...]
    python -m bench.tune sweep --smoke --out /tmp/t.json  # CPU: interpreter, tiny head
    python -m bench.tune host-cost --out results/kernels/triton_host_cost.json

``compile`` builds every candidate's plan as the launcher would and compiles its kernels for
sm_90 through Triton's binder (``bench/check_triton_kernels.py``), filling Triton's cache
(``TRITON_CACHE_DIR``) and dropping candidates that spill.  It needs no GPU.  Triton's cache key
includes a hash of its own compiled library, which differs between Python versions: fill the
cache with the Python the GPU machine runs, or run ``compile --jobs 16`` there first (its CPUs
compile while no GPU time is spent timing).

``sweep`` (GPU): for each shape, every candidate is first checked against the float64 reference
on fresh random inputs (a wrong candidate is dropped, never timed), then timed: a CUDA graph of
the step over several rotating input buffers (so inputs do not stay in L2), replayed after
warm-up, median over replays.  The step is forward + backward with dropout 0.5 for buckets up to
4096 rows (training) and the forward alone without saving hidden above (inference).  The table
is written after every shape, so a cut-off run keeps what it measured; ``--budget-s`` stops
starting new shapes in time.  The table's format: see ``spinalkern.triton_plan.load_table``.
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# The heads of models/ (spinal VGG-5 / ResNet18 heads, their progressive versions, the small
# CNN head) and the wide head of the goals.  (kind, D, H, n, C, S)
HEADS = {
    "spinal-vgg": ("spinal", 256, 128, 4, 10, 2),
    "spinal-resnet": ("spinal", 512, 128, 4, 62, 2),
    "progressive-vgg": ("progressive", 256, 128, 4, 10, 1),
    "spinal-cnn": ("spinal", 160, 8, 6, 10, 2),
    "spinal-wide": ("spinal", 2048, 512, 4, 100, 2),
}
BATCHES = (128, 256, 512, 1024, 65536)
# what one call of <= 5 minutes covers: the heads and batches of the goals (docs/triton.md)
DEFAULT_HEADS = ("spinal-vgg", "progressive-vgg", "spinal-wide")
DEFAULT_BATCHES = (128, 1024, 65536)
TRAIN_DROPOUT = 0.5


def candidates(spec, dtype, B, smoke=False):
    """Candidate HeadConfigs for one shape, the heuristic one first.  Training batches
    (timed forward + backward) vary both variants, the row tile and the warps; inference
    batches (forward only) vary the forward: fused (16 or 32 rows, persistent or not) or
    chunked (32 or 64 rows).  Then two other weight-gradient tilings."""
    import torch
    from spinalkern import triton_plan as tp
    K = tp.KernelConfig
    base = tp.default_config(spec, dtype, B, dropout=B <= 4096, interpreting=False)
    if smoke:
        k = K(128, 32, 32, 4)
        return [tp.HeadConfig("fused", "fused", k, k, k),
                tp.HeadConfig("chunked", "chunked", k, k, k)]
    out = [base]

    def add(cfg):
        if cfg not in out and ("fused" not in (cfg.fwd_variant, cfg.bwd_variant)
                               or tp.fused_fits(spec)):
            out.append(cfg)
    kb = 64 if dtype in (torch.float16, torch.bfloat16) else 32
    if B <= 4096:
        for fv, bv, bm, warps in itertools.product(("fused", "chunked"), ("fused", "chunked"),
                                                   (16, 32), (4, 8)):
            if bv == "fused" and tp.pow2(spec.H) > 64:
                continue
            add(tp.HeadConfig(fv, bv, K(bm, 64, kb, warps), K(bm, 32, kb, warps), base.wgrad))
    else:
        for bm, warps, persistent in itertools.product((16, 32), (4, 8), (False, True)):
            add(tp.HeadConfig("fused", base.bwd_variant, K(bm, 64, kb, warps, 3), base.chain,
                              base.wgrad, persistent))
        for bm, warps in itertools.product((32, 64), (4, 8)):
            add(tp.HeadConfig("chunked", base.bwd_variant, K(bm, 64, kb // 2, warps, 3),
                              base.chain, base.wgrad))
    if B <= 4096:
        for wg in (K(64, 64, 64, 8), K(16, 64, 32, 4)):
            add(tp.HeadConfig(base.fwd_variant, base.bwd_variant, base.fwd, base.chain, wg,
                              base.persistent))
    return out


def shapes(args):
    import torch
    from spinalkern.spec import HeadSpec
    dts = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
    if args.smoke:
        return [("smoke", HeadSpec("spinal", 40, 16, 2, 10, 2), "fp32", torch.float32, 150)]
    return [(h, HeadSpec(*HEADS[h]), d, dts[d], B)
            for h in args.heads for d in args.dtypes for B in args.batches]


# ---------------------------------------------------------------------------------------------
# compile: ahead of time, no GPU
# ---------------------------------------------------------------------------------------------
def _compile_job(job):
    os.environ.pop("TRITON_INTERPRET", None)
    spec_, cfg_json, dtype_name, B, dropout, save_hidden = job
    from bench import check_triton_kernels as checker
    from spinalkern import triton_plan as tp
    from spinalkern.spec import HeadSpec
    spec = HeadSpec(*spec_)
    plan = tp.build_plan(spec, checker._torch_dtype(dtype_name), B, dropout, save_hidden,
                         sms=checker.SM90_SMS, config=tp.HeadConfig.from_json(cfg_json),
                         interpreting=False)
    spills = False
    timed = (plan.fwd, plan.chain, plan.wgrad, plan.reduce) if save_hidden else (plan.fwd,)
    for launch in timed:
        if launch is None:
            continue
        compiled, _ = checker.compile_launch(launch, checker.launch_args(launch))
        info = checker.inspect_cubin(compiled.asm["cubin"])
        spills |= info["stack_bytes"] > 0 or info["local_bytes"] > 0
    return job, spills


def _step_args(B):
    """(dropout, save_hidden) of the timed step for a batch."""
    return (TRAIN_DROPOUT, True) if B <= 4096 else (0.0, False)


def compile_all(args) -> dict:
    """{(head, dtype, B, config json): spills} for every candidate."""
    from concurrent.futures import ProcessPoolExecutor
    jobs = []
    for name, spec, dt, torch_dt, B in shapes(args):
        p, save = _step_args(B)
        for cfg in candidates(spec, torch_dt, B):
            heads = [(spec.kind, spec.D, spec.H, spec.n, spec.C, spec.num_splits)]
            jobs.append((heads[0], cfg.to_json(), dt, B, p, save))
    t0 = time.perf_counter()
    result = {}
    with ProcessPoolExecutor(args.jobs) as pool:
        for job, spills in pool.map(_compile_job, jobs):
            result[json.dumps(job, sort_keys=True)] = spills
    bad = sum(result.values())
    print(f"compiled {len(jobs)} candidate plans for sm_90 in {time.perf_counter() - t0:.0f} s; "
          f"{bad} spill and are skipped by the sweep")
    return result


# ---------------------------------------------------------------------------------------------
# sweep
# ---------------------------------------------------------------------------------------------
def _check(spec, x, ws, bs, seed, dropout, save_hidden, dtype_name):
    """Forward (+ backward) through the op against the float64 reference; returns ok."""
    import torch
    from spinalkern.reference import reference_forward
    from spinalkern.testing import ERROR_FLOOR, GRAD_ERROR_FLOOR, rel_err
    op = torch.ops.spinalkern
    y, hidden = op.triton_head_forward(x, ws, bs, seed, spec.kind_code, spec.num_splits,
                                       dropout, save_hidden)
    leaves = [t.detach().double().requires_grad_() for t in (x, *ws, *bs)]
    n1 = spec.n + 1
    y_ref = reference_forward(spec, leaves[0], leaves[1:1 + n1], leaves[1 + n1:], dropout, seed)
    dt = x.dtype
    # 4x the test suite's floors: a wrong kernel is off by O(1); rounding is not
    if not rel_err(y, y_ref) <= 4 * ERROR_FLOOR[dt]:
        return False
    if not save_hidden:
        return True
    g = torch.randn_like(y)
    y_ref.backward(g.double())
    gx, flat = op.triton_head_backward(g, x, ws, hidden, seed, spec.kind_code,
                                       spec.num_splits, dropout)
    return rel_err(gx, leaves[0].grad) <= 4 * GRAD_ERROR_FLOOR[dt]


def _time(step, device, smoke, rotate=1, replays=20):
    """Median seconds per step: a CUDA graph holding ``rotate`` steps (each on its own input
    buffer, so that inputs do not stay in L2) replayed after warm-up (GPU), or wall time of
    one call (CPU smoke)."""
    import torch
    if smoke:
        ts = []
        for _ in range(3):
            t0 = time.perf_counter()
            step()
            ts.append(time.perf_counter() - t0)
        return statistics.median(ts)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3 * rotate):
            step()
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(rotate):
            step()
    for _ in range(3):
        graph.replay()
    times = []
    for _ in range(replays):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        graph.replay()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / 1e3 / rotate)
    return statistics.median(times)


def sweep(args) -> int:
    import torch
    from spinalkern import triton_plan as tp
    from spinalkern.testing import random_params
    smoke = args.smoke
    if smoke:
        if not os.environ.get("TRITON_INTERPRET"):
            print("--smoke runs the kernels in Triton's interpreter: set TRITON_INTERPRET=1",
                  file=sys.stderr)
            return 2
        device, gpu = torch.device("cpu"), "cpu-interpreter-smoke"
    else:
        if not torch.cuda.is_available():
            print("sweep needs a GPU (or --smoke)", file=sys.stderr)
            return 2
        device, gpu = torch.device("cuda"), torch.cuda.get_device_name()
    out = Path(args.out)
    table = json.loads(out.read_text()) if out.exists() else {"format": 1, "gpus": {}}
    t_start = time.perf_counter()  # the budget includes compiling
    spilling = {} if smoke else compile_all(args)
    for name, spec, dt, torch_dt, B in shapes(args):
        if time.perf_counter() - t_start > args.budget_s:
            print(f"budget of {args.budget_s:.0f} s reached; stopping before {name} {dt} B={B}")
            break
        p, save = _step_args(B)
        rows = args.rotate if not smoke else 1
        xs = [torch.randn(B, spec.D, device=device).to(torch_dt) for _ in range(rows)]
        ws, bs = random_params(spec, torch_dt, device)
        seed = torch.randint(0, 2 ** 62, (1,), dtype=torch.int64, device=device) if p else None
        gy = torch.randn(B, spec.C, device=device).to(torch_dt)
        results = []
        for cfg in candidates(spec, torch_dt, B, smoke):
            key = json.dumps(((spec.kind, spec.D, spec.H, spec.n, spec.C, spec.num_splits),
                              cfg.to_json(), dt, B, p, save), sort_keys=True)
            if spilling.get(key):
                continue
            with tp.override(spec, torch_dt, B, cfg):
                if not _check(spec, xs[0], ws, bs, seed, p, save, dt):
                    print(f"  WRONG RESULT, dropped: {cfg}")
                    continue
                it = itertools.cycle(xs)
                op = torch.ops.spinalkern

                def step():
                    x = next(it)
                    y, hidden = op.triton_head_forward(x, ws, bs, seed, spec.kind_code,
                                                       spec.num_splits, p, save)
                    if save:
                        op.triton_head_backward(gy, x, ws, hidden, seed, spec.kind_code,
                                                spec.num_splits, p)
                sec = _time(step, device, smoke, rotate=len(xs))
            results.append((sec, cfg))
        if not results:
            continue
        results.sort(key=lambda r: r[0])
        best_s, best = results[0]
        heur_s = next((s for s, c in results if c == candidates(spec, torch_dt, B)[0]), None)
        entry = {"config": best.to_json(), "time_us": round(best_s * 1e6, 2),
                 "heuristic_time_us": None if heur_s is None else round(heur_s * 1e6, 2),
                 "candidates": len(results), "step": "fwd+bwd" if save else "fwd",
                 "dropout": p}
        (table.setdefault("gpus", {}).setdefault(gpu, {}).setdefault(tp.head_key(spec), {})
         .setdefault(dt, {})[str(tp.batch_bucket(B))]) = entry
        tmp = out.with_suffix(".tmp")
        tmp.write_text(json.dumps(table, indent=1, sort_keys=True) + "\n")
        tmp.replace(out)  # written after every shape
        print(f"{name:16} {dt} B={B:6}: best {best_s * 1e6:9.1f} us of {len(results)} "
              f"({best.fwd_variant}/{best.bwd_variant}, fwd BM={best.fwd.block_m} "
              f"w={best.fwd.num_warps})")
    return 0


# ---------------------------------------------------------------------------------------------
# host cost of one Triton launch (CPU)
# ---------------------------------------------------------------------------------------------
def host_cost(args) -> int:
    """Per-call host time of the pure-Python parts of a Triton launch, on CPU: Triton's
    argument binder (what ``kernel[grid](...)`` runs before every launch) and this package's
    launcher with the launch itself stubbed out."""
    import platform
    import timeit

    import torch
    import triton
    from triton.runtime.jit import compute_cache_key, create_function_from_signature

    from spinalkern import triton_head as th
    from spinalkern import triton_plan as tp
    from spinalkern.spec import HeadSpec
    from spinalkern.testing import random_params
    from bench import benchlib
    load_before = round(os.getloadavg()[0], 2)  # other work on the machine inflates times
    spec = HeadSpec("spinal", 64, 16, 4, 10, 2)  # tiny: the host path dominates
    B = 8
    x = torch.randn(B, spec.D)
    ws, bs = random_params(spec)
    plan = tp.build_plan(spec, torch.float32, B, 0.0, True, interpreting=False)
    launch = plan.fwd
    y, hid = torch.empty(B, spec.C), torch.empty(B, spec.n * spec.H)
    targs = (x, y, hid, tuple(ws), tuple(bs), x, B, plan.thr_biased, plan.scale)

    def best_us(fn, number=2000, repeat=7):
        # the best of several repeats: the machine may be shared, and interference only adds
        return min(timeit.repeat(fn, number=number, repeat=repeat)) / number * 1e6

    from triton.backends.compiler import GPUTarget
    from triton.compiler.compiler import make_backend
    backend = make_backend(GPUTarget("cuda", 90, 32))
    fn = launch.kernel
    if not hasattr(fn, "signature"):  # the interpreter's wrapper: bind as the JIT would
        fn = triton.runtime.jit.JITFunction(fn.fn, do_not_specialize=["thr_biased"])
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    kwargs = launch.options()
    cache = {}

    def triton_binding():
        bound, specialization, options = binder(*targs, **kwargs)
        return compute_cache_key(cache, specialization, options)

    rows = {"triton_binder_us": best_us(triton_binding),
            "aligned_check_us": best_us(lambda: th._aligned(targs))}
    old = th.run_launch
    th.run_launch = lambda launch, args: None
    try:
        fwd = torch.ops.spinalkern.triton_head_forward
        rows["op_forward_python_us"] = best_us(
            lambda: fwd(x, ws, bs, None, spec.kind_code, spec.num_splits, 0.0, True), 500)
        rows["op_backward_python_us"] = best_us(
            lambda: torch.ops.spinalkern.triton_head_backward(
                y, x, ws, hid, None, spec.kind_code, spec.num_splits, 0.0), 500)
    finally:
        th.run_launch = old
    result = {"what": "host cost of the Triton launch path, measured on CPU (no GPU): "
                      "Triton's per-call binder + cache key, the fast path's alignment check, "
                      "and the op's Python with the kernel launches stubbed out "
                      f"(spinal head D=64 H=16 n=4 C=10, B={B}, fp32); best of 7 repeats",
              "environment": benchlib.environment(torch.device("cpu")),
              "triton": triton.__version__, "cpu": platform.processor() or platform.machine(),
              "threads": torch.get_num_threads(),
              "load_average_1min_before": load_before,
              "results_us": {k: round(v, 2) for k, v in rows.items()}}
    text = json.dumps(result, indent=1) + "\n"
    if args.out:
        Path(args.out).write_text(text)
    print(text)
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    for name in ("compile", "sweep"):
        p = sub.add_parser(name)
        p.add_argument("--heads", nargs="+", default=list(DEFAULT_HEADS), choices=list(HEADS))
        p.add_argument("--dtypes", nargs="+", default=["bf16"], choices=["bf16", "fp16", "fp32"])
        p.add_argument("--batches", nargs="+", type=int, default=list(DEFAULT_BATCHES))
        p.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
        p.add_argument("--smoke", action="store_true",
                       help="CPU: tiny head, two candidates, in Triton's interpreter")
        if name == "sweep":
            p.add_argument("--out", required=True, help="the table (updated in place)")
            p.add_argument("--budget-s", type=float, default=280.0)
            p.add_argument("--rotate", type=int, default=4, help="input buffers rotated")
    p = sub.add_parser("host-cost")
    p.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    if args.cmd == "host-cost":
        os.environ["TRITON_INTERPRET"] = "1"  # the ops accept CPU tensors; launches are stubbed
        return host_cost(args)
    if args.cmd == "compile":
        compile_all(args)
        return 0
    return sweep(args)


if __name__ == "__main__":
    sys.exit(main())
