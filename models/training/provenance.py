"""Where a result came from: the git commit of the code and whether it had local changes.

One helper for every results file of the repository (training summaries and benchmarks).
In a checkout, ``git`` answers.  Where the code travels without its ``.git`` folder (a copy
sent to another machine), the commit is read from the file named by the environment
variable ``SPINALKERN_COMMIT_FILE``: its first 7 to 40 hexadecimal characters are the
commit, and the word ``dirty`` anywhere in it marks local changes (so ``git rev-parse HEAD``
output, ``<commit>-dirty`` and ``{"git_commit": "<commit>", "git_dirty": true}`` all work).
"""
from __future__ import annotations

import os
import re
import subprocess

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
COMMIT_FILE_ENV = "SPINALKERN_COMMIT_FILE"


def git_info(root: str = REPO_ROOT) -> dict:
    """``{"commit": hex or None, "dirty": bool or None, "source": "git" | file | None}``."""
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
    return _from_commit_file(os.environ.get(COMMIT_FILE_ENV))


def _from_commit_file(path: str | None) -> dict:
    unknown = {"commit": None, "dirty": None, "source": None}
    if not path:
        return unknown
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError:
        return unknown
    m = re.search(r"\b[0-9a-f]{7,40}\b", text)
    if m is None:
        return unknown
    dirty = "dirty" in text and not re.search(r'"git_dirty"\s*:\s*false', text)
    return {"commit": m.group(0), "dirty": dirty, "source": path}


def commit_label(info: dict | None = None) -> str:
    """``<commit>``, ``<commit>-dirty`` or ``unknown``: the commit as one string."""
    info = git_info() if info is None else info
    if info["commit"] is None:
        return "unknown"
    return info["commit"] + ("-dirty" if info["dirty"] else "")
