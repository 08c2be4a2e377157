"""Downloading missing data files (needs a network; every file verified by its MD5)."""
from __future__ import annotations

import hashlib
import os
import urllib.request

from .catalog import EMNIST_URL, EMNIST_ZIP_MD5, candidate_paths, find_zip, missing_message, \
    dataset_info
from .idx import DataError


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


def missing_files(root: str, info) -> list[str]:
    """The files of data set ``info`` not found under ``root`` (none when NIST's zip is)."""
    missing = [f for f in info.files
               if not any(os.path.isfile(p) for p in candidate_paths(root, info, f))]
    return [] if missing and find_zip(root, info) is not None else missing


def fetch_missing(root: str, info) -> None:
    """Download the missing files of ``info`` into ``root`` (torchvision's layout)."""
    missing = missing_files(root, info)
    raw = os.path.join(root, info.folders[0])
    if missing and info.zip_name:
        _fetch(EMNIST_URL, os.path.join(raw, info.zip_name), EMNIST_ZIP_MD5, timeout=60.0)
        return
    for f in missing:
        _fetch(info.urls[f], os.path.join(raw, f + ".gz"), info.md5[f])


def download_dataset(name: str, root: str) -> None:
    """Download the files of ``name`` that are not yet under ``root`` (torchvision layout)."""
    info = dataset_info(name)
    try:
        fetch_missing(root, info)
    except DataError as e:
        raise DataError(f"{e}. Without a network: "
                        f"{missing_message(root, info, missing_files(root, info))}") from None
