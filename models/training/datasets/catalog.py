"""The data sets: their names, files, folders, checksums and download addresses.

Supported names (``--data``): ``mnist``, ``fashion-mnist``, ``kmnist``, ``qmnist`` and
``emnist-<split>`` for the six EMNIST splits (``byclass``, ``bymerge``, ``balanced``,
``letters``, ``digits``, ``mnist``).  Files are searched for under a data root in any of:

* torchvision's layout, ``ROOT/MNIST/raw/train-images-idx3-ubyte[.gz]`` (``FashionMNIST``,
  ``KMNIST``, ``QMNIST``, ``EMNIST`` likewise);
* a lower-case folder, ``ROOT/mnist/...`` (``fashion-mnist``, ``kmnist``, ``qmnist``, ``emnist``);
* ``ROOT`` itself;
* for EMNIST also NIST's original archive ``gzip.zip`` (in ``ROOT/EMNIST/raw``, ``ROOT/emnist``
  or ``ROOT``), read directly without unpacking.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field

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
def candidate_paths(root: str, info: DatasetInfo, fname: str):
    for folder in info.folders:
        for suffix in ("", ".gz"):
            yield os.path.join(root, folder, fname + suffix)


def find_zip(root: str, info: DatasetInfo) -> str | None:
    if info.zip_name is None:
        return None
    for folder in info.folders:
        p = os.path.join(root, folder, info.zip_name)
        if os.path.isfile(p):
            return p
    return None


def missing_message(root: str, info: DatasetInfo, missing) -> str:
    where = " or ".join(os.path.join(root, f) if f else root for f in info.folders[:2])
    msg = (f"data set {info.name!r} not found under data root {root!r}: missing "
           f"{', '.join(missing)} (each may be .gz-compressed). Put the files in {where}")
    if info.zip_name:
        msg += (f", or put NIST's {info.zip_name} ({EMNIST_URL}) in "
                f"{os.path.join(root, info.folders[0])}")
    return msg + "."
