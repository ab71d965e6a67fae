"""Why a tier gets the accuracy it gets: coverage, movement and spectra of every component.

Built from each run's ``components`` table (``fl_maestro.components``: one row per round, layer
and rank index) and its ``clients`` table. Every function takes runs grouped by
``simulations.report``; numbers over seeds are means with 95% t-intervals (``simulations.stats``).
"""

from __future__ import annotations

from collections.abc import Sequence

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from simulations.runs import Run
from simulations.stats import interval_frame


def components_frame(runs: Sequence[Run]) -> pd.DataFrame:
    """Every run's components table with its group, run and seed (empty if none has one)."""
    frames = [r.tables["components"].assign(group=r.group, run=r.name, seed=r.seed)
              for r in runs if not r.tables.get("components", pd.DataFrame()).empty]
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def per_component(components: pd.DataFrame) -> pd.DataFrame:
    """Per run, layer and component: total client-steps, share of rounds with a step, and the
    last round's movement, importance and norm (with their values at initialisation)."""
    trained = components[components["round"] > 0]
    keys = ["group", "run", "seed", "layer", "component"]
    totals = trained.groupby(keys, sort=False).agg(
        **{"client-steps": ("client-steps", "sum"),
           "rounds-trained": ("client-steps", lambda s: float((s > 0).mean())),
           "clients-per-round": ("clients", "mean")})
    last = components[components["round"] == components.groupby("run")["round"].transform("max")]
    state = [c for c in ("moved", "importance", "importance-init", "norm", "norm-init")
             if c in last]
    return totals.join(last.set_index(keys)[state]).reset_index()


def full_budget_clients(runs: Sequence[Run]) -> pd.DataFrame:
    """Per run and round: how many replying clients had the run's largest budget."""
    rows = []
    for run in runs:
        clients = run.tables["clients"]
        if clients.empty or "budget" not in clients:
            continue
        full = clients["budget"] >= clients["budget"].max()
        counts = full.groupby(clients["round"]).sum()
        rows += [{"group": run.group, "run": run.name, "seed": run.seed, "round": int(r),
                  "full-budget clients": int(n)} for r, n in counts.items()]
    return pd.DataFrame(rows)


