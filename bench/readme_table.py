"""Generate the README's performance section from the newest results files: never typed.

    python bench/readme_table.py                       # print markdown to stdout
    python bench/readme_table.py --readme README.md    # replace the marked block in place
    python bench/readme_table.py --heads F.json --train T.json   # given files

The newest non-smoke ``heads-*.json`` (and ``train-*.json``) in bench/results/ is used (by the
``date`` recorded inside).  In README.md the generated text goes between the lines
``<!-- perf-table:start -->`` and ``<!-- perf-table:end -->``.

Each goal of issue 5 is evaluated from the rows as measured and reported as met / missed,
with the worst case named.  A fused row only counts when its result was correct.
"""
from __future__ import annotations

import argparse
import glob
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import benchlib as common  # noqa: E402

START, END = "<!-- perf-table:start -->", "<!-- perf-table:end -->"
FUSED = ("triton", "cuda")
TRAIN_BATCHES = (128, 1024)     # goal 1: training batches, inclusive range
INFER_BATCH = 65536             # goal 2
TABLE_BATCHES = (128, 1024, 65536)
GOAL_DTYPE = "bf16"


def pick_newest(results_dir, prefix, allow_smoke):
    best = None
    for path in glob.glob(os.path.join(results_dir, f"{prefix}-*.json")):
        try:
            data = common.read_json(path)
        except (OSError, ValueError):
            continue
        if data.get("mode") == "smoke" and not allow_smoke:
            continue
        key = (data.get("environment", {}).get("date", ""), os.path.basename(path))
        if best is None or key > best[0]:
            best = (key, path, data)
    return (best[1], best[2]) if best else (None, None)


def fmt_ms(v):
    if v is None:
        return "-"
    return f"{v * 1e3:.1f} us" if v < 1 else f"{v:.2f} ms"


def fmt_bytes(n):
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024


def index_rows(rows):
    """{(head, pass, batch, dtype): {backend: row}} of rows that have a time."""
    cells = {}
    for r in rows:
        if r.get("median_ms") is None:
            continue
        cells.setdefault((r["head"], r["pass"], r["batch"], r["dtype"]), {})[r["backend"]] = r
    return cells


def ok(row):
    return row is not None and row.get("median_ms") is not None and row.get("correct", True)


# --------------------------------------------------------------------------------------------
# Goals
# --------------------------------------------------------------------------------------------
def worst(items, higher_is_better):
    """items: [(value, where)] -> (worst value, where) or None."""
    items = [i for i in items if i[0] is not None]
    if not items:
        return None
    return min(items) if higher_is_better else max(items)


def goal_cell(result, target, higher_is_better, unit, missing_note=""):
    if result is None:
        return "not measured" + missing_note
    value, where = result
    met = value >= target if higher_is_better else value <= target
    return f"{'met' if met else 'MISSED'}: {value:.2f}{unit} (worst: {where})"


def speed_goal(cells, fused, baseline, target):
    items, wrong = [], 0
    for (head, pass_, batch, dtype), by in cells.items():
        if pass_ != "fwd+bwd" or dtype != GOAL_DTYPE or not \
                TRAIN_BATCHES[0] <= batch <= TRAIN_BATCHES[1]:
            continue
        f, b = by.get(fused), by.get(baseline)
        if f is None or b is None:
            continue
        if not ok(f):
            wrong += 1
            items.append((0.0, f"{head} B={batch} wrong result"))
            continue
        items.append((b["median_ms"] / f["median_ms"], f"{head} B={batch}"))
    return goal_cell(worst(items, True), target, True, "x")


def roofline_goal(cells, fused, target):
    items = []
    for (head, pass_, batch, dtype), by in cells.items():
        if pass_ == "fwd" and dtype == GOAL_DTYPE and batch == INFER_BATCH and fused in by:
            f = by[fused]
            items.append((f["roofline_fraction"] if ok(f) else 0.0,
                          f"{head}" + ("" if ok(f) else " wrong result")))
    return goal_cell(worst(items, True), target, True, "")


def memory_goal(cells, fused, target):
    items = []
    for (head, pass_, batch, dtype), by in cells.items():
        if pass_ != "fwd+bwd" or dtype != GOAL_DTYPE:
            continue
        f, e = by.get(fused), by.get("torch")
        if f and e and f.get("peak_mem_bytes") is not None and e.get("peak_mem_bytes"):
            items.append((f["peak_mem_bytes"] / e["peak_mem_bytes"], f"{head} B={batch}"))
    return goal_cell(worst(items, False), target, False, "x")


