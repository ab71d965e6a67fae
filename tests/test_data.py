"""Tests for fl_maestro.data: IDX parsing, loaders, CIFAR download, partitioning, loaders."""

from __future__ import annotations

import functools
import gzip
import hashlib
import http.server
import io
import logging
import math
import pickle
import re
import tarfile
import threading
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from fl_maestro import data
from fl_maestro.data import fashion_mnist, partition

# --- IDX helpers


def write_idx(path: Path, array: np.ndarray, magic: int | None = None) -> Path:
    """Write ``array`` (uint8) as a gzipped IDX file, optionally with a forced magic."""
    magic = magic if magic is not None else (0x0800 | array.ndim)
    header = magic.to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())
    return path


def write_fashion_files(root: Path, n_train: int = 6, n_test: int = 4) -> None:
    """Tiny Fashion-MNIST-shaped IDX files under the Debian names."""
    rng = np.random.default_rng(0)
    root.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", n_train), ("t10k", n_test)):
        write_idx(root / f"{split}-images-idx3-ubyte.gz", rng.integers(0, 256, (n, 28, 28)))
        write_idx(root / f"{split}-labels-idx1-ubyte.gz", np.arange(n) % 10)


def test_read_idx_roundtrip(tmp_path: Path) -> None:
    images = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    path = write_idx(tmp_path / "x-idx3-ubyte.gz", images)
    out = data.read_idx(path, expected_magic=data.IDX_IMAGES_MAGIC)
    assert out.shape == (2, 3, 4) and out.dtype == np.uint8
    np.testing.assert_array_equal(out, images)


def test_read_idx_rejects_bad_magic(tmp_path: Path) -> None:
    path = write_idx(tmp_path / "bad.gz", np.zeros((2, 2), np.uint8), magic=0x12340802)
    with pytest.raises(ValueError, match="magic number 0x12340802"):
        data.read_idx(path)
    unknown_dtype = write_idx(tmp_path / "dtype.gz", np.zeros((2, 2), np.uint8), magic=0x0702)
    with pytest.raises(ValueError, match="magic number 0x00000702"):
        data.read_idx(unknown_dtype)


def test_read_idx_rejects_wrong_kind_truncation_and_non_gzip(tmp_path: Path) -> None:
    labels = write_idx(tmp_path / "labels.gz", np.arange(5))
    with pytest.raises(ValueError, match="expected 0x00000803"):
        data.read_idx(labels, expected_magic=data.IDX_IMAGES_MAGIC)
    short = tmp_path / "short.gz"
    with gzip.open(short, "wb") as f:  # header promises 5 labels, body has 3
        f.write((0x0801).to_bytes(4, "big") + (5).to_bytes(4, "big") + b"\x00\x01\x02")
    with pytest.raises(ValueError, match="corrupt IDX"):
        data.read_idx(short)
    garbage = tmp_path / "garbage.gz"
    garbage.write_bytes(b"this is not gzip")
    with pytest.raises(ValueError, match="not a readable IDX file"):
        data.read_idx(garbage)


# --- Fashion-MNIST


def test_load_fashion_mnist_tiny_files(tmp_path: Path) -> None:
    write_fashion_files(tmp_path)
    x_train, y_train, x_test, y_test = data.load_fashion_mnist(tmp_path)
    assert x_train.shape == (6, 1, 28, 28) and x_test.shape == (4, 1, 28, 28)
    assert x_train.dtype == np.float32 and y_train.dtype == np.int64
    np.testing.assert_array_equal(y_test, [0, 1, 2, 3])
    raw = data.read_idx(tmp_path / "train-images-idx3-ubyte.gz")[0, 0, 0]
    assert x_train[0, 0, 0, 0] == pytest.approx((raw / 255 - 0.2860) / 0.3530, abs=1e-6)
    assert not x_train.flags.writeable  # shared between clients: must not be mutable
    assert data.load_fashion_mnist(tmp_path)[0] is x_train  # decoded once


