"""A finished (or running) run as the report reads it: its folder, config, tables and group."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd


@dataclass
class Run:
    """One run folder: its config (plus sweep-cell axes), tables and group label."""

    name: str
    path: Path
    config: dict
    seed: int
    tables: dict[str, pd.DataFrame]
    group: str = ""
    axes: dict = field(default_factory=dict)  # a sweep cell's axis labels (cell.json)
