"""A sweep's cells: one run of a scenario each (its id, axis labels, seed, size and overrides),
built and validated from the scenario before anything runs."""

from __future__ import annotations

import hashlib
import itertools
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from fl_maestro.config import RunConfig, parse_run_config
from fl_maestro.world import load_world
from simulations.scenarios import SUPERNODES, Axis, Level, Scenario, label

RESERVED = ("results-dir", "run-name", "resume", "seed")  # set by the sweep itself
_SAFE = re.compile(r"[A-Za-z0-9._-]")
_MAPPED = {":": "@", ",": "+"}  # device mixes stay readable: 0.2:0.5,1.0:0.5 -> 0.2@0.5+1.0@0.5
MAX_ID = 150


@dataclass(frozen=True)
class Cell:
    """One run of a sweep: its id, axis labels, seed, federation size and run-config overrides."""

    cell_id: str
    axes: Mapping[str, str]
    seed: int
    supernodes: int
    run_config: Mapping[str, Any]
    num_rounds: int
    tuned: Mapping[str, Any] = field(default_factory=dict)  # values chosen by the tuning step


RunCell = Callable[[Cell, bool], int]  # (cell, resume) -> exit code; 0 means the run finished


def slug(text: str) -> str:
    """Filesystem-safe, readable and injective text: lossy mappings get a hash suffix after '~'."""
    chars = [c if _SAFE.fullmatch(c) else _MAPPED.get(c, "-") for c in text]
    lossy = not text or any(not _SAFE.fullmatch(c) and c not in _MAPPED for c in text)
    out = "".join(chars)
    return f"{out}~{_digest(text)}" if lossy else out


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:8]


def cell_id(axes: Mapping[str, str], seed: int) -> str:
    """Stable id from the axis labels (in axis order) and seed: ``strategy=fjord__seed=0``."""
    text = "__".join([*(f"{slug(name)}={slug(value)}" for name, value in axes.items()),
                      f"seed={seed}"])
    return text if len(text) <= MAX_ID else f"{text[:MAX_ID - 9]}~{_digest(text)}"


def apply_sets(scenario: Scenario, sets: Mapping[str, Any]) -> Scenario:
    """The scenario with ``--set`` values: an axis key pins its axis, other keys are overrides."""
    overrides, axes = dict(scenario.overrides), list(scenario.axes)
    for key, value in sets.items():
        if key in RESERVED:
            raise ValueError(f"--set {key}={value!r}: {key!r} is set by the sweep itself "
                             f"(reserved: {RESERVED}; use --seeds for seeds)")
        index = next((i for i, a in enumerate(axes) if a.name == key), None)
        if index is not None:
            axes[index] = pin_axis(axes[index], value)
            continue
        owner = next((a for a in axes if key in a.keys()), None)
        if owner is not None:
            raise ValueError(f"--set {key}={value!r}: {key!r} is set by axis {owner.name!r} of "
                             f"scenario {scenario.name!r}; pin that axis instead with --set "
                             f"{owner.name}=<one of {[lv.label for lv in owner.levels]}>")
        overrides[key] = value
    return replace(scenario, overrides=overrides, axes=tuple(axes))


def pin_axis(ax: Axis, value: Any) -> Axis:
    """The axis cut to the level labelled (or valued) ``value``; a plain axis takes any value."""
    for level in ax.levels:
        if level.label == label(value) or level.values.get(ax.name, object()) == value:
            return Axis(ax.name, (level,))
    if ax.keys() == {ax.name}:
        return Axis(ax.name, (Level(label(value), {ax.name: value}),))
    raise ValueError(f"--set {ax.name}={value!r}: axis {ax.name!r} has no such level: "
                     f"allowed {[lv.label for lv in ax.levels]}")


def build_cells(scenario: Scenario, seeds: Sequence[int], out_dir: Path) -> list[Cell]:
    """Every (levels..., seed) combination as a validated cell; ValueError before anything runs."""
    for ax in scenario.axes:
        if "seed" in ax.keys() or "seed" in scenario.overrides:
            raise ValueError(f"scenario {scenario.name!r} sets 'seed': seeds come from --seeds")
    if not seeds or len(set(seeds)) != len(seeds):
        raise ValueError(f"seeds {list(seeds)} must be a non-empty list without repeats")
    cells = []
    for levels in itertools.product(*(ax.levels for ax in scenario.axes)):
        axes = {ax.name: level.label for ax, level in zip(scenario.axes, levels)}
        values = dict(scenario.overrides)
        for level in levels:
            values.update(level.values)
        for seed in seeds:
            cells.append(_make_cell(scenario, axes, values, seed, out_dir))
    ids = [c.cell_id for c in cells]
    if len(set(ids)) != len(ids):
        raise ValueError(f"scenario {scenario.name!r} gives duplicate cell ids: make labels unique")
    return cells


def _make_cell(scenario: Scenario, axes: Mapping[str, str], values: Mapping[str, Any], seed: int,
               out_dir: Path) -> Cell:
    values = dict(values)
    supernodes = values.pop(SUPERNODES, scenario.supernodes)
    cid = cell_id(axes, seed)
    run_config = {**values, "seed": seed, "results-dir": str(out_dir.resolve()), "run-name": cid}
    try:
        cfg = parse_run_config(run_config)
        load_world(cfg)  # reads the device profile and availability files
    except ValueError as exc:
        raise ValueError(f"scenario {scenario.name!r}, cell {cid}: {exc}") from None
    _check_supernodes(supernodes, cfg, cid)
    return Cell(cid, dict(axes), seed, supernodes, run_config, cfg.num_rounds)


def _check_supernodes(supernodes: Any, cfg: RunConfig, cid: str) -> None:
    if isinstance(supernodes, bool) or not isinstance(supernodes, int) or supernodes < 1:
        raise ValueError(f"cell {cid}: {SUPERNODES!r} has bad value {supernodes!r}: "
                         "allowed an integer >= 1")
    if cfg.clients_per_round > supernodes:
        raise ValueError(f"cell {cid}: 'clients-per-round' is {cfg.clients_per_round} but only "
                         f"{supernodes} supernodes exist: allowed at most {supernodes}")
