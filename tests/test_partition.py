"""Tests for fl_maestro.data.partition: flwr-datasets partitioners and one client's split."""

from __future__ import annotations

import logging
import math
import re

import numpy as np
import pytest

from fl_maestro import data
from fl_maestro.data import partition


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
