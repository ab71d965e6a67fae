"""The IDX file format (Fashion-MNIST's and MNIST's): a magic number, dims, raw big-endian data."""

from __future__ import annotations

import gzip
import math
from pathlib import Path

import numpy as np

IDX_IMAGES_MAGIC, IDX_LABELS_MAGIC = 0x00000803, 0x00000801
_IDX_DTYPES = {0x08: "u1", 0x09: "i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: str | Path, expected_magic: int | None = None) -> np.ndarray:
    """Read an IDX file (optionally gzipped) into a native-endian numpy array."""
    path = Path(path)
    try:
        with (gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")) as f:
            raw = f.read()
    except (OSError, EOFError) as err:  # BadGzipFile is an OSError
        raise ValueError(f"{path}: not a readable IDX file ({err})") from err
    if len(raw) < 4:
        raise ValueError(f"{path}: corrupt IDX file, {len(raw)} bytes is too short")
    magic = int.from_bytes(raw[:4], "big")
    if raw[:2] != b"\x00\x00" or raw[2] not in _IDX_DTYPES:
        raise ValueError(f"{path}: corrupt IDX file, bad magic number 0x{magic:08x}")
    if expected_magic is not None and magic != expected_magic:
        raise ValueError(
            f"{path}: IDX magic number is 0x{magic:08x}, expected 0x{expected_magic:08x}"
        )
    ndim, dtype = raw[3], np.dtype(_IDX_DTYPES[raw[2]])
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise ValueError(f"{path}: corrupt IDX file, header of {ndim} dims is truncated")
    dims = tuple(int(d) for d in np.frombuffer(raw, ">u4", count=ndim, offset=4))
    expected_bytes = header + math.prod(dims) * dtype.itemsize
    if len(raw) != expected_bytes:
        raise ValueError(
            f"{path}: corrupt IDX file, {len(raw)} bytes but dims {dims} need {expected_bytes}"
        )
    data = np.frombuffer(raw, dtype, count=math.prod(dims), offset=header)
    return data.reshape(dims).astype(dtype.newbyteorder("="))
