"""Statistics over seeds: t-intervals, paired differences, final accuracy and convergence.

Every number the report gives from several seeds is a mean with a 95% t-interval and its n. Methods
are compared by *paired* differences: two runs with the same seed share their partitions, budgets
and client sampling, so the seed-to-seed spread (mostly the Dirichlet partitions) cancels in their
difference. A difference whose interval contains 0 is "not separated".

"Final accuracy" is taken at the horizon, two ways: at the last round, and (the headline) as the
mean over the last ``k`` evaluated rounds *of the run's final stretch* (the rounds after
``last - STRETCH * last``, the last fifth, the same tail convergence is judged on), which averages
out the round-to-round swings of a federated model without mixing in how fast a curve rose: a
run of 40 rounds evaluated every 5 averages rounds 35 and 40, one evaluated every round its
rounds 36-40.

A run has converged when the slope of its smoothed accuracy over its last fifth of rounds is
under a threshold in size (``convergence``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy import stats as scipy_stats

CONFIDENCE = 0.95
LAST_K = 5  # evaluated rounds averaged for the "last-k" final accuracy
TAIL = 0.2  # convergence looks at the last fifth of the rounds
STRETCH = TAIL  # ... and the final value is taken only from that same final fifth
SLOPE_THRESHOLD = 2.5e-4  # accuracy per round: under 0.5 points over 20 rounds
SMOOTH_WINDOW = 5  # evaluated rounds in the trailing moving average before the slope fit
MIN_TAIL_POINTS = 3  # fewer evaluated rounds in the tail: convergence cannot be judged


@dataclass(frozen=True)
class Interval:
    """A mean with its two-sided t-interval over ``n`` values (bounds NaN when n < 2)."""

    mean: float
    low: float
    high: float
    n: int

    @property
    def half_width(self) -> float:
        """Half the interval's width (NaN when n < 2)."""
        return (self.high - self.low) / 2

    @property
    def separated(self) -> bool:
        """Whether the interval excludes 0 (False when it cannot be computed)."""
        return bool(self.low > 0 or self.high < 0)


def t_interval(values: Sequence[float], confidence: float = CONFIDENCE) -> Interval:
    """Mean and two-sided ``confidence`` t-interval (n - 1 degrees of freedom) of ``values``."""
    if not 0 < confidence < 1:
        raise ValueError(f"confidence {confidence!r} is out of range: allowed (0, 1)")
    x = np.asarray(values, dtype=float)
    x = x[~np.isnan(x)]
    if x.size == 0:
        raise ValueError("t_interval needs at least one value that is not NaN")
    mean = float(x.mean())
    if x.size < 2:
        return Interval(mean, math.nan, math.nan, 1)
    half = scipy_stats.t.ppf((1 + confidence) / 2, x.size - 1) * x.std(ddof=1) / math.sqrt(x.size)
    return Interval(mean, mean - half, mean + half, int(x.size))


def interval_frame(frame: pd.DataFrame, by: list[str], value: str,
                   confidence: float = CONFIDENCE) -> pd.DataFrame:
    """Per group of ``by``: mean, ci-low, ci-high, ci-half, std and n of ``value``. Groups with
    no value at all (e.g. factor movement of a width-sliced model, which has no factors) are
    left out."""
    rows = []
    for key, group in frame.groupby(by, sort=False):
        if group[value].isna().all():
            continue
        iv = t_interval(group[value], confidence)
        key = key if isinstance(key, tuple) else (key,)
        rows.append({**dict(zip(by, key)), "mean": iv.mean, "ci-low": iv.low,
                     "ci-high": iv.high, "ci-half": iv.half_width,
                     "std": float(group[value].std(ddof=1)) if iv.n > 1 else math.nan,
                     "n": iv.n})
    return pd.DataFrame(rows, columns=[*by, "mean", "ci-low", "ci-high", "ci-half", "std", "n"])


def paired_differences(frame: pd.DataFrame, compare: str, baseline: object, by: list[str],
                       value: str, pair: str = "seed",
                       confidence: float = CONFIDENCE) -> pd.DataFrame:
    """``value`` of every level of ``compare`` minus the ``baseline`` level, paired on ``pair``.

    Within each group of ``by`` (e.g. the budget tier) a level is matched with the baseline on
    the same ``pair`` value (the seed); unmatched rows are left out, and n counts the pairs.
    Columns: by..., compare, mean, ci-low, ci-high, n, separated.
    """
    if baseline not in set(frame[compare]):
        raise ValueError(f"baseline {baseline!r} is not a value of {compare!r}: "
                         f"allowed {list(dict.fromkeys(frame[compare]))}")
    keys = [*by, pair]
    base = frame[frame[compare] == baseline].set_index(keys)[value]
    if base.index.duplicated().any():
        raise ValueError(f"baseline {baseline!r} has several rows per {keys}: cannot pair them")
    rows = []
    for level, mine in frame[frame[compare] != baseline].groupby(compare, sort=False):
        diff = (mine.set_index(keys)[value] - base).dropna().rename("diff").reset_index()
        for key, group in diff.groupby(by, sort=False) if by else [((), diff)]:
            iv = t_interval(group["diff"], confidence)
            key = key if isinstance(key, tuple) else (key,)
            rows.append({**dict(zip(by, key)), compare: level, "mean": iv.mean, "ci-low": iv.low,
                         "ci-high": iv.high, "n": iv.n, "separated": iv.separated})
    return pd.DataFrame(rows, columns=[*by, compare, "mean", "ci-low", "ci-high", "n",
                                       "separated"])


