"""The datasets a run can name: their shapes, class counts and loaders (and sklearn's digits)."""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np

from fl_maestro.data.arrays import DatasetArrays, freeze, normalise
from fl_maestro.data.cifar10 import DEFAULT_CIFAR10_ROOT, load_cifar10
from fl_maestro.data.fashion_mnist import load_fashion_mnist

DATASET_SHAPES: dict[str, tuple[int, int, int]] = {
    "fashion-mnist": (1, 28, 28), "digits": (1, 8, 8), "cifar10": (3, 32, 32),
}
NUM_CLASSES: dict[str, int] = {"fashion-mnist": 10, "digits": 10, "cifar10": 10}

DIGITS_MEAN, DIGITS_STD = 0.3053, 0.3760  # of sklearn's digits scaled to [0, 1]
DIGITS_TEST_FRACTION = 0.2


@functools.lru_cache(maxsize=1)
def load_digits() -> DatasetArrays:
    """scikit-learn's 8x8 digits, split 80/20 stratified with a fixed seed."""
    from sklearn.datasets import load_digits as sk_load_digits
    from sklearn.model_selection import train_test_split

    bunch = sk_load_digits()
    x = normalise(bunch.images[:, None], 16.0, DIGITS_MEAN, DIGITS_STD)
    y = bunch.target.astype(np.int64)
    x_train, x_test, y_train, y_test = train_test_split(
        x, y, test_size=DIGITS_TEST_FRACTION, stratify=y, random_state=0
    )
    return freeze(x_train, y_train, x_test, y_test)


def load_dataset(name: str, root: str | Path | None = None) -> DatasetArrays:
    """Load a dataset by name; ``root`` overrides where its files live (not for digits)."""
    if name == "fashion-mnist":
        return load_fashion_mnist(root)
    if name == "digits":
        return load_digits()
    if name == "cifar10":
        return load_cifar10(root or DEFAULT_CIFAR10_ROOT)
    allowed = ", ".join(DATASET_SHAPES)
    raise ValueError(f"dataset={name!r} is not allowed; expected one of {allowed}")
