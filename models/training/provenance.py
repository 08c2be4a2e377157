"""Where a result came from: the git commit of the code and whether it had local changes.

One helper for every results file of the repository (training summaries and benchmarks).
In a checkout, ``git`` answers.  Where the code travels without its ``.git`` folder (a copy
sent to another machine), the commit is read from a commit file: the one named by the
environment variable ``SPINALKERN_COMMIT_FILE``, else ``bench/COMMIT`` (written by
``python -m bench.commit`` before the copy).  A commit file holds either ``key=value`` lines
(``commit=<id>``, ``dirty=yes|no``) or the output of ``git rev-parse HEAD``, optionally
followed by ``-dirty``.
"""
from __future__ import annotations

import os
import re
import subprocess

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
COMMIT_FILE_ENV = "SPINALKERN_COMMIT_FILE"
DEFAULT_COMMIT_FILE = os.path.join("bench", "COMMIT")


def git_info(root: str = REPO_ROOT) -> dict:
    """``{"commit": id or None, "dirty": bool or None, "source": "git" | file | None}``."""
    def git(*args):
        return subprocess.run(["git", "-C", root, *args], capture_output=True, text=True,
                              timeout=10)
    try:
        head = git("rev-parse", "HEAD")
        if head.returncode == 0:
            dirty = bool(git("status", "--porcelain", "--untracked-files=no").stdout.strip())
            return {"commit": head.stdout.strip(), "dirty": dirty, "source": "git"}
    except (OSError, subprocess.SubprocessError):
        pass
    path = os.environ.get(COMMIT_FILE_ENV) or os.path.join(root, DEFAULT_COMMIT_FILE)
    return read_commit_file(path)


def read_commit_file(path: str) -> dict:
    """What a commit file says (see the module docstring); commit None if nothing usable."""
    unknown = {"commit": None, "dirty": None, "source": None}
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError:
        return unknown
    fields = dict(line.strip().split("=", 1) for line in text.splitlines() if "=" in line)
    if "commit" in fields:
        commit = fields["commit"].strip()
        dirty = {"yes": True, "no": False}.get(fields.get("dirty", "").strip())
    else:
        m = re.search(r"\b[0-9a-f]{7,40}(-dirty)?\b", text)
        if m is None:
            return unknown
        commit, dirty = m.group(0).removesuffix("-dirty"), m.group(1) is not None
    return {"commit": commit or None, "dirty": dirty, "source": path} if commit else unknown


def commit_label(info: dict | None = None) -> str:
    """``<commit>``, ``<commit>-dirty`` or ``unknown``: the commit as one string."""
    info = git_info() if info is None else info
    if info["commit"] is None:
        return "unknown"
    return info["commit"] + ("-dirty" if info["dirty"] else "")
