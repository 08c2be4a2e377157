#!/usr/bin/env python
"""Checks a built CUDA extension without a GPU, from its binaries (cuobjdump).

    python -m bench.check_cuda_build [LIB ...] [--arch 80 --arch 90] [--ptx 90]
        [--markdown FILE] [--json FILE] [--baseline FILE | --no-baseline]

LIB defaults to spinalkern/_C*.so.  Uses the cuobjdump shipped in triton's wheel
(triton/backends/nvidia/bin/cuobjdump), else the one on PATH.  Fails (exit status 1) when:

* a LIB lacks SASS for an --arch (default 80 and 90), or PTX for a --ptx architecture;
* any kernel has a stack frame or local memory (``--dump-resource-usage``): spilled registers
  live in the stack frame, so this asserts zero spill bytes;
* in the SASS (``-sass``) of a forward, chain or weight-gradient kernel (and of the fp16/bf16
  BatchNorm layer kernels):
  - it has no *main loop*: an innermost loop (a backward branch's range) holding both the
    math (HMMA for fp16/bf16, FFMA/DFMA for fp32/fp64) and asynchronous 16-byte staging
    (LDGSTS, cp.async; or UTMALDG, TMA);
  - a math instruction lies outside every main loop (a GEMM without async staging);
  - a main loop holds a scalar 16-bit global load (LDG.U16/S16), or, for fp16/bf16, no
    LDSM (ldmatrix) fragment load;
  - an LDGSTS moves less than 16 bytes;
* a kernel of the baseline report (default results/kernels/cuda_sass.json, for the
  architectures both have) is missing or no longer passes.

--markdown / --json write the report (per kernel and architecture: registers, stack, main
loops and their instruction counts); the committed one is results/kernels/cuda_sass.json and
results/kernels/cuda_resources.md.  When the checked library is the in-tree spinalkern._C,
the markdown also lists the launch plans (tile sizes, shared memory per region) of reference
heads, read from the extension's own planner (torch.ops.spinalkern.cuda_launch_plan).
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import re
import shutil
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BASELINE = os.path.join(ROOT, "results", "kernels", "cuda_sass.json")
MAIN_LOOP_KERNELS = ("head_forward_kernel", "head_backward_chain_kernel",
                     "head_backward_wgrad_kernel")
# Checked like those in their fp16/bf16 variants only: the fp32/fp64 variants compute the
# BatchNorm normalisation (FFMA/DFMA) outside the GEMM, so the math-placement rule cannot apply.
TC_MAIN_LOOP_KERNELS = ("bn_forward_layer_kernel", "bn_backward_layer_kernel")
TC_TYPES = ("__half", "__nv_bfloat16")
MATH = {"tc": re.compile(r"\bHMMA\b"), "simt": re.compile(r"\b[FD]FMA\b")}
ASYNC = re.compile(r"\b(LDGSTS|UTMALDG)\b")
LDSM = re.compile(r"\bLDSM\b")
LDG16 = re.compile(r"\bLDG(\.\w+)*\.(U16|S16)\b")
LDGSTS_NARROW = re.compile(r"\bLDGSTS(?!(\.\w+)*\.128\b)")
# Reference heads for the launch-plan table: (name, kind, B, D, H, n, C, S, dtype, dropout)
PLAN_HEADS = [
    ("Spinal VGG-5 head, inference", 0, 65536, 256, 128, 4, 10, 2, "bfloat16", 0.0),
    ("Spinal VGG-5 head, training", 0, 1024, 256, 128, 4, 10, 2, "bfloat16", 0.5),
    ("Spinal VGG-5 head, training", 0, 128, 256, 128, 4, 10, 2, "bfloat16", 0.5),
    ("Progressive VGG-5 head, inference", 1, 65536, 256, 128, 4, 10, 1, "bfloat16", 0.0),
    ("SpinalNet MNIST head (H = 10)", 0, 1024, 320, 10, 6, 10, 2, "float32", 0.0),
    ("wide head, 1000 classes", 0, 4096, 2048, 256, 4, 1000, 2, "float16", 0.0),
]


def find_cuobjdump() -> str:
    try:
        import triton
        p = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
        if os.path.exists(p):
            return p
    except ImportError:
        pass
    p = shutil.which("cuobjdump")
    if p is None:
        raise SystemExit("cuobjdump not found (install triton, or put CUDA's cuobjdump on PATH)")
    return p


def run(cmd) -> str:
    return subprocess.run(cmd, capture_output=True, text=True, check=True).stdout


def demangle(names: list[str]) -> list[str]:
    cxxfilt = shutil.which("c++filt")
    if cxxfilt is None or not names:
        return names
    out = subprocess.run([cxxfilt], input="\n".join(names), capture_output=True, text=True,
                         check=True).stdout.splitlines()
    return out if len(out) == len(names) else names


def short_name(kernel: str) -> str:
    s = kernel.replace("spinalkern::kern::", "")
    s = re.sub(r"\(.*\)$", "", s).replace("void ", "")
    return s.replace("head_", "").replace("__nv_bfloat16", "bf16").replace("__half", "half")


def resource_usage(cuobjdump: str, lib: str) -> dict:
    """{(arch, mangled): {regs, stack, local, static_smem}}"""
    out, arch, name = {}, None, None
    for line in run([cuobjdump, "--dump-resource-usage", lib]).splitlines():
        m = re.match(r"\s*arch = sm_(\w+)", line)
        if m:
            arch = m.group(1)
            continue
        m = re.match(r"\s*Function (\S+):", line)
        if m:
            name = m.group(1)
            continue
        if name and "REG:" in line:
            vals = dict(re.findall(r"(\w+(?:\[\d+\])?):(\d+)", line))
            out[(arch, name)] = {"regs": int(vals["REG"]), "stack": int(vals["STACK"]),
                                 "local": int(vals["LOCAL"]), "static_smem": int(vals["SHARED"])}
            name = None
    return out


def sass_functions(cuobjdump: str, lib: str) -> dict:
    """{(arch, mangled): [(address, instruction text)]}"""
    out, arch = {}, None
    text = run([cuobjdump, "-sass", lib])
    for block in re.split(r"\n(?=\s*(?:code for sm_\w+|Function : ))", text):
        m = re.match(r"\s*code for sm_(\w+)", block)
        if m:
            arch = m.group(1)
            continue
        m = re.match(r"\s*Function : (\S+)", block)
        if m:
            out[(arch, m.group(1))] = [(int(a, 16), t.strip()) for a, t in
                                       re.findall(r"/\*([0-9a-f]{4,})\*/\s+([^;]*);", block)]
    return out


def loops(instrs) -> list[tuple[int, int]]:
    """Address ranges [target, branch] of the backward branches."""
    out = []
    for addr, text in instrs:
        m = re.search(r"\bBRA\b[^;]*?(0x[0-9a-f]+)", text)
        if m and int(m.group(1), 16) <= addr:
            out.append((int(m.group(1), 16), addr))
    return out


def analyse(kernel: str, instrs) -> dict:
    """Main loops and the properties the checker asserts, for one kernel's SASS."""
    kind = "tc" if any(f"<{t}" in kernel for t in TC_TYPES) else "simt"
    math = MATH[kind]
    body = lambda lo, hi: [t for a, t in instrs if lo <= a <= hi]  # noqa: E731
    cand = [(lo, hi) for lo, hi in loops(instrs)
            if any(math.search(t) for t in body(lo, hi)) and any(ASYNC.search(t) for t in body(lo, hi))]
    main = [(lo, hi) for lo, hi in cand  # innermost: no other candidate nested inside
            if not any((l2, h2) != (lo, hi) and lo <= l2 and h2 <= hi for l2, h2 in cand)]
    info = {"kind": kind, "main_loops": [], "problems": []}
    for lo, hi in sorted(main):
        b = body(lo, hi)
        row = {"range": f"{lo:#x}-{hi:#x}", "instructions": len(b),
               "async_copies": sum(bool(ASYNC.search(t)) for t in b),
               "ldsm": sum(bool(LDSM.search(t)) for t in b),
               "math": sum(bool(math.search(t)) for t in b),
               "ldg16": sum(bool(LDG16.search(t)) for t in b)}
        info["main_loops"].append(row)
        if row["ldg16"]:
            info["problems"].append(f"main loop {row['range']}: {row['ldg16']} scalar 16-bit global loads")
        if kind == "tc" and row["ldsm"] == 0:
            info["problems"].append(f"main loop {row['range']}: no LDSM fragment loads")
    if not (any(k in kernel for k in MAIN_LOOP_KERNELS)
            or (kind == "tc" and any(k in kernel for k in TC_MAIN_LOOP_KERNELS))):
        info["main_loops"] = []
        return info
    if not main:
        info["problems"].append("no main loop with both math and LDGSTS/UTMALDG")
    outside = [a for a, t in instrs if math.search(t) and not any(lo <= a <= hi for lo, hi in main)]
    if outside:
        info["problems"].append(f"{len(outside)} math instructions outside the main loops "
                                f"(first at {outside[0]:#x})")
    narrow = [t for _, t in instrs if LDGSTS_NARROW.search(t)]
    if narrow:
        info["problems"].append(f"{len(narrow)} LDGSTS narrower than 16 bytes ({narrow[0]})")
    return info


