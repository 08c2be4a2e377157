"""Small helpers shared by the benchmark scripts in bench/.

Nothing here knows about heads or models: environment facts for the results JSON (including
the commit, also on a machine where ``.git`` did not travel), a timer that works on CPU and
GPU, a background sampler of GPU utilisation / power / clocks, optional imports that degrade
with one warning, and file helpers.  Everything that needs a GPU or nvidia-ml-py is guarded so
that the CPU smoke mode runs anywhere.
"""
from __future__ import annotations

import datetime as _dt
import glob
import json
import os
import platform
import statistics
import threading
import time
import warnings

from models.training import provenance

BENCH_DIR = os.path.dirname(os.path.abspath(__file__))
REPO_ROOT = os.path.dirname(BENCH_DIR)
RESULTS_DIR = os.path.join(REPO_ROOT, "results", "bench")
# Written by `python -m bench.commit` before the checkout is copied to a machine without .git
COMMIT_FILE = os.path.join(REPO_ROOT, provenance.DEFAULT_COMMIT_FILE)


# --------------------------------------------------------------------------------------------
# Optional imports
# --------------------------------------------------------------------------------------------
_warned: set[str] = set()


def optional_import(name: str, what: str):
    """``import name``, or None with one warning (per module and process) saying what is lost.

    For packages that only make a run nicer (plots, progress bars, GPU sampling): a finished
    benchmark must never crash on them.
    """
    import importlib
    try:
        return importlib.import_module(name)
    except ImportError as e:
        if name not in _warned:
            _warned.add(name)
            warnings.warn(f"{name} is not installed ({e}); {what}", RuntimeWarning, stacklevel=2)
        return None


# --------------------------------------------------------------------------------------------
# Environment facts
# --------------------------------------------------------------------------------------------
def commit_info() -> dict:
    """The commit the results come from: {"commit", "dirty", "source"}, from the repository's
    one git-info helper (``models.training.provenance``: git in a checkout, else the commit file
    written by ``python -m bench.commit`` before the checkout was copied to a machine without
    .git); commit "unknown" when neither answers."""
    info = provenance.git_info(REPO_ROOT)
    return {**info, "commit": info["commit"] or "unknown"}


def git_commit() -> str:
    """HEAD's commit id, with "-dirty" when tracked files differ from it (see commit_info)."""
    return provenance.commit_label(provenance.git_info(REPO_ROOT))


def utc_now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat()


def file_stamp() -> str:
    """A timestamp usable in file names; sorts in time order."""
    return _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")


def nvidia_driver_version() -> str | None:
    pynvml = optional_import("pynvml", "the GPU driver version is not recorded "
                             "(pip install nvidia-ml-py)")
    if pynvml is None:
        return None
    try:
        pynvml.nvmlInit()
        try:
            v = pynvml.nvmlSystemGetDriverVersion()
            return v.decode() if isinstance(v, bytes) else v
        finally:
            pynvml.nvmlShutdown()
    except Exception:  # no driver, no library, no GPU: all mean "not known"
        return None


