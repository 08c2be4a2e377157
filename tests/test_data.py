"""Data readers, on small generated IDX files and on the shared MNIST."""
from __future__ import annotations

import gzip
import hashlib
import io
import os
import shutil
import struct
import urllib.request
import zipfile

import numpy as np
import pytest
import torch

from models.training import datasets as D
from models.training.datasets import download, idx

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.environ.get("SPINALKERN_DATA", os.path.join(REPO, "..", "shared", "data"))
HAVE_MNIST = os.path.isdir(os.path.join(SHARED, "mnist"))


def _images(n, h=28, w=28, seed=0):
    return np.random.default_rng(seed).integers(0, 256, size=(n, h, w), dtype=np.uint8)


def _write_set(folder, files, n_train=12, n_test=6, classes=10, label_offset=0, gz=True,
               label_table=False):
    """Write a tiny data set with the four given file names; returns the arrays written."""
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(1)
    out = []
    for (fname, n) in zip(files, (n_train, n_train, n_test, n_test)):
        if "images" in fname:
            arr = _images(n, seed=n)
        else:
            arr = rng.integers(0, classes, size=n).astype(np.uint8) + label_offset
            if label_table:
                arr = np.stack([arr.astype(">i4")] + [np.full(n, 7, ">i4")] * 7, axis=1)
        path = os.path.join(folder, fname + (".gz" if gz else ""))
        D.write_idx(path, arr)
        out.append(arr)
    return out


# -- IDX parsing -------------------------------------------------------------------------------
def test_idx_roundtrip(tmp_path):
    imgs = _images(5)
    table = np.arange(24, dtype=">i4").reshape(3, 8)
    for arr, name in ((imgs, "a-idx3-ubyte.gz"), (table, "b-idx2-int")):
        D.write_idx(str(tmp_path / name), arr)
        back = D.read_idx_file(str(tmp_path / name))
        assert back.shape == arr.shape and np.array_equal(back, arr)


def test_idx_bad_magic_and_sizes():
    good = b"\x00\x00\x08\x01" + (3).to_bytes(4, "big") + b"\x01\x02\x03"
    assert D.parse_idx(good).tolist() == [1, 2, 3]
    with pytest.raises(D.DataError, match="bad magic"):
        D.parse_idx(b"\x01\x02\x08\x01" + good[4:])
    with pytest.raises(D.DataError, match="truncated"):
        D.parse_idx(good[:-1])
    with pytest.raises(D.DataError, match="truncated"):
        D.parse_idx(good + b"\x00")
    with pytest.raises(D.DataError, match="not an IDX"):
        D.parse_idx(b"\x00")


# -- whole data sets from generated files ------------------------------------------------------
@pytest.mark.parametrize("gz", [True, False])
def test_kmnist_torchvision_layout(tmp_path, gz):
    files = D.dataset_info("kmnist").files
    written = _write_set(str(tmp_path / "KMNIST" / "raw"), files, gz=gz)
    raw = D.load_dataset("kmnist", str(tmp_path))
    assert raw.train_images.shape == (12, 1, 28, 28) and raw.train_images.dtype == torch.uint8
    assert raw.test_images.shape == (6, 1, 28, 28)
    assert torch.equal(raw.train_images[:, 0], torch.from_numpy(written[0]))
    assert raw.train_labels.dtype == torch.int64
    assert torch.equal(raw.test_labels, torch.from_numpy(written[3].astype(np.int64)))


def test_lowercase_layout_and_fake_mnist_checksum(tmp_path):
    files = D.dataset_info("mnist").files
    _write_set(str(tmp_path / "mnist"), files)
    # These are not the official MNIST files: the checksum must catch that...
    with pytest.raises(D.DataError, match="checksum mismatch"):
        D.load_dataset("mnist", str(tmp_path))
    # ... unless asked not to verify (format checks still run).
    raw = D.load_dataset("mnist", str(tmp_path), verify=False)
    assert raw.num_classes == 10 and raw.train_images.shape[0] == 12


def test_qmnist_label_table(tmp_path):
    info = D.dataset_info("qmnist")
    written = _write_set(str(tmp_path / "QMNIST" / "raw"), info.files, label_table=True)
    raw = D.load_dataset("qmnist", str(tmp_path))
    assert torch.equal(raw.train_labels, torch.from_numpy(written[1][:, 0].astype(np.int64)))


