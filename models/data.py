"""Readers for the MNIST family of data sets, kept whole on the training device.

Supported names (``--data``): ``mnist``, ``fashion-mnist``, ``kmnist``, ``qmnist`` and
``emnist-<split>`` for the six EMNIST splits (``byclass``, ``bymerge``, ``balanced``,
``letters``, ``digits``, ``mnist``).

Files are the raw IDX files ("ubyte" files), gzip-compressed or not, found in any of:

* torchvision's layout, ``ROOT/MNIST/raw/train-images-idx3-ubyte[.gz]`` (``FashionMNIST``,
  ``KMNIST``, ``QMNIST``, ``EMNIST`` likewise);
* a lower-case folder, ``ROOT/mnist/...`` (``fashion-mnist``, ``kmnist``, ``qmnist``, ``emnist``);
* ``ROOT`` itself;
* for EMNIST also NIST's original archive ``gzip.zip`` (in ``ROOT/EMNIST/raw``, ``ROOT/emnist``
  or ``ROOT``), read directly without unpacking.

Every file is checked: gzip/zip CRCs, the IDX header (magic number, sizes), that the data length
matches the header exactly, that images and labels agree in number and that labels are in
range.  Where the checksum of the decompressed bytes is known (MNIST, Fashion-MNIST, EMNIST
Letters labels) it is verified too, so a truncated or altered file is an error, never silent
garbage.  Downloads (``download=True``) verify the published MD5 of each downloaded file.

EMNIST images are stored transposed relative to MNIST (NIST wrote them column by column); the
reader transposes them back so that letters appear upright, as in MNIST.
"""
from __future__ import annotations

import gzip
import hashlib
import math
import os
import struct
import urllib.request
import zipfile
import zlib
from dataclasses import dataclass, field

import numpy as np
import torch


class DataError(RuntimeError):
    """A data set is missing, truncated, corrupt or inconsistent."""


# ------------------------------------------------------------------------------------------
# The IDX format: magic (2 zero bytes, a type code, the number of dimensions), then one
# big-endian uint32 per dimension, then the data, big-endian.
# ------------------------------------------------------------------------------------------
_IDX_TYPES = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


def parse_idx(data: bytes, name: str = "<bytes>") -> np.ndarray:
    """Parse the bytes of an (uncompressed) IDX file into a numpy array.

    Raises :class:`DataError` on a bad magic number or when the data length does not match
    the sizes in the header (a truncated or padded file).
    """
    if len(data) < 4:
        raise DataError(f"{name}: not an IDX file (only {len(data)} bytes)")
    zero, type_code, ndim = struct.unpack(">HBB", data[:4])
    if zero != 0 or type_code not in _IDX_TYPES or not 1 <= ndim <= 4:
        raise DataError(f"{name}: not an IDX file (bad magic number 0x{data[:4].hex()})")
    header = 4 + 4 * ndim
    if len(data) < header:
        raise DataError(f"{name}: truncated IDX header")
    shape = struct.unpack(f">{ndim}I", data[4:header])
    dtype = _IDX_TYPES[type_code]
    expected = math.prod(shape) * dtype.itemsize  # Python ints: no wrap-around
    got = len(data) - header
    if got != expected:
        raise DataError(
            f"{name}: IDX header says shape {shape} ({expected} data bytes) but the file has "
            f"{got} data bytes: the file is truncated or corrupt")
    return np.frombuffer(data, dtype=dtype, offset=header).reshape(shape)


