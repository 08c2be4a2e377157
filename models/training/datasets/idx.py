"""The IDX file format ("ubyte" files) of the MNIST family, gzip-compressed or not.

A file is a magic number (two zero bytes, a type code, the number of dimensions), one
big-endian uint32 per dimension, then the data, big-endian.  Reading checks the magic number
and that the data length matches the header exactly.
"""
from __future__ import annotations

import gzip
import math
import struct
import zlib

import numpy as np


class DataError(RuntimeError):
    """A data set is missing, unreadable, truncated, corrupt or inconsistent."""


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


def gunzip(blob: bytes, name: str) -> bytes:
    try:
        return gzip.decompress(blob)
    except (OSError, EOFError, zlib.error) as e:  # BadGzipFile is an OSError
        raise DataError(f"{name}: corrupt or truncated gzip file ({e})") from None


def read_file(path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            blob = f.read()
    except OSError as e:
        raise DataError(f"{path}: cannot read the file ({e.strerror or e})") from None
    if path.endswith(".gz") or blob[:2] == b"\x1f\x8b":
        blob = gunzip(blob, path)
    return blob


def read_idx_file(path: str) -> np.ndarray:
    """Read one IDX file (``.gz`` or not) into a numpy array; handy for inspection."""
    return parse_idx(read_file(path), path)
