"""The one merge rule of every strategy: weighted mean over the replies that cover each element.

Each reply array covers a part of its global array: by default its *leading corner*
(``[:a0, :a1, ...]``), or, when the server sent it a *window*, the elements at the window's
indices on every axis (``global[np.ix_(i0, i1, ...)]``: FedRolex's rolling window of channels,
which wraps around the end of a layer). The rank-wise strategy cuts only the rank axis of the
factors ``<layer>.U`` (axis 1) and ``<layer>.V`` (axis 0), so the merge is "average the ordered
factors rank by rank"; with every reply at full size it is FedAvg; with width-sliced models
(FjORD, HeteroFL) it is their slice averaging, and with windows FedRolex's. Everything here is
pure numpy on dicts of named arrays.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping, Sequence

import numpy as np

Arrays = dict[str, np.ndarray]
ArrayMap = Mapping[str, np.ndarray]
Replies = Sequence[tuple[ArrayMap, float]]
# Per axis, the (distinct) global indices an array's reply covers, in the reply's own order.
Window = tuple[np.ndarray, ...]

_FACTOR_AXES = {".U": 1, ".V": 0}


class InvalidReply(ValueError):
    """A client reply that must not touch the global model."""


def factor_axis(name: str) -> int | None:
    """Rank axis of a factor array (1 for ``<layer>.U``, 0 for ``<layer>.V``), None if shared."""
    return _FACTOR_AXES.get(name[-2:])


def factor_layer(name: str) -> str | None:
    """Layer name of a factor array (``"fc"`` for ``"fc.U"``), None for a shared array."""
    return name[:-2] if factor_axis(name) is not None else None


def _rank_axis(name: str, ndim: int) -> int | None:
    """Rank axis of ``name`` if it is a factor with that axis, else None (treated as shared)."""
    axis = factor_axis(name)
    return axis if axis is not None and axis < ndim else None


def _corner_index(shape: Sequence[int]) -> tuple[slice, ...]:
    """Index of the leading corner ``[:a0, :a1, ...]`` of the given shape."""
    return tuple(slice(0, int(a)) for a in shape)


def _is_corner(shape: Sequence[int], full_shape: Sequence[int]) -> bool:
    """Whether ``shape`` is a non-empty leading corner of ``full_shape``."""
    return len(shape) == len(full_shape) and all(1 <= a <= b for a, b in zip(shape, full_shape))


def slice_corner(array: np.ndarray, shape: Sequence[int]) -> np.ndarray:
    """View of the leading corner of ``array`` with the given shape."""
    if not _is_corner(tuple(shape), array.shape):
        raise ValueError(f"shape {tuple(shape)} is not a leading corner of shape {array.shape}")
    return array[_corner_index(shape)]


# --------------------------------------------------------------------------- downlink


def prefix_arrays(global_arrays: ArrayMap, ranks: Mapping[str, int]) -> Arrays:
    """Rank prefix of each factor (``U[:, :r]``, ``V[:r]``), shared arrays whole; C-order copies."""
    layers = {
        factor_layer(n) for n, g in global_arrays.items() if _rank_axis(n, g.ndim) is not None
    }
    unknown = sorted(set(ranks) - layers)
    if unknown:
        raise ValueError(f"ranks name layers without factors: {unknown}; layers: {sorted(layers)}")
    out: Arrays = {}
    for name, g in global_arrays.items():
        axis = _rank_axis(name, g.ndim)
        shape = list(g.shape)
        if axis is not None and factor_layer(name) in ranks:
            r = ranks[factor_layer(name)]
            if isinstance(r, (bool, np.bool_)) or not isinstance(r, numbers.Integral):
                raise ValueError(f"rank of layer {factor_layer(name)!r} must be an int, got {r!r}")
            if not 1 <= r <= g.shape[axis]:
                raise ValueError(
                    f"rank of layer {factor_layer(name)!r} must be in 1..{g.shape[axis]}, got {r}"
                )
            shape[axis] = int(r)
        out[name] = np.array(slice_corner(g, shape), copy=True, order="C")
    return out


def corner_arrays(global_arrays: ArrayMap, shapes: Mapping[str, Sequence[int]]) -> Arrays:
    """Leading corner of each array at ``shapes[name]`` (full size if absent); C-order copies."""
    unknown = sorted(set(shapes) - set(global_arrays))
    if unknown:
        raise ValueError(f"shapes name unknown arrays: {unknown}")
    out: Arrays = {}
    for name, g in global_arrays.items():
        shape = tuple(shapes.get(name, g.shape))
        if not _is_corner(shape, g.shape):
            raise ValueError(f"{name!r}: shape {shape} is not a leading corner of {g.shape}")
        out[name] = np.array(slice_corner(g, shape), copy=True, order="C")
    return out


def check_window(name: str, window: Sequence[np.ndarray], full_shape: Sequence[int]) -> Window:
    """``window`` as int64 index arrays, one per axis of ``full_shape``, each non-empty, distinct
    and in range; ValueError naming the array and axis otherwise."""
    if len(window) != len(full_shape):
        raise ValueError(f"{name!r}: window has {len(window)} axes, the array has "
                         f"{len(full_shape)} {tuple(full_shape)}")
    out = []
    for axis, (idx, size) in enumerate(zip(window, full_shape)):
        idx = np.asarray(idx)
        if idx.ndim != 1 or idx.size == 0 or not np.issubdtype(idx.dtype, np.integer):
            raise ValueError(f"{name!r}: window axis {axis} must be a non-empty 1-D integer "
                             f"array, got {idx!r}")
        if idx.min() < 0 or idx.max() >= size or np.unique(idx).size != idx.size:
            raise ValueError(f"{name!r}: window axis {axis} must hold distinct indices in "
                             f"0..{size - 1}, got {idx.tolist()}")
        out.append(idx.astype(np.int64, copy=False))
    return tuple(out)


def window_arrays(global_arrays: ArrayMap, windows: Mapping[str, Sequence[np.ndarray]]) -> Arrays:
    """Each array at its window (``global[np.ix_(*window)]``; whole if absent); C-order copies."""
    unknown = sorted(set(windows) - set(global_arrays))
    if unknown:
        raise ValueError(f"windows name unknown arrays: {unknown}")
    out: Arrays = {}
    for name, g in global_arrays.items():
        if name in windows:
            out[name] = np.ascontiguousarray(g[np.ix_(*check_window(name, windows[name], g.shape))])
        else:
            out[name] = np.array(g, copy=True, order="C")
    return out


# --------------------------------------------------------------------------- validation


def check_reply(
    global_arrays: ArrayMap,
    arrays: ArrayMap,
    num_examples: object,
    *,
    cut_shared: bool = False,
    exact: bool = False,
    max_examples: float | None = None,
) -> None:
    """Return None for a reply fit to merge; raise InvalidReply with the reason otherwise.

    ``exact``: every array must have exactly the shape of ``global_arrays`` (what the server sent
    this client), not just a leading corner of it. ``max_examples``: the most examples the client
    can have trained on (its partition's size).
    """
    _check_examples(num_examples)
    if max_examples is not None and num_examples > max_examples:
        raise InvalidReply(f"num_examples {num_examples!r} exceeds the {max_examples} training "
                           "examples of this client's partition")
    if not isinstance(arrays, Mapping):
        raise InvalidReply(f"reply arrays must be a mapping, got {type(arrays).__name__}")
    _check_names(global_arrays, arrays)
    for name, g in global_arrays.items():
        _check_array(name, g, arrays[name], cut_shared)
        if exact and arrays[name].shape != g.shape:
            raise InvalidReply(f"{name!r}: shape {arrays[name].shape}, but the server sent "
                               f"{g.shape}: a reply must have exactly the shapes it was sent")
    _check_factor_ranks(global_arrays, arrays)


def _check_examples(num_examples: object) -> None:
    """A positive finite int or float, never a bool."""
    if isinstance(num_examples, (bool, np.bool_)) or not isinstance(num_examples, numbers.Real):
        raise InvalidReply(
            f"num_examples must be a positive number, got {num_examples!r} "
            f"({type(num_examples).__name__})"
        )
    # Integers are always finite (and may be too large for float), so only floats need the check.
    if not isinstance(num_examples, numbers.Integral) and not math.isfinite(num_examples):
        raise InvalidReply(f"num_examples must be finite, got {num_examples!r}")
    if num_examples <= 0:
        raise InvalidReply(f"num_examples must be positive, got {num_examples!r}")


def _check_names(global_arrays: ArrayMap, arrays: ArrayMap) -> None:
    """Exactly the global names: none missing, none unknown."""
    missing = sorted(set(global_arrays) - set(arrays))
    unknown = sorted(set(arrays) - set(global_arrays), key=str)
    if missing or unknown:
        parts = [f"missing arrays {missing}"] if missing else []
        parts += [f"unknown arrays {unknown}"] if unknown else []
        raise InvalidReply("reply names do not match the global model: " + "; ".join(parts))


def _check_array(name: str, g: np.ndarray, x: object, cut_shared: bool) -> None:
    """Type, dtype, ndim, leading-corner shape (rank axis only unless cut_shared) and finiteness."""
    if not isinstance(x, np.ndarray):
        raise InvalidReply(f"{name!r}: expected a numpy array, got {type(x).__name__}")
    if x.dtype != g.dtype:
        raise InvalidReply(f"{name!r}: dtype {x.dtype}, expected the global dtype {g.dtype}")
    if x.ndim != g.ndim:
        raise InvalidReply(
            f"{name!r}: {x.ndim} dimensions {x.shape}, expected {g.ndim} like {g.shape}"
        )
    rank_axis = _rank_axis(name, g.ndim)
    for axis, (a, b) in enumerate(zip(x.shape, g.shape)):
        if not 1 <= a <= b:
            raise InvalidReply(
                f"{name!r}: shape {x.shape} is not a leading corner of the global shape {g.shape} "
                f"(axis {axis} has size {a}, allowed 1..{b})"
            )
        if not cut_shared and axis != rank_axis and a != b:
            why = (
                f"only the rank axis {rank_axis} of a factor may be cut"
                if rank_axis is not None
                else f"a shared array must have the full shape {g.shape}"
            )
            raise InvalidReply(f"{name!r}: shape {x.shape} cuts axis {axis} ({a} of {b}); {why}")
    if np.issubdtype(x.dtype, np.inexact) and not np.isfinite(x).all():
        n_nan, n_inf = int(np.isnan(x).sum()), int(np.isinf(x).sum())
        raise InvalidReply(f"{name!r}: non-finite values ({n_nan} NaN, {n_inf} Inf)")


def _check_factor_ranks(global_arrays: ArrayMap, arrays: ArrayMap) -> None:
    """A layer's U and V must come at the same rank."""
    for name, g in global_arrays.items():
        if not name.endswith(".U") or _rank_axis(name, g.ndim) is None:
            continue
        v_name = name[:-2] + ".V"
        if v_name not in global_arrays or _rank_axis(v_name, global_arrays[v_name].ndim) is None:
            continue
        r_u, r_v = arrays[name].shape[1], arrays[v_name].shape[0]
        if r_u != r_v:
            raise InvalidReply(
                f"layer {name[:-2]!r}: {name!r} has rank {r_u} but {v_name!r} has rank {r_v}"
            )


# --------------------------------------------------------------------------- merge


def merge_nested(global_arrays: ArrayMap, replies: Replies,
                 rows: Sequence[Mapping[str, np.ndarray] | None] | None = None,
                 windows: Sequence[Mapping[str, Sequence[np.ndarray]] | None] | None = None
                 ) -> Arrays:
    """Per element, the weighted mean of the replies covering it; uncovered elements stay.

    A reply covers the leading corner of its shape, or, for an array named in ``windows[i]``,
    the window's indices on every axis (its element ``[j0, j1, ...]`` is the global element
    ``[w0[j0], w1[j1], ...]``). ``rows[i]``, when given, narrows what reply ``i`` covers of the
    arrays it names to those rows (positions on axis 0 of the reply): HeteroFL and FedRolex
    merge a client's output layer only on the rows of the classes in its data.
    """
    replies = list(replies)  # walked once per array, so a generator must not run dry
    rows = [None] * len(replies) if rows is None else list(rows)
    windows = [None] * len(replies) if windows is None else list(windows)
    for what, given in (("rows", rows), ("windows", windows)):
        if len(given) != len(replies):
            raise ValueError(f"{what} has {len(given)} entries for {len(replies)} replies")
    for arrays, weight in replies:
        if not (isinstance(weight, numbers.Real) and math.isfinite(weight) and weight > 0):
            raise ValueError(f"reply weight {weight!r} is not allowed: use a finite number > 0")
        missing = set(global_arrays) - set(arrays)
        if missing:
            raise ValueError(f"a reply lacks the arrays {sorted(missing)}")
    return {name: _merge_array(name, g, replies, [r.get(name) if r else None for r in rows],
                               [w.get(name) if w else None for w in windows])
            for name, g in global_arrays.items()}


def _covered(name: str, g: np.ndarray, x: np.ndarray, window: Sequence[np.ndarray] | None,
             only: np.ndarray | None) -> tuple[tuple, np.ndarray]:
    """The global index a reply array covers and the values it puts there."""
    if window is None:
        if not _is_corner(x.shape, g.shape):
            raise ValueError(f"{name!r}: reply shape {x.shape} is no leading corner of {g.shape}")
        axes = [np.arange(a) if i == 0 and only is not None else slice(0, a)
                for i, a in enumerate(x.shape)]
    else:
        axes = list(check_window(name, window, g.shape))
        sizes = tuple(len(i) for i in axes)
        if sizes != x.shape:
            raise ValueError(f"{name!r}: reply shape {x.shape} does not match its window {sizes}")
    if only is not None:  # only these rows (distinct positions on axis 0 of the reply)
        only = np.asarray(only, dtype=np.int64)
        axes[0], x = axes[0][only], x[only]
    if window is None:  # slices, and at most one index array (the rows): basic += semantics
        return tuple(axes), x
    # Index arrays on every axis (np.ix_): distinct indices, so += lands on each element once.
    return np.ix_(*axes), x


def _merge_array(name: str, g: np.ndarray, replies: Replies,
                 rows: Sequence[np.ndarray | None],
                 windows: Sequence[Sequence[np.ndarray] | None]) -> np.ndarray:
    """Merge one array in O(received elements): ``acc[idx] += w*x``, ``wsum[idx] += w``."""
    if not replies:
        return g.copy()
    acc = np.zeros(g.shape, dtype=np.float64)
    wsum = np.zeros(g.shape, dtype=np.float64)
    for (arrays, weight), only, window in zip(replies, rows, windows):
        index, x = _covered(name, g, arrays[name], window, only)
        # Accumulate in float64 so the result does not depend on the order of the replies.
        acc[index] += np.multiply(x, float(weight), dtype=np.float64)
        wsum[index] += float(weight)
    merged = g.astype(np.float64, copy=True)
    np.divide(acc, wsum, out=merged, where=wsum > 0)
    if not np.issubdtype(g.dtype, np.inexact):
        np.rint(merged, out=merged)  # integer arrays (counters) round instead of truncating
    return merged.astype(g.dtype, copy=False)
