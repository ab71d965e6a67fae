"""Plots and one offline HTML page from run folders and sweep folders.

    python -m simulations.report results/sweeps/budget-mixes --out results/reports/budget-mixes
    fl-maestro-report results/run-a results/run-b --devices devices.toml --deadline 30

Runs are grouped by the config keys that differ between them (seed aside; ``supernodes`` from a
sweep cell's ``cell.json`` too); a group's seeds are drawn as their mean with a min-max band.
Each plot is written as PNG and PDF, and ``report.html`` embeds the PNGs and the tables.
"""

from __future__ import annotations

import argparse
import base64
import html
import json
import logging
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from fl_maestro.results import TABLES, RunStore  # noqa: E402
from fl_maestro.shrinking import importance_from_arrays  # noqa: E402
from simulations.devices import (load_profiles, profiles_for, profiles_frame,  # noqa: E402
                                 simulate, time_at_rounds)

log = logging.getLogger(__name__)

IGNORED_KEYS = ("run-name", "results-dir", "resume", "seed")
STATS = ["mean", "min", "max", "std", "count"]
MB = 1e6


@dataclass
class Run:
    """One run folder: its config (plus sweep-cell axes), tables and group label."""

    name: str
    path: Path
    config: dict
    seed: int
    tables: dict[str, pd.DataFrame]
    group: str = ""
    sim_rounds: pd.DataFrame = field(default_factory=pd.DataFrame)


# --------------------------------------------------------------------------- loading


def find_runs(paths: Sequence[str | Path]) -> list[Path]:
    """Run folders (with config.json) named directly or inside sweep folders, in sweep order."""
    found = []
    for path in map(Path, paths):
        if (path / "config.json").exists():
            found.append(path)
            continue
        order = (pd.read_csv(path / "cells.csv")["cell-id"].astype(str).tolist()
                 if (path / "cells.csv").exists() else [])
        rank = {name: i for i, name in enumerate(order)}
        inner = sorted((p.parent for p in path.glob("*/config.json")),
                       key=lambda p: (rank.get(p.name, len(rank)), p.name))
        if not inner:
            raise ValueError(f"{path} is neither a run folder (no config.json) nor a sweep folder "
                             "(no <cell>/config.json)")
        found += [p for p in inner if _finished(p)]
    return found


def _finished(path: Path) -> bool:
    """Whether a sweep cell ran all its rounds (unfinished cells would skew the comparison)."""
    store = RunStore(path)
    done = (store.checkpoint_round() or 0) >= int(store.read_config().get("num-rounds", 0))
    if not done:
        log.warning("leaving out unfinished run %s", path)
    return done


def load_run(path: Path) -> Run:
    """A run folder's config, cell axes and tables."""
    store = RunStore(path)
    config = store.read_config()
    cell = path / "cell.json"
    if cell.exists():
        config["supernodes"] = json.loads(cell.read_text()).get("supernodes")
    return Run(path.name, path, config, int(config.get("seed", 0)),
               {t: store.read(t) for t in TABLES})


def load_runs(paths: Sequence[str | Path]) -> list[Run]:
    """Every run under ``paths``; same-named runs of different sweeps get the sweep as prefix."""
    runs = [load_run(p) for p in find_runs(paths)]
    names = [r.name for r in runs]
    for run in runs:
        if names.count(run.name) > 1:
            run.name = f"{run.path.parent.name}/{run.name}"
    return runs


def group_runs(runs: Sequence[Run]) -> str:
    """Set every run's group label from the keys that vary; returns the legend title."""
    keys = sorted({k for r in runs for k in r.config} - set(IGNORED_KEYS))
    varying = [k for k in keys if len({json.dumps(r.config.get(k)) for r in runs}) > 1]
    for run in runs:
        if len(varying) == 1:
            run.group = str(run.config.get(varying[0]))
        elif varying:
            run.group = ", ".join(f"{k}={run.config.get(k)}" for k in varying)
        else:
            run.group = run.name if len({r.name for r in runs}) == 1 else "all runs"
    return varying[0] if len(varying) == 1 else ""