@pytest.mark.parametrize("gz", [True, False])
def test_emnist_letters_raw_layout(tmp_path, gz):
    info = D.dataset_info("emnist-letters")
    written = _write_set(str(tmp_path / "EMNIST" / "raw"), info.files, classes=26,
                         label_offset=1, gz=gz)
    with pytest.raises(D.DataError, match="checksum mismatch"):   # not NIST's real labels
        D.load_dataset("emnist-letters", str(tmp_path))
    raw = D.load_dataset("emnist-letters", str(tmp_path), verify=False)
    assert raw.num_classes == 26
    # labels 1..26 become 0..25
    assert torch.equal(raw.train_labels, torch.from_numpy(written[1].astype(np.int64)) - 1)
    assert int(raw.train_labels.min()) >= 0 and int(raw.train_labels.max()) <= 25
    # images are stored transposed: the reader transposes them back
    assert torch.equal(raw.train_images[:, 0], torch.from_numpy(written[0]).transpose(1, 2))


def test_emnist_transpose_orientation(tmp_path):
    """A horizontal bar written column-major (as NIST does) must come out horizontal."""
    info = D.dataset_info("emnist-digits")
    folder = tmp_path / "EMNIST" / "raw"
    _write_set(str(folder), info.files)
    upright = np.zeros((12, 28, 28), np.uint8)
    upright[:, 5, :] = 255                    # row 5 lit: a horizontal bar
    D.write_idx(str(folder / (info.files[0] + ".gz")), upright.transpose(0, 2, 1).copy())
    raw = D.load_dataset("emnist-digits", str(tmp_path))
    assert torch.equal(raw.train_images[:, 0], torch.from_numpy(upright))


@pytest.mark.parametrize("split,classes", sorted(D.EMNIST_SPLITS.items()))
def test_emnist_all_splits_from_nist_zip(tmp_path, split, classes):
    info = D.dataset_info(f"emnist-{split}")
    offset = 1 if split == "letters" else 0
    staging = tmp_path / "staging"
    written = _write_set(str(staging), info.files, classes=classes, label_offset=offset)
    zpath = tmp_path / "emnist" / "gzip.zip"
    os.makedirs(zpath.parent)
    with zipfile.ZipFile(zpath, "w") as zf:
        for f in info.files:
            zf.write(staging / (f + ".gz"), arcname=f"gzip/{f}.gz")
        zf.writestr("gzip/emnist-other-file.gz", gzip.compress(b"unrelated"))
    raw = D.load_dataset(f"emnist-{split}", str(tmp_path), verify=False)
    assert raw.num_classes == classes
    assert raw.train_images.shape == (12, 1, 28, 28)
    assert torch.equal(raw.test_labels, torch.from_numpy(written[3].astype(np.int64)) - offset)


def test_corrupt_zip(tmp_path):
    zpath = tmp_path / "EMNIST" / "raw" / "gzip.zip"
    os.makedirs(zpath.parent)
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("gzip/emnist-letters-train-images-idx3-ubyte.gz", os.urandom(4000))
    blob = bytearray(buf.getvalue())
    blob[200] ^= 0xFF  # flip a byte inside the compressed member
    zpath.write_bytes(bytes(blob))
    with pytest.raises(D.DataError, match="corrupt|truncated|gzip|no member"):
        D.load_dataset("emnist-letters", str(tmp_path))


