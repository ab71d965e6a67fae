"""The nested merge, the reply check and the downlink slicing, on tiny hand-computed arrays."""

from __future__ import annotations

import copy

import numpy as np
import pytest

from strategies import (
    InvalidReply,
    check_reply,
    corner_arrays,
    factor_axis,
    merge_nested,
    prefix_arrays,
)
from strategies.merge import slice_corner

F32 = np.float32


def _arr(values: list, dtype: type = F32) -> np.ndarray:
    return np.array(values, dtype=dtype)


# --------------------------------------------------------------------------- merge


def test_mixed_ranks_hand_computed() -> None:
    g = {
        "fc.U": np.zeros((2, 4), F32),
        "fc.V": np.zeros((4, 3), F32),
        "fc.bias": np.zeros(2, F32),
    }
    r1 = {"fc.U": _arr([[1], [2]]), "fc.V": _arr([[1, 1, 1]]), "fc.bias": _arr([1, 1])}
    r2 = {
        "fc.U": _arr([[3, 4], [5, 6]]),
        "fc.V": _arr([[2, 2, 2], [4, 4, 4]]),
        "fc.bias": _arr([2, 2]),
    }
    r4 = {
        "fc.U": _arr([[7, 8, 9, 10], [11, 12, 13, 14]]),
        "fc.V": _arr([[3, 3, 3], [6, 6, 6], [9, 9, 9], [12, 12, 12]]),
        "fc.bias": _arr([3, 3]),
    }
    out = merge_nested(g, [(r1, 1.0), (r2, 2.0), (r4, 3.0)])
    # Column 0 is covered by all three (weights 1+2+3), column 1 by r2 and r4 (2+3), the rest by r4.
    expected_u = [
        [(1 * 1 + 2 * 3 + 3 * 7) / 6, (2 * 4 + 3 * 8) / 5, 9, 10],  # 28/6, 32/5
        [(1 * 2 + 2 * 5 + 3 * 11) / 6, (2 * 6 + 3 * 12) / 5, 13, 14],  # 45/6, 48/5
    ]
    np.testing.assert_allclose(out["fc.U"], expected_u, rtol=1e-6)
    assert out["fc.U"][0, 0] == pytest.approx(28 / 6, rel=1e-6)
    assert out["fc.U"][1, 0] == pytest.approx(7.5, rel=1e-6)
    assert out["fc.U"][0, 1] == pytest.approx(6.4, rel=1e-6)
    assert out["fc.U"][1, 1] == pytest.approx(9.6, rel=1e-6)
    expected_v_rows = [14 / 6, 26 / 5, 9, 12]  # (1+4+9)/6, (2*4+3*6)/5, then r4 alone
    np.testing.assert_allclose(out["fc.V"], np.repeat([expected_v_rows], 3, axis=0).T, rtol=1e-6)
    np.testing.assert_allclose(out["fc.bias"], [14 / 6, 14 / 6], rtol=1e-6)


def test_uncovered_components_keep_old_values() -> None:
    g = {"fc.U": _arr([[10, 20, 30, 40], [50, 60, 70, 80]])}
    replies = [({"fc.U": _arr([[1], [2]])}, 1.0), ({"fc.U": _arr([[3, 4], [5, 6]])}, 3.0)]
    out = merge_nested(g, replies)
    # Column 0: (1*1 + 3*3)/4 = 2.5 and (1*2 + 3*5)/4 = 4.25; column 1: r2 alone; 2, 3 untouched.
    np.testing.assert_array_equal(out["fc.U"], _arr([[2.5, 4, 30, 40], [4.25, 6, 70, 80]]))


def test_weights_respected() -> None:
    g = {"w": _arr([100.0])}
    a, b = {"w": _arr([0.0])}, {"w": _arr([4.0])}
    assert merge_nested(g, [(a, 1), (b, 3)])["w"][0] == 3.0  # (0 + 12) / 4
    assert merge_nested(g, [(a, 3), (b, 1)])["w"][0] == 1.0  # (0 + 4) / 4
    assert merge_nested(g, [(a, 30.0), (b, 10.0)])["w"][0] == 1.0  # only ratios matter


