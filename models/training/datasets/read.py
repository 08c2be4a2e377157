"""Reading a whole data set from its files, checking everything on the way.

Every file is checked: gzip/zip CRCs, the IDX header (magic number, sizes), that the data length
matches the header exactly, that images and labels agree in number, that labels are integers
in range.  Where the checksum of the decompressed bytes is known (MNIST, Fashion-MNIST, EMNIST
Letters labels) it is verified too, so a truncated or altered file is an error, never silent
garbage.  EMNIST images are stored transposed relative to MNIST (NIST wrote them column by
column); the reader transposes them back so that letters appear upright, as in MNIST.
"""
from __future__ import annotations

import hashlib
import os
import zipfile
import zlib
from dataclasses import dataclass

import numpy as np
import torch

from ..provenance import REPO_ROOT
from .catalog import DatasetInfo, candidate_paths, dataset_info, find_zip, missing_message
from .download import download_dataset, fetch_missing, missing_files
from .idx import DataError, gunzip, parse_idx, read_file


def _read_from_zip(zip_path: str, fname: str) -> bytes:
    try:
        with zipfile.ZipFile(zip_path) as zf:
            members = [m for m in zf.namelist() if os.path.basename(m) in (fname, fname + ".gz")]
            if not members:
                raise DataError(f"{zip_path}: has no member {fname}[.gz]")
            blob = zf.read(members[0])
    except (zipfile.BadZipFile, zlib.error, EOFError, OSError) as e:
        if isinstance(e, DataError):
            raise
        raise DataError(f"{zip_path}: corrupt or truncated zip file ({e})") from None
    if members[0].endswith(".gz"):
        blob = gunzip(blob, f"{zip_path}:{members[0]}")
    return blob


def _check_sha(info: DatasetInfo, fname: str, blob: bytes, where: str) -> None:
    want = info.sha256.get(fname)
    if want is None:
        return
    got = hashlib.sha256(blob).hexdigest()
    if got != want:
        raise DataError(
            f"{where}: checksum mismatch for {fname} (sha256 of the decompressed bytes is "
            f"{got[:16]}..., expected {want[:16]}...): the file is corrupt or not the "
            f"official {info.name} file (pass verify=False / --no-verify to skip this check)")


def _check_readable_folders(root: str, info: DatasetInfo) -> None:
    """A folder we may not list hides its files: say so instead of "missing"."""
    for folder in info.folders:
        d = os.path.join(root, folder)
        if os.path.isdir(d) and not os.access(d, os.R_OK | os.X_OK):
            raise DataError(f"cannot read the folder {d} (permission denied): give read "
                            "access to it, or pass another --data-root")


def read_raw(root: str, info: DatasetInfo, verify: bool = True):
    """Read the four arrays (train images, train labels, test images, test labels)."""
    _check_readable_folders(root, info)
    paths, missing = [], []
    for fname in info.files:
        found = next((p for p in candidate_paths(root, info, fname) if os.path.isfile(p)), None)
        paths.append(found)
        if found is None:
            missing.append(fname)
    zip_path = find_zip(root, info) if missing else None
    if missing and zip_path is None:
        raise DataError(missing_message(root, info, missing))
    arrays = []
    for fname, path in zip(info.files, paths):
        if path is not None:
            blob, where = read_file(path), path
        else:
            blob, where = _read_from_zip(zip_path, fname), f"{zip_path}:{fname}"
        array = parse_idx(blob, where)  # format errors first: the more specific message
        if verify:
            _check_sha(info, fname, blob, where)
        arrays.append((array, where))
    return arrays


@dataclass
class RawDataset:
    """Images (N, 1, H, W) uint8 and labels (N,) int64, as CPU tensors."""
    name: str
    num_classes: int
    train_images: torch.Tensor
    train_labels: torch.Tensor
    test_images: torch.Tensor
    test_labels: torch.Tensor


def _images(arr: np.ndarray, where: str, transpose: bool) -> torch.Tensor:
    if arr.ndim != 3 or arr.dtype != np.uint8:
        raise DataError(f"{where}: expected uint8 images of shape (N, H, W), got "
                        f"{arr.dtype} {arr.shape}")
    t = torch.from_numpy(arr.copy())
    if transpose:
        t = t.transpose(1, 2).contiguous()
    return t.unsqueeze(1)


