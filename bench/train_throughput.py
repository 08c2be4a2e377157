"""Training throughput: models x heads x backends x AMP x CUDA graph x compile.

    python -m bench.train_throughput --quick --data-root data --out DIR   # the main runs
    python -m bench.train_throughput --data-root data --out DIR           # the full matrix
    python -m bench.train_throughput --smoke --out DIR                    # CPU, synthetic data

Every run is a separate process of the training CLI (``python -m models.train``), in a
scratch folder; its ``summary.json`` is read back (images/s, test accuracy, parameters, peak
GPU memory).  The papers' training-loop style (bench.paper_loop: DataLoader with CPU
transforms, fp32 eager, batch 100) runs on the same GPU in the same run as the baseline,
with 0 DataLoader workers (as the papers' scripts) and with 4.  While each run is going,
GPU utilisation, power and SM clock are sampled with nvidia-ml-py.

``images_per_s`` of a row is the steady rate (median epoch after the first, which holds
compilation, graph capture and autotuning) when the run had more than one epoch, otherwise
the rate over its only epoch.  One JSON file (``--json PATH``, or ``DIR/train-<UTC
time>.json`` with ``--out DIR``) holds every row; it is rewritten atomically after every run,
so a run cut short keeps what it measured.
"""
from __future__ import annotations

import argparse
import itertools
import os
import shutil
import subprocess
import sys
import tempfile
import time

from spinalkern import _backends

from . import benchlib as common

SPINAL_MODELS = ["spinal-vgg5", "progressive-vgg5", "spinal-resnet18", "progressive-resnet18"]
FC_MODELS = ["vgg5", "resnet18-fc512"]  # the papers' plain heads, for reference
BACKENDS = ["torch", *_backends.fused_names()]


def run_spec(model, backend="torch", amp="off", graph="off", compile_=False, paper=False,
             workers=0):
    label = (f"paper loop, {workers} workers" if paper else
             f"{backend}, amp {amp}, graph {graph}" + (", compile" if compile_ else ""))
    return {"model": model, "backend": backend, "amp": amp, "cuda_graph": graph,
            "compile": compile_, "paper_loop": paper, "workers": workers, "label": label}


def plan(mode: str, models_: list[str], backends: list[str]) -> list[dict]:
    """The list of runs, most important first (a time budget cuts the tail)."""
    if mode == "smoke":
        return [r for m in models_ for r in (run_spec(m, paper=True), run_spec(m, "torch"))]
    fused = [b for b in backends if b != "torch"]
    if mode == "quick":
        # 1: what the 10x goal needs, for every model; 2: the other baselines; 3: the rest.
        tiers = [lambda m: [run_spec(m, paper=True, workers=0)]
                 + [run_spec(m, b, "bf16", "on") for b in fused[:1]]
                 + [run_spec(m, "torch")],
                 lambda m: [run_spec(m, paper=True, workers=4), run_spec(m, "torch", "bf16", "on")]
                 + [run_spec(m, b, "bf16", "on") for b in fused[1:]],
                 lambda m: [run_spec(m, "torch", "bf16", "off", compile_=True)]
                 + [run_spec(m, b, "bf16", "off") for b in fused]]
        return [r for tier in tiers for m in models_ for r in tier(m)]
    runs = []
    for m in models_:
        spinal = m not in FC_MODELS
        runs += [run_spec(m, paper=True, workers=0), run_spec(m, paper=True, workers=4)]
        for b, amp, graph, comp in itertools.product(
                backends if spinal else ["torch"], ["off", "bf16"], ["off", "on"], [False, True]):
            runs.append(run_spec(m, b, amp, graph, comp))
    return runs


def command(spec, opts, out_dir):
    py = sys.executable
    common_args = ["--data", opts.data, "--data-root", opts.data_root,
                   "--epochs", str(opts.epochs), "--device", opts.device, "--out", out_dir]
    if opts.train_subset:
        common_args += ["--train-subset", str(opts.train_subset)]
    if opts.test_subset:
        common_args += ["--test-subset", str(opts.test_subset)]
    if not opts.verify:
        common_args += ["--no-verify"]
    if spec["paper_loop"]:
        return [py, "-m", "bench.paper_loop", "--model", spec["model"],
                "--workers", str(spec["workers"]), "--batch-size", "100"] + common_args
    cmd = [py, "-m", "models.train", "--model", spec["model"], "--backend", spec["backend"],
           "--batch-size", str(opts.batch_size), "--amp", spec["amp"],
           "--cuda-graph", spec["cuda_graph"], "--progress", "off", "--no-plot"] + common_args
    if spec["compile"]:
        cmd.append("--compile")
    return cmd


