"""Checkpoints that hold plain data only, verify themselves, and are never torn.

A checkpoint file is ``torch.save({"format": 2, "sha256": digest, "state": state})`` where
``state`` contains only dicts, lists, tuples, strings, numbers, booleans, ``None`` and tensors.
So it is read with ``torch.load(..., weights_only=True)``: loading never runs code from the
file.  ``digest`` is a sha256 over every key, value and tensor byte of ``state``
(:func:`state_digest`); it is recomputed after loading, so a flipped bit anywhere is an error,
never silently altered weights.

Writing (:func:`write_checkpoint`): the new checkpoint goes to a temporary file in the same
folder (``.tmp-*.pt``, created with the user's umask), is flushed to disk, read back and
verified; only then does the current ``checkpoint.pt`` become ``checkpoint.prev.pt`` and the
new file take its name.  A run killed at any moment leaves at least one verified checkpoint.
Reading (:func:`load_latest`) takes ``checkpoint.pt`` and falls back to ``checkpoint.prev.pt``,
saying why, when the newest one is missing or fails verification.

What a training run's checkpoint holds, and the fingerprint that decides whether a run may
resume from it, are at the end (:func:`save_run`, :func:`resume_run`).
"""
from __future__ import annotations

import dataclasses
import glob
import hashlib
import os
import uuid

import torch

FORMAT = 2
LATEST = "checkpoint.pt"
PREVIOUS = "checkpoint.prev.pt"
CORRUPT_SUFFIX = ".corrupt"
TMP_PREFIX = ".tmp-"


class CheckpointError(RuntimeError):
    """A checkpoint is unreadable, fails verification, or belongs to another configuration."""


# ------------------------------------------------------------------------------------------
# The digest of a state: sha256 over its structure, in order
# ------------------------------------------------------------------------------------------
def state_digest(state) -> str:
    """sha256 (hex) of ``state``: keys, values, tensor dtypes, shapes and bytes, in order.

    Raises ``TypeError`` for anything that ``torch.load(weights_only=True)`` could not
    restore (such as an arbitrary object), so a checkpoint can only hold plain data.
    """
    h = hashlib.sha256()
    _feed(h, state)
    return h.hexdigest()


def _feed(h, obj) -> None:
    if isinstance(obj, torch.Tensor):
        t = obj.detach().to("cpu").contiguous()
        h.update(f"tensor {t.dtype} {tuple(t.shape)}:".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    elif isinstance(obj, dict):
        h.update(f"dict {len(obj)}:".encode())
        for k, v in obj.items():
            _feed(h, k)
            _feed(h, v)
    elif isinstance(obj, (list, tuple)):
        h.update(f"{type(obj).__name__} {len(obj)}:".encode())
        for v in obj:
            _feed(h, v)
    elif obj is None or isinstance(obj, (bool, int, float, str)):
        h.update(f"{type(obj).__name__} {obj!r};".encode())
    else:
        raise TypeError(f"a checkpoint may hold only plain data and tensors, not "
                        f"{type(obj).__name__} ({obj!r:.80})")


# ------------------------------------------------------------------------------------------
# Files created with the user's umask
# ------------------------------------------------------------------------------------------
def _new_temp(folder: str, suffix: str = "") -> tuple[int, str]:
    """A new file ``folder/.tmp-<unique><suffix>`` opened for writing, mode 0666 & ~umask."""
    path = os.path.join(folder, f"{TMP_PREFIX}{os.getpid()}-{uuid.uuid4().hex[:12]}{suffix}")
    return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666), path


def _fsync_folder(folder: str) -> None:
    """Make renames in ``folder`` durable (best effort: not every file system allows it)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


def atomic_write_text(text: str, path: str) -> None:
    """Write a small text file atomically (summary.json, metrics.jsonl)."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = _new_temp(folder)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def clean_temporaries(folder: str) -> list[str]:
    """Remove the ``.tmp-*`` files a killed write left in ``folder``; the removed paths."""
    removed = []
    for p in glob.glob(os.path.join(glob.escape(folder), TMP_PREFIX + "*")):
        if os.path.isfile(p):
            os.remove(p)
            removed.append(p)
    return removed


