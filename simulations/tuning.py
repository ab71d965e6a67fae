"""Each method at its own best setting: a grid search on a tuning seed, judged on validation data.

    python -m simulations.sweep comparison --runner inprocess --jobs 2 \
        --tune lr=0.02,0.05,0.1 --tune momentum=0,0.9 --tune-rounds 15 --tune-only

Every level of the scenario's axes (a method) runs once per point of the declared grid, on the
tuning seed (``--tune-seed``, by default one not among the comparison's seeds), for ``--tune-rounds``
rounds, with the server evaluating on the clients' validation splits (``eval-split =
validation``: training-set rows held out of every client's local training), never on the test
set. A method's choice is the grid point with the highest validation accuracy of its final
round, averaged over the budget tiers (ties: the first point in grid order). The runs live in
``<out>/tuning/``; ``<out>/tuning/table.csv`` has one row per method and grid point with its
validation accuracy and whether it was chosen, and the comparison's cells run at their method's
choice (recorded as ``tuned-<key>`` columns of ``<out>/cells.csv``).

One seed can pick a setting at the edge of stability that diverges on the next. With
``--tune-confirm K`` each method's K best points are run again on a second tuning seed
(``--tune-confirm-seed``, by default the tuning seed + 1; runs in ``<out>/tuning/confirm/``), and
the choice becomes the point with the highest mean validation accuracy over the two seeds among
those that finished on both (a point that fails on either seed cannot be chosen). ``--tuned
TABLE --tune-confirm K`` adds the confirmation to a finished table.
"""

from __future__ import annotations

import argparse
import itertools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from fl_maestro.config import KEYS
from simulations.cells import RESERVED
from simulations.scenarios import Axis, Level, Scenario

TUNING_DIR = "tuning"
CONFIRM_DIR = "confirm"  # the second seed's runs, under the tuning folder
TABLE = "table.csv"
# The table's own columns (the rest are the methods' axes and the grid's keys).
TABLE_COLUMNS = ("cell-id", "status", "round", "val-accuracy", "diverged-clients", "chosen",
                 "tuning-seed", "horizon", "score")
# Keys a grid may not tune: the sweep sets them, or the tuning runs need them fixed.
FIXED = (*RESERVED, "num-rounds", "eval-split", "eval-every")


@dataclass(frozen=True)
class Tuning:
    """The declared grid (key -> values, in order), the tuning seed, the horizon in rounds and
    the confirmation (how many of each method's best points, on which second seed)."""

    grid: Mapping[str, tuple[Any, ...]]
    seed: int
    rounds: int
    confirm: int = 0  # each method's best points run again on confirm_seed (0: no confirmation)
    confirm_seed: int | None = None

    def points(self) -> list[dict[str, Any]]:
        """Every grid point, in grid order (the last key varies fastest)."""
        keys = list(self.grid)
        return [dict(zip(keys, values)) for values in itertools.product(*self.grid.values())]


def parse_tune(items: Sequence[str]) -> dict[str, tuple[Any, ...]]:
    """``["lr=0.01,0.1", "momentum=0,0.9"]`` to ``{"lr": (0.01, 0.1), "momentum": (0.0, 0.9)}``,
    each value parsed as TOML-like text; ValueError naming a bad item."""
    grid: dict[str, tuple[Any, ...]] = {}
    for item in items:
        key, sep, text = item.partition("=")
        if not sep or not text:
            raise ValueError(f"--tune {item!r} is malformed: allowed KEY=V1,V2,...")
        if key not in KEYS or key in FIXED:
            raise ValueError(f"--tune {key!r}: not a run-config key a grid may tune (fixed by "
                             f"the tuning: {FIXED})")
        if key in grid:
            raise ValueError(f"--tune {key!r} is given twice: list all its values in one")
        values = tuple(_value(v, KEYS[key].default) for v in text.split(","))
        if len(set(values)) != len(values):
            raise ValueError(f"--tune {item!r} repeats a value")
        grid[key] = values
    return grid


def _value(text: str, default: Any) -> Any:
    """A grid value in the type of the key's default (numbers for numeric keys)."""
    if isinstance(default, bool):
        return text.lower() == "true"
    if isinstance(default, (int, float)):
        number = float(text)
        return int(number) if isinstance(default, int) and number.is_integer() else number
    return text


