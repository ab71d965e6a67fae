"""Run a scenario's cartesian product of axes x seeds, one ``flwr run`` per cell, resumably.

    python -m simulations.sweep budget-mixes --seeds 0,1,2 --set num-rounds=30
    python -m simulations.sweep strategies --set strategy=rankwise --dry-run

Every cell is a run folder ``<out>/<cell-id>/`` (results-dir = the sweep folder, run-name = the cell
id). Re-running the same command skips cells whose checkpoint reached num-rounds, resumes cells with
an earlier checkpoint (``resume=true``) and starts the others afresh; a failing cell is recorded in
``<out>/cells.csv`` and the sweep goes on. After every cell the finished cells' tables are gathered
into ``<out>/{evaluation,clients,rounds}.csv`` with the cell's axes and seed as extra columns.

``--set key=value`` adds a run-config override to every cell; on a key that is an axis it pins the
axis to that value (the cell ids stay those of the full sweep). ``--set supernodes=N`` sizes the
federation.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import replace
from pathlib import Path
from typing import Any

import pandas as pd

from fl_maestro.config import parse_run_config
from fl_maestro.federation import RESUMABLE_CHANGES
from fl_maestro.results import TABLES, RunStore
from simulations.cells import (Cell, RunCell, apply_sets, build_cells,  # noqa: F401
                               cell_id, slug)  # (also the sweep's public names)
from simulations.tuning import (CONFIRM_DIR, TUNING_DIR, Tuning, add_tuning_arguments,
                                best_points, choices, choose, chosen_from_table, confirmed,
                                diverged_clients, tuning_from_args, tuning_scenario,
                                validation_scores, write_table)
from simulations.launch import exit_on_sigterm, parse_overrides
from simulations.runners import FlowerCells, InProcessCells
from simulations.scenarios import SUPERNODES, Scenario, get_scenario
from simulations.stats import SLOPE_THRESHOLD
from simulations.until import Until, with_rounds

log = logging.getLogger(__name__)

# Keys whose change leaves a cell's finished rounds valid (num-rounds is judged by the checkpoint;
# results-dir changes when a sweep folder is moved).
KEEPS_RESULTS = RESUMABLE_CHANGES
CELL_FILE = "cell.json"  # axes and federation size of a cell, read by the report
STALE_FILES = (*(f"{t}.csv" for t in TABLES), "config.json")


# --------------------------------------------------------------------------- running


def cell_state(run_dir: Path, num_rounds: int) -> tuple[str, int | None]:
    """("done" | "partial" | "new", checkpoint round) of a cell's run folder."""
    rnd = RunStore(run_dir).checkpoint_round() if (run_dir / "checkpoint.json").exists() else None
    if rnd is None:
        return "new", None
    return ("done" if rnd >= num_rounds else "partial"), rnd


def check_existing(cells: Sequence[Cell], out_dir: Path) -> None:
    """ValueError if a cell's folder holds a run made with other settings (it would be reused)."""
    conflicts = []
    for cell in cells:
        path = out_dir / cell.cell_id / "config.json"
        if not (out_dir / cell.cell_id / "checkpoint.json").exists() or not path.exists():
            continue
        saved, wanted = json.loads(path.read_text()), parse_run_config(cell.run_config).to_dict()
        changed = {k: (saved[k], v) for k, v in wanted.items()
                   if k in saved and k not in KEEPS_RESULTS and saved[k] != v}
        if changed:
            conflicts.append(f"{cell.cell_id}: {changed}")
    if conflicts:
        raise ValueError(f"{out_dir} holds runs made with other settings (saved, now): "
                         f"{'; '.join(conflicts[:3])}{' ...' if len(conflicts) > 3 else ''}; "
                         "choose another --out or remove those cell folders")


