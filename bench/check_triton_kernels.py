"""Compile the Triton kernels exactly as the launcher launches them, for sm_90 and without a GPU,
and report what each compiled kernel uses; fail if any spills registers.

    python -m bench.check_triton_kernels [--out report.json] [--jobs 2] [--all]

For every checked configuration (heads with aligned and unaligned widths, including a wide one
that takes the chunked kernels; bf16 / fp16 / fp32; a training and a large batch; dropout off
and on; one call whose input starts off a 16-byte boundary; the training-mode BatchNorm ops)
the launch plan (``spinalkern.triton_plan``, ``spinalkern.triton_bn``) is built as the
launcher builds it, and each of its launches is bound by Triton's own argument binder
(stand-ins with the plan's dtypes and data-pointer alignment play the tensors), so the
signature, constexprs and specialisation attributes (``tt.divisibility``) are the ones the JIT
would compile on a GPU.  The tuning table's configurations are checked the same way.

Per kernel: registers, spill bytes (STACK/LOCAL from the cuobjdump in triton's wheel), shared
memory, and from the SASS: tensor-core MMAs (HMMA, HGMMA), async copies (LDGSTS = cp.async,
UTMALDG = TMA), LDSM, 128-bit global loads, local-memory traffic (LDL/STL) - each counted over
the whole kernel and inside loops (ranges closed by a backward branch; loops whose trip count is
a compile-time constant may be unrolled completely and then count as straight-line code).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path


SM90_SMS = 132  # H100 / H200: the SM count the plans are built for (wgrad slices, grids)
# (kind, D, H, n, C, S): the VGG-5 / ResNet18 heads (aligned D and H; C = 62, EMNIST, is not a
# multiple of 8), the small-CNN heads (n = 6, narrow, nothing aligned), a wide head that takes
# the chunked kernels.
HEADS = {
    "spinal-vgg": ("spinal", 256, 128, 4, 62, 2),
    "progressive-vgg": ("progressive", 256, 128, 4, 62, 1),
    "spinal-cnn": ("spinal", 160, 10, 6, 10, 2),
    "progressive-odd": ("progressive", 45, 64, 4, 62, 1),
    "spinal-wide": ("spinal", 2048, 512, 4, 100, 2),
}
BATCHES = (1024, 65536)  # the two row-tile regimes of the heuristics


def scenarios(everything: bool = False) -> list[dict]:
    """The (head, dtype, batch, dropout, save_hidden, misaligned pointers) calls checked:
    by default one call per kernel family and regime the heuristics ship (CI); with
    ``everything`` every head x batch x dropout in bf16, plus fp16 and fp32."""
    def call(head, dtype, B, p, **kw):
        return dict(head=head, dtype=dtype, B=B, dropout=p, save_hidden=True, **kw)
    out = [call("spinal-vgg", "bf16", 1024, 0.0), call("spinal-vgg", "bf16", 1024, 0.5),
           call("progressive-vgg", "bf16", 1024, 0.5), call("spinal-cnn", "bf16", 1024, 0.0),
           call("progressive-odd", "bf16", 1024, 0.0), call("spinal-wide", "bf16", 1024, 0.5),
           dict(call("spinal-vgg", "bf16", 65536, 0.0), save_hidden=False),
           call("spinal-vgg", "fp32", 1024, 0.5),
           # a contiguous view that starts 2 bytes past a 16-byte boundary (e.g. feats[1:]
           # of an odd-width feature map): Triton drops the alignment specialisation
           call("spinal-vgg", "bf16", 1024, 0.0, misaligned=("x_ptr",)),
           # the training-mode BatchNorm ops (spinalkern/triton_bn.py) of the VGG-5 head
           call("spinal-vgg", "bf16", 1024, 0.5, bn=True)]
    if everything:
        for head in HEADS:
            for B in BATCHES:
                for p in (0.0, 0.5):
                    out.append(call(head, "bf16", B, p))
        for head in ("spinal-vgg", "progressive-vgg", "spinal-cnn"):
            out.append(call(head, "fp16", 1024, 0.5))
            for p in (0.0, 0.5):
                out.append(call(head, "fp32", 1024, p))
    unique = []
    for sc in out:
        if sc not in unique:
            unique.append(sc)
    return unique


def _torch_dtype(name):
    import torch
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[name]


class StandIn:
    """What Triton's binder reads from a tensor argument: dtype and data pointer."""

    def __init__(self, dtype, ptr: int):
        self.dtype = dtype
        self._ptr = ptr

    def data_ptr(self) -> int:
        return self._ptr


def plan_launches(sc: dict, config=None):
    from spinalkern.spec import HeadSpec
    from spinalkern.triton_plan import build_plan
    spec = HeadSpec(*HEADS[sc["head"]])
    if sc.get("bn"):  # the BN ops' launches (forward and backward)
        from spinalkern.triton_bn import build_bn_plan
        plan = build_bn_plan(spec, _torch_dtype(sc["dtype"]), sc["B"], sc["dropout"], True,
                             prec="highest", sms=SM90_SMS, interpreting=False)
        return plan, plan.fwd + plan.bwd + [plan.wgrad] + ([plan.reduce] if plan.reduce else [])
    plan = build_plan(spec, _torch_dtype(sc["dtype"]), sc["B"], sc["dropout"],
                      sc["save_hidden"], prec="highest", sms=SM90_SMS, config=config,
                      interpreting=False)
    launches = [plan.fwd, plan.chain, plan.wgrad] + ([plan.reduce] if plan.reduce else [])
    return plan, launches


