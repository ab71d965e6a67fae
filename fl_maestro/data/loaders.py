"""Torch DataLoaders over the shared, read-only dataset arrays."""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import DataLoader, TensorDataset


def make_loader(
    x: np.ndarray, y: np.ndarray, indices: np.ndarray | None = None, batch_size: int = 32,
    shuffle: bool = False, seed: int = 0,
) -> DataLoader:
    """A single-process DataLoader over ``x[indices], y[indices]`` (all rows if None)."""
    if indices is not None:
        indices = np.asarray(indices, np.int64)
        x, y = x[indices], y[indices]
    # require() copies only read-only (cached) arrays, which torch.from_numpy warns about.
    tx = torch.from_numpy(np.require(x, np.float32, ["C", "W"]))
    ty = torch.from_numpy(np.require(y, np.int64, ["C", "W"]))
    generator = torch.Generator().manual_seed(int(seed)) if shuffle else None
    return DataLoader(
        TensorDataset(tx, ty), batch_size=batch_size, shuffle=shuffle,
        generator=generator, num_workers=0,
    )