def environment(device) -> dict:
    """Device name, driver, library versions, git commit and date for a results file."""
    import torch
    commit = commit_info()
    info = {
        "date": utc_now(),
        "git_commit": commit["commit"] + ("-dirty" if commit["dirty"] else ""),
        "git_commit_source": commit["source"],
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda_runtime": torch.version.cuda,
        "host_cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        # other work on the machine while this ran (1, 5, 15 minute run-queue averages)
        "load_avg": [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None,
        "device_type": torch.device(device).type,
    }
    try:
        import triton
        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    if torch.device(device).type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info["device_name"] = props.name
        info["sm_count"] = props.multi_processor_count
        info["compute_capability"] = f"{props.major}.{props.minor}"
        info["memory_bytes"] = props.total_memory
        info["l2_cache_bytes"] = getattr(props, "L2_cache_size", None)
        info["driver"] = nvidia_driver_version()
        info["tf32_matmul"] = torch.backends.cuda.matmul.allow_tf32
    else:
        info["device_name"] = "cpu: " + (platform.processor() or platform.machine())
        info["driver"] = None
    return info


def facts_lines(data: dict) -> list[str]:
    """Four lines about a machine.json of bench.machine: device, versions, ceilings, backends."""
    env, peaks = data["environment"], data["peaks"]
    mm = ", ".join(f"{k} {v / 1e12:.3g} TFLOP/s" for k, v in peaks["matmul_flops_per_s"].items())
    return [f"device: {env.get('device_name')} (driver {env.get('driver')}, "
            f"{env.get('sm_count', '-')} SMs, L2 {env.get('l2_cache_bytes', '-')} B)",
            f"versions: python {env['python']}, torch {env['torch']}, triton {env['triton']}, "
            f"CUDA {env['cuda_runtime']}; commit {env['git_commit']} "
            f"(from {env.get('git_commit_source')})",
            f"measured: copy {peaks['copy_bytes_per_s'] / 1e12:.3g} TB/s "
            f"({peaks['copy_size_bytes'] >> 20} MiB), matmul {mm} "
            f"({peaks['matmul_size']}^3, random data)",
            "backends: " + ", ".join(f"{k} {v}" for k, v in data["backends"].items())]


# --------------------------------------------------------------------------------------------
# Timing
# --------------------------------------------------------------------------------------------
def synchronize(device) -> None:
    import torch
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def time_fn(fn, device, target_ms: float = 20.0, min_reps: int = 3, max_reps: int = 200,
            warmup: int = 2) -> list[float]:
    """Run ``fn()`` repeatedly and return the time of each call in milliseconds.

    Warm-up calls first (compilation, allocator, clocks), then one timed call to estimate the
    cost, then enough calls to fill about ``target_ms`` (between min_reps and max_reps).  On a
    GPU each call is bracketed by CUDA events recorded on the current stream, so the numbers
    are device time including any launch gaps; on CPU time.perf_counter is used.
    """
    import torch
    for _ in range(warmup):
        fn()
    synchronize(device)
    cuda = torch.device(device).type == "cuda"
    t0 = time.perf_counter()
    fn()
    synchronize(device)
    est_ms = max((time.perf_counter() - t0) * 1e3, 1e-3)
    reps = int(min(max_reps, max(min_reps, target_ms / est_ms)))
    if cuda:
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
        for s, e in zip(starts, ends):
            s.record()
            fn()
            e.record()
        torch.cuda.synchronize(device)
        return [s.elapsed_time(e) for s, e in zip(starts, ends)]
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return times


def median(xs):
    return statistics.median(xs) if xs else None


# --------------------------------------------------------------------------------------------
# GPU sampling (nvidia-ml-py) in a background thread
# --------------------------------------------------------------------------------------------
class GpuSampler:
    """Samples GPU utilisation (%), power (W) and SM clock (MHz) every ``interval_s``.

    Use as a context manager; ``summary()`` gives mean and max of each quantity.  Without a
    GPU or nvidia-ml-py it records nothing and ``summary()`` says why.
    """

    def __init__(self, device_index: int = 0, interval_s: float = 0.1):
        self.device_index = device_index
        self.interval_s = interval_s
        self.samples: list[tuple[float, float, float]] = []
        self.error: str | None = None
        self._stop = threading.Event()
        self._thread = None
        self._nvml = None
        self._handle = None

    def __enter__(self):
        pynvml = optional_import("pynvml", "GPU utilisation, power and clocks are not sampled "
                                 "(pip install nvidia-ml-py)")
        if pynvml is None:
            self.error = "nvml unavailable: nvidia-ml-py is not installed"
            return self
        try:
            pynvml.nvmlInit()
            self._nvml = pynvml
            # CUDA_VISIBLE_DEVICES remaps torch's index 0; nvml sees all devices.  With one
            # visible GPU (the benchmark machines) the first listed is the right one.
            visible = os.environ.get("CUDA_VISIBLE_DEVICES", "")
            index = self.device_index
            if visible and visible.split(",")[0].strip().isdigit():
                index = int(visible.split(",")[self.device_index].strip())
            self._handle = pynvml.nvmlDeviceGetHandleByIndex(index)
        except Exception as e:  # noqa: BLE001 - any failure means "no sampling"
            self.error = f"nvml unavailable: {type(e).__name__}: {e}"
            return self
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self):
        nv, h = self._nvml, self._handle
        while not self._stop.is_set():
            try:
                util = nv.nvmlDeviceGetUtilizationRates(h).gpu
                power = nv.nvmlDeviceGetPowerUsage(h) / 1000.0
                clock = nv.nvmlDeviceGetClockInfo(h, nv.NVML_CLOCK_SM)
                self.samples.append((float(util), float(power), float(clock)))
            except Exception as e:  # noqa: BLE001
                self.error = f"nvml sample failed: {e}"
                return
            self._stop.wait(self.interval_s)

    def __exit__(self, *exc):
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=2)
        if self._nvml is not None:
            try:
                self._nvml.nvmlShutdown()
            except Exception:  # noqa: BLE001
                pass
        return False

    def summary(self) -> dict:
        """Mean/max over all samples, and over the busy ones (utilisation > 0).

        The sampled span usually includes idle stretches (process start-up, data loading),
        so the busy-sample means say more about the training itself.
        """
        if not self.samples:
            return {"gpu_samples": 0, "gpu_sampling_note": self.error or "no samples"}
        util, power, clock = zip(*self.samples)
        busy = [s for s in self.samples if s[0] > 0] or self.samples
        b_util, b_power, b_clock = zip(*busy)
        return {
            "gpu_samples": len(self.samples),
            "gpu_busy_samples": len([s for s in self.samples if s[0] > 0]),
            "gpu_util_mean_pct": round(statistics.fmean(util), 1),
            "gpu_util_busy_mean_pct": round(statistics.fmean(b_util), 1),
            "gpu_power_busy_mean_w": round(statistics.fmean(b_power), 1),
            "gpu_power_max_w": round(max(power), 1),
            "gpu_sm_clock_busy_mean_mhz": round(statistics.fmean(b_clock)),
            "gpu_sm_clock_min_mhz": min(clock),
        }


# --------------------------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------------------------
def write_json(path: str, obj) -> str:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1, sort_keys=False, default=str)
        f.write("\n")
    os.replace(tmp, path)
    return path


def read_json(path: str):
    with open(path) as f:
        return json.load(f)


def newest(pattern_dir: str, prefix: str) -> str | None:
    """Newest ``prefix-*.json`` in a folder (by the timestamp in the name, then mtime)."""
    files = glob.glob(os.path.join(pattern_dir, f"{prefix}-*.json"))
    if not files:
        return None
    return max(files, key=lambda p: (os.path.basename(p), os.path.getmtime(p)))
