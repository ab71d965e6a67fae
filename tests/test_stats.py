"""Statistics over seeds on hand-computed data; the convergence rule on synthetic curves."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from simulations.stats import (convergence, final_values, interval_frame, paired_differences,
                               t_interval)

# t quantiles from a printed table (two-sided 95%): 4 df 2.776, 2 df 4.303.
T975_4, T975_2 = 2.7764451, 4.3026527


def test_t_interval_matches_the_hand_computation() -> None:
    iv = t_interval([1, 2, 3, 4, 5])
    # mean 3, s = sqrt(2.5), s / sqrt(5) = sqrt(0.5)
    half = T975_4 * math.sqrt(0.5)
    assert (iv.mean, iv.n) == (3.0, 5)
    assert (iv.low, iv.high) == pytest.approx((3 - half, 3 + half), abs=1e-6)
    assert iv.half_width == pytest.approx(1.963243, abs=1e-6)
    assert iv.separated  # 3 +- 1.96 excludes 0
    assert t_interval([1, 2, 3, 4, 5], 0.5).half_width < half  # narrower at lower confidence


def test_t_interval_of_one_value_has_no_bounds_and_nan_is_skipped() -> None:
    one = t_interval([0.7, np.nan])
    assert one.mean == 0.7 and one.n == 1 and math.isnan(one.low) and math.isnan(one.high)
    assert not one.separated  # an interval that cannot be computed separates nothing
    with pytest.raises(ValueError, match="at least one value"):
        t_interval([np.nan])
    with pytest.raises(ValueError, match="confidence"):
        t_interval([1, 2], 1.0)


def test_interval_frame_groups() -> None:
    frame = pd.DataFrame({"method": ["a"] * 3 + ["b"] * 3, "seed": [0, 1, 2] * 2,
                          "acc": [0.70, 0.75, 0.80, 0.9, 0.9, 0.9]})
    table = interval_frame(frame, ["method"], "acc").set_index("method")
    half = T975_2 * 0.05 / math.sqrt(3)  # s of (0.70, 0.75, 0.80) is 0.05
    assert table.loc["a", "mean"] == pytest.approx(0.75)
    assert table.loc["a", "ci-half"] == pytest.approx(half)
    assert table.loc["a", "ci-low"] == pytest.approx(0.75 - half)
    assert table.loc["a", "std"] == pytest.approx(0.05)
    assert table.loc["b", "ci-half"] == pytest.approx(0.0) and table.loc["b", "n"] == 3
    without = pd.concat([frame, pd.DataFrame({"method": ["c"] * 2, "acc": [math.nan] * 2})])
    assert list(interval_frame(without, ["method"], "acc")["method"]) == ["a", "b"]  # c: no value


def _pairs() -> pd.DataFrame:
    # Seeds move every method together (a partition effect of +-0.05); "close" is 0.02 above
    # the baseline on seeds 0..2 with little scatter, "noisy" 0.02 above with much scatter.
    base = [0.70, 0.75, 0.80]
    rows = []
    for method, deltas in {"base": [0, 0, 0], "close": [0.02, 0.021, 0.019],
                           "noisy": [0.02, 0.03, 0.01]}.items():
        rows += [{"method": method, "tier": 1.0, "seed": s, "acc": b + d}
                 for s, (b, d) in enumerate(zip(base, deltas))]
    rows.append({"method": "close", "tier": 1.0, "seed": 7, "acc": 0.1})  # no baseline on seed 7
    return pd.DataFrame(rows)


def test_paired_differences_match_the_hand_computation() -> None:
    table = paired_differences(_pairs(), "method", "base", ["tier"], "acc").set_index("method")
    close, noisy = table.loc["close"], table.loc["noisy"]
    # close: differences 0.02, 0.021, 0.019: mean 0.02, s 0.001; seed 7 has no pair
    assert close["n"] == 3 and close["mean"] == pytest.approx(0.02)
    half = T975_2 * 0.001 / math.sqrt(3)
    assert (close["ci-low"], close["ci-high"]) == pytest.approx((0.02 - half, 0.02 + half))
    assert close["separated"]
    # noisy: differences 0.02, 0.03, 0.01: s 0.01, half 0.0248 > 0.02
    assert noisy["ci-low"] == pytest.approx(0.02 - T975_2 * 0.01 / math.sqrt(3))
    assert noisy["ci-low"] < 0 < noisy["ci-high"] and not noisy["separated"]


def test_pairing_separates_what_unpaired_intervals_do_not() -> None:
    frame = _pairs()
    frame = frame[frame["seed"] < 3]
    means = interval_frame(frame, ["method"], "acc").set_index("method")
    # unpaired: each method's interval is about +-0.12 wide, so they overlap
    assert means.loc["close", "ci-low"] < means.loc["base", "ci-high"]
    assert paired_differences(frame, "method", "base", ["tier"], "acc")["separated"].iloc[0]


def test_paired_differences_refuse_an_unknown_baseline_or_duplicate_rows() -> None:
    with pytest.raises(ValueError, match="baseline 'x' is not a value of 'method'"):
        paired_differences(_pairs(), "method", "x", ["tier"], "acc")
    doubled = pd.concat([_pairs(), _pairs()[_pairs()["method"] == "base"]])
    with pytest.raises(ValueError, match="several rows"):
        paired_differences(doubled, "method", "base", ["tier"], "acc")


def test_final_values_last_round_and_last_k_mean() -> None:
    curve = pd.DataFrame({"run": "r", "level": 1.0, "round": [0, 5, 10, 15, 20],
                          "accuracy": [0.1, 0.5, 0.6, 0.8, 0.7]})
    other = pd.DataFrame({"run": "r", "level": 0.5, "round": [0, 20],  # evaluated twice only
                          "accuracy": [0.2, 0.4]})
    table = final_values(pd.concat([curve, other]), ["run", "level"], k=3,
                         stretch=1.0).set_index("level")
    assert table.loc[1.0, "last"] == pytest.approx(0.7)
    assert table.loc[1.0, "last-k"] == pytest.approx((0.6 + 0.8 + 0.7) / 3)
    assert table.loc[1.0, "first-round-of-k"] == 10 and table.loc[1.0, "k-used"] == 3
    # round 0 is the untrained model: never in the mean (here it would pull 0.4 down to 0.3)
    assert table.loc[0.5, "last-k"] == pytest.approx(0.4) and table.loc[0.5, "k-used"] == 1
    only_initial = pd.DataFrame({"run": "r", "round": [0], "accuracy": [0.1]})
    assert final_values(only_initial, ["run"])["last-k"].iloc[0] == pytest.approx(0.1)
    assert final_values(curve, ["run"], k=1)["last-k"].iloc[0] == pytest.approx(0.7)
    with pytest.raises(ValueError, match="k=0"):
        final_values(curve, ["run"], k=0)


def test_headline_final_accuracy_is_taken_in_the_final_stretch_only() -> None:
    """A curve still rising: 40 rounds evaluated every 5. The old mean over the last 5 evaluated
    rounds (20..40) would be 0.70; the headline takes only the final fifth (rounds > 32: 35, 40)."""
    rising = pd.DataFrame({"run": "r", "round": [0, 5, 10, 15, 20, 25, 30, 35, 40],
                           "accuracy": [.1, .3, .4, .5, .6, .65, .7, .75, .8]})
    row = final_values(rising, ["run"]).iloc[0]
    assert row["last-k"] == pytest.approx((0.75 + 0.8) / 2)
    assert (row["first-round-of-k"], row["k-used"], row["last"]) == (35, 2, 0.8)
    every = pd.DataFrame({"run": "r", "round": range(0, 41), "accuracy": np.linspace(0, 0.8, 41)})
    row = final_values(every, ["run"]).iloc[0]  # k = 5 of rounds 33..40: rounds 36..40
    assert (row["first-round-of-k"], row["k-used"]) == (36, 5)
    assert row["last-k"] == pytest.approx(0.02 * 38)
    with pytest.raises(ValueError, match="stretch=0"):
        final_values(rising, ["run"], stretch=0)


def _saturating(rounds: np.ndarray, scale: float = 10.0) -> np.ndarray:
    return 0.9 * (1 - np.exp(-rounds / scale))


def test_convergence_of_a_flat_tail_a_rising_curve_and_a_short_run() -> None:
    rounds = np.arange(1, 101)
    flat = convergence(rounds, _saturating(rounds))
    # tail: rounds 81..100; the curve's slope there is about 0.09 * exp(-8) ~ 3e-5 per round
    assert flat.converged and flat.tail_start == 81 and flat.points == 20
    assert abs(flat.slope) < 1e-4
    rising = convergence(rounds, 0.3 + 0.005 * rounds)
    assert not rising.converged and rising.slope == pytest.approx(0.005, rel=1e-6)
    early = convergence(rounds[:20], _saturating(rounds[:20]))  # slope ~ 0.015 at round 18
    assert not early.converged and early.slope > 0.01
    falling = convergence(rounds, 0.9 - 0.002 * rounds)  # collapsing is not converged either
    assert not falling.converged and falling.slope < 0


def test_convergence_smooths_round_to_round_swings_and_needs_enough_points() -> None:
    rounds = np.arange(5, 201, 5)  # evaluated every 5 rounds
    zigzag = 0.8 + 0.02 * (-1.0) ** np.arange(len(rounds))  # flat, swinging +-2 points
    verdict = convergence(rounds, zigzag)
    # tail: rounds 165..200 (8 points). Unsmoothed, the swings alone fit a slope of
    # -4 * 0.02 / 42 per 5 rounds (x = -3.5..3.5): -3.8e-4 per round, over the threshold.
    raw = convergence(rounds, zigzag, window=1)
    assert raw.slope == pytest.approx(-4 * 0.02 / 42 / 5) and not raw.converged
    # a trailing mean of 5 alternating values swings +-0.004: a fifth of the slope
    assert verdict.points == 8 and verdict.converged
    assert verdict.slope == pytest.approx(raw.slope / 5)
    sparse = convergence([0, 10, 20], [0.1, 0.8, 0.8])  # one point in the tail (> 16)
    assert not sparse.converged and math.isnan(sparse.slope) and sparse.points == 1
    with pytest.raises(ValueError, match="tail"):
        convergence(rounds, zigzag, tail=0)