def check_lib(cuobjdump: str, lib: str, archs, ptx_archs) -> tuple[bool, list[dict]]:
    ok = True
    elfs = run([cuobjdump, "--list-elf", lib]) if os.path.exists(lib) else ""
    present = sorted(set(re.findall(r"\.sm_(\w+)\.cubin", elfs)))
    ptx = sorted(set(re.findall(r"\.sm_(\w+)\.ptx", subprocess.run(
        [cuobjdump, "--list-ptx", lib], capture_output=True, text=True).stdout)))
    print(f"{lib}\n  SASS: {', '.join('sm_' + a for a in present) or 'none'};"
          f"  PTX: {', '.join('compute_' + a for a in ptx) or 'none'}")
    for a in archs:
        if a not in present:
            print(f"  FAIL: no sm_{a} code")
            ok = False
    for a in ptx_archs:
        if a not in ptx:
            print(f"  FAIL: no compute_{a} PTX (for GPUs newer than the SASS targets)")
            ok = False
    usage = resource_usage(cuobjdump, lib)
    sass = sass_functions(cuobjdump, lib)
    if not usage:
        print("  FAIL: no CUDA kernels in this library (CPU-only build?)")
        return False, []
    keys = sorted(usage)
    names = dict(zip(keys, demangle([k[1] for k in keys])))
    rows = []
    for key in keys:
        arch, mangled = key
        kernel = names[key]
        r = dict(usage[key], arch=arch, kernel=short_name(kernel))
        info = analyse(kernel, sass.get(key, []))
        r.update(kind=info["kind"], main_loops=info["main_loops"], problems=list(info["problems"]))
        if r["stack"] or r["local"]:
            r["problems"].append(f"stack frame {r['stack']} bytes, local memory {r['local']} bytes (spills)")
        r["ok"] = not r["problems"]
        ok &= r["ok"]
        rows.append(r)
    print(f"  {'arch':6} {'kernel':38} {'regs':>4} {'stack':>5}  main loops (LDGSTS/LDSM/math/LDG.16)")
    for r in sorted(rows, key=lambda r: (r["arch"], r["kernel"])):
        loops_txt = "  ".join(f"{m['async_copies']}/{m['ldsm']}/{m['math']}/{m['ldg16']}"
                              for m in r["main_loops"]) or "-"
        print(f"  sm_{r['arch']:3} {r['kernel']:38} {r['regs']:4d} {r['stack']:5d}  {loops_txt}")
        for p in r["problems"]:
            print(f"      FAIL: {p}")
    n_bad = sum(not r["ok"] for r in rows)
    print(f"  {len(rows)} kernels, {n_bad} failing; stack frames / local memory: "
          f"{'none (zero spills)' if all(not (r['stack'] or r['local']) for r in rows) else 'SPILLS'}")
    return ok, rows


