"""Experiments from Python (a notebook): run one in process, load finished runs, write a report.

    from simulations.api import load, run_experiment, write_report
    result = run_experiment({"dataset": "digits", "num-rounds": 3}, nodes=6, seeds=(0, 1))
    result.summary                  # group x tier: accuracy mean, 95% half-width, n, ...
    result.table("clients")         # every run's clients.csv, with run, group and seed columns
    write_report(result, "results/reports/digits")

``run_experiment`` drives the same ServerApp and ClientApp code as ``flwr run`` through
``simulations.inprocess`` (no SuperLink, no Ray), one run per seed. ``load`` reads run folders or
sweep folders as the report does and groups them by what differs between them.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from fl_maestro.config import parse_run_config
from fl_maestro.federation import run_federation
from simulations.inprocess import InProcessGrid
from simulations.report import Run, build_report, evaluation_wide, group_runs, load_runs
from simulations.stats import LAST_K, SLOPE_THRESHOLD
from simulations.summary import final_frame, run_convergence, summary_frame

log = logging.getLogger(__name__)


@dataclass
class Results:
    """Finished runs as DataFrames: the report's numbers without the page."""

    paths: list[Path]  # what was loaded (run or sweep folders)
    runs: list[Run]  # each with its config, tables and group label
    evaluation: pd.DataFrame  # every evaluation row, one column per metric (wide)
    final: pd.DataFrame  # per run, kind and level: last-k mean and last round accuracy
    converged: pd.DataFrame  # per run: the convergence verdict and its tail slope
    summary: pd.DataFrame  # per group and tier: the report's first table, in fractions

    def table(self, name: str) -> pd.DataFrame:
        """One result table (``evaluation``, ``clients``, ``rounds``, ``timeline``,
        ``components``) of every run, with ``run``, ``group`` and ``seed`` columns."""
        if not self.runs or name not in self.runs[0].tables:
            allowed = sorted(self.runs[0].tables) if self.runs else []
            raise ValueError(f"table {name!r} is unknown: allowed {allowed}")
        frames = [r.tables[name].assign(run=r.name, group=r.group, seed=r.seed)
                  for r in self.runs if not r.tables[name].empty]
        return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def load(*paths: str | Path, last_k: int = LAST_K, baseline: str | None = None,
         slope_threshold: float = SLOPE_THRESHOLD) -> Results:
    """Finished run folders or sweep folders as ``Results`` (grouped as the report groups them)."""
    if not paths:
        raise ValueError("load needs at least one run or sweep folder")
    runs = load_runs(paths)
    group_runs(runs)
    wide = evaluation_wide(runs)
    final = final_frame(wide, last_k)
    converged = run_convergence(wide, threshold=slope_threshold)
    return Results([Path(p) for p in paths], runs, wide, final, converged,
                   summary_frame(final, converged, baseline))


def run_experiment(config: Mapping[str, Any] | None = None, nodes: int = 10,
                   seeds: Sequence[int] = (0,), results_dir: str | Path = "results",
                   name: str | None = None) -> Results:
    """Run the federation in this process once per seed, with ``config``'s run-config keys over
    the defaults and ``nodes`` simulated clients; returns the runs loaded as ``Results``.

    Each run is written to ``<results_dir>/<name>-seed<seed>`` (``name`` defaults to
    ``notebook-<time>``); an existing folder of that name is refused unless ``resume`` is set.
    """
    if nodes < 1:
        raise ValueError(f"nodes={nodes!r} is out of range: allowed an integer >= 1")
    if not seeds:
        raise ValueError("seeds is empty: give at least one seed")
    name = name or time.strftime("notebook-%Y%m%d-%H%M%S")
    paths = []
    for seed in seeds:
        overrides = {**(config or {}), "seed": int(seed), "results-dir": str(results_dir),
                     "run-name": f"{name}-seed{seed}"}
        cfg = parse_run_config(overrides)  # refuses a bad key before anything runs
        log.info("run %s (%d nodes)", overrides["run-name"], nodes)
        run_federation(InProcessGrid(nodes, overrides), cfg)
        paths.append(Path(results_dir) / overrides["run-name"])
    return load(*paths)


def write_report(results: Results | str | Path | Sequence[str | Path], out: str | Path,
                 **options: Any) -> Path:
    """Write ``report.html`` (plots, CSV tables) under ``out`` for ``Results`` or run or sweep
    folders; ``options`` go to ``build_report`` (``last_k``, ``baseline``, ...). The page's path."""
    if isinstance(results, Results):
        paths = results.paths
    elif isinstance(results, (str, Path)):
        paths = [results]
    else:
        paths = list(results)
    return build_report(paths, out, **options)