def tuning_scenario(scenario: Scenario, tuning: Tuning, seed: int | None = None) -> Scenario:
    """The scenario's axes crossed with the grid, as runs on validation data over the horizon
    (on the tuning seed, or on ``seed``)."""
    taken = {key for ax in scenario.axes for key in ax.keys()}
    clash = sorted(set(tuning.grid) & taken)
    if clash:
        raise ValueError(f"--tune {clash}: set by an axis of scenario {scenario.name!r}; "
                         "tune keys the methods share, not their axes")
    grid_axes = tuple(Axis(key, tuple(Level(str(v), {key: v}) for v in values))
                      for key, values in tuning.grid.items())
    overrides = {**scenario.overrides, "num-rounds": tuning.rounds, "eval-every": tuning.rounds,
                 "eval-split": "validation"}
    return replace(scenario, name=f"{scenario.name}-tuning", overrides=overrides,
                   axes=(*scenario.axes, *grid_axes),
                   seeds=(tuning.seed if seed is None else seed,))


def validation_scores(evaluation: pd.DataFrame, method_axes: Sequence[str],
                      grid_keys: Sequence[str]) -> pd.DataFrame:
    """Per method and grid point: the final round's validation accuracy, mean over the tiers
    (over the rank fractions for a run without tiers), from a tuning sweep's gathered table."""
    rows = evaluation[evaluation["metric"] == "accuracy"]
    cols = [*method_axes, *grid_keys]
    out = []
    for key, run in rows.groupby(cols, sort=False):
        last = run[run["round"] == run["round"].max()]
        kind = "tier" if (last["kind"] == "tier").any() else "fraction"
        out.append({**dict(zip(cols, key if isinstance(key, tuple) else (key,))),
                    "round": int(last["round"].iloc[0]),
                    "val-accuracy": float(last.loc[last["kind"] == kind, "value"].mean())})
    return pd.DataFrame(out, columns=[*cols, "round", "val-accuracy"])


def _best_first(rows: pd.DataFrame, method_axes: Sequence[str], grid_keys: Sequence[str],
                order: Sequence[Mapping[str, str]], by: str):
    """The rows that have ``by``, grouped by method, best first in each group (ties: grid
    order): ``.head(k)`` gives each method's k best."""
    rank = {tuple(point[k] for k in grid_keys): i for i, point in enumerate(order)}
    rows = rows.dropna(subset=[by])
    rows = rows.assign(**{"grid-order": [rank[tuple(str(r[k]) for k in grid_keys)]
                                         for r in rows.to_dict("records")]})
    rows = rows.sort_values([by, "grid-order"], ascending=[False, True])
    return rows.groupby(list(method_axes), sort=False) if method_axes else rows.groupby(
        lambda _: 0, sort=False)


def choose(scores: pd.DataFrame, method_axes: Sequence[str], grid_keys: Sequence[str],
           order: Sequence[Mapping[str, str]], by: str = "val-accuracy") -> pd.DataFrame:
    """``scores`` with a ``chosen`` column: per method, its grid point of highest ``by`` (ties:
    the first of ``order``, the grid points as labels in grid order); rows without ``by`` are
    never chosen."""
    best = _best_first(scores, method_axes, grid_keys, order, by).head(1).index
    return scores.assign(chosen=scores.index.isin(best))


def best_points(table: pd.DataFrame, method_axes: Sequence[str], grid_keys: Sequence[str],
                order: Sequence[Mapping[str, str]], k: int) -> pd.DataFrame:
    """Per method, the labels of its ``k`` grid points of highest validation accuracy (ties: grid
    order); failed points (no accuracy) are never among them."""
    top = _best_first(table, method_axes, grid_keys, order, "val-accuracy").head(k)
    return top[[*method_axes, *grid_keys]].astype(str).reset_index(drop=True)


def confirmed(table: pd.DataFrame, second: pd.DataFrame, method_axes: Sequence[str],
              grid_keys: Sequence[str], order: Sequence[Mapping[str, str]]) -> pd.DataFrame:
    """The first seed's table with the second seed's runs (``second``: labels, ``status``,
    ``val-accuracy``, ``diverged-clients``) as ``confirm-*`` columns, a ``score`` (the mean
    validation accuracy over both seeds, only where both finished) and the choice remade by it."""
    labels = [*method_axes, *grid_keys]
    second = second[[*labels, "status", "val-accuracy", "diverged-clients"]].rename(columns={
        c: f"confirm-{c}" for c in ("status", "val-accuracy", "diverged-clients")})
    out = table.drop(columns=[c for c in table.columns if c.startswith("confirm-")
                              or c in ("score", "chosen")])
    out = out.astype({c: str for c in labels}).merge(second.astype({c: str for c in labels}),
                                                     on=labels, how="left")
    out["score"] = out[["val-accuracy", "confirm-val-accuracy"]].mean(axis=1, skipna=False)
    return choose(out, method_axes, grid_keys, order, by="score")