def train_goal(train, fused, target):
    if train is None:
        return "not measured"
    runs = [r for r in train["rows"] if r.get("images_per_s")]
    items = []
    for model in dict.fromkeys(r["model"] for r in runs):
        paper = [r["images_per_s"] for r in runs if r["model"] == model and r.get("paper_loop")]
        mine = [r["images_per_s"] for r in runs if r["model"] == model
                and r.get("backend") == fused and not r.get("paper_loop")]
        if paper and mine:
            items.append((max(mine) / max(paper), model))
    return goal_cell(worst(items, True), target, True, "x")


GOALS = [
    ("fwd+bwd, B=128-1024: fused vs eager", ">= 3x",
     lambda c, t, f: speed_goal(c, f, "torch", 3.0)),
    ("fwd+bwd, B=128-1024: fused vs eager in a CUDA graph", ">= 2x",
     lambda c, t, f: speed_goal(c, f, "torch+graph", 2.0)),
    ("fwd+bwd, B=128-1024: fused vs torch.compile max-autotune", ">= 1.5x",
     lambda c, t, f: speed_goal(c, f, "torch+compile", 1.5)),
    ("fwd, B=65536: fraction of the roofline floor", ">= 0.75",
     lambda c, t, f: roofline_goal(c, f, 0.75)),
    ("fwd+bwd peak memory vs eager (every batch)", "<= 0.5x",
     lambda c, t, f: memory_goal(c, f, 0.5)),
    ("training images/s vs the papers' loop (best run per model)", ">= 10x",
     lambda c, t, f: train_goal(t, f, 10.0)),
]


# --------------------------------------------------------------------------------------------
# Markdown
# --------------------------------------------------------------------------------------------
def heads_table(heads, cells):
    backends = [b for b in ("torch", "torch+graph", "torch+compile", "triton", "triton+graph",
                            "cuda", "cuda+graph")
                if any(b in by for by in cells.values())]
    batches = sorted({k[2] for k in cells if k[2] in TABLE_BATCHES}) or sorted({k[2] for k in cells})
    dtype = GOAL_DTYPE if any(k[3] == GOAL_DTYPE for k in cells) else sorted({k[3] for k in cells})[0]
    lines = [f"Median time per call, {dtype} (speedup over eager torch); "
             "roofline = floor / time of the fastest fused backend; "
             "mem = its fwd+bwd peak memory / eager's. `!` marks a result outside tolerance.",
             "",
             "| head | pass | B | " + " | ".join(backends) + " | roofline | mem |",
             "|---|---|---:|" + "---:|" * len(backends) + "---:|---:|"]
    heads_order = [c["name"] for c in heads["settings"]["configs"]]
    for head in heads_order:
        for pass_ in ("fwd", "fwd+bwd"):
            for b in batches:
                by = cells.get((head, pass_, b, dtype))
                if not by:
                    continue
                cols = []
                for backend in backends:
                    r = by.get(backend)
                    if r is None:
                        cols.append("-")
                        continue
                    s = fmt_ms(r["median_ms"])
                    if backend != "torch" and r.get("speedup_vs_torch"):
                        s += f" ({r['speedup_vs_torch']:.1f}x)"
                    cols.append(s + ("" if ok(r) else " !"))
                fused = [by[f] for f in FUSED if ok(by.get(f))]
                best = min(fused, key=lambda r: r["median_ms"]) if fused else None
                roof = f"{best['roofline_fraction']:.2f}" if best else "-"
                mem = f"{best['peak_mem_vs_torch']:.2f}" if best and best.get(
                    "peak_mem_vs_torch") is not None else "-"
                lines.append(f"| {head} | {pass_} | {b} | " + " | ".join(cols) +
                             f" | {roof} | {mem} |")
    return lines