def coverage_table(components: pd.DataFrame, full: pd.DataFrame) -> pd.DataFrame:
    """Per group and layer: client-steps of the first, middle and last component, how often the
    last one was trained, its movement against the first's, and full-budget clients per round."""
    per = per_component(components)
    rows = []
    for (group, layer), mine in per.groupby(["group", "layer"], sort=False):
        means = mine.groupby("component").mean(numeric_only=True)
        last, mid = means.index.max(), means.index[len(means) // 2]
        row = {"group": group, "layer": layer, "components": int(last) + 1,
               "seeds": mine["run"].nunique(),
               "client-steps first": means.loc[0, "client-steps"],
               "client-steps middle": means.loc[mid, "client-steps"],
               "client-steps last": means.loc[last, "client-steps"],
               "rounds training the last": means.loc[last, "rounds-trained"]}
        if "moved" in means:
            row.update({"moved first": means.loc[0, "moved"],
                        "moved last": means.loc[last, "moved"]})
        if not full.empty:
            row["full-budget clients per round"] = full[full["group"] == group][
                "full-budget clients"].mean()
        rows.append(row)
    return pd.DataFrame(rows)


def _band(ax, stats: pd.DataFrame, x: str, color, label: str | None) -> None:
    ax.plot(stats[x], stats["mean"], color=color, label=label)
    if (stats["n"] > 1).any():
        ax.fill_between(stats[x], stats["ci-low"], stats["ci-high"], color=color, alpha=0.18,
                        linewidth=0)


def _layer_axes(layers: Sequence[str], rows: int) -> tuple[plt.Figure, np.ndarray]:
    fig, axes = plt.subplots(rows, len(layers), figsize=(max(8, 4.6 * len(layers)), 3.6 * rows),
                             squeeze=False, layout="constrained")
    return fig, axes


def plot_coverage(components: pd.DataFrame, colors: dict) -> plt.Figure:
    """Per layer: total client-steps of each component (top) and the share of rounds in which it
    received any (bottom); mean over seeds with a 95% t-interval band."""
    per = per_component(components)
    layers = sorted(per["layer"].unique())
    fig, axes = _layer_axes(layers, 2)
    for col, layer in enumerate(layers):
        mine = per[per["layer"] == layer]
        for group, rows in mine.groupby("group", sort=False):
            label = group if col == 0 else None
            _band(axes[0, col], interval_frame(rows, ["component"], "client-steps"),
                  "component", colors[group], label)
            _band(axes[1, col], interval_frame(rows, ["component"], "rounds-trained"),
                  "component", colors[group], None)
        axes[0, col].set(title=layer, yscale="log", ylabel="client-steps, whole run")
        axes[1, col].set(xlabel="component j (rank index)", ylim=(0, 1.05),
                         ylabel="share of rounds with a step")
    _legend(fig, axes, "Coverage: how many local steps trained each component", per)
    return fig


def plot_movement(components: pd.DataFrame, colors: dict) -> plt.Figure | None:
    """Per layer: each component's distance from its initial value (relative to its initial norm,
    top) and its importance now (solid) and at initialisation (dashed, bottom), last round."""
    per = per_component(components)
    if "moved" not in per:
        return None
    layers = sorted(per["layer"].unique())
    fig, axes = _layer_axes(layers, 2)
    for col, layer in enumerate(layers):
        mine = per[per["layer"] == layer]
        for group, rows in mine.groupby("group", sort=False):
            if rows["moved"].isna().all():  # width-sliced models: no factors to follow
                continue
            _band(axes[0, col], interval_frame(rows, ["component"], "moved"), "component",
                  colors[group], group if col == 0 else None)
            for value, style in (("importance", "-"), ("importance-init", "--")):
                stats = interval_frame(rows, ["component"], value)
                axes[1, col].plot(stats["component"], stats["mean"], style, color=colors[group])
        axes[0, col].set(title=layer, ylabel="||w_j - w_j(init)|| / ||w_j(init)||")
        axes[1, col].set(xlabel="component j (rank index)", yscale="log",
                         ylabel="importance ||V[j:]|| ||U[:, j:]||")
    axes[1, 0].plot([], [], "k-", label="last round")
    axes[1, 0].plot([], [], "k--", label="initialisation")
    axes[1, 0].legend(fontsize=8)
    _legend(fig, axes, "Movement from initialisation and importance spectrum (last round)", per)
    return fig


def plot_full_budget_clients(full: pd.DataFrame, colors: dict) -> plt.Figure:
    """Full-budget clients among each round's replies: mean over seeds with a 95% t-interval."""
    fig, ax = plt.subplots(figsize=(7, 4.2), layout="constrained")
    for group, rows in full.groupby("group", sort=False):
        _band(ax, interval_frame(rows, ["round"], "full-budget clients"), "round", colors[group],
              group)
    ax.set(xlabel="round", ylabel="clients with the largest budget", ylim=(0, None))
    _legend(fig, np.array([[ax]]), "Full-budget clients per round", full)
    return fig


def _legend(fig: plt.Figure, axes: np.ndarray, title: str, frame: pd.DataFrame) -> None:
    n = frame.groupby("group")["run"].nunique()
    seeds = f"{n.min()}" if n.min() == n.max() else f"{n.min()}-{n.max()}"
    fig.suptitle(f"{title}\n(mean over n = {seeds} seeds per group; band: 95% t-interval)")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    if handles:
        fig.legend(handles, labels, loc="outside lower center", fontsize=8,
                   ncol=1 if max(map(len, labels)) > 40 else min(len(labels), 3))
    for ax in axes.flat:
        ax.grid(alpha=0.3)