def test_fashion_mnist_missing_names_package_and_path(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(fashion_mnist, "_can_apt_install", lambda: False)
    with pytest.raises(FileNotFoundError, match="dataset-fashion-mnist") as info:
        data.load_fashion_mnist(tmp_path / "nowhere")
    assert str(tmp_path / "nowhere") in str(info.value)


def test_fashion_mnist_missing_installs_with_apt_as_root(tmp_path: Path, monkeypatch) -> None:
    root = tmp_path / "debian"
    calls = []

    def fake_run(cmd: list[str], check: bool) -> None:
        calls.append(cmd)
        write_fashion_files(root)  # what the package would put there

    monkeypatch.setattr(fashion_mnist, "FASHION_MNIST_ROOT", str(root.resolve()))
    monkeypatch.setattr(fashion_mnist, "_can_apt_install", lambda: True)
    monkeypatch.setattr(fashion_mnist.subprocess, "run", fake_run)
    x_train, *_ = data.load_fashion_mnist(root)
    assert calls == [["apt-get", "install", "-y", "dataset-fashion-mnist"]]
    assert x_train.shape == (6, 1, 28, 28)


@pytest.mark.skipif(
    not all(Path(data.FASHION_MNIST_ROOT, f).is_file() for f in data.FASHION_MNIST_FILES.values()),
    reason="Debian package dataset-fashion-mnist is not installed",
)
def test_real_fashion_mnist() -> None:
    x_train, y_train, x_test, y_test = data.load_dataset("fashion-mnist")
    assert x_train.shape == (60000, 1, 28, 28) and x_test.shape == (10000, 1, 28, 28)
    assert y_train.min() == 0 and y_train.max() == 9
    np.testing.assert_array_equal(np.bincount(y_test), [1000] * 10)
    assert abs(float(x_train.mean())) < 0.01 and abs(float(x_train.std()) - 1) < 0.01


# --- digits and the registry


def test_digits_shapes_and_deterministic_split() -> None:
    x_train, y_train, x_test, y_test = data.load_dataset("digits")
    assert x_train.shape[1:] == data.DATASET_SHAPES["digits"] == (1, 8, 8)
    assert len(x_train) + len(x_test) == 1797 and len(x_test) == 360
    assert x_train.dtype == np.float32 and y_test.dtype == np.int64
    assert set(np.unique(y_test)) == set(range(data.NUM_CLASSES["digits"]))
    assert abs(float(x_train.mean())) < 0.05
    data.load_digits.cache_clear()
    np.testing.assert_array_equal(data.load_digits()[3], y_test)


def test_load_dataset_rejects_unknown_name() -> None:
    with pytest.raises(ValueError, match=r"dataset='mnist'.*fashion-mnist, digits, cifar10"):
        data.load_dataset("mnist")


# --- CIFAR-10 over a local HTTP server


def cifar_batch(rng: np.random.Generator, n: int) -> dict[bytes, object]:
    """A CIFAR-10-format batch: b'data' (n, 3072) uint8 and b'labels' as a list."""
    return {
        b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
        b"labels": rng.integers(0, 10, n).tolist(),
    }


@pytest.fixture
def cifar_server(tmp_path: Path):
    """Serve a tiny cifar-10-python.tar.gz on 127.0.0.1; yield (url, md5, batches)."""
    rng = np.random.default_rng(0)
    names = [*data.CIFAR10_TRAIN_BATCHES, "test_batch"]
    batches = {name: cifar_batch(rng, 3) for name in names}
    serve = tmp_path / "serve"
    serve.mkdir()
    archive = serve / data.CIFAR10_ARCHIVE
    with tarfile.open(archive, "w:gz") as tar:
        for name, batch in batches.items():
            blob = pickle.dumps(batch)
            info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
            info.size = len(blob)
            tar.addfile(info, io.BytesIO(blob))
    handler = functools.partial(QuietHandler, directory=str(serve))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{server.server_address[1]}/{data.CIFAR10_ARCHIVE}"
    yield url, hashlib.md5(archive.read_bytes()).hexdigest(), batches
    server.shutdown()
    server.server_close()
    thread.join()


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    """Static file handler that keeps the test output clean."""

    def log_message(self, *args: object) -> None:
        pass


def test_cifar10_download_and_load(cifar_server, tmp_path: Path, caplog) -> None:
    url, md5, batches = cifar_server
    root = tmp_path / "data"
    with caplog.at_level(logging.INFO, logger="fl_maestro.data"):
        x_train, y_train, x_test, y_test = data.load_cifar10(root, download=True, url=url, md5=md5)
    assert (root / data.CIFAR10_ARCHIVE).is_file()
    size = (root / data.CIFAR10_ARCHIVE).stat().st_size
    assert f"{size} of {size} bytes" in caplog.text  # progress reached the end
    assert x_train.shape == (15, 3, 32, 32) and x_test.shape == (3, 3, 32, 32)
    assert x_train.dtype == np.float32 and y_train.dtype == np.int64
    expected = np.concatenate([batches[n][b"labels"] for n in data.CIFAR10_TRAIN_BATCHES])
    np.testing.assert_array_equal(y_train, expected)
    raw = batches["test_batch"][b"data"][1].reshape(3, 32, 32)
    mean = np.array(data.CIFAR10_MEAN).reshape(3, 1, 1)
    std = np.array(data.CIFAR10_STD).reshape(3, 1, 1)
    np.testing.assert_allclose(x_test[1], (raw / 255 - mean) / std, atol=1e-5)
    assert data.load_dataset("cifar10", root)[0] is x_train  # registry reuses the cache


def test_download_wrong_md5_leaves_no_file(cifar_server, tmp_path: Path) -> None:
    url, _, _ = cifar_server
    dest = tmp_path / "dl" / "archive.tar.gz"
    with pytest.raises(ValueError, match="md5"):
        data.download_file(url, dest, expected_md5="0" * 32)
    assert list(dest.parent.iterdir()) == []  # neither the file nor a temp file remains


def test_download_http_error_leaves_no_file(cifar_server, tmp_path: Path) -> None:
    url, _, _ = cifar_server
    dest = tmp_path / "dl" / "missing.tar.gz"
    with pytest.raises(OSError):  # urllib's HTTPError is an OSError
        data.download_file(url.replace(data.CIFAR10_ARCHIVE, "missing"), dest)
    assert list(dest.parent.iterdir()) == []


def test_cifar10_missing_without_download(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="download=True"):
        data.load_cifar10(tmp_path)


# --- partitioning


def sorted_labels(num_classes: int = 10, per_class: int = 300) -> np.ndarray:
    """Labels grouped by class: contiguous shards of them would be single-class."""
    return np.repeat(np.arange(num_classes), per_class)


def mean_max_class_share(parts: list[np.ndarray], labels: np.ndarray) -> float:
    """Average over partitions of the share of the partition's most common class."""
    return float(np.mean([np.bincount(labels[p]).max() / len(p) for p in parts]))


def assert_exact_cover(parts: list[np.ndarray], n: int) -> None:
    """Every index in [0, n) appears in exactly one partition."""
    np.testing.assert_array_equal(np.sort(np.concatenate(parts)), np.arange(n))


def test_iid_covers_all_once_balanced_and_mixed() -> None:
    labels = sorted_labels()
    parts = data.partition_indices(labels, 7, "iid", seed=3)
    assert_exact_cover(parts, len(labels))
    sizes = [len(p) for p in parts]
    assert max(sizes) - min(sizes) <= 1
    assert all(len(np.unique(labels[p])) == 10 for p in parts)  # shuffled before sharding
    assert mean_max_class_share(parts, labels) < 0.2


def test_dirichlet_skew_follows_alpha_and_is_seeded() -> None:
    labels = sorted_labels()
    skewed = data.partition_indices(labels, 20, "dirichlet", alpha=0.1, seed=0)
    flat = data.partition_indices(labels, 20, "dirichlet", alpha=100.0, seed=0)
    assert_exact_cover(skewed, len(labels))
    assert mean_max_class_share(skewed, labels) > 0.5
    assert mean_max_class_share(flat, labels) < 0.2
    again = data.partition_indices(labels, 20, "dirichlet", alpha=0.1, seed=0)
    assert all(np.array_equal(a, b) for a, b in zip(skewed, again))
    other = data.partition_indices(labels, 20, "dirichlet", alpha=0.1, seed=1)
    assert not all(np.array_equal(a, b) for a, b in zip(skewed, other))


def test_dirichlet_relaxes_min_size_then_gives_up(monkeypatch, caplog) -> None:
    labels = sorted_labels()
    monkeypatch.setattr(partition, "DIRICHLET_MIN_PARTITION_SIZES", (10**6, 1))
    with caplog.at_level(logging.WARNING, logger="fl_maestro.data"):
        parts = data.partition_indices(labels, 5, "dirichlet", alpha=1.0, seed=0)
    assert "relaxing the minimum" in caplog.text
    assert min(len(p) for p in parts) >= 1
    with pytest.raises(ValueError, match=r"alpha=0\.001 is too small"):
        data.partition_indices(np.arange(200) % 10, 100, "dirichlet", alpha=0.001, seed=0)


def test_pathological_limits_classes_per_client() -> None:
    labels = sorted_labels()
    parts = data.partition_indices(labels, 20, "pathological", classes_per_client=2, seed=0)
    assert_exact_cover(parts, len(labels))  # 20 clients >= 10 classes: every class is used
    assert all(len(np.unique(labels[p])) <= 2 for p in parts)
    one = data.partition_indices(labels, 10, "pathological", classes_per_client=1, seed=0)
    assert all(len(np.unique(labels[p])) == 1 for p in one)
    assert_exact_cover(one, len(labels))  # first-deterministic: client i gets class i


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"partitioner": "zipf"}, "partitioner='zipf'"),
        ({"alpha": 0.0}, "alpha=0.0"),
        ({"alpha": -1}, "alpha=-1"),
        ({"alpha": math.nan}, "alpha=nan"),
        ({"num_partitions": 0}, "num_partitions=0"),
        ({"num_partitions": 3001}, "num_partitions=3001"),
        ({"classes_per_client": 11}, "classes_per_client=11"),
        ({"classes_per_client": 0}, "classes_per_client=0"),
    ],
)
def test_partition_indices_rejects_bad_inputs(kwargs: dict, needle: str) -> None:
    args = {"num_partitions": 4, "partitioner": "dirichlet", **kwargs}
    with pytest.raises(ValueError, match=re.escape(needle) + ".*expected"):
        data.partition_indices(sorted_labels(), **args)


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"partition_id": 5}, "partition_id=5"),
        ({"partition_id": -1}, "partition_id=-1"),
        ({"num_partitions": 0}, "num_partitions=0"),
        ({"val_fraction": 1.0}, "val_fraction=1.0"),
        ({"val_fraction": -0.1}, "val_fraction=-0.1"),
        ({"dataset_name": "mnist"}, "dataset='mnist'"),
        ({"partitioner": "zipf"}, "partitioner='zipf'"),
    ],
)
def test_client_partition_rejects_bad_inputs(kwargs: dict, needle: str) -> None:
    args = {"dataset_name": "digits", "partition_id": 0, "num_partitions": 5, **kwargs}
    with pytest.raises(ValueError, match=re.escape(needle) + ".*expected"):
        data.client_partition(**args)