# ------------------------------------------------------------------------------------------
# Reading and writing one checkpoint file
# ------------------------------------------------------------------------------------------
def read_checkpoint(path: str, map_location="cpu") -> dict:
    """The verified state stored in ``path`` (weights only; the digest must match)."""
    try:
        box = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable file is the same problem
        raise CheckpointError(f"cannot read checkpoint {path}: {type(e).__name__}: "
                              f"{str(e).splitlines()[0] if str(e) else ''}") from None
    if not isinstance(box, dict) or not {"format", "sha256", "state"} <= set(box):
        raise CheckpointError(f"{path} is not a checkpoint written by models.train")
    if box["format"] != FORMAT:
        raise CheckpointError(f"{path} has checkpoint format {box['format']!r}; this version "
                              f"reads format {FORMAT} only")
    try:
        digest = state_digest(box["state"])
    except TypeError as e:
        raise CheckpointError(f"{path}: {e}") from None
    if digest != box["sha256"]:
        raise CheckpointError(f"{path} fails verification: its contents do not match the "
                              "sha256 stored with them (the file is corrupt or was altered)")
    if not isinstance(box["state"], dict):
        raise CheckpointError(f"{path} is not a checkpoint written by models.train")
    return box["state"]


def write_checkpoint(state: dict, path: str) -> None:
    """Save ``state`` as ``path``, keeping the current ``path`` as the previous checkpoint.

    The new file is written to a temporary name, flushed, read back and verified before the
    current checkpoint is renamed to :data:`PREVIOUS` (same folder) and the new one takes
    ``path``'s name.
    """
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    box = {"format": FORMAT, "sha256": state_digest(state), "state": state}
    fd, tmp = _new_temp(folder, ".pt")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(box, f)
            f.flush()
            os.fsync(f.fileno())
        read_checkpoint(tmp)  # what is on disk loads and verifies
        if os.path.isfile(path):
            os.replace(path, os.path.join(folder, PREVIOUS))
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    _fsync_folder(folder)


# ------------------------------------------------------------------------------------------
# Resuming: the newest usable checkpoint of a run folder
# ------------------------------------------------------------------------------------------
def checkpoint_files(folder: str) -> list[str]:
    """The checkpoints present in ``folder``, newest first."""
    return [p for p in (os.path.join(folder, LATEST), os.path.join(folder, PREVIOUS))
            if os.path.isfile(p)]


def check_fingerprint(path: str, saved, fingerprint: dict) -> None:
    """Raise :class:`CheckpointError` naming every setting where ``saved`` differs."""
    if not isinstance(saved, dict):
        raise CheckpointError(f"{path} is not a checkpoint written by models.train")
    diffs = [f"{k}: checkpoint has {saved.get(k)!r}, this run has {fingerprint.get(k)!r}"
             for k in sorted(set(saved) | set(fingerprint)) if saved.get(k) != fingerprint.get(k)]
    if diffs:
        raise CheckpointError(
            f"checkpoint {path} was written by another configuration ("
            + "; ".join(diffs) + "). Use another --out folder, or the same settings.")


def load_latest(folder: str, fingerprint: dict, map_location="cpu", log=print):
    """(state, path) of the newest usable checkpoint in ``folder``; (None, None) if none.

    ``checkpoint.pt`` is tried first.  When it is missing or fails verification and
    ``checkpoint.prev.pt`` verifies, that one is used and ``log`` says so; a corrupt newest
    file is renamed ``checkpoint.pt.corrupt`` (kept for inspection, never overwritten by
    the next save's rotation).  A checkpoint of another configuration is an error, never a
    reason to fall back.
    """
    latest, previous = os.path.join(folder, LATEST), os.path.join(folder, PREVIOUS)
    problems = []
    for path in (latest, previous):
        if not os.path.isfile(path):
            if path == latest and os.path.isfile(previous):
                problems.append(f"{path} is missing (a write was interrupted)")
            continue
        try:
            state = read_checkpoint(path, map_location)
        except CheckpointError as e:
            problems.append(str(e))
            continue
        check_fingerprint(path, state.get("fingerprint"), fingerprint)
        if path == previous and problems:
            if os.path.isfile(latest):
                os.replace(latest, latest + CORRUPT_SUFFIX)
                problems[-1] += f"; moved it to {latest + CORRUPT_SUFFIX}"
            log(f"WARNING: {problems[-1]}. Resuming from the previous checkpoint {path} "
                "instead.")
        return state, path
    if problems:
        raise CheckpointError(
            "no usable checkpoint in " + folder + ": " + "; ".join(problems)
            + ". Start the run again with --overwrite, or choose another --out.")
    return None, None



