"""Generate the README's performance section from the newest results files: never typed.

    python -m bench.readme_table                       # print markdown to stdout
    python -m bench.readme_table --readme README.md    # replace the marked block in place
    python -m bench.readme_table --heads F.json --train T.json --host H.json   # given files

The newest non-smoke ``heads-*.json``, ``train-*.json`` and ``host-*.json`` in results/bench/
are used (by the ``date`` recorded inside).  In README.md the generated text goes between the
lines ``<!-- perf-table:start -->`` and ``<!-- perf-table:end -->``.

Each goal is evaluated from the rows as measured and reported as met / missed, with the
worst case named.  A fused row only counts when its result was correct and a fused op ran
(``path`` "fused"; a fused backend that fell back to the eager code counts as a miss).
"""
from __future__ import annotations

import argparse
import glob
import os
import sys

from . import benchlib as common

START, END = "<!-- perf-table:start -->", "<!-- perf-table:end -->"
FUSED = ("triton", "cuda")
BACKENDS = ("torch", "torch+graph", "torch+compile", "triton", "triton+graph", "cuda",
            "cuda+graph")
TRAIN_BATCHES = (128, 1024)     # training batches, inclusive range
INFER_BATCH = 65536
TABLE_BATCHES = (128, 1024, 65536)
GOAL_DTYPE = "bf16"
BN_HEAD = "spinal_vgg5_bn_train"   # issue 11's goal; the goals of issue 5 are on the others


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
    """A row whose time may count: timed and correct."""
    return row is not None and row.get("median_ms") is not None and row.get("correct", True)


def fell_back(row):
    """A fused backend's row where no fused op ran (the module used the eager code)."""
    return row.get("base_backend", row["backend"]) in FUSED and row.get("path") == "eager"


def head_names(heads):
    settings = heads["settings"]
    return [h["name"] for h in settings.get("heads", settings.get("configs", []))]


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


def speed_goal(cells, fused, baseline, target, heads=None):
    """Worst fused / baseline speedup, fwd+bwd at the training batches, over ``heads``
    (default: every head but the BatchNorm training head, which has its own goal)."""
    items = []
    for (head, pass_, batch, dtype), by in cells.items():
        if pass_ != "fwd+bwd" or dtype != GOAL_DTYPE or not \
                TRAIN_BATCHES[0] <= batch <= TRAIN_BATCHES[1]:
            continue
        if (head not in heads) if heads is not None else head == BN_HEAD:
            continue
        f, b = by.get(fused), by.get(baseline)
        if f is None or b is None:
            continue
        if not ok(f):
            items.append((0.0, f"{head} B={batch} wrong result"))
        elif fell_back(f):
            items.append((0.0, f"{head} B={batch} ran the eager fallback"))
        else:
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
        if pass_ != "fwd+bwd" or dtype != GOAL_DTYPE or head == BN_HEAD:
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
    ("BatchNorm head in training (issue 11), fwd+bwd, B=128-1024: fused vs eager", ">= 3x",
     lambda c, t, f: speed_goal(c, f, "torch", 3.0, heads=[BN_HEAD])),
]


