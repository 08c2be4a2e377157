"""Record the checkout's commit in bench/COMMIT, for machines the checkout is copied to without .git.

    python -m bench.commit          # before copying the working tree to the GPU machine
    python -m bench.commit --show   # print what results would record here

The file holds ``commit=<git rev-parse HEAD>``, ``dirty=yes|no`` (tracked files changed
since that commit) and ``date=``.  It is untracked and not ignored, so it travels with the
working tree; results files read it (``models.training.provenance.git_info``) only when git cannot
answer, and record where the commit came from (``git_commit_source``).
"""
from __future__ import annotations

import argparse
import os
import sys

from models.training import provenance

from . import benchlib


def write(path: str | None = None) -> str:
    info = provenance.git_info(benchlib.REPO_ROOT)
    if info["source"] != "git":
        sys.exit("bench.commit: git cannot read this checkout's commit (no .git here?); "
                 "run it in the original checkout before copying the tree")
    commit, dirty = info["commit"], info["dirty"]
    path = path or benchlib.COMMIT_FILE
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(f"commit={commit}\ndirty={'yes' if dirty else 'no'}\n"
                f"date={benchlib.utc_now()}\n")
    os.replace(tmp, path)
    return f"{commit}{' (with uncommitted changes)' if dirty else ''}"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--show", action="store_true", help="print the commit results would record")
    opts = p.parse_args(argv)
    if opts.show:
        info = benchlib.commit_info()
        print(f"{info['commit']}{'-dirty' if info['dirty'] else ''} (source: {info['source']})")
        return
    print(f"bench/COMMIT: {write()}")


if __name__ == "__main__":
    main()