# ------------------------------------------------------------------------------------------
# A training run's checkpoint: what it holds, and how a Trainer is restored from it
# ------------------------------------------------------------------------------------------
def run_fingerprint(tr) -> dict:
    """What a checkpoint must have been written with to be resumed by the Trainer ``tr``:
    every setting but the resume-free ones, with the effective device, precision and (on
    CPU, where it changes how reductions round) thread count, and the data's digest."""
    from .config import RESUME_FREE

    fp = {k: v for k, v in dataclasses.asdict(tr.cfg).items() if k not in RESUME_FREE}
    fp.update(seed=tr.seed, fold=tr.fold, world_size=tr.dist.world, device=tr.device.type,
              amp=tr.amp, threads=None if tr.cuda else torch.get_num_threads(),
              data_sha256=tr.data_sha256)
    return fp


def save_run(tr) -> None:
    """Checkpoint the Trainer ``tr`` (every rank's random number generators included)."""
    rng = {"cpu": torch.get_rng_state()}
    if tr.cuda:
        rng["cuda"] = torch.cuda.get_rng_state(tr.device)
    rngs = tr.dist.gather_objects(rng)
    if tr.dist.is_main:
        write_checkpoint({
            "fingerprint": run_fingerprint(tr),
            "epoch": tr.epoch, "step_in_epoch": tr.step_in_epoch, "global_step": tr.global_step,
            "model": tr.net.state_dict(),
            "optimizer": tr.opt.state_dict(),
            "scaler": tr.scaler.state_dict() if tr.scaler is not None else None,
            "accumulators": {"loss_sum": tr.loss_sum.item(),
                             "correct_sum": int(tr.correct_sum.item()),
                             "nonfinite": tr.nonfinite.tolist()},
            "history": tr.history,
            "rng": rngs,
            "normalization": {"mean": tr.data.mean, "std": tr.data.std},
            "model_name": tr.cfg.model, "num_classes": tr.data.num_classes,
        }, tr.ckpt_path)
    tr.dist.barrier()


def resume_run(tr) -> bool:
    """Restore the Trainer ``tr`` from the newest usable checkpoint of its folder; False if
    there is none."""
    state, path = load_latest(tr.out_dir, run_fingerprint(tr), map_location=tr.device,
                              log=tr.log)
    if state is None:
        return False
    try:
        _restore(tr, state)
    except (KeyError, IndexError, TypeError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"{path}: not a usable checkpoint of this run "
                              f"({type(e).__name__}: {e})") from None
    tr.log(f"resumed from {path} at epoch {tr.epoch + 1}, step "
           f"{tr.step_in_epoch}/{tr.steps_per_epoch}")
    return True


def _restore(tr, state: dict) -> None:
    from .optim import restore_tensor_lr

    tr.net.load_state_dict(state["model"])
    tr.opt.load_state_dict(state["optimizer"])
    restore_tensor_lr(tr.opt, tr.device)
    if tr.scaler is not None and state["scaler"] is not None:
        tr.scaler.load_state_dict(state["scaler"])
    tr.epoch, tr.step_in_epoch = state["epoch"], state["step_in_epoch"]
    tr.global_step = state["global_step"]
    acc = state["accumulators"]
    tr.loss_sum.fill_(acc["loss_sum"])
    tr.correct_sum.fill_(acc["correct_sum"])
    tr.nonfinite.copy_(torch.tensor(acc["nonfinite"]))
    tr.history = state["history"]
    rng = state["rng"][tr.dist.rank]
    torch.set_rng_state(rng["cpu"].cpu())
    if tr.cuda and "cuda" in rng:
        torch.cuda.set_rng_state(rng["cuda"].cpu(), tr.device)
