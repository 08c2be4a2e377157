"""Checkpoint files: plain data only, verified on load, the previous one kept, never torn."""
from __future__ import annotations

import os
import pathlib

import pytest
import torch

from models.training import checkpoint as C
from models.training.checkpoint import CheckpointError


def _state(v: float = 1.0) -> dict:
    w = torch.arange(64, dtype=torch.float32) * 0.25 + v
    return {"fingerprint": {"lr": 0.1, "seed": 0}, "epoch": int(v), "model": {"w": w},
            "history": [{"loss": float("nan")}], "rng": [{"cpu": torch.get_rng_state()}],
            "betas": (0.9, 0.999), "note": None}


class _RunsCode:
    """Unpickling this calls ``Path.touch(marker)``: code from the file running on load."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return pathlib.Path.touch, (pathlib.Path(self.marker),)


def test_loading_never_runs_code_from_the_file(tmp_path):
    marker = tmp_path / "code-ran"
    evil = tmp_path / "checkpoint.pt"
    torch.save({"format": C.FORMAT, "sha256": "0", "state": {"x": _RunsCode(str(marker))}},
               evil)
    with pytest.raises(CheckpointError, match="cannot read checkpoint"):
        C.read_checkpoint(str(evil))
    with pytest.raises(CheckpointError, match="no usable checkpoint"):
        C.load_latest(str(tmp_path), {})
    assert not marker.exists()


def test_roundtrip_is_exact_and_plain_data(tmp_path):
    path = tmp_path / "checkpoint.pt"
    C.write_checkpoint(_state(), str(path))
    raw = torch.load(path, weights_only=True)          # loadable without unsafe globals
    assert raw["format"] == C.FORMAT and raw["sha256"] == C.state_digest(raw["state"])
    back = C.read_checkpoint(str(path))
    assert torch.equal(back["model"]["w"], _state()["model"]["w"])
    assert back["betas"] == (0.9, 0.999) and back["note"] is None
    with pytest.raises(TypeError, match="plain data"):
        C.write_checkpoint({"obj": object()}, str(path))
    assert C.read_checkpoint(str(path))["epoch"] == 1   # the failed write changed nothing


def _flip_a_bit_of(path, values: torch.Tensor) -> None:
    """Flip one bit inside the stored bytes of ``values`` (torch.save stores them as is)."""
    blob = bytearray(path.read_bytes())
    at = blob.find(values.numpy().tobytes())
    assert at > 0
    blob[at + 9] ^= 0x10
    path.write_bytes(bytes(blob))


def test_a_flipped_bit_in_a_weight_is_caught(tmp_path):
    path = tmp_path / "checkpoint.pt"
    C.write_checkpoint(_state(), str(path))
    _flip_a_bit_of(path, _state()["model"]["w"])
    with pytest.raises(CheckpointError, match="fails verification"):
        C.read_checkpoint(str(path))


def test_previous_checkpoint_kept_and_used_as_fallback(tmp_path):
    latest, prev = tmp_path / C.LATEST, tmp_path / C.PREVIOUS
    C.write_checkpoint(_state(1.0), str(latest))
    assert not prev.exists()
    C.write_checkpoint(_state(2.0), str(latest))
    assert C.read_checkpoint(str(prev))["epoch"] == 1
    assert C.read_checkpoint(str(latest))["epoch"] == 2
    fp = _state()["fingerprint"]
    state, path = C.load_latest(str(tmp_path), fp)
    assert path == str(latest) and state["epoch"] == 2
    # The newest one corrupt: the previous one is used, with a message, and the corrupt file
    # is moved aside so that the next save cannot rotate it into the "previous" slot.
    _flip_a_bit_of(latest, _state(2.0)["model"]["w"])
    said = []
    state, path = C.load_latest(str(tmp_path), fp, log=said.append)
    assert path == str(prev) and state["epoch"] == 1
    assert len(said) == 1 and "fails verification" in said[0] and "previous" in said[0]
    assert not latest.exists() and (tmp_path / (C.LATEST + C.CORRUPT_SUFFIX)).exists()
    C.write_checkpoint(_state(3.0), str(latest))
    assert C.read_checkpoint(str(prev))["epoch"] == 1   # the good one, not the corrupt one
    # A killed rotation (previous renamed, newest not yet in place) falls back too.
    os.remove(latest)
    state, path = C.load_latest(str(tmp_path), fp, log=said.append)
    assert path == str(prev) and "missing" in said[-1]
    # Both unusable: one error naming both and saying what to do.
    prev.write_bytes(b"")
    with pytest.raises(CheckpointError, match="no usable checkpoint.*--overwrite"):
        C.load_latest(str(tmp_path), fp)


def test_another_configuration_is_refused_not_skipped(tmp_path):
    C.write_checkpoint(_state(1.0), str(tmp_path / C.LATEST))
    C.write_checkpoint(_state(2.0), str(tmp_path / C.LATEST))
    with pytest.raises(CheckpointError, match="lr: checkpoint has 0.1, this run has 0.2"):
        C.load_latest(str(tmp_path), {"lr": 0.2, "seed": 0})


def test_killed_write_keeps_the_old_checkpoint_and_leaves_no_temporary(tmp_path, monkeypatch):
    path = tmp_path / C.LATEST
    C.write_checkpoint(_state(1.0), str(path))

    def broken_save(obj, f):
        f.write(b"half a checkpoint")
        raise KeyboardInterrupt("killed while writing")

    monkeypatch.setattr(C.torch, "save", broken_save)
    with pytest.raises(KeyboardInterrupt):
        C.write_checkpoint(_state(2.0), str(path))
    monkeypatch.undo()
    assert C.read_checkpoint(str(path))["epoch"] == 1
    assert sorted(os.listdir(tmp_path)) == [C.LATEST]
    # What a SIGKILL leaves (no chance to clean up) is removed by the next run.
    (tmp_path / ".tmp-123-abc.pt").write_bytes(b"")
    (tmp_path / ".tmp-123-def").write_text("{")
    removed = C.clean_temporaries(str(tmp_path))
    assert len(removed) == 2 and sorted(os.listdir(tmp_path)) == [C.LATEST]


def test_unreadable_and_foreign_files(tmp_path):
    (tmp_path / "garbage.pt").write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="cannot read"):
        C.read_checkpoint(str(tmp_path / "garbage.pt"))
    torch.save({"model": {}}, tmp_path / "foreign.pt")
    with pytest.raises(CheckpointError, match="not a checkpoint written by models.train"):
        C.read_checkpoint(str(tmp_path / "foreign.pt"))
    torch.save({"format": 1, "sha256": "", "state": {}}, tmp_path / "old.pt")
    with pytest.raises(CheckpointError, match="format 1"):
        C.read_checkpoint(str(tmp_path / "old.pt"))


def test_files_get_the_users_umask(tmp_path):
    old = os.umask(0o022)
    try:
        C.write_checkpoint(_state(), str(tmp_path / C.LATEST))
        C.atomic_write_text("{}\n", str(tmp_path / "summary.json"))
    finally:
        os.umask(old)
    for name in (C.LATEST, "summary.json"):
        assert (tmp_path / name).stat().st_mode & 0o777 == 0o644, name