def add_sim_time(runs: Sequence[Run], overrides: dict | None, deadline: float | None,
                 rng: np.random.Generator) -> None:
    """Simulated device time per round (``devices.simulate``) for every run with client rows."""
    for run in runs:
        clients = run.tables["clients"]
        if not clients.empty:
            _, run.sim_rounds = simulate(clients, overrides, deadline, rng)


# --------------------------------------------------------------------------- tables


def evaluation_wide(runs: Sequence[Run]) -> pd.DataFrame:
    """Every evaluation row of every run, one column per metric, with group, run, seed, sim time."""
    frames = []
    for run in runs:
        ev = run.tables["evaluation"]
        if ev.empty:
            continue
        wide = ev.pivot_table(index=["round", "kind", "level"], columns="metric",
                              values="value").reset_index()
        wide["final"] = wide["round"] == wide["round"].max()
        sim = time_at_rounds(run.sim_rounds, wide["round"]) if not run.sim_rounds.empty else np.nan
        frames.append(wide.assign(group=run.group, run=run.name, seed=run.seed,
                                  **{"sim-seconds": sim}))
    if not frames:
        raise ValueError("no run has evaluation rows: nothing to report")
    return pd.concat(frames, ignore_index=True)


def summarise(frame: pd.DataFrame, by: list[str], value: str = "accuracy") -> pd.DataFrame:
    """Mean, min, max, std and count of ``value`` over seeds, plus the mean of the cost columns."""
    stats = frame.groupby(by, sort=False)[value].agg(STATS)
    costs = [c for c in ("dense-relative-macs", "relative-macs", "sim-seconds") if c in frame]
    return stats.join(frame.groupby(by, sort=False)[costs].mean()).reset_index()


def final_table(wide: pd.DataFrame, kind: str) -> pd.DataFrame:
    """Final-round accuracy per group and tier (``kind="tier"``) or rank fraction, over seeds."""
    rows = summarise(wide[wide["final"] & (wide["kind"] == kind)], ["group", "level"])
    rows = rows.rename(columns={"level": "budget" if kind == "tier" else "rank fraction",
                                "mean": "accuracy", "min": "accuracy min", "max": "accuracy max",
                                "std": "accuracy std", "count": "seeds"})
    return rows.drop(columns=["sim-seconds"], errors="ignore")


def runs_table(runs: Sequence[Run], wide: pd.DataFrame) -> pd.DataFrame:
    """One row per run: group, seed, rounds, final full-rank accuracy and simulated time."""
    rows = []
    for run in runs:
        mine = wide[(wide["run"] == run.name) & wide["final"] & (wide["kind"] == "fraction")]
        full = mine.loc[mine["level"].idxmax(), "accuracy"] if len(mine) else np.nan
        sim = run.sim_rounds
        rows.append({"run": run.name, "group": run.group, "seed": run.seed,
                     "rounds": int(run.tables["evaluation"]["round"].max()),
                     "full-rank accuracy": full,
                     "simulated seconds": sim["sim-seconds"].sum() if len(sim) else np.nan,
                     "stragglers": int(sim["stragglers"].sum()) if len(sim) else 0,
                     "dropped out": int(sim["dropped-out"].sum()) if len(sim) else 0})
    return pd.DataFrame(rows)


# --------------------------------------------------------------------------- plots


def group_colors(runs: Sequence[Run]) -> dict[str, tuple]:
    """One colour per group, in run order, shared by every plot."""
    cmap = plt.get_cmap("tab10")
    groups = [r.group for r in runs]
    return {g: cmap(i % 10) for i, g in enumerate(dict.fromkeys(groups))}