def run_sweep(cells: Sequence[Cell], run_cell: RunCell, out_dir: Path,
              until: Until | None = None, jobs: int = 1) -> pd.DataFrame:
    """Run every unfinished cell through ``run_cell``, ``jobs`` at a time; returns (and writes)
    the cells table.

    With ``until`` a cell is finished only once it converged or reached the cap."""
    if isinstance(jobs, bool) or not isinstance(jobs, int) or jobs < 1:
        raise ValueError(f"jobs={jobs!r}: allowed an integer >= 1")
    check_existing(cells, out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    previous = _read_cells(out_dir)
    records = {c.cell_id: _record(c, out_dir, previous.get(c.cell_id, {}), until) for c in cells}
    todo = [c for c in cells if records[c.cell_id]["status"] != "done"]
    log.info("%d cells: %d already done, %d to run", len(cells), len(cells) - len(todo), len(todo))
    _write_cells(out_dir, records)
    started, done = time.monotonic(), 0
    with ThreadPoolExecutor(max_workers=jobs) as pool:  # one job: one cell after another
        pending = {}
        queue = list(todo)
        while queue or pending:
            while queue and len(pending) < jobs:
                cell = queue.pop(0)
                log.info("cell %d/%d: %s", len(todo) - len(queue), len(todo), cell.cell_id)
                pending[pool.submit(_run_one, cell, run_cell, out_dir, until)] = cell
            finished, _ = wait(pending, return_when=FIRST_COMPLETED)
            for future in finished:  # records and tables are written by this thread only
                records[pending.pop(future).cell_id] = future.result()
                done += 1
                _write_cells(out_dir, records)
                gather(cells, out_dir)
                _log_progress(records, done, len(todo), started)
    if not todo:
        gather(cells, out_dir)
    return pd.DataFrame(records.values())


def _record(cell: Cell, out_dir: Path, previous: Mapping[str, Any],
            until: Until | None = None) -> dict[str, Any]:
    state, rnd = cell_state(out_dir / cell.cell_id, cell.num_rounds)
    status = {"done": "done", "partial": "partial"}.get(state, "pending")
    extra = {}
    if until is not None and state == "done":
        verdict = until.verdict(out_dir / cell.cell_id)
        extra = {"converged": verdict.converged, "tail-slope": verdict.slope}
        if until.target(cell, rnd, out_dir / cell.cell_id) is not None:
            status = "partial"
    kept = previous.get("status") == status and status != "pending"
    return {"cell-id": cell.cell_id, **cell.axes, "seed": cell.seed, "supernodes": cell.supernodes,
            **{f"tuned-{k}": v for k, v in cell.tuned.items()}, "status": status, "rounds": rnd, "num-rounds": cell.num_rounds, **extra,
            "seconds": previous.get("seconds") if kept else None,
            "error": previous.get("error") if kept and status != "done" else None}


def _run_one(cell: Cell, run_cell: RunCell, out_dir: Path, until: Until | None
             ) -> dict[str, Any]:
    run_dir = out_dir / cell.cell_id
    state, rounds = cell_state(run_dir, cell.num_rounds)
    if state == "new":  # tables left by a run that died before its first checkpoint
        for name in STALE_FILES:
            (run_dir / name).unlink(missing_ok=True)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / CELL_FILE).write_text(json.dumps(
        {"cell-id": cell.cell_id, "axes": dict(cell.axes), "seed": cell.seed,
         SUPERNODES: cell.supernodes}, indent=1))
    start, error = time.monotonic(), None
    try:
        code = _run_to_the_end(cell, run_cell, run_dir, rounds, until)
    except Exception as exc:  # a broken cell must not stop the sweep
        log.exception("cell %s raised", cell.cell_id)
        code, error = None, f"{type(exc).__name__}: {exc}"
    record = _record(cell, out_dir, {}, until)
    record["seconds"] = round(time.monotonic() - start, 1)
    if record["status"] != "done":
        record["status"] = "failed"
        # `flwr run --stream` exits 0 even when the ServerApp raises: the checkpoint tells
        record["error"] = error or (f"exit code {code}" if code else
                                    f"exit code 0 but checkpoint round is {record['rounds']} "
                                    f"of {cell.num_rounds}: the ServerApp failed, see its log")
        log.error("cell %s failed: %s", cell.cell_id, record["error"])
    return record


def _run_to_the_end(cell: Cell, run_cell: RunCell, run_dir: Path, rounds: int | None,
                    until: Until | None) -> int:
    """Run the cell to its rounds and, with ``until``, on until it is finished; the exit code."""
    target = cell.num_rounds if until is None else until.target(cell, rounds, run_dir)
    code = 0
    while target is not None:
        code = run_cell(with_rounds(cell, target), rounds is not None)
        rounds = RunStore(run_dir).checkpoint_round()
        if code != 0 or rounds is None or rounds < target or until is None:
            break
        target = until.target(cell, rounds, run_dir)
        if target is not None:
            log.info("cell %s not converged after %d rounds: on to %d", cell.cell_id, rounds,
                     target)
    return code