def read_summary(path: str) -> dict:
    """The fields we report from a summary.json of models.train or paper_loop.py."""
    s = common.read_json(path)
    steady = s.get("images_per_s_after_first_epoch")
    graph = s.get("cuda_graph")
    return {
        "images_per_s": steady or s.get("images_per_s"),
        "images_per_s_all_epochs": s.get("images_per_s"),
        "epoch_s": round(min(s["epoch_times_s"]), 3) if s.get("epoch_times_s") else None,
        "test_accuracy": s.get("test_accuracy"),
        "params": s.get("params"),
        "epochs": s.get("epochs"),
        "peak_mem_bytes": s.get("peak_gpu_memory_bytes"),
        "cuda_graph_used": graph.get("used") if isinstance(graph, dict) else graph,
        "cuda_graph_fallback": graph.get("fallback_reason") if isinstance(graph, dict) else None,
        "amp_used": s.get("amp"),
        "train_samples": s.get("train_images") or s.get("train_samples"),
    }


def run_one(spec, opts, scratch, timeout_s):
    out_dir = os.path.join(scratch, f"run{len(os.listdir(scratch))}")
    cmd = command(spec, opts, out_dir)
    row = dict(spec)
    t0 = time.perf_counter()
    with common.GpuSampler() as sampler:
        try:
            proc = subprocess.run(cmd, cwd=common.REPO_ROOT, capture_output=True,
                                  text=True, timeout=timeout_s)
            rc, log = proc.returncode, proc.stdout + proc.stderr
        except subprocess.TimeoutExpired as e:
            rc = "timeout"
            log = (e.stdout or b"").decode(errors="replace") if isinstance(e.stdout, bytes) \
                else (e.stdout or "")
    row["wall_s"] = round(time.perf_counter() - t0, 1)
    row["rc"] = rc
    row.update(sampler.summary())
    summary = os.path.join(out_dir, "summary.json")
    if rc == 0 and os.path.isfile(summary):
        row.update(read_summary(summary))
    else:
        row["images_per_s"] = None
        row["error"] = f"exit {rc}"
        row["log_tail"] = log[-3000:]
    row["command"] = " ".join(cmd[1:]).replace(common.REPO_ROOT + os.sep, "").replace(
        os.path.dirname(scratch), "<scratch>")
    shutil.rmtree(out_dir, ignore_errors=True)  # checkpoints can be large: keep nothing
    return row


def write_synthetic_mnist(root: str, train: int = 128, test: int = 32) -> None:
    """Tiny random data in the MNIST file layout, for the CPU smoke run (use --no-verify)."""
    import numpy as np
    from models.training.datasets import write_idx
    rng = np.random.default_rng(0)
    folder = os.path.join(root, "mnist")
    os.makedirs(folder, exist_ok=True)
    for prefix, n in (("train", train), ("t10k", test)):
        write_idx(os.path.join(folder, f"{prefix}-images-idx3-ubyte.gz"),
                  rng.integers(0, 256, (n, 28, 28), dtype=np.uint8))
        write_idx(os.path.join(folder, f"{prefix}-labels-idx1-ubyte.gz"),
                  rng.integers(0, 10, n, dtype=np.uint8))


