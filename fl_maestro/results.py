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
    components.csv          round, layer, component: client-steps, clients, movement from init,
                            norm and importance (fl_maestro.components)
    initial.safetensors     the global arrays at round 0 (what movement is measured from)
    checkpoint-<round>.safetensors  global arrays after the last finished round (no pickle)
    checkpoint.json         round, strategy state, the nodes' partitions and budgets, and the
                            arrays file of that checkpoint
    lock, lock.json         held by the one process writing the folder; lock.json names it

The checkpoint is written atomically: arrays to a file named by round, then the state that names
them by temp file + rename, then older arrays files are removed. On resume, table rows after the checkpoint's round are dropped, so a run killed at any
moment continues to the same tables as an uninterrupted one.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from filelock import FileLock, Timeout
from safetensors.numpy import load_file, save_file

TABLES = ("evaluation", "clients", "rounds", "timeline", "components")
INITIAL = "initial.safetensors"


def _atomic_write(path: Path, write) -> None:
    """Write through ``write(tmp_path)`` then rename over ``path`` (readers never see half a file)."""
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    os.replace(tmp, path)


def _save_arrays(path: Path, arrays: Mapping[str, np.ndarray]) -> None:
    """Arrays to a safetensors file, atomically."""
    # reshape: np.ascontiguousarray turns a 0-d array (a scalar buffer) into shape (1,).
    tensors = {k: np.ascontiguousarray(v).reshape(np.shape(v)) for k, v in arrays.items()}
    _atomic_write(path, lambda p: save_file(tensors, str(p)))


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
                     self.root / INITIAL, *self.root.glob("checkpoint-*.safetensors")]:
            path.unlink(missing_ok=True)

    def truncate_after(self, last_round: int) -> None:
        """Drop table rows of rounds after ``last_round`` (left by a run killed mid-round)."""
        for table in TABLES:
            path = self.root / f"{table}.csv"
            if path.exists():
                frame = pd.read_csv(path)
                kept = frame[frame["round"] <= last_round]
                _atomic_write(path, lambda p: kept.to_csv(p, index=False))

    def save_initial(self, arrays: Mapping[str, np.ndarray]) -> None:
        """Keep the round-0 global arrays (movement from init is measured against them)."""
        _save_arrays(self.root / INITIAL, arrays)

    def load_initial(self) -> dict[str, np.ndarray] | None:
        """The round-0 global arrays, None for a run made before they were kept."""
        path = self.root / INITIAL
        return load_file(str(path)) if path.exists() else None

    def save_checkpoint(self, server_round: int, arrays: Mapping[str, np.ndarray],
                        state: Mapping[str, Any]) -> None:
        """Checkpoint the global arrays and the run state after ``server_round``."""
        name = f"checkpoint-{server_round}.safetensors"
        _save_arrays(self.root / name, arrays)
        text = json.dumps({"round": server_round, "arrays": name, **state}, indent=1)
        _atomic_write(self.root / "checkpoint.json", lambda p: p.write_text(text))
        for old in self.root.glob("checkpoint-*.safetensors"):
            if old.name != name:
                old.unlink()

    def checkpoint_round(self) -> int | None:
        """The round of the last checkpoint, None if there is none."""
        if not self.has_checkpoint():
            return None
        return int(self._checkpoint_state()["round"])

    def _checkpoint_state(self) -> dict[str, Any]:
        """checkpoint.json, or a ValueError naming the file and what is wrong with it."""
        path = self.root / "checkpoint.json"
        try:
            state = json.loads(path.read_text())
            if not (isinstance(state, dict) and isinstance(state.get("arrays"), str)
                    and isinstance(state.get("round"), int)):
                raise ValueError("it lacks an integer 'round' or the 'arrays' file name")
        except (OSError, UnicodeDecodeError, ValueError) as err:
            raise ValueError(f"checkpoint {path} is corrupt ({err}): delete the run folder "
                             "(or that file) and start the run again") from None
        return state

    def load_checkpoint(self) -> tuple[int, dict[str, np.ndarray], dict[str, Any]]:
        """The last checkpoint: (round, global arrays, state); refuses corrupt or non-finite ones."""
        state = self._checkpoint_state()
        path = self.root / state.pop("arrays")
        try:
            arrays = load_file(str(path))
        except Exception as err:  # safetensors raises its own error types for a damaged file
            raise ValueError(f"checkpoint arrays {path} cannot be read ({type(err).__name__}: "
                             f"{err}): delete the run folder and start the run again") from None
        return int(state.pop("round")), check_finite(arrays, f"checkpoint {path}"), state

    def lock(self) -> "RunLock":
        """An exclusive lock on this folder (``with store.lock(): ...``); see ``RunLock``."""
        return RunLock(self.root)


def check_finite(arrays: Mapping[str, np.ndarray], what: str) -> dict[str, np.ndarray]:
    """``arrays`` if every value is finite; ValueError naming ``what`` and the arrays otherwise."""
    bad = sorted(n for n, a in arrays.items()
                 if np.issubdtype(a.dtype, np.inexact) and not np.isfinite(a).all())
    if bad:
        raise ValueError(f"{what} holds non-finite values (NaN or Inf) in {bad}: refused")
    return dict(arrays)


class RunLocked(RuntimeError):
    """Another process is writing this run folder."""


class RunLock:
    """One writer per run folder: an OS file lock (released when its process dies, even by
    SIGKILL) plus ``lock.json`` naming the holder, so a refused writer can say who holds it."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self._lock = FileLock(self.root / "lock", timeout=0)

    def holder(self) -> str:
        """Who holds the lock, as ``lock.json`` says (or that it does not say)."""
        try:
            info = json.loads((self.root / "lock.json").read_text())
            return (f"pid {info['pid']} on {info['host']} since {info['since']} "
                    f"({info['command']})")
        except (OSError, ValueError, KeyError, TypeError):
            return "an unknown process"

    def __enter__(self) -> "RunLock":
        self.root.mkdir(parents=True, exist_ok=True)
        try:
            self._lock.acquire()
        except Timeout:
            raise RunLocked(f"{self.root} is being written by another run: held by "
                            f"{self.holder()}; wait for it or stop it") from None
        info = {"pid": os.getpid(), "host": socket.gethostname(),
                "since": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                "command": " ".join(sys.argv)[:200]}
        _atomic_write(self.root / "lock.json", lambda p: p.write_text(json.dumps(info)))
        return self

    def __exit__(self, *exc) -> None:
        (self.root / "lock.json").unlink(missing_ok=True)
        self._lock.release()

    def is_free(self) -> bool:
        """Whether nobody holds the lock right now (checked by taking and releasing it)."""
        try:
            self._lock.acquire()
        except Timeout:
            return False
        self._lock.release()
        return True
