"""Fashion-MNIST from Debian's ``dataset-fashion-mnist`` IDX files, decoded once per machine."""

from __future__ import annotations

import functools
import logging
import os
import shutil
import subprocess
import time
from pathlib import Path

import numpy as np

from fl_maestro.cache import cached_arrays
from fl_maestro.data.arrays import DatasetArrays, freeze, normalise
from fl_maestro.data.idx import IDX_IMAGES_MAGIC, IDX_LABELS_MAGIC, read_idx

logger = logging.getLogger(__name__)

FASHION_MNIST_ROOT = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_PACKAGE = "dataset-fashion-mnist"
FASHION_MNIST_FILES = {
    "train_images": "train-images-idx3-ubyte.gz",
    "train_labels": "train-labels-idx1-ubyte.gz",
    "test_images": "t10k-images-idx3-ubyte.gz",
    "test_labels": "t10k-labels-idx1-ubyte.gz",
}
FASHION_MNIST_MEAN, FASHION_MNIST_STD = 0.2860, 0.3530


def _can_apt_install() -> bool:
    """Whether this process may install a Debian package (root with apt-get)."""
    is_root = hasattr(os, "geteuid") and os.geteuid() == 0
    return is_root and shutil.which("apt-get") is not None


def _fashion_mnist_paths(root: Path) -> dict[str, Path]:
    """Paths of the four Fashion-MNIST files, installing the Debian package if allowed."""
    paths = {key: root / name for key, name in FASHION_MNIST_FILES.items()}
    missing = [p for p in paths.values() if not p.is_file()]
    # Installing only helps when the files are looked for where the package puts them.
    if missing and root == Path(FASHION_MNIST_ROOT) and _can_apt_install():
        logger.info("Fashion-MNIST missing; running apt-get install -y %s", FASHION_MNIST_PACKAGE)
        subprocess.run(["apt-get", "install", "-y", FASHION_MNIST_PACKAGE], check=True)
        missing = [p for p in paths.values() if not p.is_file()]
    if missing:
        raise FileNotFoundError(
            f"Fashion-MNIST files {[p.name for p in missing]} not found under {root}; install "
            f"the Debian package {FASHION_MNIST_PACKAGE}, which puts them in {FASHION_MNIST_ROOT}"
        )
    return paths


@functools.lru_cache(maxsize=4)
def _load_fashion_mnist_cached(root: str) -> DatasetArrays:
    """Fashion-MNIST from ``root``, decoded once per machine (``fl_maestro.cache``) and per process."""
    start = time.perf_counter()
    paths = _fashion_mnist_paths(Path(root))
    # The name carries everything the decoding depends on besides the files themselves.
    name = f"fashion-mnist-v1-{FASHION_MNIST_MEAN}-{FASHION_MNIST_STD}"
    arrays = cached_arrays(name, [paths[k] for k in sorted(paths)],
                           lambda: _decode_fashion_mnist(paths, root))
    logger.info("Loaded Fashion-MNIST from %s in %.1f s", root, time.perf_counter() - start)
    return freeze(*arrays)


def _decode_fashion_mnist(paths: dict[str, Path], root: str) -> list[np.ndarray]:
    arrays = []
    for split in ("train", "test"):
        images = read_idx(paths[f"{split}_images"], IDX_IMAGES_MAGIC)
        labels = read_idx(paths[f"{split}_labels"], IDX_LABELS_MAGIC).astype(np.int64)
        if images.shape[0] != labels.shape[0] or images.shape[1:] != (28, 28):
            raise ValueError(
                f"Fashion-MNIST {split} split under {root}: images {images.shape} "
                f"do not match labels {labels.shape}"
            )
        images = normalise(images[:, None], 255.0, FASHION_MNIST_MEAN, FASHION_MNIST_STD)
        arrays += [images, labels]
    return arrays


def load_fashion_mnist(root: str | Path = FASHION_MNIST_ROOT) -> DatasetArrays:
    """Fashion-MNIST from Debian's IDX files: (N,1,28,28) float32 images, int64 labels."""
    return _load_fashion_mnist_cached(str(Path(root).resolve()))
