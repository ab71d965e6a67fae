"""The report's plots: matplotlib figures from the tables of one or more runs.

Every function takes runs grouped by ``simulations.report`` (each run has ``group``, ``tables``,
``path`` and ``sim_rounds``), the wide evaluation frame built from them, or the per-run final
values (``report.final_frame``: final accuracy as the mean over the last k evaluated rounds), and
returns a figure; seeds of a group are drawn as their mean with a 95% t-interval band or whiskers,
and the title says n.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.ticker import MaxNLocator, PercentFormatter  # noqa: E402

from fl_maestro.results import RunStore  # noqa: E402
from fl_maestro.shrinking import importance_from_arrays  # noqa: E402
from simulations.runs import Run  # noqa: E402
from simulations.stats import interval_frame  # noqa: E402

MB = 1e6
ZOOM_WINDOW = 0.10  # a zoomed accuracy axis shows the methods within 10 points of the best
log = logging.getLogger(__name__)


def summarise(frame: pd.DataFrame, by: list[str], value: str = "accuracy") -> pd.DataFrame:
    """Mean, 95% t-interval (ci-low, ci-high, ci-half), std and n of ``value`` over seeds, plus
    the mean of the cost columns."""
    stats = interval_frame(frame, by, value)
    costs = [c for c in ("dense-relative-macs", "relative-macs", "sim-seconds") if c in frame]
    if not costs:
        return stats
    return stats.merge(frame.groupby(by, sort=False)[costs].mean().reset_index(), on=by)


def group_colors(runs: Sequence[Run]) -> dict[str, tuple]:
    """One colour per group, in run order, shared by every plot: tab10 up to 10 groups, tab20
    up to 20 (so no two groups share a colour), then tab20 again."""
    groups = list(dict.fromkeys(r.group for r in runs))
    if len(groups) <= 10:
        return {g: plt.get_cmap("tab10")(i) for i, g in enumerate(groups)}
    cmap = plt.get_cmap("tab20")
    return {g: cmap(i % 20) for i, g in enumerate(groups)}


def _line(ax, x, stats: pd.DataFrame, color, label: str | None, style: str = "-",
          marker: str = "o") -> None:
    spread = (stats["n"] > 1).any()
    if style == "none":  # separate points: whiskers instead of a band
        err = np.vstack([stats["ci-half"], stats["ci-half"]])
        ax.errorbar(x, stats["mean"], yerr=err if spread else None, fmt=marker, color=color,
                    label=label, markersize=5, capsize=3)
        return
    ax.plot(x, stats["mean"], linestyle=style, marker=marker or None, color=color, label=label,
            markersize=4)
    if spread:
        ax.fill_between(x, stats["ci-low"], stats["ci-high"], color=color, alpha=0.18,
                        linewidth=0)


def seeds_text(frame: pd.DataFrame) -> str:
    """How many seeds each group has, as text: ``"5"`` or ``"3-5"``."""
    n = frame.groupby("group")["run"].nunique()
    return f"{n.min()}" if n.min() == n.max() else f"{n.min()}-{n.max()}"


def _finish(fig, axes, title: str, legend_title: str, frame: pd.DataFrame) -> None:
    handles, labels = axes[0].get_legend_handles_labels()
    n = seeds_text(frame)
    band = (f"\n(mean over n = {n} seeds per group; band or whiskers: 95% t-interval)"
            if n != "1" else "\n(n = 1 seed per group: no interval)")
    fig.suptitle(title + band)
    if handles:
        fig.legend(handles, labels, title=legend_title or None, loc="outside lower center",
                   ncol=1 if max(map(len, labels)) > 40 else min(len(labels), 3), fontsize=8)
    for ax in axes:
        ax.grid(alpha=0.3)


def final_label(finals: pd.DataFrame) -> str:
    """Axis label of the final accuracy the frame holds (mean over its last k evaluated rounds)."""
    k = finals.attrs.get("k", 1)
    return "test accuracy (final round)" if k == 1 else \
        f"test accuracy (mean of the last {k} evaluated rounds)"


def plot_accuracy_vs_fraction(finals: pd.DataFrame, legend: str, colors: dict) -> plt.Figure:
    """Final accuracy of the global model run at each rank fraction."""
    fig, ax = plt.subplots(figsize=(7, 5), layout="constrained")
    for group, stats in summarise(finals[finals["kind"] == "fraction"],
                                  ["group", "level"]).groupby("group", sort=False):
        _line(ax, stats["level"], stats, colors[group], group)
    ax.set(xlabel="rank fraction of every low-rank layer", ylabel=final_label(finals),
           xlim=(0, 1.05))
    _percent_axis(ax)
    _finish(fig, [ax], "Accuracy of the final global model at each rank fraction", legend,
            finals)
    return fig


def data_limits(stats: pd.DataFrame, pad: float = 0.15, least: float = 0.02
                ) -> tuple[float, float]:
    """Accuracy axis limits that fit ``stats``' means and intervals (not 0 to 1): the range of
    mean - half-width to mean + half-width, padded by ``pad`` of it on each side and at least
    ``least`` wide, clipped to [0, 1], so differences of a point or two stay visible."""
    half = stats["ci-half"].fillna(0)
    low, high = float((stats["mean"] - half).min()), float((stats["mean"] + half).max())
    span = max(high - low, least)
    middle = (low + high) / 2
    low, high = middle - span / 2 * (1 + 2 * pad), middle + span / 2 * (1 + 2 * pad)
    return max(low, 0.0), min(high, 1.0)


def leading(stats: pd.DataFrame, window: float = ZOOM_WINDOW) -> pd.Series:
    """Which rows of ``stats`` (group x level) sit within ``window`` of the best mean at their
    level: the cluster a zoomed axis shows (a method far behind would flatten the others)."""
    best = stats.groupby("level")["mean"].transform("max")
    return stats["mean"] >= best - window


def _zoomed_points(ax, x, stats: pd.DataFrame, low: float, color, label: str | None,
                   marker: str = "o") -> None:
    """Means with 95% whiskers on a zoomed axis; a mean under its floor ``low`` becomes a
    triangle on the floor labelled with its value, so nothing is silently cut off."""
    x = np.asarray(x, dtype=float)
    present = stats["mean"].notna().to_numpy()  # a group without this tier draws nothing there
    x, stats = x[present], stats[present]
    inside = (stats["mean"] >= low).to_numpy()
    spread = (stats["n"] > 1).any()
    ax.errorbar(x[inside], stats["mean"][inside], label=label, fmt=marker, color=color,
                yerr=stats["ci-half"][inside] if spread else None, markersize=6, capsize=3)
    for xi, mean in zip(x[~inside], stats["mean"][~inside]):
        ax.plot([xi], [low], marker="v", color=color, markersize=8, clip_on=False)
        ax.annotate(f"{mean:.1%}", (xi, low), textcoords="offset points", xytext=(0, 7),
                    ha="center", fontsize=7, color=color)


def _percent_axis(ax) -> None:
    ax.yaxis.set_major_formatter(PercentFormatter(xmax=1, decimals=None))


def plot_tier_accuracy(finals: pd.DataFrame, legend: str, colors: dict) -> plt.Figure:
    """Final accuracy of each budget tier's sub-model: one point with 95% whiskers per group and
    tier, on an axis scaled to the data (so gaps of a point or two can be seen)."""
    fig, ax = plt.subplots(figsize=(8, 4.4), layout="constrained")
    kind = "tier" if (finals["kind"] == "tier").any() else "fraction"
    stats = summarise(finals[finals["kind"] == kind], ["group", "level"])
    tiers = sorted(stats["level"].unique())
    groups = list(dict.fromkeys(stats["group"]))
    width = 0.8 / len(groups)
    low, high = data_limits(stats[leading(stats)])
    for i, group in enumerate(groups):
        mine = stats[stats["group"] == group].set_index("level").reindex(tiers)
        x = np.arange(len(tiers)) + (i - (len(groups) - 1) / 2) * width
        _zoomed_points(ax, x, mine, low, colors[group], group)
    for edge in np.arange(len(tiers) - 1) + 0.5:
        ax.axvline(edge, color="#ccc", linewidth=0.8)
    name = "device budget tier (fraction of the dense model's cost)" if kind == "tier" else \
        "rank fraction (the runs have no budget tiers)"
    ax.set_xticks(np.arange(len(tiers)), [f"{float(t):g}" for t in tiers])
    ax.set(xlabel=name, ylabel=final_label(finals), ylim=(low, high),
           xlim=(-0.5, len(tiers) - 0.5))
    _percent_axis(ax)
    _finish(fig, [ax], "Final accuracy of each budget tier's sub-model\n(axis zoomed on the "
            f"methods within {ZOOM_WINDOW:.0%} of the best; ▼: below the axis)", legend, finals)
    return fig


def plot_pareto(finals: pd.DataFrame, legend: str, colors: dict) -> plt.Figure:
    """Accuracy against inference MACs relative to the dense model: every rank fraction and tier
    (left), and the budget tiers alone on an axis zoomed on the leading methods (right)."""
    fig, axes = plt.subplots(1, 2, figsize=(11, 5), layout="constrained")
    for kind, style, marker in (("fraction", "-", "o"), ("tier", "none", "s")):
        stats = summarise(finals[finals["kind"] == kind], ["group", "level"])
        for group, mine in stats.groupby("group", sort=False):
            _line(axes[0], mine["dense-relative-macs"], mine, colors[group],
                  group if kind == "fraction" else None, style, marker)
    kind = "tier" if (finals["kind"] == "tier").any() else "fraction"
    zoom = summarise(finals[finals["kind"] == kind], ["group", "level"])
    low, high = data_limits(zoom[leading(zoom)])
    for group, mine in zoom.groupby("group", sort=False):
        _zoomed_points(axes[1], mine["dense-relative-macs"], mine, low, colors[group], None,
                       "s" if kind == "tier" else "o")
    macs = zoom["dense-relative-macs"]
    spread = max(float(macs.max() - macs.min()), 0.05)
    axes[1].set(xlim=(macs.min() - 0.08 * spread, macs.max() + 0.08 * spread), ylim=(low, high),
                title=f"{kind}s only, zoomed\n(within {ZOOM_WINDOW:.0%} of the best; ▼: below)")
    axes[0].set(ylim=data_limits(summarise(finals, ["group", "kind", "level"]), pad=0.05),
                title="every rank fraction and tier")
    for ax in axes:
        ax.axvline(1.0, color="black", linestyle="--", linewidth=1)
        ax.text(1.0, 0.02, " dense", transform=ax.get_xaxis_transform(), fontsize=8)
        ax.set(xlabel="inference MACs per sample relative to the dense model")
        _percent_axis(ax)
    axes[0].plot([], [], "ko-", markersize=4, label="rank fraction (line)")
    axes[0].plot([], [], "ks", markersize=4, label="budget tier (square)")
    axes[0].set(ylabel=final_label(finals))
    _finish(fig, axes, "Accuracy vs inference cost of the final global model", legend, finals)
    return fig


def _time_unit(seconds: float) -> tuple[float, str]:
    return next(((d, u) for d, u in ((3600, "hours"), (60, "minutes")) if seconds >= 2 * d),
                (1, "seconds"))


def plot_accuracy_over_time(wide: pd.DataFrame, legend: str, colors: dict) -> plt.Figure:
    """Accuracy at the largest and smallest rank fraction against round and simulated time."""
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.8), sharey=True, layout="constrained")
    rows = wide[wide["kind"] == "fraction"]
    levels = (rows["level"].max(), rows["level"].min())
    divisor, unit = _time_unit(np.nan_to_num(rows["sim-seconds"].max()))
    for level, style in zip(levels, ("-", "--")):
        stats = summarise(rows[rows["level"] == level], ["group", "round"])
        for group, mine in stats.groupby("group", sort=False):
            label = group if level == levels[0] else None
            _line(axes[0], mine["round"], mine, colors[group], label, style, "")
            if mine["sim-seconds"].notna().any():
                _line(axes[1], mine["sim-seconds"] / divisor, mine, colors[group], None, style, "")
    for level, style in zip(levels, ("-", "--")):
        axes[0].plot([], [], "k" + style, label=f"rank fraction {level:g}")
    axes[0].set(xlabel="round", ylabel="test accuracy of the global model")
    _percent_axis(axes[0])
    axes[0].xaxis.set_major_locator(MaxNLocator(integer=True))
    axes[1].set(xlabel=f"simulated device time ({unit}, the run's own clock)")
    _finish(fig, axes, "Accuracy of the global model over training, by round and by simulated "
            "device time", legend, wide)
    return fig


def plot_communication(runs: Sequence[Run], legend: str, colors: dict) -> plt.Figure:
    """Per-client traffic by budget tier and total traffic per round."""
    frames = [r.tables["clients"].assign(group=r.group, seed=r.seed, run=r.name)
              for r in runs if not r.tables["clients"].empty]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.8), layout="constrained")
    clients = pd.concat(frames, ignore_index=True)
    clients["MB"] = (clients["bytes-down"] + clients["bytes-up"]) / MB
    groups = list(dict.fromkeys(clients["group"]))
    tiers, width = sorted(clients["budget"].unique()), 0.8 / len(groups)
    for i, group in enumerate(groups):
        mine = clients[clients["group"] == group].groupby("budget")["MB"].mean().reindex(tiers)
        x = np.arange(len(tiers)) + (i - (len(groups) - 1) / 2) * width
        axes[0].bar(x, mine, width, color=colors[group], label=group)
        total = clients[clients["group"] == group].groupby(["run", "round"])["MB"].sum()
        per_round = summarise(total.reset_index(), ["round"], "MB")
        _line(axes[1], per_round["round"], per_round, colors[group], None)
    axes[0].set_xticks(np.arange(len(tiers)), [str(float(t)) for t in tiers])
    axes[0].set(xlabel="device budget tier", ylabel="MB per client per round (down + up)")
    axes[1].set(xlabel="round", ylabel="MB per round, all sampled clients (down + up)")
    axes[1].xaxis.set_major_locator(MaxNLocator(integer=True))
    axes[1].set_ylim(bottom=0)
    _finish(fig, axes, "Communication: traffic per client by tier (left) and per round (right)",
            legend, clients)
    return fig


def plot_importance(runs: Sequence[Run], legend: str, colors: dict) -> plt.Figure | None:
    """Component importance of each low-rank layer at the last checkpoint (a group's first seed)."""
    spectra: dict[str, dict[str, np.ndarray]] = {}
    missing: list[str] = []
    for run in sorted(runs, key=lambda r: r.seed):
        store = RunStore(run.path)
        if run.group in spectra or not store.has_checkpoint():
            continue
        try:
            _, arrays, _ = store.load_checkpoint()
        except ValueError:  # e.g. a committed reference keeps its tables, not its arrays
            missing.append(run.name)
            continue
        spectra[run.group] = {name[:-2]: importance_from_arrays(arrays[name], arrays[v])
                              for name in sorted(arrays) if name.endswith(".U")
                              and (v := name[:-1] + "V") in arrays}
    if missing:
        log.warning("no importance spectrum from %d runs whose checkpoint arrays cannot be read "
                    "(e.g. %s)", len(missing), missing[0])
    layers = sorted({layer for s in spectra.values() for layer in s})
    if not layers:
        return None
    cols = min(len(layers), 3)
    rows = -(-len(layers) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.8 * rows), squeeze=False,
                             layout="constrained")
    for ax, layer in zip(axes.flat, layers):
        for group, spectrum in spectra.items():
            values = spectrum.get(layer)
            if values is not None:
                ax.plot(np.arange(1, len(values) + 1), np.where(values > 0, values, np.nan),
                        color=colors[group], label=group)
        ax.set(yscale="log", title=layer, xlabel="component j (rank index)",
               ylabel="importance ||V[j:]|| x ||U[:, j:]||")
    for ax in axes.flat[len(layers):]:
        ax.set_visible(False)
    _finish(fig, list(axes.flat), "Importance spectrum of each low-rank layer "
            "(last checkpoint of each group's first seed, log scale)", legend,
            pd.DataFrame({"group": list(spectra), "run": list(spectra)}))
    return fig


# --------------------------------------------------------------------------- output


def save_figure(fig: plt.Figure, out: Path, name: str) -> Path:
    """Write ``name.png`` and ``name.pdf``; returns the PNG path."""
    fig.savefig(out / f"{name}.png", dpi=130)
    fig.savefig(out / f"{name}.pdf")
    plt.close(fig)
    return out / f"{name}.png"