def add_speedups(rows):
    """speedup_vs_paper_loop = images/s over the best papers'-loop run of the same model."""
    for r in rows:
        paper = [p["images_per_s"] for p in rows if p["model"] == r["model"]
                 and p["paper_loop"] and p.get("images_per_s")]
        if paper and r.get("images_per_s"):
            r["speedup_vs_paper_loop"] = r["images_per_s"] / max(paper)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=common.RESULTS_DIR,
                   help="folder for train-<UTC time>.json (default results/bench)")
    p.add_argument("--json", default=None, help="write exactly this file instead")
    p.add_argument("--smoke", action="store_true", help="CPU, synthetic data, tiny model")
    p.add_argument("--quick", action="store_true", help="a short matrix (the runbook)")
    p.add_argument("--models", nargs="*", default=None)
    p.add_argument("--backends", nargs="*", default=None, choices=BACKENDS)
    p.add_argument("--data", default="mnist")
    p.add_argument("--data-root", default="data")
    p.add_argument("--epochs", type=int, default=None, help="default 2 (1 in smoke)")
    p.add_argument("--batch-size", type=int, default=256, help="for models.train runs")
    p.add_argument("--train-subset", type=int, default=None)
    p.add_argument("--test-subset", type=int, default=None)
    p.add_argument("--device", default=None)
    p.add_argument("--no-verify", dest="verify", action="store_false")
    p.add_argument("--budget-s", type=float, default=None, help="start no run after this")
    p.add_argument("--run-timeout-s", type=float, default=300.0)
    opts = p.parse_args(argv)
    if opts.device is None:
        import torch
        opts.device = "cuda" if torch.cuda.is_available() else "cpu"
    opts.mode = "smoke" if opts.smoke else "quick" if opts.quick else "full"
    if opts.smoke:
        opts.models = opts.models or ["spinal-cnn-8"]
        opts.epochs = opts.epochs or 1
        opts.batch_size = 64
    else:
        opts.models = opts.models or (SPINAL_MODELS[:2] if opts.quick
                                      else SPINAL_MODELS + FC_MODELS)
        opts.epochs = opts.epochs or 2
        if opts.quick and opts.train_subset is None:
            opts.train_subset = 20000
    if opts.backends is None:
        import spinalkern
        opts.backends = spinalkern.available_backends(opts.device)
    return opts


def main(argv=None) -> str:
    opts = parse_args(argv)
    started = time.perf_counter()
    if not opts.smoke and not os.path.isdir(opts.data_root):
        sys.exit(f"[train] no data folder {opts.data_root!r}: put the MNIST IDX files in "
                 f"{os.path.join(opts.data_root, opts.data)}/ (see docs/benchmarks.md)")
    import torch
    path = opts.json or os.path.join(opts.out, f"train-{common.file_stamp()}.json")
    result = {
        "kind": "train", "mode": opts.mode, "environment": common.environment(opts.device),
        "settings": {k: getattr(opts, k) for k in ("models", "backends", "data", "epochs",
                                                   "batch_size", "train_subset",
                                                   "test_subset")},
        "skipped_runs": 0, "complete": False, "wall_s": 0.0, "rows": [],
        "torch_threads": torch.get_num_threads(),
    }
    if opts.mode == "smoke":
        result["settings"]["data"] = "synthetic (random) MNIST-layout files"
    rows = result["rows"]
    scratch = tempfile.mkdtemp(prefix="spinalkern-train-")
    try:
        if opts.smoke:
            opts.data_root = os.path.join(scratch, "data")
            opts.data, opts.verify = "mnist", False
            write_synthetic_mnist(opts.data_root)
        runs_dir = os.path.join(scratch, "runs")
        os.makedirs(runs_dir)
        runs = plan(opts.mode, opts.models, opts.backends)
        print(f"[train] {opts.mode}: {len(runs)} runs on {opts.device}, backends "
              f"{opts.backends}, data {opts.data} in {opts.data_root} -> {path}", flush=True)
        for i, spec in enumerate(runs):
            left = None if opts.budget_s is None else opts.budget_s - (time.perf_counter() - started)
            if left is not None and left < 10:
                result["skipped_runs"] += 1
                continue
            timeout = opts.run_timeout_s if left is None else min(opts.run_timeout_s, left)
            row = run_one(spec, opts, runs_dir, timeout)
            rows.append(row)
            ips = row.get("images_per_s")
            print(f"[train] {i + 1}/{len(runs)} {spec['model']}: {spec['label']}: "
                  + (f"{ips:,.0f} img/s" if ips else row.get("error", "?"))
                  + f" ({row['wall_s']} s)", flush=True)
            add_speedups(rows)
            result["wall_s"] = round(time.perf_counter() - started, 1)
            common.write_json(path, result)  # atomic: a cut-off run keeps every finished run
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    add_speedups(rows)
    result["complete"] = True
    result["wall_s"] = round(time.perf_counter() - started, 1)
    common.write_json(path, result)
    failed = [r for r in rows if not r.get("images_per_s")]
    print(f"[train] {len(rows)} runs, {len(failed)} failed, {result['skipped_runs']} skipped "
          f"for time -> {path}")
    for r in failed:
        print(f"  {r['model']} {r['label']}: {r.get('error')}\n    "
              + (r.get("log_tail") or "")[-600:].replace("\n", "\n    "))
    return path


if __name__ == "__main__":
    main()
