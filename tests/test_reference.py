"""Same seed, same results, of what the repo shows: a committed reference cell re-run at the
current code gives the committed numbers, and the committed summary is the report's.

The tiny reference (``results/reference/tiny``) is made by ``make tiny-reference``; re-make it
when a change is meant to move the numbers, and say so in the commit.
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import torch

from fl_maestro.config import parse_run_config
from fl_maestro.federation import run_federation
from fl_maestro.results import RunStore
from simulations.api import load
from simulations.inprocess import InProcessGrid

TINY = Path(__file__).resolve().parents[1] / "results" / "reference" / "tiny"
CELL = "method=rankwise__seed=0"  # the method the tool is about; every cell costs the same
WALL = ("seconds", "train-seconds", "decode-seconds", "build-seconds", "data-seconds",
        "validate-seconds", "encode-seconds")  # the host's clock, not the run's: never the same

pytestmark = pytest.mark.skipif(not (TINY / "sweep" / CELL / "config.json").exists(),
                                reason="no committed tiny reference")


@pytest.fixture
def one_thread():
    """The reference ran with one torch thread (the sweep's default); sums in another order
    could move the last digits."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_a_committed_cell_reruns_to_the_committed_numbers(tmp_path: Path, one_thread) -> None:
    committed = TINY / "sweep" / CELL
    config = json.loads((committed / "config.json").read_text())
    nodes = json.loads((committed / "cell.json").read_text())["supernodes"]
    overrides = {**config, "results-dir": str(tmp_path), "resume": False}
    run_federation(InProcessGrid(nodes, overrides), parse_run_config(overrides))
    again, before = RunStore(tmp_path / config["run-name"]), RunStore(committed)
    for table, keys in (("evaluation", ["round", "kind", "level", "metric"]),
                        ("clients", ["round", "partition-id"]), ("rounds", ["round"])):
        new = again.read(table).drop(columns=list(WALL), errors="ignore").sort_values(keys)
        old = before.read(table).drop(columns=list(WALL), errors="ignore").sort_values(keys)
        pd.testing.assert_frame_equal(new.reset_index(drop=True), old.reset_index(drop=True),
                                      check_exact=False, rtol=1e-9, obj=f"{CELL}/{table}.csv")


def test_the_committed_summary_is_the_reports_summary_of_the_committed_runs() -> None:
    summary = load(TINY / "sweep", baseline="rankwise").summary
    committed = pd.read_csv(TINY / "summary.csv")
    pd.testing.assert_frame_equal(summary.reset_index(drop=True), committed,
                                  check_dtype=False, rtol=1e-12)
