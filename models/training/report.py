"""What a run reports: the log, progress bar, metrics.jsonl, summary.json and curves.png.

JSON outputs are strict (a NaN or infinite number is written as ``null``).  The progress bar
(tqdm) and the plots (matplotlib) are optional: without them a run says so once and goes on.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import statistics
import sys
import warnings

import torch

from .checkpoint import atomic_write_text
from .provenance import git_info

_warned: set = set()


def optional_import(module: str, purpose: str):
    """``module``, or None with one warning (per module) saying what is skipped without it."""
    try:
        return __import__(module, fromlist=["_"])
    except ImportError:
        if module not in _warned:
            _warned.add(module)
            warnings.warn(f"{module} is not installed: {purpose} (pip install {module})",
                          stacklevel=2)
        return None


def strict_json(obj, **kw) -> str:
    """JSON without the NaN / Infinity tokens that strict readers reject: those become null."""
    def clean(o):
        if isinstance(o, float) and not math.isfinite(o):
            return None
        if isinstance(o, dict):
            return {k: clean(v) for k, v in o.items()}
        if isinstance(o, (list, tuple)):
            return [clean(v) for v in o]
        return o
    return json.dumps(clean(obj), allow_nan=False, **kw)


def write_json(obj, path: str) -> None:
    atomic_write_text(strict_json(obj, indent=2) + "\n", path)


def write_metrics(history: list[dict], out_dir: str) -> None:
    """metrics.jsonl: one line per finished epoch."""
    atomic_write_text("".join(strict_json(h) + "\n" for h in history),
                      os.path.join(out_dir, "metrics.jsonl"))


def fmt_time(s: float) -> str:
    return f"{s:.1f}s" if s < 120 else f"{s / 60:.1f}min"


def progress_bar(tr, epoch: int):
    """A tqdm bar over the epoch's images (main process, --progress on or a terminal)."""
    cfg = tr.cfg
    show = cfg.progress == "on" or (cfg.progress == "auto" and sys.stderr.isatty())
    if not (show and tr.dist.is_main):
        return None
    tqdm = optional_import("tqdm", "no progress bar")
    if tqdm is None:
        return None
    return tqdm.tqdm(total=tr.steps_per_epoch * cfg.batch_size,
                     initial=tr.step_in_epoch * cfg.batch_size, unit="img", unit_scale=True,
                     leave=False, dynamic_ncols=True, desc=f"epoch {epoch + 1}/{cfg.epochs}")


def plot(kind: str, *args) -> None:
    """``plots.plot_<kind>(*args)`` when matplotlib is installed."""
    if optional_import("matplotlib", "no curves.png") is not None:
        from . import plots

        getattr(plots, f"plot_{kind}")(*args)


def finish(tr) -> dict:
    """The summary of the finished Trainer ``tr``: written to summary.json with curves.png."""
    cfg, hist = tr.cfg, tr.history
    final = hist[-1]
    summary = {"model": cfg.model, "data": tr.data.name, "num_classes": tr.data.num_classes,
               "seed": tr.seed, "fold": tr.fold, "epochs": len(hist), "params": tr.params}
    if cfg.folds:
        test_loss, test_acc = tr.evaluate(tr.data.test_x, tr.data.test_y)
        summary.update(val_accuracy=final["eval_accuracy"], val_loss=final["eval_loss"],
                       best_val_accuracy=max(h["eval_accuracy"] for h in hist),
                       test_accuracy=test_acc, test_loss=test_loss)
    else:
        best = max(hist, key=lambda h: h["eval_accuracy"])
        summary.update(test_accuracy=final["eval_accuracy"], test_loss=final["eval_loss"],
                       best_test_accuracy_test_selected=best["eval_accuracy"],
                       best_epoch_test_selected=best["epoch"])
    times = [h["epoch_time_s"] for h in hist]
    steady = [h["images_per_s"] for h in hist[1:] if not h["resumed_mid_epoch"]]
    git = git_info()
    summary.update(
        images_per_s=sum(h["images_timed"] for h in hist) / max(sum(times), 1e-9),
        images_per_s_after_first_epoch=statistics.median(steady) if steady else None,
        train_time_s=sum(times), epoch_times_s=times,
        accuracy_per_epoch=[h["eval_accuracy"] for h in hist],
        train_images=int(tr.data.train_x.shape[0]), eval_images=int(tr.data.eval_x.shape[0]),
        peak_gpu_memory_bytes=torch.cuda.max_memory_allocated(tr.device) if tr.cuda else None,
        device=str(tr.device),
        device_name=torch.cuda.get_device_name(tr.device) if tr.cuda else "cpu",
        threads=torch.get_num_threads(), cpu_count=os.cpu_count(),
        world_size=tr.dist.world, amp=tr.amp,
        cuda_graph={"requested": tr.use_graph, "used": tr.runner.captured,
                    "fallback_reason": tr.runner.fallback_reason},
        compile=cfg.compile, channels_last=tr.channels_last,
        normalization={"mean": tr.data.mean, "std": tr.data.std}, data_sha256=tr.data_sha256,
        head=dataclasses.asdict(tr.net.head_cfg), config=dataclasses.asdict(cfg),
        git_commit=git["commit"], git_dirty=git["dirty"], torch_version=torch.__version__,
    )
    if tr.dist.enabled:
        summary["ddp_params_in_sync"] = tr.params_in_sync()
    if tr.dist.is_main:
        write_json(summary, os.path.join(tr.out_dir, "summary.json"))
        if cfg.plot:
            plot("history", hist, os.path.join(tr.out_dir, "curves.png"),
                 f"{cfg.model} on {tr.data.name} ({tr.label or 'run'})")
    key = "val_accuracy" if cfg.folds else "test_accuracy"
    tr.log(f"done: {key} {summary[key]:.2f}% after {len(hist)} epochs, "
           f"{summary['images_per_s']:,.0f} img/s")
    return summary