def test_full_size_replies_equal_fedavg() -> None:
    rng = np.random.default_rng(0)
    shapes = {"conv.U": (6, 5), "conv.V": (5, 3, 3, 3), "bn.weight": (6,), "fc.bias": (10,)}
    g = {n: rng.normal(size=s).astype(F32) for n, s in shapes.items()}
    replies = [({n: rng.normal(size=s).astype(F32) for n, s in shapes.items()}, float(w))
               for w in rng.integers(1, 500, size=7)]
    out = merge_nested(g, replies)
    weights = [w for _, w in replies]
    for name in shapes:
        fedavg = np.average(np.stack([r[name] for r, _ in replies]), axis=0, weights=weights)
        np.testing.assert_allclose(out[name], fedavg, rtol=1e-6, atol=1e-6)


def _random_nested_replies(rng: np.random.Generator, n: int) -> list:
    replies = []
    for _ in range(n):
        r = int(rng.integers(1, 9))
        arrays = {
            "a.U": rng.normal(size=(5, r)),
            "a.V": rng.normal(size=(r, 4, 3, 3)),
            "a.bias": rng.normal(size=5),
        }
        replies.append((arrays, float(rng.integers(1, 100))))
    return replies


def test_order_invariant() -> None:
    rng = np.random.default_rng(1)
    g = {"a.U": np.zeros((5, 8)), "a.V": np.zeros((8, 4, 3, 3)), "a.bias": np.zeros(5)}
    replies = _random_nested_replies(rng, 20)
    out = merge_nested(g, replies)
    for perm in (rng.permutation(20) for _ in range(3)):
        shuffled = merge_nested(g, [replies[i] for i in perm])
        for name in g:
            np.testing.assert_allclose(shuffled[name], out[name], rtol=1e-12, atol=1e-12)


def test_dtype_preserved_and_inputs_not_mutated() -> None:
    rng = np.random.default_rng(2)
    g = {"a.U": np.ones((5, 8), F32), "a.V": np.ones((8, 4, 3, 3), F32), "a.bias": np.ones(5, F32)}
    replies = [({n: x.astype(F32) for n, x in r.items()}, w)
               for r, w in _random_nested_replies(rng, 4)]
    g_before, replies_before = copy.deepcopy(g), copy.deepcopy(replies)
    out = merge_nested(g, replies)
    assert all(out[n].dtype == F32 and out[n].shape == g[n].shape for n in g)
    for name in g:
        np.testing.assert_array_equal(g[name], g_before[name])
        assert not np.shares_memory(out[name], g[name])
    for (arrays, w), (arrays_before, w_before) in zip(replies, replies_before):
        assert w == w_before
        for name in arrays:
            np.testing.assert_array_equal(arrays[name], arrays_before[name])


def test_no_replies_returns_copies() -> None:
    g = {"fc.U": _arr([[1, 2], [3, 4]]), "fc.bias": _arr([5, 6])}
    out = merge_nested(g, [])
    for name in g:
        np.testing.assert_array_equal(out[name], g[name])
        assert out[name].dtype == g[name].dtype
        assert not np.shares_memory(out[name], g[name])


def test_width_corners_merge_like_heterofl() -> None:
    g = {"w": np.full((3, 3), 9.0)}
    small = {"w": np.array([[1.0, 2.0], [3.0, 4.0]])}
    large = {"w": np.arange(9.0).reshape(3, 3)}  # [[0 1 2] [3 4 5] [6 7 8]]
    out = merge_nested(g, [(small, 1.0), (large, 1.0)])
    expected = [[0.5, 1.5, 2.0], [3.0, 4.0, 5.0], [6.0, 7.0, 8.0]]
    np.testing.assert_array_equal(out["w"], expected)


def test_integer_arrays_round_and_keep_dtype() -> None:
    g = {"bn.num_batches_tracked": np.array(0, dtype=np.int64)}
    replies = [({"bn.num_batches_tracked": np.array(3, np.int64)}, 1.0),
               ({"bn.num_batches_tracked": np.array(4, np.int64)}, 2.0)]
    out = merge_nested(g, replies)["bn.num_batches_tracked"]
    assert isinstance(out, np.ndarray) and out.dtype == np.int64 and out.shape == ()
    assert out == 4  # (3 + 8) / 3 = 3.67 rounds to 4


