"""PNG plots from a results JSON of bench.heads (or bench.train_throughput).

    python -m bench.plots                          # newest results/bench/heads-*.json
    python -m bench.plots RESULTS.json --out DIR   # a given file

Writes, per dtype in the file, ``speedup_<dtype>.png`` (speedup over eager torch vs batch,
one panel per head config; solid = fwd+bwd, dashed = fwd) and ``roofline_<dtype>.png``
(fraction of the roofline floor vs batch).  For a training results file it writes
``train_images_per_s.png``.  Without matplotlib it warns once and writes nothing.
"""
from __future__ import annotations

import argparse
import math
import os
import sys

from . import benchlib as common

STYLE = {"fwd": "--", "fwd+bwd": "-"}


def _grid(n):
    cols = min(3, n)
    return math.ceil(n / cols), cols


def _series(rows, head, dtype, value):
    """{(backend, pass): [(batch, value), ...]} for one panel."""
    out = {}
    for r in rows:
        if r["head"] != head or r["dtype"] != dtype or r.get("median_ms") is None:
            continue
        v = value(r)
        if v is None:
            continue
        out.setdefault((r["backend"], r["pass"]), []).append((r["batch"], v))
    return {k: sorted(v) for k, v in out.items()}


def pyplot():
    """matplotlib.pyplot with the file-only backend, or None (one warning) without it."""
    matplotlib = common.optional_import("matplotlib", "no plots are written "
                                        "(pip install matplotlib)")
    if matplotlib is None:
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def plot_metric(plt, result, dtype, value, ylabel, title, path, logy, hline=None):
    rows = result["rows"]
    heads = list(dict.fromkeys(r["head"] for r in rows if r["dtype"] == dtype))
    if not heads:
        return None
    nr, nc = _grid(len(heads))
    fig, axes = plt.subplots(nr, nc, figsize=(5 * nc, 3.8 * nr), squeeze=False)
    backends = list(dict.fromkeys(r["backend"] for r in rows))
    colors = {b: plt.cm.tab10(i % 10) for i, b in enumerate(backends)}
    for ax, head in zip(axes.flat, heads):
        for (backend, pass_), pts in _series(rows, head, dtype, value).items():
            xs, ys = zip(*pts)
            ax.plot(xs, ys, STYLE.get(pass_, "-"), marker="o", ms=3, color=colors[backend],
                    label=f"{backend} {pass_}")
        ax.set_xscale("log", base=2)
        if logy:
            ax.set_yscale("log")
        if hline is not None:
            ax.axhline(hline, color="grey", lw=0.8)
        ax.set_title(head, fontsize=10)
        ax.set_xlabel("batch")
        ax.set_ylabel(ylabel)
        ax.grid(True, which="both", alpha=0.3)
    for ax in list(axes.flat)[len(heads):]:
        ax.axis("off")
    legend = {}
    for ax in axes.flat:
        for h, label in zip(*ax.get_legend_handles_labels()):
            legend.setdefault(label, h)
    labels, handles = list(legend), list(legend.values())
    fig.legend(handles, labels, loc="lower center", ncol=min(6, max(1, len(labels))),
               fontsize=8, frameon=False)
    env = result.get("environment", {})
    fig.suptitle(f"{title} ({dtype}) - {env.get('device_name', '?')}, "
                 f"{env.get('date', '')[:10]}, {env.get('git_commit', '')[:10]}", fontsize=11)
    fig.tight_layout(rect=(0, 0.08, 1, 0.95))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_heads(result, out_dir):
    plt = pyplot()
    if plt is None:
        return []
    os.makedirs(out_dir, exist_ok=True)
    written = []
    for dtype in dict.fromkeys(r["dtype"] for r in result["rows"]):
        p = plot_metric(plt, result, dtype, lambda r: r.get("speedup_vs_torch"),
                        "speedup vs eager torch", "Speedup over eager",
                        os.path.join(out_dir, f"speedup_{dtype}.png"), logy=True, hline=1.0)
        q = plot_metric(plt, result, dtype, lambda r: r.get("roofline_fraction"),
                        "fraction of roofline floor", "Roofline fraction",
                        os.path.join(out_dir, f"roofline_{dtype}.png"), logy=True, hline=1.0)
        written += [x for x in (p, q) if x]
    return written


def plot_train(result, out_dir):
    runs = [r for r in result["rows"] if r.get("images_per_s")]
    plt = pyplot() if runs else None
    if plt is None:
        return []
    os.makedirs(out_dir, exist_ok=True)
    labels = [r["label"] for r in runs]
    fig, ax = plt.subplots(figsize=(8, 0.35 * len(runs) + 1.5))
    ax.barh(range(len(runs)), [r["images_per_s"] for r in runs],
            color=["tab:grey" if r.get("paper_loop") else "tab:blue" for r in runs])
    ax.set_yticks(range(len(runs)), labels, fontsize=7)
    ax.invert_yaxis()
    ax.set_xscale("log")
    ax.set_xlabel("training images/s (grey: the papers' loop style)")
    env = result.get("environment", {})
    ax.set_title(f"Training throughput - {env.get('device_name', '?')}", fontsize=10)
    fig.tight_layout()
    path = os.path.join(out_dir, "train_images_per_s.png")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return [path]


def main(argv=None):
    p = argparse.ArgumentParser(description="PNG plots from a results JSON")
    p.add_argument("results", nargs="?", help="results JSON (default: newest heads-*.json)")
    p.add_argument("--out", default=None, help="folder for the PNGs (default: beside JSON)")
    opts = p.parse_args(argv)
    path = opts.results or common.newest(common.RESULTS_DIR, "heads")
    if path is None:
        sys.exit("no results file given and none in results/bench/")
    result = common.read_json(path)
    out = opts.out or os.path.dirname(os.path.abspath(path))
    written = plot_train(result, out) if result.get("kind") == "train" else \
        plot_heads(result, out)
    for w in written:
        print(w)
    return written


if __name__ == "__main__":
    main()