def choices(table: pd.DataFrame, method_axes: Sequence[str], grid: Mapping[str, tuple]
            ) -> dict[tuple[str, ...], dict[str, Any]]:
    """Per method (its axis labels), the chosen values in the keys' own types."""
    out = {}
    for row in table[table["chosen"]].to_dict("records"):
        labels = tuple(str(row[a]) for a in method_axes)
        out[labels] = {k: next(v for v in grid[k] if str(v) == str(row[k])) for k in grid}
    return out


def write_table(table: pd.DataFrame, folder: Path) -> Path:
    """Save the tuning table as ``<folder>/table.csv``."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / TABLE
    table.to_csv(path, index=False)
    return path


def diverged_clients(folder: Path, labels: Sequence[str],
                     cell_ids: Sequence[str] | None = None) -> pd.DataFrame:
    """Per tuning run (of ``cell_ids`` only, if given), the clients whose local training
    diverged (summed over its rounds)."""
    path = folder / "rounds.csv"
    if not path.exists():
        return pd.DataFrame(columns=[*labels, "diverged-clients"])
    rounds = pd.read_csv(path, dtype={c: str for c in labels})
    if cell_ids is not None:
        rounds = rounds[rounds["cell-id"].isin(cell_ids)]
    if "dropped-diverged" not in rounds:
        rounds["dropped-diverged"] = 0
    return (rounds.groupby(list(labels), sort=False)["dropped-diverged"].sum()
            .rename("diverged-clients").reset_index())


def tuning_tables(paths: Sequence[str | Path]) -> pd.DataFrame:
    """The tuning tables of the sweep folders among ``paths`` (empty if none was tuned)."""
    tables = [pd.read_csv(Path(p) / TUNING_DIR / TABLE) for p in paths
              if (Path(p) / TUNING_DIR / TABLE).exists()]
    return pd.concat(tables, ignore_index=True) if tables else pd.DataFrame()


def add_tuning_arguments(parser: argparse.ArgumentParser) -> None:
    """The sweep command's tuning options."""
    parser.add_argument("--tune", action="append", default=[], metavar="KEY=V1,V2,...",
                        help="tune KEY per method over these values on validation data first "
                             "(repeatable: the grid is their product; see simulations.tuning)")
    parser.add_argument("--tune-seed", type=int, help="seed of the tuning runs (default: one "
                        "more than the largest seed of the sweep)")
    parser.add_argument("--tune-rounds", type=int, default=15,
                        help="rounds of each tuning run (default 15)")
    parser.add_argument("--tune-only", action="store_true",
                        help="stop after the tuning table (<out>/tuning/table.csv)")
    parser.add_argument("--tuned", type=Path, metavar="TABLE.csv",
                        help="run every method at its choice in a finished tuning table (e.g. "
                             "results/reference/tuning/table.csv) instead of tuning again")
    parser.add_argument("--tune-confirm", type=int, default=0, metavar="K",
                        help="run each method's K best grid points again on a second tuning "
                             "seed and choose by the mean over both (default 0: no second seed; "
                             "with --tuned, at the table's horizon and seed)")
    parser.add_argument("--tune-confirm-seed", type=int,
                        help="the second tuning seed (default: the tuning seed + 1)")


def tuning_from_args(args: argparse.Namespace, seeds: Sequence[int],
                     table: pd.DataFrame | None = None,
                     method_axes: Sequence[str] = ()) -> Tuning | None:
    """The tuning step the command line asks for: the grid of ``--tune``, or with ``--tuned``
    (its ``table``, whose ``method_axes`` columns are not grid keys) and ``--tune-confirm`` the
    finished table's grid, seed and horizon; None when nothing is to be run."""
    confirm = getattr(args, "tune_confirm", 0)
    confirm_seed = getattr(args, "tune_confirm_seed", None)
    if args.tune:
        seed = max(seeds) + 1 if args.tune_seed is None else args.tune_seed
        if seed in seeds or seed < 0 or args.tune_rounds < 1:
            raise ValueError(f"--tune-seed {seed} / --tune-rounds {args.tune_rounds}: allowed a "
                             f"seed >= 0 not among the sweep's seeds {list(seeds)} and rounds >= 1")
        grid, rounds = parse_tune(args.tune), args.tune_rounds
    elif table is not None and confirm:
        missing = [c for c in ("tuning-seed", "horizon") if c not in table.columns]
        if missing:
            raise ValueError(f"--tune-confirm with --tuned: the table has no column {missing} "
                             "(allowed: a table.csv that --tune wrote)")
        grid = {k: v for k, v in table_grid(table).items() if k not in method_axes}
        seed, rounds = int(table["tuning-seed"].iloc[0]), int(table["horizon"].iloc[0])
        if seed in seeds:
            raise ValueError(f"--tuned: the table's tuning seed {seed} is among the sweep's "
                             f"seeds {list(seeds)}: allowed seeds the tuning did not use")
    else:
        if args.tune_only or confirm:
            raise ValueError("--tune-only and --tune-confirm need --tune KEY=V1,V2,... (or "
                             "--tune-confirm a --tuned table)")
        return None
    if not confirm:
        if confirm_seed is not None:
            raise ValueError("--tune-confirm-seed needs --tune-confirm K (K >= 1)")
        return Tuning(grid, seed, rounds)
    confirm_seed = seed + 1 if confirm_seed is None else confirm_seed
    if confirm < 0 or confirm_seed in (*seeds, seed) or confirm_seed < 0:
        raise ValueError(f"--tune-confirm {confirm} / --tune-confirm-seed "
                         f"{confirm_seed}: allowed K >= 0 and a seed >= 0 that is neither the "
                         f"tuning seed {seed} nor among the sweep's seeds {list(seeds)}")
    return Tuning(grid, seed, rounds, confirm, confirm_seed)


