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
"""

from __future__ import annotations

import argparse
import itertools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pandas as pd

from fl_maestro.config import KEYS
from simulations.scenarios import Axis, Level, Scenario

TUNING_DIR = "tuning"
TABLE = "table.csv"
# Keys a grid may not tune: the sweep sets them, or the tuning runs need them fixed.
FIXED = ("results-dir", "run-name", "resume", "seed", "num-rounds", "eval-split", "eval-every")


@dataclass(frozen=True)
class Tuning:
    """The declared grid (key -> values, in order), the tuning seed and the horizon in rounds."""

    grid: Mapping[str, tuple[Any, ...]]
    seed: int
    rounds: int

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


def tuning_scenario(scenario: Scenario, tuning: Tuning) -> Scenario:
    """The scenario's axes crossed with the grid, as runs on validation data over the horizon."""
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
                   axes=(*scenario.axes, *grid_axes), seeds=(tuning.seed,))


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


def choose(scores: pd.DataFrame, method_axes: Sequence[str], grid_keys: Sequence[str],
           order: Sequence[Mapping[str, str]]) -> pd.DataFrame:
    """``scores`` with a ``chosen`` column: per method, its best grid point (ties: the first of
    ``order``, the grid points as labels in grid order)."""
    rank = {tuple(point[k] for k in grid_keys): i for i, point in enumerate(order)}
    scores = scores.copy()
    scores["grid-order"] = [rank[tuple(str(r[k]) for k in grid_keys)]
                            for r in scores.to_dict("records")]
    scores["chosen"] = False
    groups = scores.groupby(list(method_axes), sort=False) if method_axes else [((), scores)]
    for _, group in groups:
        best = group.sort_values(["val-accuracy", "grid-order"], ascending=[False, True])
        scores.loc[best.index[0], "chosen"] = True
    return scores.drop(columns="grid-order")


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


def diverged_clients(folder: Path, labels: Sequence[str]) -> pd.DataFrame:
    """Per tuning run, the clients whose local training diverged (summed over its rounds)."""
    path = folder / "rounds.csv"
    if not path.exists():
        return pd.DataFrame(columns=[*labels, "diverged-clients"])
    rounds = pd.read_csv(path, dtype={c: str for c in labels})
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


def tuning_from_args(args: argparse.Namespace, seeds: Sequence[int]) -> Tuning | None:
    """The tuning step the command line asks for (None without --tune)."""
    if not args.tune:
        if args.tune_only:
            raise ValueError("--tune-only needs at least one --tune KEY=V1,V2,...")
        return None
    seed = max(seeds) + 1 if args.tune_seed is None else args.tune_seed
    if seed in seeds or seed < 0 or args.tune_rounds < 1:
        raise ValueError(f"--tune-seed {seed} / --tune-rounds {args.tune_rounds}: allowed a "
                         f"seed >= 0 not among the sweep's seeds {list(seeds)} and rounds >= 1")
    return Tuning(parse_tune(args.tune), seed, args.tune_rounds)


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
    grid = {k: tuple(_value(str(v), KEYS[k].default) for v in table[k].unique())
            for k in table.columns if k in KEYS and k not in method_axes}
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
                   if c not in (*grid, "cell-id", "status", "round", "val-accuracy",
                                "diverged-clients", "chosen", "tuning-seed", "horizon")]
    label = table[grid].astype(str).agg(lambda r: ", ".join(f"{k} {v}" for k, v in r.items()),
                                        axis=1)

    def text(row: Mapping[str, Any]) -> str:
        if pd.isna(row["val-accuracy"]):
            return "failed"
        out = f"{100 * row['val-accuracy']:.1f}"
        out += f" ({int(row['diverged-clients'])}d)" if row.get("diverged-clients", 0) > 0 else ""
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