def compare_baseline(rows: list[dict], path: str) -> bool:
    with open(path) as f:
        base = json.load(f)
    have = {(r["arch"], r["kernel"]): r for r in rows}
    archs = {r["arch"] for r in rows}
    ok = True
    for b in base["kernels"]:
        if b["arch"] not in archs:
            continue
        r = have.get((b["arch"], b["kernel"]))
        if r is None:
            print(f"  REGRESSION: sm_{b['arch']} {b['kernel']} of the baseline is missing")
            ok = False
        elif b["ok"] and not r["ok"]:
            print(f"  REGRESSION: sm_{b['arch']} {b['kernel']} passed in the baseline, fails now")
            ok = False
    print(f"  baseline {os.path.relpath(path, ROOT)}: {'no regression' if ok else 'REGRESSIONS'}")
    return ok


def launch_plans() -> list[tuple]:
    """Plans of the reference heads from the in-tree extension's planner ([] if not built)."""
    try:
        import torch
        from spinalkern import cuda_backend
        if not cuda_backend.has_cuda_kernels():
            return []
        out = []
        for name, kind, B, D, H, n, C, S, dtype, p in PLAN_HEADS:
            plan = json.loads(torch.ops.spinalkern.cuda_launch_plan(
                kind, B, D, H, n, C, S, getattr(torch, dtype), p))
            out.append(((name, kind, B, D, H, n, C, S, dtype, p), plan))
        return out
    except Exception as e:  # the report still lists the kernels
        print(f"  (launch plans unavailable: {e})")
        return []


