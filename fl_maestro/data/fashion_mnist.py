"""Fashion-MNIST's IDX files, found or fetched, decoded once per machine.

Where the four files come from, first match wins: Debian's ``dataset-fashion-mnist`` package
(``/usr/share/datasets/fashion-mnist``); a copy downloaded earlier into the cache folder
(``fl_maestro.cache.cache_root()/fashion-mnist``); ``apt-get install`` of that package, when this
process is root; a download of the original files from Zalando Research, each checked against
its published md5.
"""

from __future__ import annotations

import functools
import logging
import os
import shutil
import subprocess
import time
from pathlib import Path

import numpy as np

from fl_maestro.cache import cache_root, cached_arrays, file_lock
from fl_maestro.data.arrays import DatasetArrays, freeze, normalise
from fl_maestro.data.download import download_file
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
# The original files, as linked from https://github.com/zalandoresearch/fashion-mnist; the md5s
# are the ones published there. Debian's package re-compresses them (same data, other md5s).
FASHION_MNIST_URL = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"
FASHION_MNIST_MD5 = {
    "train-images-idx3-ubyte.gz": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
    "train-labels-idx1-ubyte.gz": "25c81989df183df01b3e8a0aad5dffbe",
    "t10k-images-idx3-ubyte.gz": "bef4ecab320f06d8554ea6380940ec79",
    "t10k-labels-idx1-ubyte.gz": "bb300cfdad3c16e7a12a480ee83cd310",
}
FASHION_MNIST_MEAN, FASHION_MNIST_STD = 0.2860, 0.3530


def fashion_mnist_cache_dir() -> Path:
    """Where downloaded Fashion-MNIST files are kept: ``cache_root()/fashion-mnist``."""
    return cache_root() / "fashion-mnist"


def _missing(folder: Path) -> list[str]:
    """Names of the four files not (yet) in ``folder``."""
    return [name for name in FASHION_MNIST_FILES.values() if not (folder / name).is_file()]


def _can_apt_install() -> bool:
    """Whether this process may install a Debian package (root with apt-get)."""
    is_root = hasattr(os, "geteuid") and os.geteuid() == 0
    return is_root and shutil.which("apt-get") is not None


def _apt_install() -> bool:
    """Install Debian's package; False (with a warning) when apt-get fails."""
    logger.info("Fashion-MNIST missing; running apt-get install -y %s", FASHION_MNIST_PACKAGE)
    try:
        subprocess.run(["apt-get", "install", "-y", FASHION_MNIST_PACKAGE], check=True)
    except (OSError, subprocess.CalledProcessError) as err:
        logger.warning("apt-get install %s failed (%s)", FASHION_MNIST_PACKAGE, err)
        return False
    return not _missing(Path(FASHION_MNIST_ROOT))


def _download(folder: Path, url: str, md5: dict[str, str]) -> None:
    """Fetch the files missing from ``folder``, one process at a time (a lock in ``folder``)."""
    folder.mkdir(parents=True, exist_ok=True)
    with file_lock(folder / ".download.lock"):
        for name in _missing(folder):  # again under the lock: another process may have done it
            source = url.rstrip("/") + "/" + name
            try:
                download_file(source, folder / name, expected_md5=md5[name])
            except OSError as err:  # urllib's errors say little about what was being fetched
                raise OSError(
                    f"Fashion-MNIST: could not download {source} into {folder} ({err}); install "
                    f"the Debian package {FASHION_MNIST_PACKAGE} or put the files there"
                ) from err


def fashion_mnist_folder(
    root: str | Path | None = None, url: str = FASHION_MNIST_URL,
    md5: dict[str, str] | None = None,
) -> Path:
    """The folder holding the four files: ``root`` if given, else found or fetched (module doc)."""
    if root is not None:
        folder = Path(root)
        # Installing only helps when the files are looked for where the package puts them.
        if _missing(folder) and folder == Path(FASHION_MNIST_ROOT) and _can_apt_install():
            _apt_install()
        if missing := _missing(folder):
            raise FileNotFoundError(
                f"Fashion-MNIST files {missing} not found under {folder}; install the Debian "
                f"package {FASHION_MNIST_PACKAGE}, which puts them in {FASHION_MNIST_ROOT}, or "
                "leave the folder unset to download them into the cache folder"
            )
        return folder
    debian, cached = Path(FASHION_MNIST_ROOT), fashion_mnist_cache_dir()
    for folder in (debian, cached):
        if not _missing(folder):
            return folder
    if _can_apt_install() and _apt_install():
        return debian
    _download(cached, url, FASHION_MNIST_MD5 if md5 is None else md5)
    return cached


@functools.lru_cache(maxsize=4)
def _load_fashion_mnist_cached(folder: str) -> DatasetArrays:
    """Fashion-MNIST from ``folder``, decoded once per machine (``fl_maestro.cache``)."""
    start = time.perf_counter()
    paths = {key: Path(folder, name) for key, name in FASHION_MNIST_FILES.items()}
    # The name carries everything the decoding depends on besides the files themselves.
    name = f"fashion-mnist-v1-{FASHION_MNIST_MEAN}-{FASHION_MNIST_STD}"
    arrays = cached_arrays(name, [paths[k] for k in sorted(paths)],
                           lambda: _decode_fashion_mnist(paths, folder))
    logger.info("Loaded Fashion-MNIST from %s in %.1f s", folder, time.perf_counter() - start)
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


def load_fashion_mnist(
    root: str | Path | None = None, url: str = FASHION_MNIST_URL,
    md5: dict[str, str] | None = None,
) -> DatasetArrays:
    """(N,1,28,28) float32 images and int64 labels, from ``root`` or found / fetched."""
    folder = fashion_mnist_folder(root, url, md5)
    return _load_fashion_mnist_cached(str(folder.resolve()))