def launch_args(launch, misaligned=()) -> tuple:
    """Stand-ins for the launch's runtime arguments, in signature order."""
    args = []
    for p in launch.params:
        if p in launch.scalars:
            args.append(launch.scalars[p])
            continue
        dt = launch.tensor_dtypes[p]
        ptr = 0x7F0000000000 + (2 if p in misaligned else 0)
        args.append(tuple(StandIn(d, ptr) for d in dt) if isinstance(dt, tuple)
                    else StandIn(dt, ptr))
    return tuple(args)


def compile_launch(launch, args):
    """Bind and compile as JITFunction.run does, for sm_90."""
    import triton
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature
    fn = launch.kernel
    target = GPUTarget("cuda", 90, 32)
    backend = make_backend(target)
    kwargs = dict(launch.options())
    kwargs["debug"] = kwargs.get("debug", fn.debug) or knobs.runtime.debug
    kwargs["instrumentation_mode"] = knobs.compilation.instrumentation_mode
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound,
                                                          specialization, options)
    src = triton.compiler.ASTSource(fn, signature, constexprs, attrs)
    compiled = triton.compile(src, target=target, options=options.__dict__)
    divisible = sorted(fn.arg_names[path[0]] + "".join(f"[{i}]" for i in path[1:])
                       for path, a in attrs.items() if ["tt.divisibility", 16] in a)
    return compiled, divisible


def _tool(name):
    import triton
    return str(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name)


def _loop_ranges(lines):
    """Address ranges [target, branch] of backward branches in cuobjdump SASS."""
    ranges = []
    for addr, text in lines:
        m = re.search(r"\bBRA\b.*?(0x[0-9a-f]+)", text)
        if m and int(m.group(1), 16) <= addr:
            ranges.append((int(m.group(1), 16), addr))
    return ranges


SASS_OPS = {"HMMA": r"\bHMMA\.", "HGMMA": r"\bHGMMA\.", "LDGSTS": r"\bLDGSTS\b",
            "UTMALDG": r"\bUTMALDG\b", "LDSM": r"\bLDSM\b", "LDG.128": r"\bLDG\.E\.128\b",
            "LDL/STL": r"\b(LDL|STL)\b"}


def inspect_cubin(cubin: bytes) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        usage = subprocess.run([_tool("cuobjdump"), "--dump-resource-usage", f.name],
                               check=True, capture_output=True, text=True).stdout
        sass = subprocess.run([_tool("cuobjdump"), "-sass", f.name], check=True,
                              capture_output=True, text=True).stdout
    fields = dict(re.findall(r"(REG|STACK|SHARED|LOCAL):(\d+)", usage))
    lines = [(int(m.group(1), 16), m.group(2))
             for m in re.finditer(r"/\*([0-9a-f]{4,})\*/\s+([^;]*;)", sass)]
    loops = _loop_ranges(lines)
    in_loop = lambda a: any(lo <= a <= hi for lo, hi in loops)  # noqa: E731
    counts, loop_counts = {}, {}
    for op, rx in SASS_OPS.items():
        hits = [a for a, t in lines if re.search(rx, t)]
        counts[op] = len(hits)
        loop_counts[op] = sum(1 for a in hits if in_loop(a))
    return {"registers": int(fields["REG"]), "stack_bytes": int(fields["STACK"]),
            "local_bytes": int(fields["LOCAL"]), "sass": counts, "sass_in_loops": loop_counts,
            "loops": len(loops)}


def _bind(launch, args):
    """What Triton's JIT would compile for these arguments: a hashable key (kernel, the
    binder's specialisation incl. alignment, constexprs and options)."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature
    fn = launch.kernel
    binder = create_function_from_signature(fn.signature, fn.params,
                                            make_backend(GPUTarget("cuda", 90, 32)))
    _, specialization, _ = binder(*args, **launch.options())
    return (fn.__name__, repr(specialization), repr(sorted(launch.options().items())))


def calls(jobs):
    """[(scenario, config json, launch index, launch, stand-in args, compile key)]."""
    from spinalkern.triton_plan import HeadConfig
    out = []
    for sc, config_json in jobs:
        config = HeadConfig.from_json(config_json) if config_json else None
        plan, launches = plan_launches(sc, config)
        for i, launch in enumerate(launches):
            args = launch_args(launch, sc.get("misaligned", ()))
            out.append((sc, config_json, i, plan, launch, args, _bind(launch, args)))
    return out


def compile_one(job) -> dict:
    """Compile launch ``i`` of a scenario's plan and inspect it."""
    sc, config_json, i = job
    from spinalkern.triton_plan import HeadConfig
    config = HeadConfig.from_json(config_json) if config_json else None
    plan, launches = plan_launches(sc, config)
    launch = launches[i]
    t0 = time.perf_counter()
    compiled, divisible = compile_launch(launch, launch_args(launch, sc.get("misaligned", ())))
    info = inspect_cubin(compiled.asm["cubin"])
    info["spills"] = info["stack_bytes"] > 0 or info["local_bytes"] > 0 \
        or info["sass"]["LDL/STL"] > 0
    return {"shared_bytes": compiled.metadata.shared, "divisible_args": divisible, **info,
            "compile_s": round(time.perf_counter() - t0, 1)}


