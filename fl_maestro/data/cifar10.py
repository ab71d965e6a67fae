"""CIFAR-10 from its python archive, downloaded with an md5 check into the cache folder."""

from __future__ import annotations

import functools
import logging
import pickle
import tarfile
import time
from pathlib import Path

import numpy as np

from fl_maestro.data.arrays import DatasetArrays, freeze, normalise
from fl_maestro.data.download import download_file

logger = logging.getLogger(__name__)

CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR10_MD5 = "c58f30108f718f92721af3b95e74349a"
CIFAR10_ARCHIVE = "cifar-10-python.tar.gz"
CIFAR10_TRAIN_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6))
CIFAR10_MEAN, CIFAR10_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
DEFAULT_CIFAR10_ROOT = Path.home() / ".cache" / "fl-maestro" / "cifar10"


def _read_cifar_batch(tar: tarfile.TarFile, name: str) -> tuple[np.ndarray, np.ndarray]:
    """One pickled CIFAR-10 batch from the archive as (N,3,32,32) uint8 and int64 labels."""
    member = f"cifar-10-batches-py/{name}"
    try:
        f = tar.extractfile(member)
    except KeyError as err:
        raise ValueError(f"{tar.name}: missing member {member}") from err
    if f is None:
        raise ValueError(f"{tar.name}: member {member} is not a file")
    # Pickle is the dataset's own format; only open archives you trust (md5 on download).
    batch = pickle.load(f, encoding="bytes")  # noqa: S301
    try:
        images = np.asarray(batch[b"data"], np.uint8).reshape(-1, 3, 32, 32)
        labels = np.asarray(batch[b"labels"], np.int64)
    except (KeyError, ValueError) as err:
        raise ValueError(f"{tar.name}: corrupt batch {member} ({err})") from err
    if images.shape[0] != labels.shape[0]:
        raise ValueError(f"{tar.name}: {member} has {len(images)} images, {len(labels)} labels")
    return images, labels


@functools.lru_cache(maxsize=2)
def _load_cifar10_cached(archive: str) -> DatasetArrays:
    """Decode the CIFAR-10 python archive once per process."""
    start = time.perf_counter()
    with tarfile.open(archive, "r:gz") as tar:
        train = [_read_cifar_batch(tar, name) for name in CIFAR10_TRAIN_BATCHES]
        x_test, y_test = _read_cifar_batch(tar, "test_batch")
    x_train = np.concatenate([x for x, _ in train])
    y_train = np.concatenate([y for _, y in train])
    logger.info("Loaded CIFAR-10 from %s in %.1f s", archive, time.perf_counter() - start)
    x_train, x_test = (normalise(x, 255.0, CIFAR10_MEAN, CIFAR10_STD) for x in (x_train, x_test))
    return freeze(x_train, y_train, x_test, y_test)


def load_cifar10(
    root: str | Path = DEFAULT_CIFAR10_ROOT, download: bool = False, url: str = CIFAR10_URL,
    md5: str | None = CIFAR10_MD5,
) -> DatasetArrays:
    """CIFAR-10 from ``root/cifar-10-python.tar.gz``: (N,3,32,32) float32, int64 labels."""
    archive = Path(root) / CIFAR10_ARCHIVE
    if not archive.is_file():
        if not download:
            raise FileNotFoundError(
                f"CIFAR-10 archive {archive} not found; pass download=True or fetch {url}"
            )
        download_file(url, archive, expected_md5=md5)
    return _load_cifar10_cached(str(archive.resolve()))
