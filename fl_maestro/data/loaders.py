"""Mini-batches of the shared, read-only dataset arrays, held on the device they are used on.

``DataLoader`` over a ``TensorDataset`` fetches every example on its own and stacks them again in
Python (32 ``__getitem__`` calls and a ``torch.stack`` per training batch) and leaves the data on
the CPU. ``Batches`` indexes the whole tensors once per batch (``x[idx]``) on the device that holds
them, so a client's partition moves to a GPU once, not once per batch. The order is the one a
``DataLoader(shuffle=True, generator=...)`` over the same tensors yields in its first epoch (later
passes differ: DataLoader's sampler draws twice per pass).
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch


class Batches:
    """Iterable of ``(x, y)`` batches of ``batch_size`` rows (the last one may be smaller).

    With ``shuffle``, every pass draws a new order from its own seeded generator, so the n-th
    pass over the same ``Batches`` is the same in every run. Without it, batches are views in
    row order (no copies).
    """

    def __init__(self, x: torch.Tensor, y: torch.Tensor, batch_size: int, shuffle: bool = False,
                 seed: int = 0, device: torch.device | str | None = None) -> None:
        if len(x) != len(y):
            raise ValueError(f"x has {len(x)} rows but y has {len(y)}")
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size!r}: allowed an integer >= 1")
        device = torch.device(device) if device is not None else x.device
        self.x, self.y = x.to(device), y.to(device)
        self.batch_size, self.shuffle = int(batch_size), shuffle
        self.generator = torch.Generator().manual_seed(int(seed)) if shuffle else None

    @property
    def num_examples(self) -> int:
        """Rows in one pass."""
        return len(self.y)

    def __len__(self) -> int:
        return -(-self.num_examples // self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        n, size = self.num_examples, self.batch_size
        if not self.shuffle:
            for start in range(0, n, size):
                yield self.x[start:start + size], self.y[start:start + size]
            return
        # DataLoader draws its workers' base seed from the generator first; so do we, to give
        # the same order (and the same runs) as the DataLoader this replaces.
        torch.empty((), dtype=torch.int64).random_(generator=self.generator)
        order = torch.randperm(n, generator=self.generator).to(self.x.device)
        for start in range(0, n, size):
            idx = order[start:start + size]
            yield self.x[idx], self.y[idx]


def make_loader(
    x: np.ndarray, y: np.ndarray, indices: np.ndarray | None = None, batch_size: int = 32,
    shuffle: bool = False, seed: int = 0, device: torch.device | str | None = None,
) -> Batches:
    """Batches of ``x[indices], y[indices]`` (all rows if None), held on ``device`` (default CPU)."""
    if indices is not None:
        indices = np.asarray(indices, np.int64)
        x, y = x[indices], y[indices]
    # require() copies only read-only (cached) arrays, which torch.from_numpy warns about.
    tx = torch.from_numpy(np.require(x, np.float32, ["C", "W"]))
    ty = torch.from_numpy(np.require(y, np.int64, ["C", "W"]))
    return Batches(tx, ty, batch_size, shuffle=shuffle, seed=seed, device=device)