def check(jobs, n_jobs) -> list[dict]:
    """One report row per launch of every job; identical kernels are compiled once."""
    todo = calls(jobs)
    first = {}
    for sc, cj, i, plan, launch, args, key in todo:
        first.setdefault(key, (sc, cj, i))
    with ProcessPoolExecutor(n_jobs) as pool:
        results = dict(zip(first, pool.map(compile_one, first.values())))
    rows = []
    for sc, cj, i, plan, launch, args, key in todo:
        tiles = {k: v for k, v in launch.constexprs.items() if k.startswith("BLOCK")}
        variants = ("bn", "bn") if sc.get("bn") else (plan.config.fwd_variant,
                                                      plan.config.bwd_variant)
        rows.append({**sc, "fwd_variant": variants[0], "bwd_variant": variants[1],
                     "kernel": launch.kernel.__name__,
                     "grid": list(launch.grid), "num_warps": launch.num_warps,
                     "num_stages": launch.num_stages, **tiles, **results[key],
                     "from_table": bool(cj)})
    return rows, len(first)


def table_jobs() -> list:
    """The tuning table's configurations for sm_90 GPUs, one scenario each."""
    from spinalkern.spec import HeadSpec  # noqa: F401
    from spinalkern.triton_plan import load_table
    jobs = []
    for gpu, heads in load_table().get("gpus", {}).items():
        for key, by_dtype in heads.items():
            head = next((h for h, v in HEADS.items() if _key(v) == key), None)
            if head is None:
                continue  # a head not in this checker's list: covered by the tuner's own check
            for dt, by_bucket in by_dtype.items():
                for bucket, entry in by_bucket.items():
                    jobs.append((dict(head=head, dtype=dt, B=int(bucket), dropout=0.5,
                                      save_hidden=True, gpu=gpu), entry["config"]))
    return jobs


def _key(v):
    from spinalkern.spec import HeadSpec
    from spinalkern.triton_plan import head_key
    return head_key(HeadSpec(*v))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=None, help="write the report as JSON here")
    ap.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1))
    ap.add_argument("--all", action="store_true",
                    help="every head x batch x dropout in bf16, plus fp16 and fp32")
    args = ap.parse_args(argv)
    if "triton" in sys.modules and os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise SystemExit("run without TRITON_INTERPRET: this compiles for the GPU")
    os.environ.pop("TRITON_INTERPRET", None)  # compile for the GPU, not the interpreter
    todo = [(sc, None) for sc in scenarios(args.all)] + table_jobs()
    t0 = time.perf_counter()
    rows, compiles = check(todo, args.jobs)
    hdr = (f"{'head':16} {'dt':4} {'B':>5} {'p':>3} {'kernel':24} {'BM':>3} {'w':>2} {'regs':>4} "
           f"{'smem':>6} {'spill':>5} {'HMMA':>4} {'HGMMA':>5} {'LDGSTS':>6} {'LDSM':>4} "
           f"{'LDG128':>6}")
    print(hdr)
    for r in rows:
        s = r["sass"]
        print(f"{r['head']:16} {r['dtype']:4} {r['B']:>5} {r['dropout']:>3} {r['kernel']:24} "
              f"{r.get('BLOCK_M', 0):>3} {r['num_warps']:>2} {r['registers']:>4} "
              f"{r['shared_bytes']:>6} {r['stack_bytes'] + r['local_bytes']:>5} "
              f"{s['HMMA']:>4} {s['HGMMA']:>5} {s['LDGSTS']:>6} {s['LDSM']:>4} "
              f"{s['LDG.128']:>6}" + ("  misaligned x" if r.get("misaligned") else ""))
    import triton
    import torch
    report = {"target": "sm_90", "triton": triton.__version__, "torch": torch.__version__,
              "sms": SM90_SMS, "heads": HEADS, "rows": rows}
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=1, default=str) + "\n")
    bad = [r for r in rows if r["spills"]]
    took = time.perf_counter() - t0
    if bad:
        for r in bad:
            print(f"SPILL: {r['head']} {r['dtype']} B={r['B']} {r['kernel']}", file=sys.stderr)
        print(f"FAIL: {len(bad)} of {len(rows)} kernels spill registers", file=sys.stderr)
        return 1
    print(f"OK: {len(rows)} launches of {len(todo)} calls ({compiles} distinct kernels), "
          f"zero spills ({took:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
