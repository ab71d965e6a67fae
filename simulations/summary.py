"""The report's tables with their statistics: final accuracy, paired differences, convergence.

Inputs are the wide evaluation frame of ``simulations.report`` (one row per run, round, kind and
level, with ``accuracy`` and cost columns). Final accuracy is given at the last round and as the
mean over the last ``k`` evaluated rounds; every number over seeds is a mean with a 95%
t-interval and n (``simulations.stats``).
"""

from __future__ import annotations

import pandas as pd

from simulations.stats import (CONFIDENCE, LAST_K, accuracy_curve, convergence, final_values,
                               interval_frame, paired_differences)

COSTS = ("dense-relative-macs", "relative-macs")


def final_frame(wide: pd.DataFrame, k: int = LAST_K) -> pd.DataFrame:
    """One row per run, kind and level: ``accuracy`` (mean of the last ``k`` evaluated rounds),
    ``last`` (the last round's), group, seed and the level's costs; ``attrs["k"]`` holds k."""
    keys = ["run", "kind", "level"]
    finals = final_values(wide, keys, "accuracy", k).rename(columns={"last-k": "accuracy"})
    info = wide.sort_values("round").groupby(keys, sort=False)[
        ["group", "seed", *[c for c in COSTS if c in wide]]].last().reset_index()
    finals = finals.merge(info, on=keys)
    finals.attrs["k"] = k
    return finals


def run_convergence(wide: pd.DataFrame, **rule) -> pd.DataFrame:
    """Per run: the convergence verdict of its mean accuracy over the budget tiers (over the
    rank fractions when it has no tier rows), by ``stats.convergence``."""
    rows = []
    for run, mine in wide.groupby("run", sort=False):
        curve = accuracy_curve(mine)
        verdict = convergence(curve.index, curve.to_numpy(), **rule)
        rows.append({"run": run, "converged": verdict.converged,
                     "tail slope per round": verdict.slope, "tail from round": verdict.tail_start,
                     "points in tail": verdict.points})
    return pd.DataFrame(rows)


def final_table(finals: pd.DataFrame, kind: str, converged: pd.DataFrame | None = None
                ) -> pd.DataFrame:
    """Per group and level: final accuracy (last-k mean and last round) with 95% intervals, n,
    and how many of the group's runs converged."""
    rows = finals[finals["kind"] == kind]
    k, keys = finals.attrs.get("k", 1), ["group", "level"]
    last = interval_frame(rows, keys, "last")[[*keys, "mean", "ci-half"]]
    table = interval_frame(rows, keys, "accuracy")[[*keys, "n", "mean", "ci-half"]].merge(
        last, on=keys, suffixes=("", " last"))
    costs = [c for c in COSTS if c in rows]
    if costs:
        table = table.merge(rows.groupby(keys, sort=False)[costs].mean().reset_index(), on=keys)
    if converged is not None:
        runs = rows[["group", "run"]].drop_duplicates().merge(converged, on="run")
        done = runs.groupby("group")["converged"].agg(lambda c: f"{int(c.sum())}/{len(c)}")
        table["converged"] = table["group"].map(done)
    return table.rename(columns={
        "level": "budget" if kind == "tier" else "rank fraction",
        "mean": f"mean of last {k}", "ci-half": f"last {k} ±95%",
        "mean last": "last round", "ci-half last": "last round ±95%"})


def _difference_columns(table: pd.DataFrame, level_name: str) -> pd.DataFrame:
    """Readable columns and a 'separated' verdict ('not separated' when the CI holds 0)."""
    table = table.rename(columns={"level": level_name, "mean": "difference",
                                  "ci-low": "95% CI low", "ci-high": "95% CI high",
                                  "n": "pairs"})
    table["verdict"] = table.pop("separated").map({True: "separated", False: "not separated"})
    return table


def group_differences(finals: pd.DataFrame, baseline: str, kind: str = "tier") -> pd.DataFrame:
    """Every group minus ``baseline`` at each level, paired on the seed (same partitions, budgets
    and client sampling), on the last-k final accuracy."""
    rows = finals[finals["kind"] == kind]
    table = paired_differences(rows, "group", baseline, ["level"], "accuracy", pair="seed")
    table = table[["group", *[c for c in table if c != "group"]]]
    return _difference_columns(table, "budget" if kind == "tier" else "rank fraction")


def tier_differences(finals: pd.DataFrame) -> pd.DataFrame:
    """Within each group, every tier minus the group's lowest tier, paired on the run (the same
    global model run at two budgets)."""
    frames = []
    for group, rows in finals[finals["kind"] == "tier"].groupby("group", sort=False):
        lowest = rows["level"].min()
        diff = paired_differences(rows, "level", lowest, [], "accuracy", pair="run")
        frames.append(diff.assign(group=group, **{"minus tier": lowest}))
    if not frames:
        return pd.DataFrame()
    table = pd.concat(frames, ignore_index=True)
    table = table[["group", "level", "minus tier", "mean", "ci-low", "ci-high", "n", "separated"]]
    return _difference_columns(table, "budget")