def train_table(train):
    lines = ["| model | run | images/s | vs papers' loop | epoch s | test acc % | peak mem | "
             "GPU util % | power W |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in train["rows"]:
        if r.get("images_per_s") is None:
            lines.append(f"| {r.get('model', '?')} | {r['label']} | failed: "
                         f"{(r.get('error') or '')[:60]} | | | | | | |")
            continue
        acc, speed = r.get("test_accuracy"), r.get("speedup_vs_paper_loop")
        lines.append(
            f"| {r['model']} | {r['label']} | {r['images_per_s']:,.0f} | "
            f"{f'{speed:.1f}x' if speed else '-'} | {r.get('epoch_s') or '-'} | "
            f"{f'{acc:.2f}' if acc is not None else '-'} | "
            f"{fmt_bytes(r.get('peak_mem_bytes'))} | {r.get('gpu_util_busy_mean_pct', '-')} | "
            f"{r.get('gpu_power_busy_mean_w', '-')} |")
    return lines


def render(heads_path, heads, train_path, train) -> str:
    out = ["_Generated by `python bench/readme_table.py` from the newest results in "
           "`bench/results/`; do not edit by hand._", ""]
    if heads is None:
        out.append("No kernel benchmark results yet: run `bench/gpu_runbook.sh OUTDIR` on a GPU "
                   "(see docs/benchmarks.md).")
        return "\n".join(out) + "\n"
    env, peaks = heads["environment"], heads["peaks"]
    mm = ", ".join(f"{k} {v / 1e12:.3g} TFLOP/s" for k, v in peaks["matmul_flops_per_s"].items())
    out += [f"**{env.get('device_name')}** (driver {env.get('driver')}), torch {env.get('torch')},"
            f" triton {env.get('triton')}, CUDA {env.get('cuda_runtime')}; commit "
            f"`{env.get('git_commit', '')[:12]}`, {env.get('date')}; file "
            f"`{os.path.basename(heads_path)}` ({heads.get('mode')} sweep).",
            f"Measured in the same run: copy {peaks['copy_bytes_per_s'] / 1e12:.2f} TB/s, "
            f"matmul {mm}.", ""]
    if heads.get("mode") == "smoke":
        out += ["**Smoke run (tiny sizes, possibly CPU): these numbers say nothing about "
                "performance.**", ""]
    for s in heads.get("skipped", []):
        out.append(f"- not measured: `{s['backend']}` ({s['reason']})")
    if heads.get("skipped_cells"):
        out.append(f"- {heads['skipped_cells']} cells skipped for the time budget")
    out.append("")
    cells = index_rows(heads["rows"])
    if not cells:
        out.append("The results file has no timed rows (see its `cell_errors` / `skipped_cells`).")
        return "\n".join(out) + "\n"
    out += heads_table(heads, cells)
    fused = [f for f in FUSED if any(f in by for by in cells.values())]
    device = env.get("device_name", "")
    out += ["", f"Goals (issue 5; {GOAL_DTYPE}; fused = the plain fused op, no CUDA graph)" +
            ("" if "H100" in device else f" - note: measured on {device}, goals are set for "
                                         "an H100") + ":", "",
            "| goal | target | " + " | ".join(fused or ["fused"]) + " |",
            "|---|---|" + "---|" * max(1, len(fused))]
    for name, target, fn in GOALS:
        cols = [fn(cells, train, f) for f in fused] or ["not measured (no fused backend ran)"]
        out.append(f"| {name} | {target} | " + " | ".join(cols) + " |")
    if train is not None:
        out += ["", f"Training throughput (`{os.path.basename(train_path)}`, "
                    f"{train['environment'].get('device_name')}):", ""]
        out += train_table(train)
    return "\n".join(out) + "\n"


def update_readme(path, text):
    with open(path) as f:
        content = f.read()
    if START not in content or END not in content:
        sys.exit(f"{path} has no '{START}' ... '{END}' block to replace")
    head, rest = content.split(START, 1)
    _, tail = rest.split(END, 1)
    with open(path, "w") as f:
        f.write(head + START + "\n" + text + END + tail)


def main(argv=None):
    p = argparse.ArgumentParser(description="README performance table from results JSON")
    p.add_argument("--results-dir", default=common.RESULTS_DIR)
    p.add_argument("--heads", default=None, help="heads results JSON (default: newest)")
    p.add_argument("--train", default=None, help="training results JSON (default: newest)")
    p.add_argument("--allow-smoke", action="store_true", help="also consider smoke runs")
    p.add_argument("--readme", default=None, help="update this file's marked block in place")
    opts = p.parse_args(argv)
    if opts.heads:
        heads_path, heads = opts.heads, common.read_json(opts.heads)
    else:
        heads_path, heads = pick_newest(opts.results_dir, "heads", opts.allow_smoke)
    if opts.train:
        train_path, train = opts.train, common.read_json(opts.train)
    else:
        train_path, train = pick_newest(opts.results_dir, "train", opts.allow_smoke)
    text = render(heads_path, heads, train_path, train)
    if opts.readme:
        update_readme(opts.readme, text)
    else:
        sys.stdout.write(text)
    return text


if __name__ == "__main__":
    main()