def write_idx(path: str, array: np.ndarray, compress: bool | None = None) -> None:
    """Write ``array`` as an IDX file (gzip-compressed when the name ends in ``.gz``).

    Used by the tests to make small data sets; also handy for exporting a subset.
    """
    codes = {np.dtype(np.uint8): 0x08, np.dtype(np.int8): 0x09, np.dtype(">i2"): 0x0B,
             np.dtype(">i4"): 0x0C, np.dtype(">f4"): 0x0D, np.dtype(">f8"): 0x0E}
    arr = np.asarray(array)
    if arr.dtype.kind in "iuf" and arr.dtype.itemsize > 1:
        arr = arr.astype(arr.dtype.newbyteorder(">"))
    if arr.dtype not in codes:
        raise ValueError(f"write_idx: unsupported dtype {arr.dtype}")
    blob = struct.pack(">HBB", 0, codes[arr.dtype], arr.ndim)
    blob += struct.pack(f">{arr.ndim}I", *arr.shape) + arr.tobytes()
    if compress is None:
        compress = str(path).endswith(".gz")
    with open(path, "wb") as f:
        f.write(gzip.compress(blob) if compress else blob)


def _gunzip(blob: bytes, name: str) -> bytes:
    try:
        return gzip.decompress(blob)
    except (OSError, EOFError, zlib.error) as e:  # BadGzipFile is an OSError
        raise DataError(f"{name}: corrupt or truncated gzip file ({e})") from None


# ------------------------------------------------------------------------------------------
# The data sets
# ------------------------------------------------------------------------------------------
_MNIST_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte",
                "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")

# sha256 of the *decompressed* standard files (these are public facts about the data sets).
_MNIST_SHA256 = {
    "train-images-idx3-ubyte": "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
    "train-labels-idx1-ubyte": "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
    "t10k-images-idx3-ubyte": "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
    "t10k-labels-idx1-ubyte": "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
}
_FASHION_SHA256 = {
    "train-images-idx3-ubyte": "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888",
    "train-labels-idx1-ubyte": "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9",
    "t10k-images-idx3-ubyte": "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b",
    "t10k-labels-idx1-ubyte": "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34",
}
_EMNIST_LETTERS_SHA256 = {
    "emnist-letters-train-labels-idx1-ubyte":
        "e8e94c3f4353d5532fd9604b939cb4c76e7847945b9b0d9ff7884d881dead6bc",
    "emnist-letters-test-labels-idx1-ubyte":
        "22dbcde0a929a7f166bdac863b9195b2994d840a1e082f8f6daaeac5606376a6",
}

# Number of classes of each EMNIST split.
EMNIST_SPLITS = {"byclass": 62, "bymerge": 47, "balanced": 47, "letters": 26, "digits": 10,
                 "mnist": 10}
EMNIST_URL = "https://biometrics.nist.gov/cs_links/EMNIST/gzip.zip"
EMNIST_ZIP_MD5 = "58c8d27c78d21e728a6bc7b3cc06412e"


@dataclass(frozen=True)
class DatasetInfo:
    """Where a data set's four files live and how to check and interpret them."""
    name: str
    folders: tuple              # sub-folders of ROOT searched, in order ("" = ROOT itself)
    files: tuple                # (train images, train labels, test images, test labels), no .gz
    num_classes: int
    label_offset: int = 0       # subtracted from the stored labels (EMNIST Letters: 1..26)
    label_column: int | None = None  # QMNIST: labels are an (N, 8) int table, class in col 0
    transpose: bool = False     # EMNIST: images stored transposed
    sha256: dict = field(default_factory=dict)   # decompressed bytes, by file name
    urls: dict = field(default_factory=dict)     # download URL of each file (gz), by file name
    md5: dict = field(default_factory=dict)      # MD5 of each downloaded file, by file name
    zip_name: str | None = None  # EMNIST: NIST's archive holding every split


def _mirror(base: str, files, md5s) -> tuple[dict, dict]:
    urls = {f: base + f + ".gz" for f in files}
    return urls, dict(zip(files, md5s))


