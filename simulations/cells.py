"""A sweep's cell: one run of a scenario (its id, axis labels, seed, size and overrides)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any


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
