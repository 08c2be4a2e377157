"""What spinalkern can do on this machine: ``python -m spinalkern.info [--json]``.

Prints the versions (spinalkern, Python, torch, CUDA, Triton), the GPUs, the backends that can
run on each device here and why the others cannot, and how the extension ``spinalkern._C`` was
built (torch it was built against, CUDA architectures, compiler flags; recorded by setup.py
in ``spinalkern/_build_info.py``).
"""
from __future__ import annotations

import argparse
import importlib
import json
import platform
import sys

import torch

import spinalkern
from spinalkern import _backends, cuda_backend


def _version(module: str) -> str | None:
    try:
        return importlib.import_module(module).__version__
    except Exception:  # noqa: BLE001  (not installed, or broken: report as absent)
        return None


def build_info() -> dict | None:
    """What setup.py recorded when it built spinalkern._C (None when it is not built)."""
    try:
        from spinalkern._build_info import BUILD_INFO
    except ImportError:
        return None
    return dict(BUILD_INFO)


def _devices() -> list[torch.device]:
    devices = [torch.device("cpu")]
    if torch.cuda.is_available():
        devices.append(torch.device("cuda"))
    return devices


def _why_not(name: str, device: torch.device) -> str:
    """Why backend ``name`` cannot run on ``device`` here (the error it would raise)."""
    try:
        _backends.resolve(name, device)
    except (RuntimeError, ValueError) as e:
        return str(e)
    return "unavailable"


def backend_report() -> dict:
    """{device: {"available": [...], "unavailable": {name: reason}}} for cpu (and cuda)."""
    report = {}
    for device in _devices():
        available = spinalkern.available_backends(device)
        names = [b for b in _backends.BACKENDS if b != "auto"]
        report[str(device)] = {
            "available": available,
            "auto": _backends.resolve("auto", device),
            "unavailable": {b: _why_not(b, device) for b in names if b not in available},
        }
    return report


def gpus() -> list[dict]:
    out = []
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            out.append({"index": i, "name": p.name, "capability": f"{p.major}.{p.minor}",
                        "memory_gib": round(p.total_memory / 2**30, 1),
                        "sms": p.multi_processor_count})
    return out


def info() -> dict:
    """Everything ``python -m spinalkern.info`` prints, as a dict."""
    built = build_info()
    ext = {"loaded": cuda_backend.available(), "cuda_kernels": cuda_backend.has_cuda_kernels()}
    if not ext["loaded"]:
        ext["hint"] = cuda_backend.build_hint()
    if built and built.get("torch") != torch.__version__:
        ext["warning"] = (f"spinalkern._C was built against torch {built.get('torch')}, this is "
                          f"torch {torch.__version__}: rebuild it (pip install "
                          "--no-build-isolation ., or python setup.py build_ext --inplace)")
    return {
        "spinalkern": spinalkern.__version__,
        "location": spinalkern.__path__[0],
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "triton": _version("triton"),
        "cuda_available": torch.cuda.is_available(),
        "gpus": gpus(),
        "backends": backend_report(),
        "extension": ext,
        "build": built,
    }


def _print(d: dict, out=None) -> None:
    p = lambda *a: print(*a, file=out or sys.stdout)  # noqa: E731
    p(f"spinalkern {d['spinalkern']}  ({d['location']})")
    p(f"python {d['python']}, torch {d['torch']} (CUDA {d['torch_cuda'] or 'none: CPU build'}), "
      f"triton {d['triton'] or 'not installed'}")
    p(f"platform {d['platform']}")
    if d["gpus"]:
        for g in d["gpus"]:
            p(f"GPU {g['index']}: {g['name']}, compute capability {g['capability']}, "
              f"{g['memory_gib']} GiB, {g['sms']} SMs")
    else:
        p("GPU: none (torch.cuda.is_available() is False)")
    p("")
    for device, r in d["backends"].items():
        p(f"backends on {device}: {', '.join(r['available'])}  (auto -> {r['auto']})")
        for name, why in r["unavailable"].items():
            p(f"  {name}: not available: {why}")
    p("")
    ext, b = d["extension"], d["build"]
    if not ext["loaded"]:
        p(f"extension spinalkern._C: not loaded. {ext.get('hint', '')}")
    else:
        p(f"extension spinalkern._C: loaded, "
          f"{'with CUDA kernels' if ext['cuda_kernels'] else 'C++ CPU ops only (no CUDA kernels)'}")
    if ext.get("warning"):
        p(f"  WARNING: {ext['warning']}")
    if b:
        p(f"  built against torch {b.get('torch')} (CUDA {b.get('torch_cuda')}), "
          f"python {b.get('python')}, C++ standard {b.get('cxx_standard')}")
        if b.get("with_cuda"):
            p(f"  nvcc {b.get('nvcc')}, TORCH_CUDA_ARCH_LIST={b.get('cuda_arch_list')}")
            gencode = [f for f in (b.get("nvcc_flags") or []) if "arch=" in f or "gencode" in f]
            if gencode:
                p(f"  architectures: {' '.join(gencode)}")
        p(f"  C++ flags: {' '.join(b.get('cxx_flags') or [])}")
        if b.get("with_cuda"):
            p(f"  nvcc flags: {' '.join(b.get('nvcc_flags') or [])}")
    elif ext["loaded"]:
        p("  (no build record: built by an older setup.py)")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m spinalkern.info", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    args = parser.parse_args(argv)
    d = info()
    if args.json:
        print(json.dumps(d, indent=2))
    else:
        _print(d)
    return 0


if __name__ == "__main__":
    sys.exit(main())