def _line(ax, x, stats: pd.DataFrame, color, label: str | None, style: str = "-",
          marker: str = "o") -> None:
    spread = (stats["count"] > 1).any()
    if style == "none":  # separate points: whiskers instead of a band
        err = np.vstack([stats["mean"] - stats["min"], stats["max"] - stats["mean"]])
        ax.errorbar(x, stats["mean"], yerr=err if spread else None, fmt=marker, color=color,
                    label=label, markersize=5, capsize=3)
        return
    ax.plot(x, stats["mean"], linestyle=style, marker=marker or None, color=color, label=label,
            markersize=4)
    if spread:
        ax.fill_between(x, stats["min"], stats["max"], color=color, alpha=0.18, linewidth=0)


def _finish(fig, axes, title: str, legend_title: str, n_seeds: int) -> None:
    handles, labels = axes[0].get_legend_handles_labels()
    band = f"\n(mean over {n_seeds} seeds; band or whiskers: min-max)" if n_seeds > 1 else ""
    fig.suptitle(title + band)
    if handles:
        fig.legend(handles, labels, title=legend_title or None, loc="outside lower center",
                   ncol=1 if max(map(len, labels)) > 40 else min(len(labels), 3), fontsize=8)
    for ax in axes:
        ax.grid(alpha=0.3)


def plot_accuracy_vs_fraction(wide: pd.DataFrame, legend: str, colors: dict) -> plt.Figure:
    """Final-round accuracy of the global model run at each rank fraction."""
    fig, ax = plt.subplots(figsize=(7, 5), layout="constrained")
    for group, stats in summarise(wide[wide["final"] & (wide["kind"] == "fraction")],
                                  ["group", "level"]).groupby("group", sort=False):
        _line(ax, stats["level"], stats, colors[group], group)
    ax.set(xlabel="rank fraction of every low-rank layer", ylabel="test accuracy (final round)",
           xlim=(0, 1.05))
    _finish(fig, [ax], "Accuracy of the final global model at each rank fraction", legend,
            wide["seed"].nunique())
    return fig


def plot_tier_accuracy(wide: pd.DataFrame, legend: str, colors: dict) -> plt.Figure:
    """Grouped bars: final accuracy of each budget tier's sub-model, one bar colour per group."""
    fig, ax = plt.subplots(figsize=(8, 5), layout="constrained")
    stats = summarise(wide[wide["final"] & (wide["kind"] == "tier")], ["group", "level"])
    tiers = sorted(stats["level"].unique())
    groups = list(dict.fromkeys(stats["group"]))
    width = 0.8 / len(groups)
    for i, group in enumerate(groups):
        mine = stats[stats["group"] == group].set_index("level").reindex(tiers)
        x = np.arange(len(tiers)) + (i - (len(groups) - 1) / 2) * width
        err = np.vstack([mine["mean"] - mine["min"], mine["max"] - mine["mean"]])
        bars = ax.bar(x, mine["mean"], width, yerr=err if (mine["count"] > 1).any() else None,
                      color=colors[group], label=group, capsize=3)
        if len(groups) <= 4:
            ax.bar_label(bars, fmt="%.3f", fontsize=7, padding=2)
    ax.set_xticks(np.arange(len(tiers)), [str(float(t)) for t in tiers])
    ax.set(xlabel="device budget tier (fraction of the full model's cost)",
           ylabel="test accuracy (final round)", ylim=(0, 1))
    _finish(fig, [ax], "Final accuracy of the sub-model each budget tier receives", legend,
            wide["seed"].nunique())
    return fig


