"""Conversions between Flower records and dicts of named numpy arrays."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
from flwr.app import Array, ArrayRecord

# The MetricRecord of a training reply: the ClientApp writes it, the strategies read it.
METRICS = "metrics"

Arrays = dict[str, np.ndarray]


def to_numpy(record: ArrayRecord) -> Arrays:
    """The arrays of a Flower ArrayRecord as a dict of numpy arrays."""
    return {name: array.numpy() for name, array in record.items()}


def to_record(arrays: Mapping[str, np.ndarray]) -> ArrayRecord:
    """A dict of numpy arrays as a Flower ArrayRecord (contiguous copies where needed).

    ``np.require``, not ``np.ascontiguousarray``: the latter turns a 0-d array into shape (1,),
    and a client echoing such an array back would fail the shape check.
    """
    return ArrayRecord({name: Array(np.require(a, requirements="C")) for name, a in arrays.items()})


def nbytes(arrays: Mapping[str, np.ndarray]) -> int:
    """Payload size of a dict of arrays in bytes."""
    return int(sum(a.nbytes for a in arrays.values()))


def slice_nbytes(arrays: Mapping[str, np.ndarray], shapes: Mapping[str, tuple[int, ...]]) -> int:
    """Payload size in bytes of the leading corners ``shapes`` of ``arrays`` (whole if absent)."""
    return int(sum(int(np.prod(shapes.get(name, a.shape))) * a.itemsize
                   for name, a in arrays.items()))
