#!/usr/bin/env python
"""Checks a built CUDA extension without a GPU: architectures and per-kernel resources.

    python scripts/check_cuda_build.py [LIB ...] [--arch 80 --arch 90] [--markdown FILE]

LIB defaults to spinalkern/_C*.so.  Uses the cuobjdump shipped in triton's wheel
(triton/backends/nvidia/bin/cuobjdump), else the one on PATH.

* every LIB must contain SASS (cubin) for each --arch (default: 80 and 90);
* every kernel of every cubin is listed with registers, stack frame, local memory and static
  shared memory (``cuobjdump --dump-resource-usage``), plus the dynamic shared memory its
  staging buffers take (the kernels also keep a row tile of h / dh there, sized at launch);
* the check fails unless every kernel has STACK 0 and LOCAL 0: register spills are stored to
  the thread's stack frame in local memory, so a zero stack frame means zero spill bytes.

Exit status 0 when all checks pass.
"""
from __future__ import annotations

import argparse
import glob
import os
import re
import shutil
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Mirrors csrc/head_kernels.cuh: staging bytes per kernel config (BK = 32 columns; the WMMA
# path pads rows to 40 elements and adds 8 warps x 16x16 fp32 scratch, SIMT pads to 33).
ELEM_BYTES = {"__half": 2, "__nv_bfloat16": 2, "float": 4, "double": 8}


def _align(v):
    return (v + 127) // 128 * 128


def staging_bytes(dtype: str, bm: int, bn: int) -> int:
    tc = dtype in ("__half", "__nv_bfloat16")
    ld = 40 if tc else 33
    e = ELEM_BYTES[dtype]
    return _align(bm * ld * e) + _align(bn * ld * e) + (8 * 256 * 4 if tc else 0)


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


def demangle(names: list[str]) -> list[str]:
    cxxfilt = shutil.which("c++filt")
    if cxxfilt is None or not names:
        return names
    out = subprocess.run([cxxfilt], input="\n".join(names), capture_output=True, text=True,
                         check=True).stdout.splitlines()
    return out if len(out) == len(names) else names


def resource_usage(cuobjdump: str, lib: str) -> list[dict]:
    text = subprocess.run([cuobjdump, "--dump-resource-usage", lib], capture_output=True,
                          text=True, check=True).stdout
    rows, arch, name = [], None, None
    for line in text.splitlines():
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
            rows.append({"arch": arch, "mangled": name, "regs": int(vals["REG"]),
                         "stack": int(vals["STACK"]), "local": int(vals["LOCAL"]),
                         "static_smem": int(vals["SHARED"])})
            name = None
    for r, pretty in zip(rows, demangle([r["mangled"] for r in rows])):
        r["kernel"] = pretty
    return rows


def short_name(kernel: str) -> str:
    s = kernel.replace("spinalkern::kern::", "")
    s = re.sub(r"\(.*\)$", "", s).replace("void ", "")
    return s.replace("head_", "").replace("__nv_bfloat16", "bf16").replace("__half", "half")


def dynamic_staging(kernel: str) -> str:
    m = re.search(r"(forward_kernel|chain_kernel|dw_kernel)<(\w+), (\d+), (\d+)>", kernel)
    if not m:
        return "0"
    kind, dtype, bm, bn = m.group(1), m.group(2), int(m.group(3)), int(m.group(4))
    base = staging_bytes(dtype, bm, bn)
    if kind == "forward_kernel":
        return f"{base} + {bm}*n*H*{ELEM_BYTES[dtype]}"
    if kind == "chain_kernel":
        return f"{base} + {bm}*n*H*{8 if dtype == 'double' else 4}"
    return str(base)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("libs", nargs="*", help="shared objects to check (default spinalkern/_C*.so)")
    ap.add_argument("--arch", action="append", default=None,
                    help="required SASS architecture, e.g. 90 (repeatable; default 80 and 90)")
    ap.add_argument("--markdown", help="also write the resource report as a markdown table")
    args = ap.parse_args(argv)
    libs = args.libs or sorted(glob.glob(os.path.join(ROOT, "spinalkern", "_C*.so")))
    if not libs:
        print("no extension found: build it first (python setup.py build_ext --inplace)")
        return 1
    archs = args.arch or ["80", "90"]
    cuobjdump = find_cuobjdump()
    ok = True
    report = []
    for lib in libs:
        elfs = subprocess.run([cuobjdump, "--list-elf", lib], capture_output=True, text=True).stdout
        present = sorted(set(re.findall(r"\.sm_(\w+)\.cubin", elfs)))
        print(f"{lib}\n  SASS architectures: {', '.join('sm_' + a for a in present) or 'none'}")
        for a in archs:
            if a not in present:
                print(f"  FAIL: no sm_{a} code")
                ok = False
        rows = resource_usage(cuobjdump, lib)
        if not rows:
            print("  FAIL: no CUDA kernels in this library (CPU-only build?)")
            ok = False
            continue
        print(f"  {'arch':6} {'kernel':44} {'regs':>4} {'stack':>5} {'local':>5} {'smem':>5}  dynamic smem (bytes)")
        for r in sorted(rows, key=lambda r: (r["arch"], short_name(r["kernel"]))):
            bad = r["stack"] != 0 or r["local"] != 0
            ok &= not bad
            dyn = dynamic_staging(r["kernel"])
            print(f"  sm_{r['arch']:3} {short_name(r['kernel']):44} {r['regs']:4d} {r['stack']:5d} "
                  f"{r['local']:5d} {r['static_smem']:5d}  {dyn}{'   <-- SPILLS/LOCAL MEMORY' if bad else ''}")
            report.append((os.path.basename(lib), r, dyn))
        n_bad = sum(1 for r in rows if r["stack"] or r["local"])
        print(f"  {len(rows)} kernels, {n_bad} with a stack frame or local memory "
              f"({'zero spills' if n_bad == 0 else 'SPILLS'})")
    if args.markdown:
        arch_list = sorted({r["arch"] for _, r, _ in report})
        table = {}
        for lib, r, dyn in report:
            row = table.setdefault((lib, short_name(r["kernel"])), {"dyn": dyn, "spill": 0})
            row[r["arch"]] = r["regs"]
            row["spill"] += r["stack"] + r["local"]
        with open(args.markdown, "w") as f:
            f.write("| kernel | " + " | ".join(f"regs sm_{a}" for a in arch_list) +
                    " | spill/stack/local bytes | dynamic smem bytes (n*H = hidden width) |\n")
            f.write("|---" * (len(arch_list) + 3) + "|\n")
            for (lib, name), row in sorted(table.items()):
                regs = " | ".join(str(row.get(a, "-")) for a in arch_list)
                f.write(f"| `{name}` | {regs} | {row['spill']} | {row['dyn']} |\n")
    print("OK" if ok else "FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