def default_baseline(finals: pd.DataFrame) -> str:
    """The first group, the one every other group is compared with unless told otherwise."""
    return str(finals["group"].iloc[0])


NOTES = (f"Intervals are two-sided {CONFIDENCE:.0%} t-intervals over n seeds (n - 1 degrees of "
         "freedom); n = 1 gives none. Differences are paired: on the same seed two methods share "
         "the partitions, budgets and client sampling. A difference whose interval contains 0 is "
         "'not separated'.")


def summary_frame(finals: pd.DataFrame, converged: pd.DataFrame,
                  baseline: str | None = None) -> pd.DataFrame:
    """The report's first table, long form: per group and budget tier (rank fraction when the
    runs have no tiers) the last-k final accuracy (mean, 95% half-width, n), the paired
    difference from ``baseline`` (mean, half-width, pairs, separated; NaN for the baseline and
    for a single group) and how many of the group's runs converged."""
    kind = "tier" if (finals["kind"] == "tier").any() else "fraction"
    rows = finals[finals["kind"] == kind]
    table = interval_frame(rows, ["group", "level"], "accuracy")[
        ["group", "level", "mean", "ci-half", "n"]]
    diff_columns = ["difference", "difference ±95%", "pairs", "separated"]
    if rows["group"].nunique() > 1:
        base = baseline or default_baseline(finals)
        diff = paired_differences(rows, "group", base, ["level"], "accuracy", pair="seed")
        diff = diff.assign(half=(diff["ci-high"] - diff["ci-low"]) / 2).rename(columns={
            "mean": "difference", "half": "difference ±95%", "n": "pairs"})
        table = table.merge(diff[["group", "level", *diff_columns]], on=["group", "level"],
                            how="left")
    else:
        table = table.assign(**{c: float("nan") for c in diff_columns})
    runs = rows[["group", "run"]].drop_duplicates().merge(converged, on="run")
    done = runs.groupby("group")["converged"].agg(lambda c: f"{int(c.sum())}/{len(c)}")
    table["converged"] = table["group"].map(done)
    table.attrs.update(kind=kind, k=finals.attrs.get("k", 1), **rounds_used(rows))
    return table


def rounds_used(finals: pd.DataFrame) -> dict[str, int]:
    """The fewest and most evaluated rounds a final value averaged, and the rounds they span
    (what the headline number is a mean of, for the report's legend)."""
    if "k-used" not in finals or finals.empty:
        return {}
    return {"k-min": int(finals["k-used"].min()), "k-max": int(finals["k-used"].max()),
            "first-round": int(finals["first-round-of-k"].min()),
            "last-round": int(finals["last-round"].max())}


def accuracy_at_time(wide: pd.DataFrame, at: float | None = None) -> pd.DataFrame:
    """Per group and budget tier (rank fraction without tiers): the accuracy of each run's last
    evaluation within ``at`` simulated seconds (default: the shortest run's final clock, a time
    every run reached), as mean, 95% half-width and n over runs, beside the group's simulated
    seconds per round (mean over its runs). Empty when the runs recorded no clock;
    ``attrs["at"]`` holds the time used."""
    if "sim-seconds" not in wide or wide["sim-seconds"].isna().all():
        return pd.DataFrame()
    kind = "tier" if (wide["kind"] == "tier").any() else "fraction"
    rows = wide[wide["kind"] == kind].dropna(subset=["sim-seconds", "accuracy"])
    if at is None:
        at = float(rows.groupby("run")["sim-seconds"].max().min())
    within = rows[rows["sim-seconds"] <= at].sort_values("round")
    last = within.groupby(["run", "level"], sort=False).tail(1)
    order = {g: i for i, g in enumerate(dict.fromkeys(rows["group"]))}
    last = last.sort_values(["group", "level"], key=lambda c: c.map(order) if c.name == "group"
                            else c)
    table = interval_frame(last, ["group", "level"], "accuracy")[
        ["group", "level", "mean", "ci-half", "n"]]
    table = table.merge(last.groupby(["group", "level"])["round"].mean().rename("rounds by then")
                        .reset_index(), on=["group", "level"], how="left")
    ends = rows.sort_values("round").groupby("run").tail(1)
    pace = (ends["sim-seconds"] / ends["round"]).groupby(ends["group"]).mean()
    table["simulated s per round"] = table["group"].map(pace)
    table = table.rename(columns={"level": "budget" if kind == "tier" else "rank fraction",
                                  "mean": "accuracy at time",
                                  "ci-half": "accuracy at time ±95%"})
    table.attrs["at"] = at
    return table

