"""What the run commands refuse before Flower starts, each with a message naming what is wrong."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import fl_maestro.data.registry as registry
from fl_maestro.results import RunStore
from simulations.launch import APP_DIR
from simulations.preflight import PreflightError, absolute_paths, preflight


def _config(tmp_path: Path, **extra) -> dict:
    return {"dataset": "digits", "model": "mlp", "num-rounds": 2, "clients-per-round": 2,
            "device-mix": "0.25:0.5,1.0:0.5", "results-dir": str(tmp_path), "run-name": "run",
            **extra}


def _finished_run(tmp_path: Path, **extra) -> RunStore:
    """A folder that holds a checkpointed run of ``_config(tmp_path, **extra)``."""
    from fl_maestro.config import parse_run_config

    store = RunStore(tmp_path / "run")
    store.write_config(parse_run_config(_config(tmp_path, **extra)).to_dict())
    store.save_checkpoint(2, {"w": np.zeros(3, np.float32)},
                          {"strategy": {}, "nodes": {"num-partitions": 4, "budgets": {}}})
    return store


def test_a_good_run_passes(tmp_path: Path) -> None:
    preflight(_config(tmp_path), supernodes=4)


@pytest.mark.parametrize("supernodes, extra, needle", [
    (0, {}, "--supernodes = 0: allowed an integer >= 1"),
    (4, {"clients-per-round": 5}, "clients-per-round = 5 but only 4 of 4 nodes"),
    (4, {"strategy": "fedavg-exclusive", "device-mix": "0.25:0.5,0.5:0.5"},
     "strategy 'fedavg-exclusive': none of the 4 nodes takes part"),
    (10, {"strategy": "fedavg-exclusive", "clients-per-round": 6},
     "clients-per-round = 6 but only 5 of 10 nodes take part"),
    (4, {"init": "svd:/nonexistent/dense.safetensors"}, "file '/nonexistent/dense.safetensors'"),
    (4, {"resume": True}, "holds no checkpoint to resume from"),
])
def test_refused_before_flower_starts(tmp_path: Path, supernodes: int, extra: dict,
                                      needle: str) -> None:
    with pytest.raises(PreflightError, match=needle.replace("(", r"\(").replace("[", r"\[")):
        preflight(_config(tmp_path, **extra), supernodes)


def test_a_read_only_results_folder_is_refused() -> None:
    # /proc refuses new folders to everyone, root included (a chmod would not stop root).
    with pytest.raises(PreflightError, match="results folder /proc/fl-maestro/run is not writable"):
        preflight({"dataset": "digits", "results-dir": "/proc/fl-maestro", "run-name": "run"}, 4)


def test_a_missing_dataset_archive_is_refused(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(registry, "DEFAULT_CIFAR10_ROOT", tmp_path / "nothing-here")
    with pytest.raises(PreflightError, match="dataset 'cifar10' cannot be loaded: .*not found"):
        preflight(_config(tmp_path, dataset="cifar10", model="cnn"), 4)


def test_existing_run_resume_checks(tmp_path: Path) -> None:
    store = _finished_run(tmp_path)
    with pytest.raises(PreflightError, match="already holds a run: pass resume=true"):
        preflight(_config(tmp_path), 4)
    preflight(_config(tmp_path, resume=True, **{"num-rounds": 3}), 4)
    with pytest.raises(PreflightError, match=r"differs from the checkpointed run in \{'lr'"):
        preflight(_config(tmp_path, resume=True, lr=0.5), 4)
    with pytest.raises(PreflightError, match="with 5 SuperNodes, but the checkpointed run had 4"):
        preflight(_config(tmp_path, resume=True), 5)
    (store.root / "checkpoint.json").write_text("{not json")
    with pytest.raises(PreflightError, match=rf"checkpoint {store.root}/checkpoint.json is corrupt"):
        preflight(_config(tmp_path, resume=True), 4)


def test_relative_init_paths_become_absolute(tmp_path: Path) -> None:
    assert absolute_paths({"init": "svd:d.safetensors"}, tmp_path)["init"] == \
        f"svd:{tmp_path / 'd.safetensors'}"
    assert absolute_paths({"init": "random"}, tmp_path) == {"init": "random"}


def test_the_launcher_refuses_in_seconds(tmp_path: Path) -> None:
    """The real command: `--supernodes 0` stops before any Flower process starts."""
    start = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-m", "simulations.launch", "--supernodes", "0", "-c", "dataset=digits",
         "-c", f"results-dir={tmp_path}"], cwd=APP_DIR, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert "--supernodes = 0: allowed an integer >= 1" in result.stderr
    assert "flower-superlink" not in result.stderr
    assert time.monotonic() - start < 60


def test_a_partitioning_that_leaves_a_client_without_examples_is_refused(tmp_path: Path) -> None:
    """Dirichlet 0.5 over digits' training set for 1000 clients cannot give every client an
    example: every ClientApp would fail on it after Flower started; the preflight refuses it
    naming the partitioner, alpha and the number of clients."""
    config = _config(tmp_path, partitioner="dirichlet", alpha=0.5)
    with pytest.raises(PreflightError, match=r"partitioner = 'dirichlet', alpha = 0.5, "
                                             r"--supernodes = 1000 .*cannot give every client"):
        preflight(config, 1000)
    with pytest.raises(PreflightError, match="more clients than training examples"):
        preflight(_config(tmp_path, partitioner="iid"), 100_000)
    preflight(config, 4)  # a partitioning that works passes
