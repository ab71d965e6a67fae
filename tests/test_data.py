"""Tests for fl_maestro.data: IDX, Fashion-MNIST (found or fetched), digits, CIFAR-10, loaders."""

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
from fl_maestro.data import fashion_mnist

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


# --- downloads from a local HTTP server


class CountingHandler(http.server.SimpleHTTPRequestHandler):
    """Static file handler that records each requested path and keeps the test output clean."""

    requests: list[str]

    def do_GET(self) -> None:
        self.requests.append(self.path)
        super().do_GET()

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def http_folder(tmp_path: Path):
    """Serve an empty folder over HTTP on 127.0.0.1; yield (base url, folder, requested paths)."""
    serve = tmp_path / "serve"
    serve.mkdir()
    requests: list[str] = []
    handler_class = type("Handler", (CountingHandler,), {"requests": requests})
    handler = functools.partial(handler_class, directory=str(serve))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/", serve, requests
    server.shutdown()
    server.server_close()
    thread.join()


def cifar_batch(rng: np.random.Generator, n: int) -> dict[bytes, object]:
    """A CIFAR-10-format batch: b'data' (n, 3072) uint8 and b'labels' as a list."""
    return {
        b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
        b"labels": rng.integers(0, 10, n).tolist(),
    }


@pytest.fixture
def cifar_server(http_folder):
    """Serve a tiny cifar-10-python.tar.gz on 127.0.0.1; yield (url, md5, batches)."""
    base, serve, _ = http_folder
    rng = np.random.default_rng(0)
    names = [*data.CIFAR10_TRAIN_BATCHES, "test_batch"]
    batches = {name: cifar_batch(rng, 3) for name in names}
    archive = serve / data.CIFAR10_ARCHIVE
    with tarfile.open(archive, "w:gz") as tar:
        for name, batch in batches.items():
            blob = pickle.dumps(batch)
            info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
            info.size = len(blob)
            tar.addfile(info, io.BytesIO(blob))
    return base + data.CIFAR10_ARCHIVE, hashlib.md5(archive.read_bytes()).hexdigest(), batches


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


# --- Fashion-MNIST downloaded when neither Debian's files nor a cached copy exist


@pytest.fixture
def fashion_server(http_folder, tmp_path: Path, monkeypatch):
    """Tiny Fashion-MNIST files served on 127.0.0.1, no Debian files, an empty cache folder.

    Yields (base url, md5 of each served file, requested paths, the cache's Fashion-MNIST folder).
    """
    base, serve, requests = http_folder
    write_fashion_files(serve)
    md5 = {p.name: hashlib.md5(p.read_bytes()).hexdigest() for p in serve.iterdir()}
    monkeypatch.setattr(fashion_mnist, "FASHION_MNIST_ROOT", str(tmp_path / "no-debian"))
    monkeypatch.setattr(fashion_mnist, "_can_apt_install", lambda: False)
    monkeypatch.setenv("FL_MAESTRO_CACHE", str(tmp_path / "cache"))
    return base, md5, requests, tmp_path / "cache" / "fashion-mnist"


def test_fashion_mnist_downloads_into_cache_then_reuses_it(fashion_server, caplog) -> None:
    url, md5, requests, cached = fashion_server
    with caplog.at_level(logging.INFO, logger="fl_maestro.data"):
        x_train, y_train, x_test, y_test = data.load_fashion_mnist(url=url, md5=md5)
    assert sorted(requests) == sorted(f"/{name}" for name in data.FASHION_MNIST_FILES.values())
    assert sorted(p.name for p in cached.glob("*.gz")) == sorted(md5)
    assert "Downloaded" in caplog.text
    assert x_train.shape == (6, 1, 28, 28) and x_test.shape == (4, 1, 28, 28)
    np.testing.assert_array_equal(y_test, [0, 1, 2, 3])
    # A cached copy is used as it is: nothing is fetched again, even with no server at all.
    assert data.fashion_mnist_folder(url="http://127.0.0.1:9/") == cached
    assert data.load_dataset("fashion-mnist")[1] is y_train
    assert len(requests) == 4


def test_fashion_mnist_download_fetches_only_missing_files(fashion_server) -> None:
    url, md5, requests, cached = fashion_server
    kept = data.FASHION_MNIST_FILES["train_labels"]
    write_fashion_files(cached)  # the same tiny files: as if an earlier download stopped midway
    for name in data.FASHION_MNIST_FILES.values():
        if name != kept:
            (cached / name).unlink()
    data.load_fashion_mnist(url=url, md5=md5)
    assert sorted(requests) == sorted(f"/{n}" for n in data.FASHION_MNIST_FILES.values()
                                      if n != kept)


def test_fashion_mnist_download_checksum_failure_keeps_nothing(fashion_server) -> None:
    url, _, requests, cached = fashion_server
    # The served files are not the originals, so the published md5s (the default) refuse them.
    with pytest.raises(ValueError, match=r"md5 [0-9a-f]{32} does not match expected "
                       + data.FASHION_MNIST_MD5[data.FASHION_MNIST_FILES["train_images"]]):
        data.load_fashion_mnist(url=url)
    assert requests == ["/train-images-idx3-ubyte.gz"]  # stopped at the first bad file
    assert not list(cached.glob("*.gz*"))  # neither the file nor a partial download remains


def test_fashion_mnist_download_error_names_url_and_package(fashion_server) -> None:
    url, md5, _, cached = fashion_server
    with pytest.raises(OSError, match=r"could not download .*/missing/train-images.*"
                       r"dataset-fashion-mnist"):
        data.load_fashion_mnist(url=url + "missing/", md5=md5)
    assert not list(cached.glob("*.gz*"))


def test_fashion_mnist_debian_files_come_first(fashion_server, tmp_path: Path,
                                               monkeypatch) -> None:
    url, md5, requests, cached = fashion_server
    debian = tmp_path / "debian"
    write_fashion_files(debian, n_train=8)
    monkeypatch.setattr(fashion_mnist, "FASHION_MNIST_ROOT", str(debian))
    assert data.fashion_mnist_folder(url=url, md5=md5) == debian
    assert data.load_fashion_mnist(url=url, md5=md5)[0].shape[0] == 8
    assert requests == [] and not cached.exists()


def test_fashion_mnist_failed_apt_falls_back_to_download(fashion_server, monkeypatch) -> None:
    url, md5, requests, cached = fashion_server

    def failing_apt(cmd: list[str], check: bool) -> None:
        raise fashion_mnist.subprocess.CalledProcessError(100, cmd)

    monkeypatch.setattr(fashion_mnist, "_can_apt_install", lambda: True)
    monkeypatch.setattr(fashion_mnist.subprocess, "run", failing_apt)
    assert data.fashion_mnist_folder(url=url, md5=md5) == cached
    assert len(requests) == 4


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
