"""Atomic checkpoints and the check that a checkpoint belongs to the current configuration."""
from __future__ import annotations

import os
import tempfile

import torch


class CheckpointError(RuntimeError):
    """A checkpoint is unreadable or was written by a different configuration."""


def atomic_save(obj, path: str) -> None:
    """``torch.save`` to a temporary file in the same folder, fsync, then rename over ``path``.

    A run killed at any moment leaves either the old or the new checkpoint, never a torn one.
    """
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".pt", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    try:  # make the rename itself durable
        dfd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError:
        pass


def atomic_write_text(text: str, path: str) -> None:
    """Write a small text file atomically (summary.json, metrics.jsonl)."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=folder)
    with os.fdopen(fd, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def load_checkpoint(path: str, fingerprint: dict, map_location="cpu") -> dict:
    """Load ``path`` and check that it was written with the same ``fingerprint``."""
    try:
        state = torch.load(path, map_location=map_location, weights_only=False)
    except Exception as e:  # noqa: BLE001 - any unreadable file is the same problem
        raise CheckpointError(f"cannot read checkpoint {path}: {e}") from None
    if not isinstance(state, dict) or "fingerprint" not in state:
        raise CheckpointError(f"{path} is not a checkpoint written by models.train")
    saved = state["fingerprint"]
    diffs = [f"{k}: checkpoint has {saved.get(k)!r}, this run has {fingerprint.get(k)!r}"
             for k in sorted(set(saved) | set(fingerprint)) if saved.get(k) != fingerprint.get(k)]
    if diffs:
        raise CheckpointError(
            f"checkpoint {path} was written by another configuration ("
            + "; ".join(diffs) + "). Use another --out folder, or the same settings.")
    return state