def final_values(curves: pd.DataFrame, by: list[str], value: str = "accuracy",
                 k: int = LAST_K, stretch: float = STRETCH) -> pd.DataFrame:
    """Per group of ``by`` (e.g. run, kind, level): ``value`` at the last round and the mean over
    the last ``k`` evaluated rounds (those where the group has a value) of its final ``stretch``
    of rounds (rounds after ``last - stretch * last``; 1.0: anywhere), with the rounds used.

    Round 0 (the initial model, before any training) is never part of the mean unless it is the
    group's only evaluated round: in a short run evaluated every few rounds it would otherwise
    pull the "final" accuracy toward chance."""
    if k < 1:
        raise ValueError(f"k={k!r} is out of range: allowed an integer >= 1")
    if not 0 < stretch <= 1:
        raise ValueError(f"stretch={stretch!r} is out of range: allowed (0, 1]")
    rows = []
    for key, group in curves.dropna(subset=[value]).groupby(by, sort=False):
        trained = group[group["round"] > 0]
        tail = (trained if len(trained) else group).sort_values("round")
        last = int(tail["round"].iloc[-1])
        tail = tail[tail["round"] > last - stretch * last].tail(k) if last else tail.tail(k)
        key = key if isinstance(key, tuple) else (key,)
        rows.append({**dict(zip(by, key)), "last": float(tail[value].iloc[-1]),
                     "last-k": float(tail[value].mean()), "last-round": int(tail["round"].iloc[-1]),
                     "first-round-of-k": int(tail["round"].iloc[0]), "k-used": len(tail)})
    return pd.DataFrame(rows)


@dataclass(frozen=True)
class Convergence:
    """The convergence verdict of one accuracy curve."""

    converged: bool
    slope: float  # of the smoothed curve over the tail, accuracy per round (NaN: too few points)
    tail_start: int  # first round of the tail
    points: int  # evaluated rounds in the tail


def convergence(rounds: Sequence[int], values: Sequence[float], tail: float = TAIL,
                threshold: float = SLOPE_THRESHOLD, window: int = SMOOTH_WINDOW,
                min_points: int = MIN_TAIL_POINTS) -> Convergence:
    """Whether a curve has flattened: |slope| of its smoothed values over the last ``tail`` of the
    rounds is under ``threshold`` per round.

    The curve is smoothed by a trailing moving average of ``window`` evaluated rounds (it keeps
    a straight line's slope), then a least-squares line is fitted to the smoothed points in the
    tail (rounds after ``last - tail * last``). A falling curve is not converged either. With fewer than
    ``min_points`` evaluated rounds in the tail the run is not judged converged.
    """
    if not 0 < tail <= 1:
        raise ValueError(f"tail {tail!r} is out of range: allowed (0, 1]")
    curve = pd.Series(np.asarray(values, float), index=np.asarray(rounds, int)).dropna()
    curve = curve.sort_index()
    if curve.empty:
        raise ValueError("convergence needs at least one evaluated round")
    last = int(curve.index[-1])
    start = last - tail * last
    smooth = curve.rolling(window, min_periods=1).mean()
    in_tail = smooth[smooth.index > start]
    first = int(in_tail.index[0])
    if len(in_tail) < max(min_points, 2):
        return Convergence(False, math.nan, first, len(in_tail))
    slope = float(np.polyfit(in_tail.index.to_numpy(float), in_tail.to_numpy(), 1)[0])
    return Convergence(abs(slope) < threshold, slope, first, len(in_tail))


def accuracy_curve(evaluation: pd.DataFrame) -> pd.Series:
    """One run's accuracy per round, the curve convergence is judged on: the mean over its budget
    tiers (over its rank fractions when it has no tier rows). Takes wide rows (round, kind,
    accuracy) or a run's long ``evaluation`` table (round, kind, metric, value)."""
    if "accuracy" not in evaluation:
        evaluation = evaluation[evaluation["metric"] == "accuracy"].rename(
            columns={"value": "accuracy"})
    kind = "tier" if (evaluation["kind"] == "tier").any() else "fraction"
    return evaluation[evaluation["kind"] == kind].groupby("round")["accuracy"].mean()
