"""Datasets and their federated partitioning.

Loaders return ``(x_train, y_train, x_test, y_test)``: normalised float32 (N, C, H, W) images
and int64 labels, decoded once per process and read-only, since every simulated client in a
process shares them. Partitioning runs flwr-datasets' partitioners over a label-only
``datasets.Dataset`` (the images stay in numpy) and yields indices into the training set.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import logging
import math
import numbers
import os
import pickle
import shutil
import subprocess
import tarfile
import tempfile
import time
import urllib.request
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch.utils.data import DataLoader, TensorDataset

from fl_maestro.cache import cached_arrays

if TYPE_CHECKING:  # imported where partitions are made: ~1 s of imports the ServerApp never needs
    import datasets
    from flwr_datasets.partitioner import Partitioner

logger = logging.getLogger(__name__)

DatasetArrays = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]

DATASET_SHAPES: dict[str, tuple[int, int, int]] = {
    "fashion-mnist": (1, 28, 28), "digits": (1, 8, 8), "cifar10": (3, 32, 32),
}
NUM_CLASSES: dict[str, int] = {"fashion-mnist": 10, "digits": 10, "cifar10": 10}
PARTITIONERS = ("iid", "dirichlet", "pathological")

FASHION_MNIST_ROOT = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_PACKAGE = "dataset-fashion-mnist"
FASHION_MNIST_FILES = {
    "train_images": "train-images-idx3-ubyte.gz",
    "train_labels": "train-labels-idx1-ubyte.gz",
    "test_images": "t10k-images-idx3-ubyte.gz",
    "test_labels": "t10k-labels-idx1-ubyte.gz",
}
FASHION_MNIST_MEAN, FASHION_MNIST_STD = 0.2860, 0.3530
IDX_IMAGES_MAGIC, IDX_LABELS_MAGIC = 0x00000803, 0x00000801
_IDX_DTYPES = {0x08: "u1", 0x09: "i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}

DIGITS_MEAN, DIGITS_STD = 0.3053, 0.3760  # of sklearn's digits scaled to [0, 1]
DIGITS_TEST_FRACTION = 0.2

CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR10_MD5 = "c58f30108f718f92721af3b95e74349a"
CIFAR10_ARCHIVE = "cifar-10-python.tar.gz"
CIFAR10_TRAIN_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6))
CIFAR10_MEAN, CIFAR10_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
DEFAULT_CIFAR10_ROOT = Path.home() / ".cache" / "fl-maestro" / "cifar10"

# flwr-datasets' DirichletPartitioner redraws until every partition has at least
# min_partition_size examples and gives up (ValueError) after 10 redraws. With 100
# clients and alpha=0.1 a floor of 10 fails for some seeds, so the floor is relaxed
# step by step; a floor of 1 that still fails means alpha is too small for the
# number of clients (an empty client could not report a positive example count).
DIRICHLET_MIN_PARTITION_SIZES = (10, 5, 2, 1)


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


def _normalise(x: np.ndarray, scale: float, mean: object, std: object) -> np.ndarray:
    """Scale raw pixels to [0, 1] and standardise per channel (axis 1), as float32."""
    shape = (1, -1) + (1,) * (x.ndim - 2)
    out = x.astype(np.float32) / np.float32(scale)
    out -= np.asarray(mean, np.float32).reshape(shape)
    out /= np.asarray(std, np.float32).reshape(shape)
    return out


def _freeze(*arrays: np.ndarray) -> DatasetArrays:
    """Mark cached arrays read-only so one client cannot corrupt another's data."""
    for a in arrays:
        a.flags.writeable = False
    return arrays  # type: ignore[return-value]


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
    return _freeze(*arrays)


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
        images = _normalise(images[:, None], 255.0, FASHION_MNIST_MEAN, FASHION_MNIST_STD)
        arrays += [images, labels]
    return arrays


def load_fashion_mnist(root: str | Path = FASHION_MNIST_ROOT) -> DatasetArrays:
    """Fashion-MNIST from Debian's IDX files: (N,1,28,28) float32 images, int64 labels."""
    return _load_fashion_mnist_cached(str(Path(root).resolve()))