# --------------------------------------------------------------------------------------------
# Markdown
# --------------------------------------------------------------------------------------------
def heads_table(heads, cells):
    backends = [b for b in BACKENDS if any(b in by for by in cells.values())]
    batches = sorted({k[2] for k in cells if k[2] in TABLE_BATCHES}) or sorted({k[2] for k in cells})
    dtype = GOAL_DTYPE if any(k[3] == GOAL_DTYPE for k in cells) else sorted({k[3] for k in cells})[0]
    lines = [f"Median time per call, {dtype} (speedup over eager torch); "
             "roofline = floor / time of the fastest fused backend; "
             "mem = its fwd+bwd peak memory / eager's. `!` marks a result outside tolerance, "
             "`(eager)` a fused backend that ran the eager fallback (no fused op).",
             "",
             "| head | pass | B | " + " | ".join(backends) + " | roofline | mem |",
             "|---|---|---:|" + "---:|" * len(backends) + "---:|---:|"]
    for head in head_names(heads):
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
                    if fell_back(r):
                        s += " (eager)"
                    cols.append(s + ("" if ok(r) else " !"))
                fused = [by[f] for f in FUSED if ok(by.get(f)) and not fell_back(by[f])]
                best = min(fused, key=lambda r: r["median_ms"]) if fused else None
                roof = f"{best['roofline_fraction']:.2f}" if best else "-"
                mem = f"{best['peak_mem_vs_torch']:.2f}" if best and best.get(
                    "peak_mem_vs_torch") is not None else "-"
                lines.append(f"| {head} | {pass_} | {b} | " + " | ".join(cols) +
                             f" | {roof} | {mem} |")
    timed_out = sorted({f"{r['head']} {r['pass']} B={r['batch']}" for r in heads["rows"]
                        if r.get("compile_timed_out")})
    if timed_out:
        lines += ["", "torch.compile timed out (no row): " + ", ".join(timed_out) + "."]
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


def host_section(host_path, host) -> list[str]:
    env, st = host["environment"], host["settings"]
    out = [f"**Host overhead** (`{os.path.basename(host_path)}`): {env.get('device_name')}, "
           f"torch {env.get('torch')}, commit `{env.get('git_commit', '')[:12]}`, "
           f"{env.get('date')}. Tiny heads (B={st['batch']}, {st['dtype']}; "
           + ", ".join(f"{k}: D={v['D']} H={v['H']} n={v['n']} C={v['C']}"
                       + (f" S={v['S']}" if v["kind"] == "spinal" else "")
                       for k, v in st["heads"].items())
           + f"), median of {st['rounds'] * st.get('calls_per_round', 1)} calls timed one "
           f"by one in {st['rounds']} interleaved rounds, "
           f"{st['torch_threads']} CPU thread(s)"
           + (f", machine load {env['load_avg'][0]} on {env.get('cpu_count')} cores"
              if env.get("load_avg") else "")
           + "; (ratio to eager torch); bwd = fwd+bwd - fwd(grad).", ""]
    backends = list(dict.fromkeys(r["backend"] for r in host["rows"]))
    out += ["| head | pass | " + " | ".join(backends) + " |",
            "|---|---|" + "---:|" * len(backends)]
    for h in dict.fromkeys(r["head"] for r in host["rows"]):
        for p in dict.fromkeys(r["pass"] for r in host["rows"]):
            cols = []
            for b in backends:
                r = next((r for r in host["rows"] if (r["head"], r["backend"], r["pass"])
                          == (h, b, p)), None)
                if r is None:
                    cols.append("-")
                else:
                    ratio = r.get("ratio_vs_torch")
                    cols.append(f"{r['median_us']:.1f} us" + (
                        f" ({ratio:.2f}x)" if b != "torch" and ratio is not None else ""))
            out.append(f"| {h} | {p} | " + " | ".join(cols) + " |")
    skipped = [f"- not measured: `{s['backend']}` ({s['reason']})"
               for s in host.get("skipped", [])]
    out += ([""] + skipped if skipped else [])
    out += ["", "| goal (issue 10) | target | backend | result |", "|---|---|---|---|"]
    for g in host["goals"]:
        out.append(f"| {g['goal']} | {g['target']} | {g['backend']} | {g['status']} |")
    return out