def write_markdown(path: str, rows: list[dict], plans) -> None:
    archs = sorted({r["arch"] for r in rows})
    table = {}
    for r in rows:
        t = table.setdefault(r["kernel"], {"ok": True, "spill": 0, "loops": {}})
        t[r["arch"]] = r["regs"]
        t["ok"] &= r["ok"]
        t["spill"] += r["stack"] + r["local"]
        t["loops"][r["arch"]] = r["main_loops"]
    with open(path, "w") as f:
        f.write("| kernel | " + " | ".join(f"regs sm_{a}" for a in archs) +
                " | stack/spill bytes | main loops: LDGSTS / LDSM / math / LDG.16 (sm_"
                f"{archs[-1]}) | checks |\n")
        f.write("|---" * (len(archs) + 4) + "|\n")
        for name, t in sorted(table.items()):
            regs = " | ".join(str(t.get(a, "-")) for a in archs)
            loops_txt = "; ".join(f"{m['async_copies']} / {m['ldsm']} / {m['math']} / {m['ldg16']}"
                                  for m in t["loops"].get(archs[-1], [])) or "-"
            f.write(f"| `{name}` | {regs} | {t['spill']} | {loops_txt} | "
                    f"{'pass' if t['ok'] else '**FAIL**'} |\n")
        if plans:
            f.write("\nLaunch plans (from `torch.ops.spinalkern.cuda_launch_plan`, an H100: 132 SMs, "
                    "227 KB of shared memory per block); shared memory in bytes per region:\n\n")
            f.write("| head | B | dtype | dropout | kernel | CTAs | shared memory |\n|---|---|---|---|---|---|---|\n")
            for (name, kind, B, D, H, n, C, S, dtype, p), plan in plans:
                for k in ("forward", "chain", "wgrad"):
                    pk = plan[k]
                    smem = ", ".join(f"{r} {v}" for r, v in pk["smem"].items())
                    f.write(f"| {name} (D={D}, H={H}, n={n}, C={C}) | {B} | {dtype} | {p} | "
                            f"`{pk['kernel'].replace('head_', '')}` | {pk['ctas']} | {smem} |\n")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("libs", nargs="*", help="shared objects to check (default spinalkern/_C*.so)")
    ap.add_argument("--arch", action="append", default=None,
                    help="required SASS architecture, e.g. 90 (repeatable; default 80 and 90)")
    ap.add_argument("--ptx", action="append", default=[],
                    help="required PTX architecture, e.g. 90 (repeatable)")
    ap.add_argument("--markdown", help="write the report as markdown tables")
    ap.add_argument("--json", help="write the report as JSON (the baseline format)")
    ap.add_argument("--baseline", default=BASELINE, help="fail on regressions against this report")
    ap.add_argument("--no-baseline", action="store_true", help="skip the baseline comparison")
    args = ap.parse_args(argv)
    libs = args.libs or sorted(glob.glob(os.path.join(ROOT, "spinalkern", "_C*.so")))
    if not libs:
        print("no extension found: build it first (python setup.py build_ext --inplace)")
        return 1
    cuobjdump = find_cuobjdump()
    ok, all_rows = True, []
    for lib in libs:
        lib_ok, rows = check_lib(cuobjdump, lib, args.arch or ["80", "90"], args.ptx)
        ok &= lib_ok
        if rows and not args.no_baseline and os.path.exists(args.baseline):
            ok &= compare_baseline(rows, args.baseline)
        all_rows += rows
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"kernels": sorted(all_rows, key=lambda r: (r["arch"], r["kernel"]))}, f,
                      indent=1)
            f.write("\n")
    if args.markdown:
        in_tree = all(os.path.dirname(os.path.abspath(l)) == os.path.join(ROOT, "spinalkern")
                      for l in libs)
        write_markdown(args.markdown, all_rows, launch_plans() if in_tree else [])
    print("OK" if ok else "FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
