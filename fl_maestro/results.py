"""A run's folder on disk: tidy result tables, the resolved config and the resumable checkpoint.

Layout of ``results/<run>/``:
    config.json             the resolved run config
    evaluation.csv          round, kind (fraction | tier), level, metric, value
    clients.csv             one row per client reply: round, partition-id, budget, examples, loss,
                            seconds, MACs, bytes up and down
    rounds.csv              one row per round: training aggregates, dropped replies, wall time
    timeline.csv            round, phase, start (Unix time), seconds, cpu-seconds: where the run's
                            time went (round 0: set-up, discovery, first evaluation; again on each
                            resume); training:plan|configure|clients|merge are parts of training
    checkpoint-<round>.safetensors  global arrays after the last finished round (no pickle)
    checkpoint.json         round, strategy state and the arrays file of that checkpoint

The checkpoint is written atomically: arrays to a file named by round, then the state that names
them by temp file + rename, then older arrays files are removed. On resume, table rows after the checkpoint's round are dropped, so a run killed at any
moment continues to the same tables as an uninterrupted one.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from safetensors.numpy import load_file, save_file

TABLES = ("evaluation", "clients", "rounds", "timeline")


def _atomic_write(path: Path, write) -> None:
    """Write through ``write(tmp_path)`` then rename over ``path`` (readers never see half a file)."""
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    os.replace(tmp, path)


class RunStore:
    """Reads and writes one run's folder."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    def has_checkpoint(self) -> bool:
        """Whether a finished round was checkpointed here."""
        return (self.root / "checkpoint.json").exists()

    def write_config(self, config: Mapping[str, Any]) -> None:
        """Save the resolved run config."""
        text = json.dumps(dict(config), indent=2, sort_keys=True)
        _atomic_write(self.root / "config.json", lambda p: p.write_text(text))

    def read_config(self) -> dict[str, Any]:
        """The saved run config."""
        return json.loads((self.root / "config.json").read_text())

    def append(self, table: str, rows: list[Mapping[str, Any]]) -> None:
        """Append rows to ``<table>.csv`` (header written with the first rows)."""
        if table not in TABLES:
            raise ValueError(f"unknown table {table!r}; tables are {TABLES}")
        if not rows:
            return
        path = self.root / f"{table}.csv"
        frame = pd.DataFrame(rows)
        if path.exists():
            columns = list(pd.read_csv(path, nrows=0).columns)
            if set(frame.columns) - set(columns):  # new columns: rewrite with their union
                merged = pd.concat([pd.read_csv(path), frame], ignore_index=True)
                _atomic_write(path, lambda p: merged.to_csv(p, index=False))
                return
            frame = frame.reindex(columns=columns)
        frame.to_csv(path, mode="a", header=not path.exists(), index=False)

    def read(self, table: str) -> pd.DataFrame:
        """One table as a DataFrame (empty when nothing was written yet)."""
        path = self.root / f"{table}.csv"
        return pd.read_csv(path) if path.exists() else pd.DataFrame()

    def clear(self) -> None:
        """Remove the tables and checkpoint a run that died before its first checkpoint left."""
        for path in [*(self.root / f"{t}.csv" for t in TABLES), self.root / "checkpoint.json",
                     *self.root.glob("checkpoint-*.safetensors")]:
            path.unlink(missing_ok=True)

    def truncate_after(self, last_round: int) -> None:
        """Drop table rows of rounds after ``last_round`` (left by a run killed mid-round)."""
        for table in TABLES:
            path = self.root / f"{table}.csv"
            if path.exists():
                frame = pd.read_csv(path)
                kept = frame[frame["round"] <= last_round]
                _atomic_write(path, lambda p: kept.to_csv(p, index=False))

    def save_checkpoint(self, server_round: int, arrays: Mapping[str, np.ndarray],
                        state: Mapping[str, Any]) -> None:
        """Checkpoint the global arrays and the run state after ``server_round``."""
        # reshape: np.ascontiguousarray turns a 0-d array (a scalar buffer) into shape (1,).
        tensors = {k: np.ascontiguousarray(v).reshape(np.shape(v)) for k, v in arrays.items()}
        name = f"checkpoint-{server_round}.safetensors"
        _atomic_write(self.root / name, lambda p: save_file(tensors, str(p)))
        text = json.dumps({"round": server_round, "arrays": name, **state}, indent=1)
        _atomic_write(self.root / "checkpoint.json", lambda p: p.write_text(text))
        for old in self.root.glob("checkpoint-*.safetensors"):
            if old.name != name:
                old.unlink()

    def checkpoint_round(self) -> int | None:
        """The round of the last checkpoint, None if there is none."""
        if not self.has_checkpoint():
            return None
        return int(json.loads((self.root / "checkpoint.json").read_text())["round"])

    def load_checkpoint(self) -> tuple[int, dict[str, np.ndarray], dict[str, Any]]:
        """The last checkpoint: (round, global arrays, state)."""
        state = json.loads((self.root / "checkpoint.json").read_text())
        arrays = load_file(str(self.root / state.pop("arrays")))
        return int(state.pop("round")), arrays, state