def test_merge_rejects_non_corner_shapes() -> None:
    g = {"fc.U": np.zeros((2, 4), F32)}
    with pytest.raises(ValueError, match="fc.U"):
        merge_nested(g, [({"fc.U": np.zeros((2, 5), F32)}, 1.0)])


# --------------------------------------------------------------------------- check_reply


def _global() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(3)
    shapes = {
        "conv.U": (6, 4),
        "conv.V": (4, 2, 3, 3),
        "conv.bias": (6,),
        "fc.U": (3, 4),
        "fc.V": (4, 5),
        "fc.bias": (3,),
    }
    return {n: rng.normal(size=s).astype(F32) for n, s in shapes.items()}


def _good_reply() -> dict[str, np.ndarray]:
    return prefix_arrays(_global(), {"conv": 3, "fc": 2})


def _set(name: str, value: object):
    def mutate(reply: dict) -> None:
        reply[name] = value(reply[name]) if callable(value) else value
    return mutate


def _with_value(v: float):
    def f(x: np.ndarray) -> np.ndarray:
        x = x.copy()
        x.flat[1] = v
        return x
    return f


def _rank_mismatch(reply: dict) -> None:
    g = _global()
    reply["fc.U"], reply["fc.V"] = g["fc.U"][:, :2].copy(), g["fc.V"][:3].copy()


def _too_large(reply: dict) -> None:
    reply["fc.U"], reply["fc.V"] = np.zeros((3, 5), F32), np.zeros((5, 5), F32)


def _empty_rank(reply: dict) -> None:
    reply["fc.U"], reply["fc.V"] = np.zeros((3, 0), F32), np.zeros((0, 5), F32)


BAD_REPLIES = {
    "nan": (_set("fc.U", _with_value(np.nan)), ["'fc.U'", "NaN"]),
    "inf": (_set("conv.bias", _with_value(-np.inf)), ["'conv.bias'", "Inf"]),
    "larger than global": (_too_large, ["'fc.U'", "leading corner", "axis 1 has size 5"]),
    "zero rank": (_empty_rank, ["'fc.U'", "leading corner", "size 0"]),
    "shared array cut": (_set("fc.bias", lambda x: x[:2]), ["'fc.bias'", "shared", "axis 0"]),
    "U cut on its output axis": (
        _set("fc.U", lambda x: x[:2]), ["'fc.U'", "axis 0", "rank axis 1"]
    ),
    "conv V cut on its kernel": (
        _set("conv.V", lambda x: x[:, :, :2]), ["'conv.V'", "axis 2", "rank axis 0"]
    ),
    "missing name": (lambda r: r.pop("fc.bias"), ["missing", "fc.bias"]),
    "unknown name": (_set("fc.W", np.zeros((3, 5), F32)), ["unknown", "fc.W"]),
    "wrong dtype": (_set("fc.V", lambda x: x.astype(np.float64)), ["'fc.V'", "float64", "float32"]),
    "wrong ndim": (_set("fc.bias", lambda x: x.reshape(1, 3)), ["'fc.bias'", "dimensions"]),
    "not an array": (_set("fc.bias", [0.0, 0.0, 0.0]), ["'fc.bias'", "numpy array"]),
    "U/V rank mismatch": (_rank_mismatch, ["'fc'", "'fc.U' has rank 2", "'fc.V' has rank 3"]),
}


@pytest.mark.parametrize("case", list(BAD_REPLIES))
def test_bad_reply_raises_with_reason(case: str) -> None:
    mutate, fragments = BAD_REPLIES[case]
    reply = _good_reply()
    mutate(reply)
    with pytest.raises(InvalidReply) as info:
        check_reply(_global(), reply, 10)
    for fragment in fragments:
        assert fragment in str(info.value)


@pytest.mark.parametrize("num_examples", [0, -3, -0.5, float("nan"), float("inf"), True, False,
                                          "10", None, np.nan])
def test_bad_num_examples(num_examples: object) -> None:
    with pytest.raises(InvalidReply, match="num_examples"):
        check_reply(_global(), _good_reply(), num_examples)