def test_client_partition_splits_and_caches() -> None:
    _, y_train, _, _ = data.load_digits()
    parts = data.partition_indices(y_train, 5, "iid", seed=2)
    seen = []
    for pid in range(5):
        train, val = data.client_partition("digits", pid, 5, "iid", seed=2, val_fraction=0.2)
        assert len(np.intersect1d(train, val)) == 0
        np.testing.assert_array_equal(np.sort(np.concatenate([train, val])), parts[pid])
        assert len(val) == int(0.2 * len(parts[pid]))
        seen += [train, val]
    assert_exact_cover(seen, len(y_train))
    hits = partition._cached_partitions.cache_info().hits
    again_train, _ = data.client_partition("digits", 3, 5, "iid", seed=2, val_fraction=0.2)
    assert partition._cached_partitions.cache_info().hits == hits + 1
    np.testing.assert_array_equal(again_train, seen[6])


# --- loaders


def test_make_loader_selects_and_shuffles_reproducibly() -> None:
    x_train, y_train, _, _ = data.load_digits()  # read-only arrays, as every client sees them
    idx = np.array([5, 1, 9, 30, 2, 7, 11])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # e.g. torch's non-writable-array warning
        plain = data.make_loader(x_train, y_train, idx, batch_size=3, shuffle=False, seed=0)
    xb, yb = next(iter(plain))
    assert xb.shape == (3, 1, 8, 8) and xb.dtype == torch.float32 and yb.dtype == torch.int64
    np.testing.assert_array_equal(yb.numpy(), y_train[idx[:3]])

    def order(seed: int) -> list[int]:
        loader = data.make_loader(np.arange(50, dtype=np.float32)[:, None], np.arange(50),
                                  None, batch_size=50, shuffle=True, seed=seed)
        return next(iter(loader))[1].tolist()

    assert order(0) == order(0) != order(1)
    assert sorted(order(0)) == list(range(50))