@functools.lru_cache(maxsize=1)
def load_digits() -> DatasetArrays:
    """scikit-learn's 8x8 digits, split 80/20 stratified with a fixed seed."""
    from sklearn.datasets import load_digits as sk_load_digits
    from sklearn.model_selection import train_test_split

    bunch = sk_load_digits()
    x = _normalise(bunch.images[:, None], 16.0, DIGITS_MEAN, DIGITS_STD)
    y = bunch.target.astype(np.int64)
    x_train, x_test, y_train, y_test = train_test_split(
        x, y, test_size=DIGITS_TEST_FRACTION, stratify=y, random_state=0
    )
    return _freeze(x_train, y_train, x_test, y_test)


def download_file(url: str, dest: str | Path, expected_md5: str | None = None) -> Path:
    """Download ``url`` to ``dest`` atomically, checking the md5 when given."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".part")
    digest, done = hashlib.md5(usedforsecurity=False), 0
    try:
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=60) as resp:
            total = int(resp.headers.get("Content-Length") or 0)
            logger.info("Downloading %s (%s bytes) to %s", url, total or "unknown", dest)
            step = max(total // 10, 1) if total else 10 << 20  # every 10%, or 10 MiB
            next_log = step
            while chunk := resp.read(1 << 20):
                out.write(chunk)
                digest.update(chunk)
                done += len(chunk)
                if done >= next_log:
                    logger.info("  %s: %d of %s bytes", dest.name, done, total or "unknown")
                    next_log = done + step
        if expected_md5 is not None and digest.hexdigest() != expected_md5.lower():
            raise ValueError(
                f"{url}: md5 {digest.hexdigest()} does not match expected {expected_md5}"
            )
        os.replace(tmp_name, dest)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
    logger.info("Downloaded %s (%d bytes)", dest, done)
    return dest


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
    x_train, x_test = (_normalise(x, 255.0, CIFAR10_MEAN, CIFAR10_STD) for x in (x_train, x_test))
    return _freeze(x_train, y_train, x_test, y_test)


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


def load_dataset(name: str, root: str | Path | None = None) -> DatasetArrays:
    """Load a dataset by name; ``root`` overrides where its files live (not for digits)."""
    if name == "fashion-mnist":
        return load_fashion_mnist(root or FASHION_MNIST_ROOT)
    if name == "digits":
        return load_digits()
    if name == "cifar10":
        return load_cifar10(root or DEFAULT_CIFAR10_ROOT)
    allowed = ", ".join(DATASET_SHAPES)
    raise ValueError(f"dataset={name!r} is not allowed; expected one of {allowed}")


def _is_int(value: object) -> bool:
    """True for Python and numpy integers, not for bools."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_real(value: object) -> bool:
    """True for Python and numpy real numbers, not for bools."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _require(ok: bool, key: str, value: object, allowed: str) -> None:
    """Raise a ValueError naming the key, its value and what is allowed unless ``ok``."""
    if not ok:
        raise ValueError(f"{key}={value!r} is not allowed; expected {allowed}")


def _validate_partition_args(
    num_examples: int, num_partitions: int, partitioner: str, alpha: float,
    classes_per_client: int, num_classes: int,
) -> None:
    """Check the partitioning arguments against the labels they will split."""
    _require(partitioner in PARTITIONERS, "partitioner", partitioner,
             f"one of {', '.join(PARTITIONERS)}")
    _require(_is_int(num_partitions) and 1 <= num_partitions <= num_examples, "num_partitions",
             num_partitions, f"an integer in [1, {num_examples}] (the number of examples)")
    _require(_is_real(alpha) and 0 < alpha < math.inf, "alpha", alpha, "a finite number > 0")
    _require(_is_int(classes_per_client) and 1 <= classes_per_client <= num_classes,
             "classes_per_client", classes_per_client,
             f"an integer in [1, {num_classes}] (the number of classes present)")


def _all_partitions(
    partitioner: Partitioner, ds: datasets.Dataset, num: int
) -> list[np.ndarray]:
    """Attach ``ds`` to the partitioner and return every partition's sorted 'idx' column."""
    partitioner.dataset = ds
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        # [:] materialises the column in one go; np.asarray would iterate row by row.
        parts = [partitioner.load_partition(i).with_format("numpy")["idx"][:]
                 for i in range(num)]
    for w in caught:
        logger.debug("flwr-datasets: %s", w.message)
    return [np.sort(np.asarray(p, dtype=np.int64)) for p in parts]