@pytest.mark.parametrize("num_examples", [1, 10, 2.5, np.int64(7), np.float32(3.0), 10**400])
def test_good_reply_returns_none(num_examples: object) -> None:
    g = _global()
    assert check_reply(g, _good_reply(), num_examples) is None
    assert check_reply(g, prefix_arrays(g, {}), num_examples) is None  # full rank
    assert check_reply(g, prefix_arrays(g, {"conv": 1, "fc": 1}), num_examples) is None


def test_invalid_reply_is_a_value_error() -> None:
    assert issubclass(InvalidReply, ValueError)


def test_cut_shared_accepts_width_corners() -> None:
    g = _global()
    width = corner_arrays(g, {
        "conv.U": (3, 2), "conv.V": (2, 1, 3, 3), "conv.bias": (3,),
        "fc.U": (2, 2), "fc.V": (2, 3), "fc.bias": (2,),
    })
    with pytest.raises(InvalidReply, match="'conv.U'"):
        check_reply(g, width, 5)
    assert check_reply(g, width, 5, cut_shared=True) is None


def test_cut_shared_still_checks_ranks_and_bounds() -> None:
    g = _global()
    reply = _good_reply()
    _rank_mismatch(reply)
    with pytest.raises(InvalidReply, match="rank"):
        check_reply(g, reply, 5, cut_shared=True)
    reply = _good_reply()
    reply["fc.bias"] = np.zeros(4, F32)
    with pytest.raises(InvalidReply, match="'fc.bias'.*leading corner"):
        check_reply(g, reply, 5, cut_shared=True)


# --------------------------------------------------------------------------- downlink slicing


def test_factor_axis() -> None:
    assert factor_axis("layer1.0.conv1.U") == 1
    assert factor_axis("fc.V") == 0
    assert factor_axis("fc.bias") is None
    assert factor_axis("bn.running_var") is None
    assert factor_axis("U") is None


def test_prefix_arrays_slices_ranks_only() -> None:
    g = _global()
    out = prefix_arrays(g, {"fc": 2})
    assert out["fc.U"].shape == (3, 2) and out["fc.V"].shape == (2, 5)
    assert out["conv.U"].shape == (6, 4) and out["conv.V"].shape == (4, 2, 3, 3)  # full rank
    assert out["fc.bias"].shape == (3,)
    np.testing.assert_array_equal(out["fc.U"], g["fc.U"][:, :2])
    np.testing.assert_array_equal(out["fc.V"], g["fc.V"][:2])
    for name in g:
        assert out[name].flags.c_contiguous and out[name].dtype == g[name].dtype
        assert not np.shares_memory(out[name], g[name])


@pytest.mark.parametrize("ranks", [{"fc": 0}, {"fc": 5}, {"fc": 1.5}, {"fc": True}, {"nope": 1}])
def test_prefix_arrays_rejects_bad_ranks(ranks: dict) -> None:
    with pytest.raises(ValueError):
        prefix_arrays(_global(), ranks)


def test_corner_arrays_and_slice_corner() -> None:
    g = {"w": np.arange(12.0).reshape(3, 4), "b": np.arange(3.0)}
    out = corner_arrays(g, {"w": (2, 3)})
    np.testing.assert_array_equal(out["w"], [[0, 1, 2], [4, 5, 6]])
    np.testing.assert_array_equal(out["b"], [0, 1, 2])
    assert out["w"].flags.c_contiguous and not np.shares_memory(out["w"], g["w"])
    assert np.shares_memory(slice_corner(g["w"], (1, 2)), g["w"])  # a view, no copy
    for bad in ({"w": (4, 4)}, {"w": (3,)}, {"w": (0, 2)}, {"x": (1,)}):
        with pytest.raises(ValueError):
            corner_arrays(g, bad)


@pytest.mark.parametrize("weight", [0.0, -1.0, float("nan"), float("inf")])
def test_merge_refuses_a_weight_that_is_not_positive_and_finite(weight) -> None:
    g = {"a": np.zeros(2, np.float32)}
    with pytest.raises(ValueError, match="weight"):
        merge_nested(g, [({"a": np.ones(2, np.float32)}, weight)])


def test_merge_refuses_a_reply_missing_an_array() -> None:
    g = {"a": np.zeros(2, np.float32), "b": np.zeros(1, np.float32)}
    with pytest.raises(ValueError, match="'b'"):
        merge_nested(g, [({"a": np.ones(2, np.float32)}, 1.0)])
