"""Plots and one offline HTML page from run folders and sweep folders.

    python -m simulations.report results/sweeps/budget-mixes --out results/reports/budget-mixes
    fl-maestro-report results/run-a results/run-b

Runs are grouped by the config keys that differ between them (seed aside; ``supernodes`` from a
sweep cell's ``cell.json`` too); a group's seeds are drawn and tabled as their mean with a 95%
t-interval and n (``simulations.stats``). Final accuracy is the mean over the last ``--last-k``
evaluated rounds (default 5), with the last round beside it in the tables; groups are compared
with ``--baseline`` (default: the first group) by differences paired on the seed, and every tier
with its group's lowest tier by differences paired on the run. Every run is judged converged or
not (``--slope-threshold``). Where runs kept their per-component table, coverage, movement from
init and importance spectra are drawn (``simulations.diagnostics``). Each plot is written as PNG
and PDF, and ``report.html`` embeds the PNGs and the tables; the tables are also saved as CSV.
Simulated time is each run's own clock (``rounds.csv``: ``sim-time`` at each round's end), which
its device world moved during the run (``fl_maestro.world``).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from fl_maestro.devices import parse_profiles, profiles_for, profiles_frame
from fl_maestro.methods import METHODS
from fl_maestro.results import TABLES, RunStore
from fl_maestro.world import DROPPED, OUTCOMES
from simulations.diagnostics import (components_frame, coverage_table, full_budget_clients,
                                     plot_coverage, plot_full_budget_clients, plot_movement)
from simulations.runs import Run
from simulations.plots import (group_colors, plot_accuracy_over_time, plot_accuracy_vs_fraction,
                               plot_communication, plot_importance, plot_pareto,
                               plot_tier_accuracy, save_figure)
from simulations.stats import LAST_K, SLOPE_THRESHOLD
from simulations.page import summary_html, summary_markdown, write_html
from simulations.tuning import tuning_tables
from simulations.summary import (NOTES, accuracy_at_time, default_baseline, final_frame, final_table,
                                 group_differences, run_convergence, summary_frame,
                                 tier_differences)

log = logging.getLogger(__name__)

IGNORED_KEYS = ("run-name", "results-dir", "resume", "seed")


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
    axes = {}
    if cell.exists():
        info = json.loads(cell.read_text())
        config["supernodes"] = info.get("supernodes")
        axes = info.get("axes", {})
    return Run(path.name, path, config, int(config.get("seed", 0)),
               {t: store.read(t) for t in TABLES}, axes=axes)


def load_runs(paths: Sequence[str | Path]) -> list[Run]:
    """Every run under ``paths``; same-named runs of different sweeps get the sweep as prefix."""
    runs = [load_run(p) for p in find_runs(paths)]
    names = [r.name for r in runs]
    for run in runs:
        if names.count(run.name) > 1:
            run.name = f"{run.path.parent.name}/{run.name}"
    return runs


def group_runs(runs: Sequence[Run]) -> str:
    """Set every run's group label from what varies; returns the legend title.

    Runs of one sweep are labelled by its axes' level names (e.g. ``method=fjord``); other runs
    by the config keys whose values differ between them.
    """
    use_axes = all(r.axes for r in runs) and len({json.dumps(r.axes) for r in runs}) > 1
    values = (lambda r: r.axes) if use_axes else (lambda r: r.config)  # noqa: E731
    keys = sorted({k for r in runs for k in values(r)} - set(IGNORED_KEYS))
    varying = [k for k in keys if len({json.dumps(values(r).get(k)) for r in runs}) > 1]
    for run in runs:
        if len(varying) == 1:
            run.group = str(values(run).get(varying[0]))
        elif varying:
            run.group = ", ".join(f"{k}={values(run).get(k)}" for k in varying)
        else:
            run.group = run.name if len({r.name for r in runs}) == 1 else "all runs"
    return varying[0] if len(varying) == 1 else ""


def time_at_rounds(rounds: pd.DataFrame, at: Sequence[int]) -> np.ndarray:
    """The run's simulated clock after each round in ``at`` (0 before round 1; NaN for a run
    made before the clock was recorded)."""
    if "sim-time" not in rounds:
        return np.full(len(at), np.nan)
    clock = rounds.set_index("round")["sim-time"]
    clock = pd.concat([pd.Series({0: 0.0}), clock[clock.index > 0]]).sort_index()
    positions = clock.index.searchsorted(np.asarray(list(at)), side="right") - 1
    return clock.to_numpy()[np.clip(positions, 0, None)]


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
        sim = time_at_rounds(run.tables["rounds"], wide["round"].tolist())
        frames.append(wide.assign(group=run.group, run=run.name, seed=run.seed,
                                  **{"sim-seconds": sim}))
    if not frames:
        raise ValueError("no run has evaluation rows: nothing to report")
    return pd.concat(frames, ignore_index=True)


def runs_table(runs: Sequence[Run], wide: pd.DataFrame, converged: pd.DataFrame) -> pd.DataFrame:
    """One row per run: group, seed, rounds, final full-rank accuracy, simulated time, what
    became of the sampled clients, and whether it converged."""
    rows = []
    for run in runs:
        mine = wide[(wide["run"] == run.name) & wide["final"] & (wide["kind"] == "fraction")]
        full = mine.loc[mine["level"].idxmax(), "accuracy"] if len(mine) else np.nan
        rounds = run.tables["rounds"]
        counts = {f"dropped-{o}": int(rounds[f"dropped-{o}"].sum()) if f"dropped-{o}" in rounds
                  else 0 for o in DROPPED}
        rows.append({"run": run.name, "group": run.group, "seed": run.seed,
                     "rounds": int(run.tables["evaluation"]["round"].max()),
                     "full-rank accuracy": full,
                     "simulated seconds": float(rounds["sim-time"].max())
                     if "sim-time" in rounds else np.nan,
                     "partial": int(rounds["partial"].sum()) if "partial" in rounds else 0,
                     **counts})
    return pd.DataFrame(rows).merge(converged, on="run", how="left")


def outcomes_table(runs: Sequence[Run]) -> pd.DataFrame:
    """Per group and budget tier: sampled clients and the share of each outcome (over seeds)."""
    frames = [r.tables["clients"].assign(group=r.group) for r in runs
              if "outcome" in r.tables["clients"]]
    if not frames:
        return pd.DataFrame()
    clients = pd.concat(frames, ignore_index=True)
    shares = pd.crosstab([clients["group"], clients["budget"]], clients["outcome"],
                         normalize="index")
    shares = shares.reindex(columns=[o for o in OUTCOMES if o in shares.columns])
    sampled = clients.groupby(["group", "budget"]).size().rename("sampled")
    steps = clients.groupby(["group", "budget"]).apply(
        lambda g: g["steps"].sum() / g["planned-steps"].sum(), include_groups=False)
    table = pd.concat([sampled, shares, steps.rename("steps done / planned")], axis=1)
    order = {g: i for i, g in enumerate(dict.fromkeys(r.group for r in runs))}
    return table.reset_index().sort_values(["group", "budget"], key=lambda c: c.map(order)
                                           if c.name == "group" else c)


SETTINGS = ("lr", "momentum", "weight-decay", "batch-size", "local-epochs", "clip-grad-norm")


def methods_table(runs: Sequence[Run]) -> pd.DataFrame:
    """Per group, the method its runs ran as the registry describes it (family, summary, paper)
    and its optimiser settings (distinct values joined when the group's runs differ)."""
    rows = []
    for group in dict.fromkeys(r.group for r in runs):
        mine = [r for r in runs if r.group == group]
        strategy = str(mine[0].config.get("strategy", ""))
        method = METHODS.get(strategy)
        settings = {k: ", ".join(dict.fromkeys(str(r.config.get(k, "")) for r in mine))
                    for k in SETTINGS}
        rows.append({"group": group, "strategy": strategy,
                     "family": method.family if method else "", "runs": len(mine),
                     **settings, "summary": method.summary if method else "(not registered)",
                     "paper": method.paper if method else ""})
    return pd.DataFrame(rows)


def profiles_table(runs: Sequence[Run]) -> pd.DataFrame:
    """The device profiles the runs used, one block per distinct ``device-profiles`` value."""
    frames = []
    for text in dict.fromkeys(str(r.config.get("device-profiles", "")) for r in runs):
        budgets = sorted({float(b) for r in runs if str(r.config.get("device-profiles", "")) == text
                          for b in r.tables["clients"].get("budget", pd.Series(dtype=float))})
        try:
            frame = profiles_frame(profiles_for(budgets, parse_profiles(text)))
        except ValueError as err:  # e.g. a profile file no longer where the run read it
            log.warning("device profiles %r: %s", text, err)
            continue
        frames.append(frame.assign(**{"device-profiles": text or "(defaults)"}))
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


PLOTS = (("tier-accuracy", "Accuracy per budget tier", plot_tier_accuracy),
         ("pareto", "Accuracy vs MACs", plot_pareto),
         ("accuracy-vs-fraction", "Accuracy vs rank fraction", plot_accuracy_vs_fraction))


def build_report(paths: Sequence[str | Path], out: str | Path, last_k: int = LAST_K,
                 baseline: str | None = None, slope_threshold: float = SLOPE_THRESHOLD) -> Path:
    """Load runs, draw every plot (PNG + PDF) and write ``report.html`` (and the tables as CSV)
    under ``out``: the summary table and the first two plots first, the rest folded below."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    runs = load_runs(paths)
    legend = group_runs(runs)
    colors = group_colors(runs)
    wide = evaluation_wide(runs)
    finals = final_frame(wide, last_k)
    converged = run_convergence(wide, threshold=slope_threshold)
    components, full = components_frame(runs), full_budget_clients(runs)  # tables and plots
    base = (baseline or default_baseline(finals)) if finals["group"].nunique() > 1 else None
    tables = _tables(runs, wide, finals, converged, base, components, full)
    images = _images(runs, wide, finals, legend, colors, out, components, full)
    tables += [("methods", "The methods: what each group ran (the method registry) and its "
                "optimiser settings", methods_table(runs)),
               ("outcomes", "What became of the sampled clients, per budget tier (shares of "
                "sampled)", outcomes_table(runs)),
               ("device-profiles", "Device profiles of the simulated clock", profiles_table(runs))]
    tuned = tuning_tables(paths)
    if not tuned.empty:
        tables.append(("tuning", "Tuning: every method x grid point, validation accuracy of the "
                       "final round (tuning seed; confirm-*: the best points again on a second seed, "
                       "score: the mean of both; 'chosen' is what the comparison ran)", tuned))
    for name, _, table in tables:
        table.to_csv(out / f"{name}.csv", index=False)
    summary = summary_frame(finals, converged, base)
    summary.to_csv(out / "summary.csv", index=False)
    (out / "summary.md").write_text(summary_markdown(summary, base))
    page = write_html(out, "fl-maestro report", _lead(paths, runs, legend),
                      [summary_html(summary, base), *images[:2]],
                      _folded(tables, images[2:], _notes(legend, last_k, slope_threshold, runs)))
    log.info("wrote %d plots and %s", len(images), page)
    return page


def _folded(tables: list[tuple[str, str, pd.DataFrame]], images: list[tuple[str, Path]],
            notes: list[str]) -> list[tuple[str, list]]:
    """Everything after the first screen, under headings: accuracy tables, plots, diagnostics."""
    by_name = {name: (caption, table) for name, caption, table in tables}
    accuracy = [by_name[n] for n in ("final-tier", "group-differences", "tier-differences",
                                     "accuracy-at-time", "final-fraction") if n in by_name]
    diagnostics = [by_name[n] for n in ("runs", "outcomes", "device-profiles", "coverage")
                   if n in by_name]
    late = ("Coverage", "Movement from initialisation and importance", "Importance spectrum",
            "Full-budget clients per round")
    return [("Accuracy in detail (percent)", accuracy),
            ("More plots", [i for i in images if i[0] not in late]),
            ("Diagnostics", [*diagnostics, *[i for i in images if i[0] in late]]),
            ("Method", [*[by_name[n] for n in ("methods", "tuning") if n in by_name],
                        ("How the numbers are made", "\n\n".join(notes))])]


def _tables(runs: Sequence[Run], wide: pd.DataFrame, finals: pd.DataFrame,
            converged: pd.DataFrame, base: str | None, components: pd.DataFrame,
            full: pd.DataFrame) -> list[tuple[str, str, pd.DataFrame]]:
    """The report's tables as (file name, caption, table), in page order (``base``: the group
    the others are compared with; None for a single group)."""
    tables = [("final-tier", "Final accuracy per budget tier",
               final_table(finals, "tier", converged))]
    tiers = tier_differences(finals)
    if not tiers.empty:
        tables.append(("tier-differences",
                       "Each tier minus its group's lowest tier (paired by run)", tiers))
    if base is not None:
        tables.append(("group-differences", f"Each group minus {base} (paired by seed)",
                       group_differences(finals, base)))
    if not components.empty:
        tables.append(("coverage", "Coverage per layer", coverage_table(components, full)))
    at_time = accuracy_at_time(wide)
    if not at_time.empty and base is not None:
        tables.append(("accuracy-at-time", "Accuracy at equal simulated time: each run's last "
                       f"evaluation within {at_time.attrs['at']:.0f} simulated seconds (the "
                       "shortest run's clock), and each group's simulated seconds per round",
                       at_time))
    tables += [("final-fraction", "Final accuracy per rank fraction",
                final_table(finals, "fraction", converged)),
               ("runs", "Runs", runs_table(runs, wide, converged))]
    return tables


def _images(runs: Sequence[Run], wide: pd.DataFrame, finals: pd.DataFrame, legend: str,
            colors: dict, out: Path, components: pd.DataFrame,
            full: pd.DataFrame) -> list[tuple[str, Path]]:
    """Every plot the runs allow, saved under ``out``: (caption, PNG path) pairs."""
    figures = [(caption, name, plot(finals, legend, colors)) for name, caption, plot in PLOTS]
    figures.append(("Accuracy vs round and simulated time", "accuracy-over-time",
                    plot_accuracy_over_time(wide, legend, colors)))
    if any(not r.tables["clients"].empty for r in runs):
        figures.append(("Communication", "communication",
                        plot_communication(runs, legend, colors)))
        if not full.empty:
            figures.append(("Full-budget clients per round", "full-budget-clients",
                            plot_full_budget_clients(full, colors)))
    if not components.empty:
        figures.append(("Coverage", "coverage", plot_coverage(components, colors)))
        movement = plot_movement(components, colors)
        if movement is not None:
            figures.append(("Movement from initialisation and importance", "movement", movement))
    importance = plot_importance(runs, legend, colors)
    if importance is not None:
        figures.append(("Importance spectrum", "importance", importance))
    return [(caption, save_figure(fig, out, name)) for caption, name, fig in figures]


def _lead(paths: Sequence[str | Path], runs: Sequence[Run], legend: str) -> str:
    groups = len({r.group for r in runs})
    lead = (f"{len(runs)} runs in {groups} groups from {', '.join(map(str, paths))}; groups differ "
            f"in {legend or 'the keys named in each group label'} (seed aside).")
    missing = unfinished_cells(paths)
    if missing:
        lead += (f" Left out, {len(missing)} sweep cell(s) that did not finish: "
                 f"{'; '.join(missing)}.")
    return lead


def unfinished_cells(paths: Sequence[str | Path]) -> list[str]:
    """The cells of the sweep folders among ``paths`` whose ``cells.csv`` status is not done,
    as "cell-id: status, round N (error)" (the report leaves their runs out)."""
    out = []
    for path in map(Path, paths):
        if not (path / "cells.csv").exists():
            continue
        cells = pd.read_csv(path / "cells.csv", dtype={"cell-id": str})
        if "status" not in cells:
            continue
        for row in cells[cells["status"] != "done"].to_dict("records"):
            rounds = "" if pd.isna(row.get("rounds")) else f", round {int(row['rounds'])}"
            error = "" if pd.isna(row.get("error")) else f" ({row['error']})"
            out.append(f"{row['cell-id']}: {row['status']}{rounds}{error}")
    return out


def _notes(legend: str, last_k: int, slope_threshold: float, runs: Sequence[Run]) -> list[str]:
    policies = sorted({f"{r.config.get('deadline-policy', 'wait')}"
                       + (f" at {r.config['round-deadline']:g} s"
                          if r.config.get("deadline-policy", "wait") != "wait" else "")
                       for r in runs})
    return [f"Groups: runs differ in {legend or 'the keys named in each group label'}; seed aside. "
            f"Final accuracy is taken at the horizon: the mean over each run's last {last_k} "
            "evaluated rounds within its final fifth of rounds (the last round alone beside "
            "it), then the mean over the group's seeds.",
            NOTES,
            f"Converged: the slope of the run's accuracy (mean over its tiers), smoothed by a "
            f"trailing mean of 5 evaluated rounds and fitted over its last fifth of rounds, is "
            f"under {slope_threshold:g} per round in size.",
            "Simulated time is each run's own clock (fl_maestro.world): a round lasts until its "
            "last merged reply, until the deadline when a reply it waits for is missing, or as "
            "long as its slowest client without a deadline. Deadline policies here: "
            f"{', '.join(policies)}."]


def main(argv: list[str] | None = None) -> int:
    """Command line: report on run or sweep folders."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("paths", nargs="+", help="run folders or sweep folders")
    parser.add_argument("--out", type=Path, help="output folder (default <first path>/report)")
    parser.add_argument("--last-k", type=int, default=LAST_K,
                        help="final accuracy: mean over this many last evaluated rounds")
    parser.add_argument("--baseline", help="group the others are compared with (default: first)")
    parser.add_argument("--slope-threshold", type=float, default=SLOPE_THRESHOLD,
                        help="converged: |slope| of the smoothed accuracy per round under this")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    try:
        page = build_report(args.paths, args.out or Path(args.paths[0]) / "report", args.last_k,
                            args.baseline, args.slope_threshold)
    except (ValueError, FileNotFoundError) as exc:
        parser.error(str(exc))
    print(page)
    return 0


if __name__ == "__main__":
    sys.exit(main())
