"""What every dataset loader returns: normalised float32 images and int64 labels, read-only."""

from __future__ import annotations

import numpy as np

DatasetArrays = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]


def normalise(x: np.ndarray, scale: float, mean: object, std: object) -> np.ndarray:
    """Scale raw pixels to [0, 1] and standardise per channel (axis 1), as float32."""
    shape = (1, -1) + (1,) * (x.ndim - 2)
    out = x.astype(np.float32) / np.float32(scale)
    out -= np.asarray(mean, np.float32).reshape(shape)
    out /= np.asarray(std, np.float32).reshape(shape)
    return out


def freeze(*arrays: np.ndarray) -> DatasetArrays:
    """Mark cached arrays read-only so one client cannot corrupt another's data."""
    for a in arrays:
        a.flags.writeable = False
    return arrays  # type: ignore[return-value]