def _make_registry() -> dict:
    reg = {}
    urls, md5 = _mirror("https://ossci-datasets.s3.amazonaws.com/mnist/", _MNIST_FILES, (
        "f68b3c2dcbeaaa9fbdd348bbdeb94873", "d53e105ee54ea40749a09fcbcd1e9432",
        "9fb629c4189551a2d022fa330f9573f3", "ec29112dd5afa0611ce80d1b7f02629c"))
    reg["mnist"] = DatasetInfo("mnist", ("MNIST/raw", "mnist", ""), _MNIST_FILES, 10,
                               sha256=_MNIST_SHA256, urls=urls, md5=md5)
    urls, md5 = _mirror("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
                        _MNIST_FILES, (
        "8d4fb7e6c68d591d4c3dfef9ec88bf0d", "25c81989df183df01b3e8a0aad5dffbe",
        "bef4ecab320f06d8554ea6380940ec79", "bb300cfdad3c16e7a12a480ee83cd310"))
    reg["fashion-mnist"] = DatasetInfo(
        "fashion-mnist", ("FashionMNIST/raw", "fashion-mnist", "fashion_mnist", ""),
        _MNIST_FILES, 10, sha256=_FASHION_SHA256, urls=urls, md5=md5)
    urls, md5 = _mirror("http://codh.rois.ac.jp/kmnist/dataset/kmnist/", _MNIST_FILES, (
        "bdb82020997e1d708af4cf47b453dcf7", "e144d726b3acfaa3e44228e80efcd344",
        "5c965bf0a639b31b8f53240b1b52f4d7", "7320c461ea6c1c855c0b718fb2a4b134"))
    reg["kmnist"] = DatasetInfo("kmnist", ("KMNIST/raw", "kmnist", ""), _MNIST_FILES, 10,
                                urls=urls, md5=md5)
    qfiles = ("qmnist-train-images-idx3-ubyte", "qmnist-train-labels-idx2-int",
              "qmnist-test-images-idx3-ubyte", "qmnist-test-labels-idx2-int")
    urls, md5 = _mirror("https://raw.githubusercontent.com/facebookresearch/qmnist/master/",
                        qfiles, (
        "ed72d4157d28c017586c42bc6afe6370", "0058f8dd561b90ffdd0f734c6a30e5e4",
        "1394631089c404de565df7b7aeaf9412", "5b5b05890a5e13444e108efe57b788aa"))
    reg["qmnist"] = DatasetInfo("qmnist", ("QMNIST/raw", "qmnist", ""), qfiles, 10,
                                label_column=0, urls=urls, md5=md5)
    for split, classes in EMNIST_SPLITS.items():
        files = tuple(f"emnist-{split}-{part}-{kind}-idx{d}-ubyte"
                      for part in ("train", "test")
                      for kind, d in (("images", 3), ("labels", 1)))
        reg[f"emnist-{split}"] = DatasetInfo(
            f"emnist-{split}", ("EMNIST/raw", "emnist", f"emnist-{split}", ""), files, classes,
            label_offset=1 if split == "letters" else 0, transpose=True,
            sha256=_EMNIST_LETTERS_SHA256 if split == "letters" else {},
            zip_name="gzip.zip")
    return reg


DATASETS = _make_registry()
_ALIASES = {"fashion_mnist": "fashion-mnist", "fashionmnist": "fashion-mnist",
            "emnist": "emnist-letters", "letters": "emnist-letters"}


def dataset_info(name: str) -> DatasetInfo:
    """The :class:`DatasetInfo` of ``name``; a clear error for unknown names."""
    key = _ALIASES.get(name.lower(), name.lower())
    if key not in DATASETS:
        raise ValueError(f"unknown data set {name!r}; known: {', '.join(sorted(DATASETS))}")
    return DATASETS[key]


# ------------------------------------------------------------------------------------------
# Finding and reading files
# ------------------------------------------------------------------------------------------
def _candidates(root: str, info: DatasetInfo, fname: str):
    for folder in info.folders:
        for suffix in ("", ".gz"):
            yield os.path.join(root, folder, fname + suffix)


def _find_zip(root: str, info: DatasetInfo) -> str | None:
    if info.zip_name is None:
        return None
    for folder in info.folders:
        p = os.path.join(root, folder, info.zip_name)
        if os.path.isfile(p):
            return p
    return None