def table_grid(table: pd.DataFrame) -> dict[str, tuple[Any, ...]]:
    """A tuning table's grid: its run-config columns' values in table order, typed as the
    keys' defaults."""
    return {k: tuple(_value(str(v), KEYS[k].default) for v in table[k].unique())
            for k in table.columns if k in KEYS}


def chosen_from_table(path: Path, method_axes: Sequence[str]
                      ) -> tuple[dict[tuple[str, ...], dict[str, Any]], pd.DataFrame]:
    """A finished tuning table's choices per method (as ``choices`` gives them) and the table.

    The grid's keys are the table's run-config columns; a method without a chosen row, or with
    more than one, is an error naming the file."""
    if not path.is_file():
        raise ValueError(f"--tuned {path}: no such tuning table")
    table = pd.read_csv(path)
    missing = [c for c in (*method_axes, "chosen") if c not in table.columns]
    if missing:
        raise ValueError(f"--tuned {path}: the table has no column {missing} (allowed: a "
                         f"table.csv that --tune wrote for this scenario's axes {list(method_axes)})")
    grid = {k: v for k, v in table_grid(table).items() if k not in method_axes}
    chosen = table[table["chosen"].astype(str).str.lower() == "true"]
    counts = chosen.groupby([chosen[a].astype(str) for a in method_axes]).size()
    if (counts > 1).any():
        raise ValueError(f"--tuned {path}: more than one chosen row for {list(counts[counts > 1].index)}")
    return choices(table.assign(chosen=table.index.isin(chosen.index)), method_axes, grid), table


def markdown_table(table: pd.DataFrame) -> str:
    """The tuning table as markdown: a row per method, a column per grid point, the validation
    accuracy in % (bold: chosen; "(Nd)": N clients diverged and were dropped; "failed": the run
    stopped, e.g. too few usable replies in a round)."""
    grid = [c for c in table.columns if c in KEYS]
    method_axes = [c for c in table.columns
                   if c not in (*grid, *TABLE_COLUMNS) and not c.startswith("confirm-")]
    label = table[grid].astype(str).agg(lambda r: ", ".join(f"{k} {v}" for k, v in r.items()),
                                        axis=1)

    def one(accuracy: Any, diverged: Any) -> str:
        if pd.isna(accuracy):
            return "failed"
        return f"{100 * accuracy:.1f}" + (f" ({int(diverged)}d)" if diverged > 0 else "")

    def text(row: Mapping[str, Any]) -> str:
        out = one(row["val-accuracy"], row.get("diverged-clients", 0))
        if pd.notna(row.get("confirm-status", np.nan)):  # run again on the second seed
            out += " / " + one(row["confirm-val-accuracy"], row["confirm-diverged-clients"])
        return f"**{out}**" if row["chosen"] else out

    cells = table.assign(setting=label, text=table.apply(text, axis=1))
    settings = list(dict.fromkeys(label))
    lines = [f"| {' / '.join(method_axes)} | " + " | ".join(settings) + " |",
             "| --- |" + " --- |" * len(settings)]
    for key, group in cells.groupby(method_axes, sort=False):
        by = dict(zip(group["setting"], group["text"]))
        name = " / ".join(key) if isinstance(key, tuple) else str(key)
        lines.append(f"| `{name}` | " + " | ".join(by.get(s, "") for s in settings) + " |")
    return "\n".join(lines)


if __name__ == "__main__":  # python -m simulations.tuning <sweep>/tuning/table.csv
    import sys

    print(markdown_table(pd.read_csv(sys.argv[1])))