def plot_pareto(wide: pd.DataFrame, legend: str, colors: dict) -> plt.Figure:
    """Accuracy against inference MACs relative to the dense model (fractions and tiers)."""
    fig, ax = plt.subplots(figsize=(7, 5), layout="constrained")
    final = wide[wide["final"]]
    for kind, style, marker in (("fraction", "-", "o"), ("tier", "none", "s")):
        stats = summarise(final[final["kind"] == kind], ["group", "level"])
        for group, mine in stats.groupby("group", sort=False):
            _line(ax, mine["dense-relative-macs"], mine, colors[group],
                  group if kind == "fraction" else None, style, marker)
    ax.axvline(1.0, color="black", linestyle="--", linewidth=1)
    ax.text(1.0, 0.02, " dense model", transform=ax.get_xaxis_transform(), fontsize=8)
    ax.plot([], [], "ko-", markersize=4, label="rank fraction (line)")
    ax.plot([], [], "ks", markersize=4, label="budget tier (square)")
    ax.set(xlabel="inference MACs per sample relative to the dense (undecomposed) model",
           ylabel="test accuracy (final round)")
    _finish(fig, [ax], "Accuracy vs inference cost of the final global model", legend,
            wide["seed"].nunique())
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
    axes[0].xaxis.set_major_locator(MaxNLocator(integer=True))
    axes[1].set(xlabel=f"simulated device time ({unit}, slowest client per round)")
    _finish(fig, axes, "Accuracy of the global model over training, by round and by simulated "
            "device time", legend, wide["seed"].nunique())
    return fig


def plot_communication(runs: Sequence[Run], legend: str, colors: dict) -> plt.Figure:
    """Per-client traffic by budget tier and total traffic per round."""
    frames = [r.tables["clients"].assign(group=r.group, seed=r.seed)
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
        total = clients[clients["group"] == group].groupby(["seed", "round"])["MB"].sum()
        per_round = total.groupby("round").agg(STATS)
        _line(axes[1], per_round.index, per_round, colors[group], None)
    axes[0].set_xticks(np.arange(len(tiers)), [str(float(t)) for t in tiers])
    axes[0].set(xlabel="device budget tier", ylabel="MB per client per round (down + up)")
    axes[1].set(xlabel="round", ylabel="MB per round, all sampled clients (down + up)")
    axes[1].xaxis.set_major_locator(MaxNLocator(integer=True))
    axes[1].set_ylim(bottom=0)
    _finish(fig, axes, "Communication: traffic per client by tier (left) and per round (right)",
            legend, clients["seed"].nunique())
    return fig


def plot_importance(runs: Sequence[Run], legend: str, colors: dict) -> plt.Figure | None:
    """Component importance of each low-rank layer at the last checkpoint (a group's first seed)."""
    spectra: dict[str, dict[str, np.ndarray]] = {}
    for run in sorted(runs, key=lambda r: r.seed):
        store = RunStore(run.path)
        if run.group in spectra or not store.has_checkpoint():
            continue
        _, arrays, _ = store.load_checkpoint()
        spectra[run.group] = {name[:-2]: importance_from_arrays(arrays[name], arrays[v])
                              for name in sorted(arrays) if name.endswith(".U")
                              and (v := name[:-1] + "V") in arrays}
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
            "(last checkpoint, log scale)", legend, 1)
    return fig


# --------------------------------------------------------------------------- output


def save_figure(fig: plt.Figure, out: Path, name: str) -> Path:
    """Write ``name.png`` and ``name.pdf``; returns the PNG path."""
    fig.savefig(out / f"{name}.png", dpi=130)
    fig.savefig(out / f"{name}.pdf")
    plt.close(fig)
    return out / f"{name}.png"


def write_html(out: Path, title: str, notes: Sequence[str],
               sections: Sequence[tuple[str, pd.DataFrame | Path]]) -> Path:
    """One self-contained page: notes, then tables as HTML and PNGs embedded as base64, in order."""
    parts = [f"<h1>{html.escape(title)}</h1>", *(f"<p>{html.escape(n)}</p>" for n in notes)]
    for caption, item in sections:
        parts.append(f"<h2>{html.escape(caption)}</h2>")
        if isinstance(item, pd.DataFrame):
            parts.append(item.to_html(index=False, float_format=lambda v: f"{v:.4f}", na_rep="-"))
        else:
            data = base64.b64encode(item.read_bytes()).decode()
            parts.append(f'<img alt="{html.escape(caption)}" src="data:image/png;base64,{data}">')
    style = ("body{font-family:sans-serif;max-width:1200px;margin:auto}img{max-width:100%}"
             "table{border-collapse:collapse;font-size:13px}td,th{border:1px solid #ccc;"
             "padding:2px 6px;text-align:right}")
    page = (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}"
            f"</title><style>{style}</style></head><body>{''.join(parts)}</body></html>")
    (out / "report.html").write_text(page)
    return out / "report.html"