def _labels(arr: np.ndarray, where: str, info: DatasetInfo) -> torch.Tensor:
    if info.label_column is not None:
        if arr.ndim != 2:
            raise DataError(f"{where}: expected a 2-d label table, got shape {arr.shape}")
        arr = arr[:, info.label_column]
    if arr.ndim != 1:
        raise DataError(f"{where}: expected 1-d labels, got shape {arr.shape}")
    if arr.dtype.kind not in "iu":
        raise DataError(f"{where}: labels must be integers, but the IDX file stores {arr.dtype.name}")
    t = torch.from_numpy(arr.astype(np.int64)) - info.label_offset
    if t.numel() and (int(t.min()) < 0 or int(t.max()) >= info.num_classes):
        lo, hi = int(t.min()) + info.label_offset, int(t.max()) + info.label_offset
        raise DataError(
            f"{where}: labels range over {lo}..{hi}, outside the {info.num_classes} classes of "
            f"{info.name} (expected {info.label_offset}.."
            f"{info.num_classes - 1 + info.label_offset})")
    return t


def content_sha256(raw: RawDataset) -> str:
    """sha256 of a data set's images and labels (what a resumed run must train on again)."""
    h = hashlib.sha256(raw.name.encode())
    for t in (raw.train_images, raw.train_labels, raw.test_images, raw.test_labels):
        h.update(f"{t.dtype} {tuple(t.shape)}:".encode())
        h.update(t.contiguous().numpy().tobytes())
    return h.hexdigest()


# Where a data set is looked for when no root is given, in this order; missing files are
# downloaded into the first.
DEFAULT_ROOTS = (os.path.join(REPO_ROOT, "data"),
                 os.path.join(os.path.dirname(REPO_ROOT), "shared", "data"))


def default_root(info: DatasetInfo, log=print) -> str:
    """The first of :data:`DEFAULT_ROOTS` holding ``info``'s files; else the checkout's
    ``data/``, after downloading them there (one message naming the files if that fails)."""
    for root in DEFAULT_ROOTS:
        if os.path.isdir(root) and not missing_files(root, info):
            return root
    root = DEFAULT_ROOTS[0]
    log(f"{info.name} is in neither {DEFAULT_ROOTS[0]} nor {DEFAULT_ROOTS[1]}: downloading it "
        f"into {root}")
    try:
        fetch_missing(root, info)
    except DataError as e:
        where = missing_message(root, info, missing_files(root, info)).rstrip(".")
        raise DataError(f"{e}. {where} (or in {DEFAULT_ROOTS[1]}), or pass --data-root "
                        "FOLDER.") from None
    return root


def load_dataset(name: str, root: str | None = None, download: bool = False,
                 verify: bool = True) -> RawDataset:
    """Load a whole data set into CPU tensors (see the module docstring for the layouts).

    ``root=None``: the first of :data:`DEFAULT_ROOTS` that holds it, else downloaded into the
    checkout's ``data/``.  With a ``root``, missing files are downloaded only if ``download``.
    """
    info = dataset_info(name)
    if root is None:
        root = default_root(info)
    elif download:
        download_dataset(info.name, root)
    elif not os.path.isdir(root):
        raise DataError(f"data root {root!r} is not a directory. "
                        + missing_message(root, info, info.files))
    try:
        arrays = read_raw(root, info, verify)
    except DataError as e:
        if not download and "not found" in str(e):
            raise DataError(f"{e} With a network connection, --download fetches them.") from None
        raise
    (tri, tri_w), (trl, trl_w), (tei, tei_w), (tel, tel_w) = arrays
    train_images = _images(tri, tri_w, info.transpose)
    test_images = _images(tei, tei_w, info.transpose)
    train_labels, test_labels = _labels(trl, trl_w, info), _labels(tel, tel_w, info)
    for imgs, labs, w in ((train_images, train_labels, tri_w), (test_images, test_labels, tei_w)):
        if imgs.shape[0] != labs.shape[0]:
            raise DataError(f"{w}: {imgs.shape[0]} images but {labs.shape[0]} labels")
    if train_images.shape[1:] != test_images.shape[1:]:
        raise DataError(f"{info.name}: train images are {tuple(train_images.shape[2:])} but test "
                        f"images are {tuple(test_images.shape[2:])}")
    return RawDataset(info.name, info.num_classes, train_images, train_labels, test_images,
                      test_labels)