def _dirichlet_partitions(
    ds: datasets.Dataset, num_partitions: int, alpha: float, seed: int
) -> list[np.ndarray]:
    """Dirichlet label skew, relaxing the minimum partition size when it cannot be met."""
    from flwr_datasets.partitioner import DirichletPartitioner

    for min_size in DIRICHLET_MIN_PARTITION_SIZES:
        partitioner = DirichletPartitioner(
            num_partitions, partition_by="label", alpha=alpha,
            min_partition_size=min_size, self_balancing=False, seed=seed,
        )
        try:
            return _all_partitions(partitioner, ds, num_partitions)
        except ValueError as err:  # arguments are validated, so this is the redraw limit
            logger.warning(
                "Dirichlet partitioning (alpha=%s, %d partitions) could not give every "
                "partition %d examples (%s); relaxing the minimum",
                alpha, num_partitions, min_size, err,
            )
    raise ValueError(
        f"alpha={alpha} is too small to give each of num_partitions={num_partitions} "
        f"partitions at least one of {ds.num_rows} examples; use a larger alpha or fewer "
        "partitions"
    )


def partition_indices(
    labels: np.ndarray, num_partitions: int, partitioner: str = "iid", alpha: float = 0.5,
    classes_per_client: int = 2, seed: int = 0,
) -> list[np.ndarray]:
    """Split training-set indices into ``num_partitions`` sorted int64 index arrays."""
    import datasets
    from flwr_datasets.partitioner import IidPartitioner, PathologicalPartitioner

    labels = np.asarray(labels)
    num_classes = len(np.unique(labels))
    _validate_partition_args(
        len(labels), num_partitions, partitioner, alpha, classes_per_client, num_classes
    )
    # A seeded shuffle first: IidPartitioner takes contiguous shards of the dataset order.
    perm = np.random.default_rng(seed).permutation(len(labels))
    ds = datasets.Dataset.from_dict({"idx": perm, "label": labels[perm]})
    if partitioner == "dirichlet":
        parts = _dirichlet_partitions(ds, num_partitions, float(alpha), seed)
    elif partitioner == "pathological":
        # first-deterministic (the original paper's mode) uses every class when
        # num_partitions >= num_classes; each partition gets exactly classes_per_client.
        parts = _all_partitions(
            PathologicalPartitioner(
                num_partitions, partition_by="label",
                num_classes_per_partition=classes_per_client,
                class_assignment_mode="first-deterministic", seed=seed,
            ),
            ds, num_partitions,
        )
    else:
        parts = _all_partitions(IidPartitioner(num_partitions), ds, num_partitions)
    sizes = [len(p) for p in parts]
    logger.info(
        "Partitioned %d examples into %d %s partitions (sizes %d..%d)",
        len(labels), num_partitions, partitioner, min(sizes), max(sizes),
    )
    return parts


@functools.lru_cache(maxsize=16)
def _cached_partitions(
    dataset_name: str, num_partitions: int, partitioner: str, alpha: float,
    classes_per_client: int, seed: int, root: str | None,
) -> tuple[np.ndarray, ...]:
    """Partition a named dataset's training labels once per process."""
    _, y_train, _, _ = load_dataset(dataset_name, root)
    parts = partition_indices(y_train, num_partitions, partitioner, alpha, classes_per_client, seed)
    for p in parts:
        p.flags.writeable = False
    return tuple(parts)


def client_partition(
    dataset_name: str, partition_id: int, num_partitions: int, partitioner: str = "iid",
    alpha: float = 0.5, classes_per_client: int = 2, seed: int = 0, val_fraction: float = 0.1,
    root: str | Path | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """One client's (train, validation) indices into the named dataset's training set."""
    _require(dataset_name in DATASET_SHAPES, "dataset", dataset_name,
             f"one of {', '.join(DATASET_SHAPES)}")
    _require(_is_int(num_partitions) and num_partitions >= 1, "num_partitions", num_partitions,
             "an integer >= 1")
    _require(_is_int(partition_id) and 0 <= partition_id < num_partitions, "partition_id",
             partition_id, f"an integer in [0, {num_partitions - 1}]")
    _require(_is_real(val_fraction) and 0 <= val_fraction < 1, "val_fraction", val_fraction,
             "a number in [0, 1)")
    parts = _cached_partitions(
        dataset_name, int(num_partitions), partitioner, alpha, classes_per_client, int(seed),
        None if root is None else str(root),
    )
    part = parts[partition_id]
    # One stream per (seed, client): a client's split does not depend on other clients.
    shuffled = np.random.default_rng([int(seed), int(partition_id)]).permutation(part)
    num_val = min(int(len(part) * val_fraction), max(len(part) - 1, 0))
    return np.sort(shuffled[num_val:]), np.sort(shuffled[:num_val])


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