def test_truncated_and_corrupt_gzip(tmp_path):
    files = D.dataset_info("kmnist").files
    folder = tmp_path / "kmnist"
    _write_set(str(folder), files)
    path = folder / (files[0] + ".gz")
    blob = path.read_bytes()
    path.write_bytes(blob[: len(blob) // 2])                 # cut in half
    with pytest.raises(D.DataError, match="corrupt or truncated gzip"):
        D.load_dataset("kmnist", str(tmp_path))
    bad = bytearray(blob)
    bad[len(bad) // 2] ^= 0xFF                                # one flipped byte: CRC error
    path.write_bytes(bytes(bad))
    with pytest.raises(D.DataError):
        D.load_dataset("kmnist", str(tmp_path))


def test_truncated_raw_file(tmp_path):
    files = D.dataset_info("kmnist").files
    folder = tmp_path / "kmnist"
    _write_set(str(folder), files, gz=False)
    path = folder / files[2]
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(D.DataError, match="truncated"):
        D.load_dataset("kmnist", str(tmp_path))


def test_inconsistent_files(tmp_path):
    files = D.dataset_info("kmnist").files
    folder = tmp_path / "kmnist"
    _write_set(str(folder), files)
    D.write_idx(str(folder / (files[1] + ".gz")), np.zeros(11, np.uint8))  # 12 images
    with pytest.raises(D.DataError, match="12 images but 11 labels"):
        D.load_dataset("kmnist", str(tmp_path))
    D.write_idx(str(folder / (files[1] + ".gz")), np.full(12, 10, np.uint8))  # class 10 of 10
    with pytest.raises(D.DataError, match="outside the 10 classes"):
        D.load_dataset("kmnist", str(tmp_path))
    D.write_idx(str(folder / (files[1] + ".gz")), np.zeros((12, 2), np.uint8))
    with pytest.raises(D.DataError, match="1-d labels"):
        D.load_dataset("kmnist", str(tmp_path))


def test_float_labels_are_rejected(tmp_path):
    """IDX can store floats; 3.7 must not silently become class 3."""
    files = D.dataset_info("kmnist").files
    folder = tmp_path / "kmnist"
    _write_set(str(folder), files)
    D.write_idx(str(folder / (files[1] + ".gz")), np.full(12, 3.7, ">f4"))
    with pytest.raises(D.DataError, match="labels must be integers.*float32"):
        D.load_dataset("kmnist", str(tmp_path))


def test_header_size_product_that_wraps():
    """Four sizes of 2**16: their product wraps to 0 in 64 bits; the error names the file."""
    blob = struct.pack(">HBB4I", 0, 0x08, 4, *[1 << 16] * 4)
    with pytest.raises(D.DataError, match="x-idx4-ubyte: IDX header says shape.*truncated"):
        D.parse_idx(blob, "x-idx4-ubyte")


def test_unreadable_folder_and_file(tmp_path, monkeypatch):
    """Reported as unreadable, not as missing.  (Permissions are simulated as well as set,
    since they do not bind the root user.)"""
    files = D.dataset_info("kmnist").files
    folder = tmp_path / "kmnist"
    _write_set(str(folder), files)
    real_access, real_open = os.access, open
    folder.chmod(0)
    try:
        monkeypatch.setattr(os, "access", lambda p, mode: (
            os.path.abspath(p) != str(folder) and real_access(p, mode)))
        with pytest.raises(D.DataError, match="cannot read the folder .*kmnist.*permission"):
            D.load_dataset("kmnist", str(tmp_path))
    finally:
        folder.chmod(0o755)
    monkeypatch.undo()
    image_file = str(folder / (files[0] + ".gz"))

    def denied(path, *a, **k):
        if os.path.abspath(path) == image_file:
            raise PermissionError(13, "Permission denied", path)
        return real_open(path, *a, **k)

    monkeypatch.setattr(idx, "open", denied, raising=False)
    with pytest.raises(D.DataError, match="cannot read the file.*Permission denied"):
        D.load_dataset("kmnist", str(tmp_path))


def test_emnist_letters_label_zero_is_an_error(tmp_path):
    info = D.dataset_info("emnist-letters")
    folder = tmp_path / "EMNIST" / "raw"
    _write_set(str(folder), info.files, classes=26, label_offset=1)
    D.write_idx(str(folder / (info.files[1] + ".gz")), np.zeros(12, np.uint8))
    with pytest.raises(D.DataError, match="labels range over 0..0"):
        D.load_dataset("emnist-letters", str(tmp_path), verify=False)


def test_missing_data_message(tmp_path):
    with pytest.raises(D.DataError) as e:
        D.load_dataset("emnist-balanced", str(tmp_path))
    msg = str(e.value)
    assert "emnist-balanced-train-images-idx3-ubyte" in msg
    assert os.path.join(str(tmp_path), "EMNIST/raw") in msg and "gzip.zip" in msg
    with pytest.raises(ValueError, match="unknown data set"):
        D.load_dataset("cifar10", str(tmp_path))


def test_download_offline_and_md5(tmp_path, monkeypatch):
    def offline(*a, **k):
        raise OSError("network is unreachable")

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    with pytest.raises(D.DataError) as e:
        D.load_dataset("fashion-mnist", str(tmp_path), download=True)
    msg = str(e.value)
    assert "download of" in msg and "failed" in msg
    assert "train-images-idx3-ubyte" in msg
    assert os.path.join(str(tmp_path), "FashionMNIST/raw") in msg

    payload = b"not the real file"

    class Resp(io.BytesIO):
        def __enter__(self):
            return self

        def __exit__(self, *a):
            return False

    monkeypatch.setattr(urllib.request, "urlopen", lambda *a, **k: Resp(payload))
    dest = tmp_path / "x" / "f.gz"
    with pytest.raises(D.DataError, match="does not match the published"):
        download._fetch("http://example.invalid/f.gz", str(dest), "0" * 32)
    assert not dest.exists() and not (tmp_path / "x" / "f.gz.part").exists()
    download._fetch("http://example.invalid/f.gz", str(dest), hashlib.md5(payload).hexdigest())
    assert dest.read_bytes() == payload


def test_default_data_root_lookup(tmp_path, monkeypatch):
    """No --data-root: the checkout's data/, else ../shared/data, else a download into data/;
    without a network, one message saying which files to put where."""
    from models.training.datasets import read

    first, second = tmp_path / "checkout" / "data", tmp_path / "shared" / "data"
    monkeypatch.setattr(read, "DEFAULT_ROOTS", (str(first), str(second)))
    files = D.dataset_info("kmnist").files
    _write_set(str(second / "kmnist"), files)
    assert D.load_dataset("kmnist").train_images.shape[0] == 12          # from the second
    _write_set(str(first / "KMNIST" / "raw"), files, n_train=10)
    assert D.load_dataset("kmnist").train_images.shape[0] == 10          # the first wins

    def offline(*a, **k):
        raise OSError("network is unreachable")

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    with pytest.raises(D.DataError) as e:
        D.load_dataset("qmnist")
    msg = str(e.value)
    assert "network is unreachable" in msg and "qmnist-train-images-idx3-ubyte" in msg
    assert str(first / "QMNIST" / "raw") in msg and str(second) in msg and "--data-root" in msg

    def fetched(url, dest, md5, timeout=30.0):     # a download that works: into data/
        _write_set(os.path.dirname(dest), D.dataset_info("qmnist").files, label_table=True)

    monkeypatch.setattr(download, "_fetch", fetched)
    assert D.load_dataset("qmnist").train_images.shape[0] == 12
    assert (first / "QMNIST" / "raw").is_dir()


def test_subsets_and_folds():
    a = D.subset_indices(100, 30)
    assert a.numel() == 30 and torch.equal(a, D.subset_indices(100, 30))
    assert torch.equal(torch.unique(a), a)
    with pytest.raises(ValueError, match="impossible"):
        D.subset_indices(100, 101)
    seen = []
    for f in range(4):
        tr, va = D.fold_indices(103, 4, f)
        assert tr.numel() + va.numel() == 103
        assert not set(tr.tolist()) & set(va.tolist())
        seen += va.tolist()
    assert sorted(seen) == list(range(103))
    with pytest.raises(ValueError):
        D.fold_indices(10, 1, 0)


@pytest.mark.skipif(not HAVE_MNIST, reason="shared MNIST not found")
def test_real_mnist_and_corrupted_copy(tmp_path):
    raw = D.load_dataset("mnist", SHARED)            # checksums verified
    assert raw.train_images.shape == (60000, 1, 28, 28)
    assert raw.test_images.shape == (10000, 1, 28, 28)
    assert int(raw.train_labels.min()) == 0 and int(raw.train_labels.max()) == 9
    dd = D.to_device(raw, "cpu", train_subset=1000, test_subset=200)
    assert dd.train_x.shape == (1000, 1, 28, 28) and dd.eval_x.shape[0] == 200
    assert abs(D.pixel_stats(raw.train_images)[0] - 0.1307) < 1e-3
    # A truncated copy of a real file is refused.
    folder = tmp_path / "mnist"
    shutil.copytree(os.path.join(SHARED, "mnist"), folder)
    p = folder / "t10k-labels-idx1-ubyte.gz"
    full = gzip.decompress(p.read_bytes())
    p.chmod(0o644)
    p.write_bytes(gzip.compress(full[:-10]))
    with pytest.raises(D.DataError, match="truncated"):
        D.load_dataset("mnist", str(tmp_path))
    # Same length, one label changed: only the checksum can tell.
    changed = bytearray(full)
    changed[100] = (changed[100] + 1) % 10
    p.write_bytes(gzip.compress(bytes(changed)))
    with pytest.raises(D.DataError, match="checksum mismatch"):
        D.load_dataset("mnist", str(tmp_path))


@pytest.mark.skipif(not os.path.isdir(os.path.join(SHARED, "emnist-letters-labels")),
                    reason="shared EMNIST Letters labels not found")
def test_real_emnist_letters_labels_with_blank_images(tmp_path):
    """NIST's real label files (checksum-verified) with generated blank images."""
    folder = tmp_path / "EMNIST" / "raw"
    os.makedirs(folder)
    for part, n in (("train", 124800), ("test", 20800)):
        name = f"emnist-letters-{part}-labels-idx1-ubyte.gz"
        shutil.copy(os.path.join(SHARED, "emnist-letters-labels", name), folder / name)
        with open(folder / f"emnist-letters-{part}-images-idx3-ubyte", "wb") as f:
            f.write(b"\x00\x00\x08\x03" + b"".join(v.to_bytes(4, "big") for v in (n, 28, 28)))
            f.write(bytes(n * 28 * 28))
    raw = D.load_dataset("emnist-letters", str(tmp_path))
    assert raw.train_images.shape == (124800, 1, 28, 28) and raw.test_labels.shape == (20800,)
    counts = torch.bincount(raw.train_labels, minlength=26)
    assert counts.numel() == 26 and bool((counts == 4800).all())   # balanced, 0..25
