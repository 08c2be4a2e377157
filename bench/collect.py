"""Bring a GPU runbook's output into results/bench/ and regenerate the README's table.

    python -m bench.collect OUTDIR                 # OUTDIR: what came back from the GPU machine
    python -m bench.collect OUTDIR --no-readme     # copy only

Copies ``heads.json``, ``train.json`` and ``host.json`` to ``results/bench/<kind>-<UTC time
of the run>.json`` and ``summary.md`` to ``results/bench/runbook-<time>.md`` (``runbook.tgz``
too with ``--keep-archive``), then runs ``python -m bench.readme_table --readme README.md``.
Smoke runs (the CPU rehearsal) are refused unless ``--allow-smoke``: their numbers say
nothing about performance.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import os
import shutil
import sys

from . import benchlib as common
from . import readme_table


def stamp_of(data: dict) -> str:
    """The run's own time (from its environment record) in file-name form."""
    date = data.get("environment", {}).get("date")
    try:
        when = _dt.datetime.fromisoformat(date)
    except (TypeError, ValueError):
        when = _dt.datetime.now(_dt.timezone.utc)
    return when.astimezone(_dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")


def collect(out_dir: str, results_dir: str, allow_smoke: bool, keep_archive: bool) -> list[str]:
    found = {kind: os.path.join(out_dir, f"{kind}.json") for kind in ("heads", "train", "host")}
    found = {k: p for k, p in found.items() if os.path.exists(p)}
    if not found:
        sys.exit(f"bench.collect: no heads.json / train.json / host.json in {out_dir}")
    data = {k: common.read_json(p) for k, p in found.items()}
    smoke = [k for k, d in data.items() if d.get("mode") == "smoke"]
    if smoke and not allow_smoke:
        sys.exit(f"bench.collect: {', '.join(smoke)} in {out_dir} are smoke runs (a CPU "
                 "rehearsal?); their numbers say nothing about performance (--allow-smoke)")
    stamp = stamp_of(data.get("heads") or next(iter(data.values())))
    os.makedirs(results_dir, exist_ok=True)
    written = []
    for kind, path in found.items():
        dst = os.path.join(results_dir, f"{kind}-{stamp_of(data[kind])}.json")
        shutil.copyfile(path, dst)
        written.append(dst)
    extra = [("summary.md", f"runbook-{stamp}.md")]
    if keep_archive:
        extra.append(("runbook.tgz", f"runbook-{stamp}.tgz"))
    for name, dst_name in extra:
        src = os.path.join(out_dir, name)
        if os.path.exists(src):
            dst = os.path.join(results_dir, dst_name)
            shutil.copyfile(src, dst)
            written.append(dst)
    return written


def main(argv=None) -> list[str]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out_dir", help="the runbook's output folder")
    p.add_argument("--results-dir", default=common.RESULTS_DIR)
    p.add_argument("--readme", default=os.path.join(common.REPO_ROOT, "README.md"))
    p.add_argument("--no-readme", action="store_true", help="do not regenerate the table")
    p.add_argument("--allow-smoke", action="store_true")
    p.add_argument("--keep-archive", action="store_true", help="also keep runbook.tgz")
    opts = p.parse_args(argv)
    written = collect(opts.out_dir, opts.results_dir, opts.allow_smoke, opts.keep_archive)
    for w in written:
        print(f"bench.collect: {os.path.relpath(w)}")
    if not opts.no_readme:
        readme_table.main(["--results-dir", opts.results_dir, "--readme", opts.readme]
                          + (["--allow-smoke"] if opts.allow_smoke else []))
        print(f"bench.collect: regenerated the performance table in {os.path.relpath(opts.readme)}")
    return written


if __name__ == "__main__":
    main()
