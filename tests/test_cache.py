"""The decoded-dataset cache: decode once, map after, decode again when the sources change."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from fl_maestro.cache import cached_arrays, entry_key


@pytest.fixture
def source(tmp_path: Path) -> Path:
    path = tmp_path / "src.bin"
    path.write_bytes(b"raw")
    return path


def _decoder(calls: list[int]):
    def decode():
        calls.append(1)
        return [np.arange(6, dtype=np.float32).reshape(2, 3), np.array([4, 5], np.int64)]
    return decode


def test_decodes_once_then_maps_read_only_arrays(tmp_path: Path, source: Path) -> None:
    calls: list[int] = []
    first = cached_arrays("demo", [source], _decoder(calls), root=tmp_path / "cache")
    second = cached_arrays("demo", [source], _decoder(calls), root=tmp_path / "cache")
    assert len(calls) == 1
    for a, b in zip(first, second):
        np.testing.assert_array_equal(a, b)
        assert type(b) is np.ndarray and not b.flags.writeable
    assert second[0].dtype == np.float32 and second[1].tolist() == [4, 5]
    key = entry_key("demo", [source])
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == [key, f"{key}.lock"]


def test_a_changed_source_is_decoded_again(tmp_path: Path, source: Path) -> None:
    calls: list[int] = []
    cached_arrays("demo", [source], _decoder(calls), root=tmp_path)
    key = entry_key("demo", [source])
    stat = source.stat()
    os.utime(source, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    assert entry_key("demo", [source]) != key
    cached_arrays("demo", [source], _decoder(calls), root=tmp_path)
    assert len(calls) == 2


def test_an_unreadable_entry_is_rebuilt(tmp_path: Path, source: Path) -> None:
    calls: list[int] = []
    cached_arrays("demo", [source], _decoder(calls), root=tmp_path)
    (tmp_path / entry_key("demo", [source]) / "0.npy").write_bytes(b"not numpy")
    arrays = cached_arrays("demo", [source], _decoder(calls), root=tmp_path)
    assert len(calls) == 2 and arrays[0].shape == (2, 3)


def test_an_unwritable_cache_still_returns_the_arrays(tmp_path: Path, source: Path) -> None:
    blocked = tmp_path / "not-a-folder"
    blocked.write_text("a file where the cache folder would be")
    calls: list[int] = []
    for _ in range(2):
        arrays = cached_arrays("demo", [source], _decoder(calls), root=blocked)
        assert arrays[1].tolist() == [4, 5]
    assert len(calls) == 2


def test_concurrent_first_loads_decode_once(tmp_path: Path, source: Path) -> None:
    calls: list[int] = []
    slow = _decoder(calls)

    def decode():
        time.sleep(0.2)  # long enough for the other thread to arrive while this one decodes
        return slow()

    results = []
    threads = [threading.Thread(target=lambda: results.append(
        cached_arrays("demo", [source], decode, root=tmp_path))) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(calls) == 1 and len(results) == 2
    np.testing.assert_array_equal(results[0][0], results[1][0])


def test_a_different_decoding_name_is_a_different_entry(tmp_path: Path, source: Path) -> None:
    calls: list[int] = []
    cached_arrays("demo-v1", [source], _decoder(calls), root=tmp_path)
    cached_arrays("demo-v2", [source], _decoder(calls), root=tmp_path)
    assert len(calls) == 2
