"""Compile every shipped Triton kernel configuration ahead of time for sm_90 (no GPU needed)
and report registers, spill bytes and shared memory; fail if any configuration spills.

    python scripts/check_triton_kernels.py [--out triton_resources.json] [--jobs 2]

The configurations are the ones the launchers in ``spinalkern.triton_head`` pick for the
heads of the papers and the benchmark suite, in every dtype.  Register and spill counts come
from the cuobjdump that ships in triton's wheel (``--dump-resource-usage``): STACK/LOCAL bytes
above zero mean the kernel spills.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# A kernel is specialised on the head kind, the number of layers, the dtype and the tiles
# (H, D, C and S are runtime values), so these cover every preset head of models/ (n = 4 for
# the VGG-5 / ResNet18 heads, n = 6 for the small-CNN heads) in both row-tile regimes.
# Dropout on: its code is a superset of the dropout-free kernel's.
HEADS = [("spinal", 4), ("progressive", 4), ("spinal", 6), ("progressive", 6)]
DTYPES = ["bf16", "fp16", "fp32"]
BATCHES = [1024, 65536]  # the two row-tile regimes of kernel_config


def _signature(kernel_name: str, dt: str, n: int) -> dict:
    ptrs = lambda k: {name: f"*{dt}" for name in k}  # noqa: E731
    wt = tuple([f"*{dt}"] * (n + 1))
    sizes = {"B": "i32", "D": "i32", "H": "i32", "C": "i32", "S": "i32", "seg": "i32",
             "threshold": "i64", "scale": "fp32"}
    if kernel_name == "fwd":
        return {**ptrs(["x_ptr", "y_ptr", "hid_ptr"]), "w_ptrs": wt, "b_ptrs": wt,
                "seed_ptr": "*i64", **sizes}
    if kernel_name == "bwd_chain":
        return {**ptrs(["dy_ptr", "x_ptr", "hid_ptr"]), "w_ptrs": wt, "seed_ptr": "*i64",
                **ptrs(["dx_ptr", "dz_ptr"]), **sizes}
    if kernel_name == "wgrad":
        return {**ptrs(["dy_ptr", "dz_ptr", "x_ptr", "hid_ptr"]), "seed_ptr": "*i64",
                "out_ptr": "*fp32", **sizes, "rows_per_split": "i32", "total": "i32"}
    raise ValueError(kernel_name)


def _resources(cubin: bytes) -> dict:
    import triton
    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([str(tool), "--dump-resource-usage", f.name], check=True,
                              capture_output=True, text=True).stdout
    fields = dict(re.findall(r"(REG|STACK|SHARED|LOCAL):(\d+)", text))
    return {"registers": int(fields["REG"]), "stack_bytes": int(fields["STACK"]),
            "local_bytes": int(fields["LOCAL"]), "static_shared_bytes": int(fields["SHARED"])}


def compile_one(job: tuple) -> dict:
    os.environ.pop("TRITON_INTERPRET", None)
    import triton
    import triton.language as tl
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from spinalkern import triton_head as th
    kernel_name, (kind, n), dt, batch = job
    tl_dt = {"bf16": tl.bfloat16, "fp16": tl.float16, "fp32": tl.float32}[dt]
    import torch
    torch_dt = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[dt]
    cfg = th.kernel_config(kernel_name, batch, torch_dt)
    fn = {"fwd": th._head_fwd_kernel, "bwd_chain": th._head_bwd_chain_kernel,
          "wgrad": th._head_wgrad_kernel}[kernel_name]
    consts = dict(KIND=0 if kind == "spinal" else 1, N_LAYERS=n, DROPOUT=True, CDT=tl_dt,
                  ACC_DT=tl.float32, DOT_PREC="ieee" if dt == "fp32" else "tf32", BLOCK_M=cfg.block_m,
                  BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k)
    sig = _signature(kernel_name, dt, n)
    sig.update({k: "constexpr" for k in consts})
    compiled = triton.compile(ASTSource(fn, sig, constexprs=consts),
                              target=GPUTarget("cuda", 90, 32),
                              options={"num_warps": cfg.num_warps})
    row = {"kernel": kernel_name, "head": f"{kind} n={n}", "dtype": dt, "batch_regime": batch,
           "num_warps": cfg.num_warps, **{k: v for k, v in consts.items() if k.startswith("BLOCK")},
           "shared_bytes": compiled.metadata.shared, **_resources(compiled.asm["cubin"])}
    row["spills"] = row["stack_bytes"] > 0 or row["local_bytes"] > 0
    return row


def jobs() -> list[tuple]:
    out = []
    for head in HEADS:
        for dt in DTYPES:
            # fp32 uses one tile size for every batch; wgrad one for every batch
            for batch in (BATCHES if dt != "fp32" else BATCHES[:1]):
                out += [("fwd", head, dt, batch), ("bwd_chain", head, dt, batch)]
            out.append(("wgrad", head, dt, BATCHES[0]))
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=None, help="write the report as JSON here")
    ap.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1))
    args = ap.parse_args(argv)
    todo = jobs()
    with ProcessPoolExecutor(args.jobs) as pool:
        rows = list(pool.map(compile_one, todo))
    print(f"{'kernel':10} {'head':16} {'dtype':5} {'BM':>3} {'warps':>5} {'regs':>4} "
          f"{'smem':>6} {'stack':>5} {'local':>5}")
    for r in rows:
        print(f"{r['kernel']:10} {r['head']:16} {r['dtype']:5} {r['BLOCK_M']:>3} "
              f"{r['num_warps']:>5} {r['registers']:>4} {r['shared_bytes']:>6} "
              f"{r['stack_bytes']:>5} {r['local_bytes']:>5}")
    if args.out:
        Path(args.out).write_text(json.dumps({"target": "sm_90", "rows": rows}, indent=1))
    bad = [r for r in rows if r["spills"]]
    if bad:
        print(f"FAIL: {len(bad)} configuration(s) spill registers", file=sys.stderr)
        return 1
    print(f"OK: {len(rows)} configurations, zero spills")
    return 0


if __name__ == "__main__":
    sys.exit(main())