def _log_progress(records: Mapping[str, Mapping], i: int, n: int, started: float) -> None:
    statuses = [r["status"] for r in records.values()]
    per_cell = (time.monotonic() - started) / i
    log.info("%d/%d cells done, %d failed, %d left to try | %.0f s/cell | ETA %.1f min",
             statuses.count("done"), len(statuses), statuses.count("failed"), n - i, per_cell,
             per_cell * (n - i) / 60)


def _read_cells(out_dir: Path) -> dict[str, dict[str, Any]]:
    path = out_dir / "cells.csv"
    if not path.exists():
        return {}
    frame = pd.read_csv(path, dtype={"cell-id": str})
    return {row["cell-id"]: {k: (None if pd.isna(v) else v) for k, v in row.items()}
            for row in frame.to_dict("records")}


def _write_cells(out_dir: Path, records: Mapping[str, Mapping]) -> None:
    frame = pd.DataFrame(list(records.values()))
    frame["rounds"] = frame["rounds"].astype("Int64")
    _write_csv(frame, out_dir / "cells.csv")


def _write_csv(frame: pd.DataFrame, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    frame.to_csv(tmp, index=False)
    os.replace(tmp, path)


def gather(cells: Sequence[Cell], out_dir: Path) -> dict[str, pd.DataFrame]:
    """Concatenate finished cells' tables, with axis and seed columns, into <out>/<table>.csv."""
    frames: dict[str, list[pd.DataFrame]] = {t: [] for t in TABLES}
    for cell in cells:
        if cell_state(out_dir / cell.cell_id, cell.num_rounds)[0] != "done":
            continue  # (checked first: RunStore creates the folder)
        store = RunStore(out_dir / cell.cell_id)
        extra = {"cell-id": cell.cell_id, **cell.axes, "seed": cell.seed}
        for table in TABLES:
            frame = store.read(table)
            if not frame.empty:
                frames[table].append(frame.assign(**extra)[[*extra, *frame.columns]])
    gathered = {t: pd.concat(f, ignore_index=True) for t, f in frames.items() if f}
    for table, frame in gathered.items():
        _write_csv(frame, out_dir / f"{table}.csv")
    return gathered


# --------------------------------------------------------------------------- tuning


def tune(scenario: Scenario, cells: Sequence[Cell], tuning: Tuning, out: Path, run_cell: RunCell,
         jobs: int = 1, table: pd.DataFrame | None = None) -> tuple[list[Cell], pd.DataFrame]:
    """Run the grid for every method (unless ``table`` is its finished result), then, with
    ``tuning.confirm``, each method's best points on the second seed; choose each method's point.
    The comparison's cells at their method's choice, and the tuning table (also written to
    ``<out>/tuning/table.csv``)."""
    folder = out / TUNING_DIR
    method_axes = [ax.name for ax in scenario.axes]
    grid_keys = list(tuning.grid)
    order = [{k: str(v) for k, v in point.items()} for point in tuning.points()]
    if table is None:
        table = _grid_runs(tuning_scenario(scenario, tuning), tuning.seed, folder, run_cell, jobs,
                           method_axes, grid_keys)
        table = choose(table, method_axes, grid_keys, order)
        table = table.assign(**{"tuning-seed": tuning.seed, "horizon": tuning.rounds})
    top = best_points(table, method_axes, grid_keys, order, tuning.confirm)
    if tuning.confirm and not top.empty:
        second = _grid_runs(tuning_scenario(scenario, tuning, tuning.confirm_seed),
                            tuning.confirm_seed, folder / CONFIRM_DIR, run_cell, jobs,
                            method_axes, grid_keys, only=top)
        table = confirmed(table, second, method_axes, grid_keys, order)
        table = table.assign(**{"confirm-seed": tuning.confirm_seed})
    write_table(table, folder)
    chosen = choices(table, method_axes, tuning.grid)
    tuned, missing = _at_choices(cells, chosen, method_axes)
    if missing:
        where = (f"every point it confirmed failed on seed {tuning.confirm_seed} (see "
                 f"{folder / CONFIRM_DIR / 'cells.csv'}; a larger --tune-confirm tries more)"
                 if "score" in table else f"every run failed (see {folder / 'cells.csv'})")
        raise RuntimeError(f"tuning found no usable grid point for {missing}: {where}")
    return tuned, table


def _grid_runs(grid_scenario: Scenario, seed: int, folder: Path, run_cell: RunCell, jobs: int,
               method_axes: Sequence[str], grid_keys: Sequence[str],
               only: pd.DataFrame | None = None) -> pd.DataFrame:
    """Run the grid's cells on ``seed`` in ``folder`` (only the labels of ``only``, if given):
    per method and grid point its cell, status, validation accuracy and diverged clients."""
    labels = [*method_axes, *grid_keys]
    cells = build_cells(grid_scenario, [seed], folder)
    if only is not None:
        wanted = set(map(tuple, only[labels].astype(str).to_numpy()))
        cells = [c for c in cells if tuple(str(c.axes[k]) for k in labels) in wanted]
    status = run_sweep(cells, run_cell, folder, jobs=jobs)
    evaluation = pd.read_csv(folder / "evaluation.csv", dtype={c: str for c in labels}) \
        if (folder / "evaluation.csv").exists() else pd.DataFrame(columns=[*labels, "metric"])
    # Only this call's finished cells: the folder's gathered table may hold older runs.
    done = status.loc[status["status"] == "done", "cell-id"]
    evaluation = evaluation[evaluation["cell-id"].isin(done)] if "cell-id" in evaluation \
        else evaluation.iloc[0:0]
    scores = validation_scores(evaluation, method_axes, grid_keys)
    scores = scores.merge(diverged_clients(folder, labels, list(done)), on=labels, how="left")
    # Failed points stay in the table with no accuracy, so the grid is complete on the page.
    every = status[["cell-id", *labels, "status"]].astype({c: str for c in labels})
    return every.merge(scores, on=labels, how="left")


def tuned_cells(scenario: Scenario, cells: Sequence[Cell], table_path: Path
                ) -> tuple[list[Cell], pd.DataFrame]:
    """The cells at their method's choice in a finished tuning table, and the table."""
    method_axes = [ax.name for ax in scenario.axes]
    chosen, table = chosen_from_table(table_path, method_axes)
    tuned, missing = _at_choices(cells, chosen, method_axes)
    if missing:
        raise ValueError(f"--tuned {table_path}: no chosen setting for {missing}")
    return tuned, table


def _at_choices(cells: Sequence[Cell], chosen: Mapping[tuple[str, ...], Mapping[str, Any]],
                method_axes: Sequence[str]) -> tuple[list[Cell], list[tuple[str, ...]]]:
    """The cells at their method's choice, and the methods (axis labels) without one."""
    def method(cell: Cell) -> tuple[str, ...]:
        return tuple(cell.axes[a] for a in method_axes)
    missing = sorted({method(c) for c in cells} - set(chosen))
    return [with_choice(c, chosen[method(c)]) for c in cells if method(c) in chosen], missing


def with_choice(cell: Cell, choice: Mapping[str, Any]) -> Cell:
    """The cell run at the tuned values (validated as a run config)."""
    run_config = {**cell.run_config, **choice}
    parse_run_config(run_config)
    return replace(cell, run_config=run_config, tuned=dict(choice))



# --------------------------------------------------------------------------- CLI


def parse_seeds(text: str) -> list[int]:
    """``"0,1,2"`` to ``[0, 1, 2]``; ValueError naming the bad entry."""
    try:
        seeds = [int(s) for s in text.split(",")]
    except ValueError:
        raise ValueError(f"--seeds {text!r} is malformed: allowed comma-separated integers >= 0") \
            from None
    if any(s < 0 for s in seeds):
        raise ValueError(f"--seeds {text!r} has a negative seed: allowed integers >= 0")
    return seeds


def write_sweep_info(out: Path, scenario: Scenario, seeds: Sequence[int]) -> None:
    """Record what the sweep crosses in ``<out>/sweep.json`` (provenance for later readers)."""
    out.mkdir(parents=True, exist_ok=True)
    info = {"scenario": scenario.name, "description": scenario.description,
            "overrides": dict(scenario.overrides), "supernodes": scenario.supernodes,
            "axes": {ax.name: {lv.label: dict(lv.values) for lv in ax.levels}
                     for ax in scenario.axes},
            "seeds": list(seeds)}
    (out / "sweep.json").write_text(json.dumps(info, indent=1))


def main(argv: list[str] | None = None) -> int:
    """Command line: run (or list, with --dry-run) a scenario's sweep."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("scenario", help="a name from simulations.scenarios.SCENARIOS")
    parser.add_argument("--out", type=Path, help="sweep folder (default results/sweeps/<scenario>)")
    parser.add_argument("--seeds", help="comma-separated seeds (default: the scenario's)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="run-config override for every cell, or pin an axis (repeatable)")
    parser.add_argument("--cpus-per-client", type=int, default=1,
                        help="CPUs per client actor (Flower takes an integer)")
    parser.add_argument("--timeout", type=float, help="seconds one run of a cell may take")
    parser.add_argument("--runner", choices=("flower", "inprocess"), default="flower",
                        help="flwr run on a private SuperLink, or simulations.inprocess")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads of an inprocess cell")
    parser.add_argument("--until-converged", type=int, metavar="CAP",
                        help="run each cell on, --chunk rounds at a time, until it converged "
                             "or reached CAP rounds")
    parser.add_argument("--chunk", type=int, default=20, help="rounds added per step (default 20)")
    parser.add_argument("--slope-threshold", type=float, default=SLOPE_THRESHOLD,
                        help="converged: |slope| of the smoothed accuracy per round under this")
    parser.add_argument("--jobs", type=int, default=1,
                        help="cells run at once (inprocess runner only; default 1)")
    add_tuning_arguments(parser)
    parser.add_argument("--dry-run", action="store_true", help="list the cells and their state")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    exit_on_sigterm()
    try:
        scenario = apply_sets(get_scenario(args.scenario), parse_overrides(args.set))
        seeds = parse_seeds(args.seeds) if args.seeds else list(scenario.seeds)
        out = args.out or Path("results/sweeps") / scenario.name
        cells = build_cells(scenario, seeds, out)
        until = (Until(args.until_converged, args.chunk, args.slope_threshold)
                 if args.until_converged else None)
        tuned_table = None
        if args.tuned is not None:
            if args.tune:
                raise ValueError("--tuned and --tune exclude each other: run at a finished "
                                 "table's choices, or tune again")
            cells, tuned_table = tuned_cells(scenario, cells, args.tuned)
        tuning = tuning_from_args(args, seeds, tuned_table, [ax.name for ax in scenario.axes])
        if tuning is None:  # a tuned sweep's cells are checked at their tuned settings
            check_existing(cells, out)
        if args.jobs != 1 and args.runner != "inprocess":
            raise ValueError(f"--jobs {args.jobs}: cells run side by side only with "
                             "--runner inprocess (the flower runner shares one SuperLink)")
    except ValueError as exc:
        parser.error(str(exc))
    if not args.dry_run:
        write_sweep_info(out, scenario, seeds)
        if tuned_table is not None and tuning is None:  # the report shows what was run
            write_table(tuned_table, out / TUNING_DIR)
    if args.dry_run:
        rows = [{"cell-id": c.cell_id, "state": cell_state(out / c.cell_id, c.num_rounds)[0],
                 "supernodes": c.supernodes} for c in cells]
        print(pd.DataFrame(rows).to_string(index=False))
        return 0
    runner = (FlowerCells(args.cpus_per_client, args.timeout) if args.runner == "flower"
              else InProcessCells(args.threads, args.timeout))
    with runner:
        if tuning is not None:
            try:
                cells, tuned = tune(scenario, cells, tuning, out, runner, args.jobs, tuned_table)
                check_existing(cells, out)
            except ValueError as exc:
                parser.error(str(exc))
            print(tuned.to_string(index=False))
            if args.tune_only:
                return 0
        table = run_sweep(cells, runner, out, until, args.jobs)
    print(table.drop(columns=["error"]).to_string(index=False))
    return 0 if (table["status"] == "done").all() else 1


if __name__ == "__main__":
    sys.exit(main())
