"""Machine facts and the two ceilings every speed is read against, measured here and now.

    python -m bench.machine --json machine.json              # GPU: 1 GiB copy, 8192^3 matmul
    python -m bench.machine --json machine.json --small      # CPU-sized (smoke runs)

Records the environment (device, driver, versions, commit), which spinalkern backends can run
here, the device-to-device copy bandwidth (bytes read + written per second) and the matmul
rate per dtype on random data (zeros run faster and are never used).  bench/heads.py reuses
the peaks of this file (``--peaks``) instead of measuring them again.
"""
from __future__ import annotations

import argparse
import os

import torch

from . import benchlib

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def measure_peaks(device, dtypes: list[str], small: bool) -> dict:
    """Copy bandwidth (bytes/s, read+write counted) and matmul FLOP/s per dtype.

    GPU: a 1 GiB device-to-device copy and 8192^3 matmuls on random data.  fp32 is measured
    with TF32 allowed, the fastest the hardware does for fp32 inputs (the fused kernels use
    TF32 dots when torch allows it), so the fp32 floor is not flattering.
    """
    gpu = torch.device(device).type == "cuda"
    nbytes = (32 << 20) if small or not gpu else (1 << 30)
    a = torch.randn(nbytes // 4, device=device)
    b = torch.empty_like(a)
    t = benchlib.median(benchlib.time_fn(lambda: b.copy_(a), device, target_ms=50, min_reps=5))
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
            t = benchlib.median(benchlib.time_fn(lambda: m1 @ m2, device, target_ms=100,
                                                 min_reps=5))
            peaks["matmul_flops_per_s"][name] = 2 * size ** 3 / (t * 1e-3)
            del m1, m2
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old_tf32
    peaks["matmul_size"] = size
    peaks["small"] = bool(small or not gpu)
    if gpu:
        torch.cuda.empty_cache()
    return peaks


def backends_here(device) -> dict:
    """{backend: "available" or why not} for the fused backends on ``device``."""
    import spinalkern
    from spinalkern import _backends
    dev = torch.device(device)
    have = spinalkern.available_backends(dev)
    out = {}
    for name in _backends.fused_names():
        if name in have:
            out[name] = "available"
        else:
            out[name] = _backends.get(name).build_hint()
    return out


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--json", default=None, help="write the facts here (atomically)")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda if present)")
    p.add_argument("--dtypes", nargs="*", default=["bf16"], choices=list(DTYPES))
    p.add_argument("--small", action="store_true", help="CPU-sized measurements")
    opts = p.parse_args(argv)
    device = torch.device(opts.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    data = {"kind": "machine", "environment": benchlib.environment(device),
            "torch_threads": torch.get_num_threads(), "backends": backends_here(device),
            "peaks": measure_peaks(device, opts.dtypes, small=opts.small)}
    if opts.json:
        benchlib.write_json(os.path.abspath(opts.json), data)
    print("\n".join(benchlib.facts_lines(data)), flush=True)
    return data


if __name__ == "__main__":
    main()