def _missing_message(root: str, info: DatasetInfo, missing) -> str:
    where = " or ".join(os.path.join(root, f) if f else root for f in info.folders[:2])
    msg = (f"data set {info.name!r} not found under data root {root!r}: missing "
           f"{', '.join(missing)} (each may be .gz-compressed). Put the files in {where}")
    if info.zip_name:
        msg += (f", or put NIST's {info.zip_name} ({EMNIST_URL}) in "
                f"{os.path.join(root, info.folders[0])}")
    return msg + "."


def _read_file(path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            blob = f.read()
    except OSError as e:
        raise DataError(f"{path}: cannot read the file ({e.strerror or e})") from None
    if path.endswith(".gz") or blob[:2] == b"\x1f\x8b":
        blob = _gunzip(blob, path)
    return blob


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
        blob = _gunzip(blob, f"{zip_path}:{members[0]}")
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
        found = next((p for p in _candidates(root, info, fname) if os.path.isfile(p)), None)
        paths.append(found)
        if found is None:
            missing.append(fname)
    zip_path = _find_zip(root, info) if missing else None
    if missing and zip_path is None:
        raise DataError(_missing_message(root, info, missing))
    arrays = []
    for fname, path in zip(info.files, paths):
        if path is not None:
            blob, where = _read_file(path), path
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


def load_dataset(name: str, root: str, download: bool = False, verify: bool = True) -> RawDataset:
    """Load a whole data set into CPU tensors (see the module docstring for the layouts)."""
    info = dataset_info(name)
    if download:
        download_dataset(info.name, root)
    elif not os.path.isdir(root):
        raise DataError(f"data root {root!r} is not a directory. "
                        + _missing_message(root, info, info.files))
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


# ------------------------------------------------------------------------------------------
# Downloading (needs a network; verified by MD5)
# ------------------------------------------------------------------------------------------
def _md5(path: str) -> str:
    h = hashlib.md5()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _fetch(url: str, dest: str, md5: str, timeout: float = 30.0) -> None:
    """Download ``url`` to ``dest`` atomically, verifying its MD5."""
    os.makedirs(os.path.dirname(dest), exist_ok=True)
    tmp = dest + ".part"
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r, open(tmp, "wb") as f:
            while True:
                chunk = r.read(1 << 20)
                if not chunk:
                    break
                f.write(chunk)
    except OSError as e:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise DataError(f"download of {url} failed ({e})") from None
    got = _md5(tmp)
    if got != md5:
        os.remove(tmp)
        raise DataError(f"download of {url}: MD5 {got} does not match the published {md5}")
    os.replace(tmp, dest)


def download_dataset(name: str, root: str) -> None:
    """Download the files of ``name`` that are not yet under ``root`` (torchvision layout)."""
    info = dataset_info(name)
    missing = [f for f in info.files
               if not any(os.path.isfile(p) for p in _candidates(root, info, f))]
    if not missing:
        return
    raw = os.path.join(root, info.folders[0])
    try:
        if info.zip_name:
            if _find_zip(root, info) is None:
                _fetch(EMNIST_URL, os.path.join(raw, info.zip_name), EMNIST_ZIP_MD5, timeout=60.0)
            return
        for f in missing:
            _fetch(info.urls[f], os.path.join(raw, f + ".gz"), info.md5[f])
    except DataError as e:
        raise DataError(f"{e}. Without a network: {_missing_message(root, info, missing)}") \
            from None


# ------------------------------------------------------------------------------------------
# Subsets, folds and the device copy
# ------------------------------------------------------------------------------------------
@dataclass
class DeviceData:
    """A data set split into train and eval parts, kept whole on the device as uint8.

    ``eval_*`` is the test set, or the held-out fold in cross-validation mode.  ``mean`` and
    ``std`` are the pixel statistics of the training part (in [0, 1] units) used to normalise.
    """
    name: str
    num_classes: int
    train_x: torch.Tensor
    train_y: torch.Tensor
    eval_x: torch.Tensor
    eval_y: torch.Tensor
    mean: float
    std: float
    test_x: torch.Tensor | None = None  # the real test set when eval_* is a CV fold
    test_y: torch.Tensor | None = None


def subset_indices(n: int, size: int | None, seed: int = 0, what: str = "subset") -> torch.Tensor:
    """A fixed pseudo-random subset of ``range(n)`` (the first ``size`` of a seeded permutation)."""
    if size is None:
        return torch.arange(n)
    if size <= 0 or size > n:
        raise ValueError(f"{what} {size} is impossible: the set has {n} samples")
    g = torch.Generator().manual_seed(seed)
    return torch.randperm(n, generator=g)[:size].sort().values


def fold_indices(n: int, folds: int, fold: int, seed: int = 0):
    """(train, validation) indices of fold ``fold`` of a seeded ``folds``-way split of range(n)."""
    if folds < 2 or folds > n:
        raise ValueError(f"--folds {folds} is impossible for {n} training samples (need 2..{n})")
    if not 0 <= fold < folds:
        raise ValueError(f"fold {fold} out of range 0..{folds - 1}")
    g = torch.Generator().manual_seed(seed + 7919)
    perm = torch.randperm(n, generator=g)
    bounds = [n * k // folds for k in range(folds + 1)]
    val = perm[bounds[fold]:bounds[fold + 1]]
    train = torch.cat([perm[:bounds[fold]], perm[bounds[fold + 1]:]])
    return train.sort().values, val.sort().values


def pixel_stats(images: torch.Tensor) -> tuple[float, float]:
    """Mean and standard deviation of uint8 ``images`` in [0, 1] units (from a histogram)."""
    hist = torch.bincount(images.reshape(-1), minlength=256).double()
    values = torch.arange(256, dtype=torch.float64) / 255.0
    n = max(float(hist.sum()), 1.0)
    mean = float((hist * values).sum()) / n
    var = float((hist * values * values).sum()) / n - mean * mean
    return mean, max(var, 0.0) ** 0.5


def to_device(raw: RawDataset, device, train_subset: int | None = None,
              test_subset: int | None = None, folds: int | None = None,
              fold: int = 0) -> DeviceData:
    """Select the training/eval samples and move them to ``device`` as uint8."""
    device = torch.device(device)
    tr = subset_indices(raw.train_images.shape[0], train_subset, what="--train-subset")
    te = subset_indices(raw.test_images.shape[0], test_subset, seed=1, what="--test-subset")
    train_x, train_y = raw.train_images[tr], raw.train_labels[tr]
    test_x, test_y = raw.test_images[te], raw.test_labels[te]
    extra = {}
    if folds:
        tr_f, va_f = fold_indices(train_x.shape[0], folds, fold)
        eval_x, eval_y = train_x[va_f], train_y[va_f]
        train_x, train_y = train_x[tr_f], train_y[tr_f]
        extra = dict(test_x=test_x.to(device), test_y=test_y.to(device))
    else:
        eval_x, eval_y = test_x, test_y
    mean, std = pixel_stats(train_x)
    return DeviceData(raw.name, raw.num_classes, train_x.to(device), train_y.to(device),
                      eval_x.to(device), eval_y.to(device), mean, max(std, 1e-3), **extra)


def read_idx_file(path: str) -> np.ndarray:
    """Read one IDX file (``.gz`` or not) into a numpy array; handy for inspection."""
    return parse_idx(_read_file(path), path)


__all__ = ["DataError", "DATASETS", "content_sha256", "EMNIST_SPLITS", "DatasetInfo", "DeviceData", "RawDataset",
           "dataset_info", "download_dataset", "fold_indices", "load_dataset", "parse_idx",
           "read_idx_file", "subset_indices", "to_device", "write_idx"]
