"""Every run asked for (seeds x folds): their folders, one Trainer each, the aggregate.

With one seed and no folds the run writes to ``--out``; otherwise each run writes to
``--out/seed<S>[-fold<F>]`` and ``--out/summary.json`` reports the mean and the sample
standard deviation over the runs.
"""
from __future__ import annotations

import dataclasses
import os
import statistics

import torch

from .checkpoint import CORRUPT_SUFFIX, LATEST, PREVIOUS, checkpoint_files
from .config import ConfigError, TrainConfig, check_config
from .datasets import load_dataset
from .distributed import Dist, resolve_device
from .report import plot, write_json
from .trainer import Trainer

# Files a run writes into its folder: never replaced without --resume (same run) or --overwrite.
RUN_OUTPUTS = ("summary.json", "metrics.jsonl", "curves.png", LATEST, PREVIOUS,
               LATEST + CORRUPT_SUFFIX)


def run_all(cfg: TrainConfig) -> dict | None:
    """Every run asked for (seeds x folds); the top-level summary (None if stopped early)."""
    dist = Dist()
    check_config(cfg, dist)
    device = resolve_device(cfg, dist)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    elif dist.enabled and device.type == "cpu":
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // dist.local_world))
    seeds = cfg.seeds or [cfg.seed]
    folds = list(range(cfg.folds)) if cfg.folds else [None]
    runs = [(s, f, f"seed{s}" + (f"-fold{f}" if f is not None else "")) for s in seeds
            for f in folds]
    run_dirs = [cfg.out] if len(runs) == 1 else [os.path.join(cfg.out, r[2]) for r in runs]
    claim_out_folders(cfg, run_dirs, dist)
    dist.init(device)
    try:
        if dist.enabled and not dist.is_main:
            dist.barrier()  # the main process reads first: a download happens only there
        raw = load_dataset(cfg.data, cfg.data_root, download=cfg.download, verify=cfg.verify)
        if dist.enabled and dist.is_main:
            dist.barrier()
        results, labels = [], []
        for (seed, fold, label), out_dir in zip(runs, run_dirs):
            trainer = Trainer(cfg, raw, seed, fold, out_dir, dist,
                              label=label if len(runs) > 1 else "")
            summary = trainer.run()
            if summary is None:  # stopped early (--stop-after-steps)
                dist.barrier()
                return None
            results.append((summary, trainer.history))
            labels.append(label)
            del trainer
        out = results[0][0] if len(runs) == 1 else aggregate(cfg, results, labels, dist)
        # Leave together: a rank that tears gloo down while its peer is still finishing can
        # abort at exit ("terminate called without an active exception").
        dist.barrier()
        return out
    finally:
        dist.close()


def claim_out_folders(cfg: TrainConfig, run_dirs: list[str], dist: Dist) -> None:
    """Refuse to replace another run's outputs; with --overwrite remove them first.

    With --resume a run folder may hold outputs only if it holds a checkpoint to continue
    from (the same run); the top folder of several runs holds their aggregate, which is
    rewritten when any of them is resumed.
    """
    folders = run_dirs if run_dirs == [cfg.out] else [cfg.out, *run_dirs]
    found = {d: [f for f in RUN_OUTPUTS if os.path.isfile(os.path.join(d, f))] for d in folders}
    taken = {d: fs for d, fs in found.items() if fs}
    if not taken:
        return
    if cfg.overwrite:
        if dist.is_main:
            for d, fs in taken.items():
                for f in fs:
                    os.remove(os.path.join(d, f))
                print(f"--overwrite: removed {', '.join(fs)} from {d}", flush=True)
        return
    resumable = {d for d in run_dirs if checkpoint_files(d)}
    if cfg.resume and resumable:
        taken = {d: fs for d, fs in taken.items()
                 if d not in resumable and not (d == cfg.out and d not in run_dirs)}
        if not taken:
            return
    d, fs = next(iter(taken.items()))
    hint = ("it has no checkpoint to resume from" if cfg.resume else
            "pass --resume to continue that run" if d in resumable else
            "that run has no checkpoint to resume from")
    raise ConfigError(f"{d} holds the outputs of another run ({', '.join(fs)}): {hint}; pass "
                      "--overwrite to replace them, or choose another --out")


def _mean_std(values: list[float]) -> tuple[float, float]:
    mean = statistics.fmean(values)
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return mean, std


def aggregate(cfg: TrainConfig, results, labels, dist: Dist) -> dict:
    """The top-level summary of several runs: mean, std and per-run values."""
    sums = [s for s, _ in results]
    top = {"model": cfg.model, "data": sums[0]["data"], "runs": len(sums), "labels": labels,
           "epochs": sums[0]["epochs"], "params": sums[0]["params"]}
    keys = ["test_accuracy"] + (["val_accuracy"] if cfg.folds else
                                ["best_test_accuracy_test_selected"])
    for k in keys + ["images_per_s"]:
        vals = [s[k] for s in sums]
        mean, std = _mean_std(vals)
        top[k], top[k + "_std"], top[k + "_per_run"] = mean, std, vals
    top["std_note"] = "sample standard deviation (n - 1) over the runs"
    top.update(peak_gpu_memory_bytes=max((s["peak_gpu_memory_bytes"] or 0) for s in sums) or None,
               device_name=sums[0]["device_name"], world_size=sums[0]["world_size"],
               threads=sums[0]["threads"], epoch_times_s=[s["epoch_times_s"] for s in sums],
               config=dataclasses.asdict(cfg), git_commit=sums[0]["git_commit"],
               git_dirty=sums[0]["git_dirty"])
    if dist.is_main:
        write_json(top, os.path.join(cfg.out, "summary.json"))
        if cfg.plot:
            plot("runs", [h for _, h in results], labels, os.path.join(cfg.out, "curves.png"),
                 f"{cfg.model} on {top['data']}")
        key = "val_accuracy" if cfg.folds else "test_accuracy"
        print(f"{len(sums)} runs: {key} {top[key]:.2f} ± {top[key + '_std']:.2f} %", flush=True)
    return top