def heads_section(heads_path, heads, train) -> list[str]:
    env, peaks = heads["environment"], heads["peaks"]
    mm = ", ".join(f"{k} {v / 1e12:.3g} TFLOP/s" for k, v in peaks["matmul_flops_per_s"].items())
    out = [f"**{env.get('device_name')}** (driver {env.get('driver')}), torch {env.get('torch')},"
           f" triton {env.get('triton')}, CUDA {env.get('cuda_runtime')}; commit "
           f"`{env.get('git_commit', '')[:12]}`, {env.get('date')}; file "
           f"`{os.path.basename(heads_path)}` ({heads.get('mode')} sweep"
           + ("" if heads.get("complete", True) else ", cut short") + ").",
           f"Measured in the same run: copy {peaks['copy_bytes_per_s'] / 1e12:.2f} TB/s, "
           f"matmul {mm}.", ""]
    if heads.get("mode") == "smoke":
        out += ["**Smoke run (tiny sizes, possibly CPU): these numbers say nothing about "
                "performance.**", ""]
    for s in heads.get("skipped", []):
        out.append(f"- not measured: `{s['backend']}` ({s['reason']})")
    if heads.get("skipped_cells"):
        out.append(f"- {heads['skipped_cells']} cells skipped for the time budget")
    if heads.get("compile_skipped"):
        out.append(f"- {heads['compile_skipped']} torch.compile rows skipped for the time budget")
    out.append("")
    cells = index_rows(heads["rows"])
    if not cells:
        out.append("The results file has no timed rows (see its `cell_errors` / `skipped_cells`).")
        return out
    out += heads_table(heads, cells)
    fused = [f for f in FUSED if any(f in by for by in cells.values())]
    device = env.get("device_name", "")
    out += ["", f"Goals ({GOAL_DTYPE}; fused = the plain fused op, no CUDA graph; issue 5 "
                f"unless named)" +
            ("" if "H100" in device else f" - note: measured on {device}, goals are set for "
                                         "an H100") + ":", "",
            "| goal | target | " + " | ".join(fused or ["fused"]) + " |",
            "|---|---|" + "---|" * max(1, len(fused))]
    for name, target, fn in GOALS:
        cols = [fn(cells, train, f) for f in fused] or ["not measured (no fused backend ran)"]
        out.append(f"| {name} | {target} | " + " | ".join(cols) + " |")
    return out


def render(heads_path, heads, train_path, train, host_path=None, host=None,
           source_note=True) -> str:
    out = ["_Generated by `python -m bench.readme_table` from the newest results in "
           "`results/bench/`; do not edit by hand._", ""] if source_note else []
    if heads is None:
        out.append("No kernel benchmark results yet: run `bench/gpu_runbook.sh OUTDIR` on a GPU "
                   "(see docs/benchmarks.md).")
    else:
        out += heads_section(heads_path, heads, train)
    if train is not None:
        out += ["", f"Training throughput (`{os.path.basename(train_path)}`, "
                    f"{train['environment'].get('device_name')}):", ""]
        out += train_table(train)
    if host is not None:
        out += [""] + host_section(host_path, host)
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


def load(path, results_dir, prefix, allow_smoke):
    if path:
        return path, common.read_json(path)
    return pick_newest(results_dir, prefix, allow_smoke)


def main(argv=None):
    p = argparse.ArgumentParser(description="README performance table from results JSON")
    p.add_argument("--results-dir", default=common.RESULTS_DIR)
    p.add_argument("--heads", default=None, help="heads results JSON (default: newest)")
    p.add_argument("--train", default=None, help="training results JSON (default: newest)")
    p.add_argument("--host", default=None, help="host-overhead results JSON (default: newest)")
    p.add_argument("--allow-smoke", action="store_true", help="also consider smoke runs")
    p.add_argument("--readme", default=None, help="update this file's marked block in place")
    opts = p.parse_args(argv)
    heads_path, heads = load(opts.heads, opts.results_dir, "heads", opts.allow_smoke)
    train_path, train = load(opts.train, opts.results_dir, "train", opts.allow_smoke)
    host_path, host = load(opts.host, opts.results_dir, "host", opts.allow_smoke)
    text = render(heads_path, heads, train_path, train, host_path, host)
    if opts.readme:
        update_readme(opts.readme, text)
    else:
        sys.stdout.write(text)
    return text


if __name__ == "__main__":
    main()