PLOTS = (("accuracy-vs-fraction", "Accuracy vs rank fraction", plot_accuracy_vs_fraction),
         ("tier-accuracy", "Accuracy per budget tier", plot_tier_accuracy),
         ("pareto", "Accuracy vs MACs", plot_pareto),
         ("accuracy-over-time", "Accuracy vs round and simulated time", plot_accuracy_over_time))


def build_report(paths: Sequence[str | Path], out: str | Path, devices: dict | None = None,
                 deadline: float | None = None, rng: np.random.Generator | None = None) -> Path:
    """Load runs, draw every plot (PNG + PDF) and write ``report.html`` under ``out``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    runs = load_runs(paths)
    legend = group_runs(runs)
    colors = group_colors(runs)
    add_sim_time(runs, devices, deadline, rng or np.random.default_rng(0))
    wide = evaluation_wide(runs)
    images = [(caption, save_figure(plot(wide, legend, colors), out, name))
              for name, caption, plot in PLOTS]
    if any(not r.tables["clients"].empty for r in runs):
        images.append(("Communication", save_figure(plot_communication(runs, legend, colors), out,
                                                    "communication")))
    importance = plot_importance(runs, legend, colors)
    if importance is not None:
        images.append(("Importance spectrum", save_figure(importance, out, "importance")))
    budgets = pd.concat([r.tables["clients"].get("budget", pd.Series(dtype=float)) for r in runs])
    sections = [("Final accuracy per budget tier", final_table(wide, "tier")), *images,
                ("Final accuracy per rank fraction", final_table(wide, "fraction")),
                ("Runs", runs_table(runs, wide)),
                ("Device profiles of the simulated time", profiles_frame(profiles_for(budgets,
                                                                                      devices)))]
    page = write_html(out, "fl-maestro report", _notes(paths, runs, legend, deadline), sections)
    log.info("wrote %d plots and %s", len(images), page)
    return page


def _notes(paths: Sequence[str | Path], runs: Sequence[Run], legend: str,
           deadline: float | None) -> list[str]:
    groups = sorted({r.group for r in runs})
    return [f"Inputs: {', '.join(map(str, paths))} ({len(runs)} runs, {len(groups)} groups).",
            f"Groups: runs differ in {legend or 'the keys named in each group label'}; seed aside. "
            "Accuracy is the mean over a group's seeds, min/max/std across them.",
            "Simulated time is a post-hoc model (simulations.devices): each round lasts as long as "
            "its slowest client; " + (f"deadline {deadline:g} s (stragglers are counted, not "
            "removed from the merged model)." if deadline else "no deadline.")]


def main(argv: list[str] | None = None) -> int:
    """Command line: report on run or sweep folders."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("paths", nargs="+", help="run folders or sweep folders")
    parser.add_argument("--out", type=Path, help="output folder (default <first path>/report)")
    parser.add_argument("--devices", help="TOML of per-tier device profiles (simulations.devices)")
    parser.add_argument("--deadline", type=float, help="round deadline in simulated seconds")
    parser.add_argument("--seed", type=int, default=0, help="seed of the simulated dropouts")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    try:
        page = build_report(args.paths, args.out or Path(args.paths[0]) / "report",
                            load_profiles(args.devices), args.deadline,
                            np.random.default_rng(args.seed))
    except (ValueError, FileNotFoundError) as exc:
        parser.error(str(exc))
    print(page)
    return 0


if __name__ == "__main__":
    sys.exit(main())
