"""Test-wide settings."""

import os
import shutil

import pytest
import torch

from fl_maestro.config import parse_run_config
from fl_maestro.federation import run_federation
from fl_maestro.results import RunStore
from simulations.inprocess import InProcessGrid

# One intra-op thread: on a 2-core machine shared with Ray actors or other work, OpenMP threads
# spin-waiting for each other make small steps tens of times slower; tests check correctness only.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed() -> None:
    """Every test starts from the same torch generator (model init draws from it)."""
    torch.manual_seed(0)


@pytest.fixture(scope="session", autouse=True)
def _dataset_cache(tmp_path_factory):
    """Decoded datasets go to a cache of the session's own (inherited by the runs tests start),
    not the user's: tests decode fake datasets under many temporary paths."""
    folder = tmp_path_factory.mktemp("dataset-cache")
    os.environ["FL_MAESTRO_CACHE"] = str(folder)
    yield
    shutil.rmtree(folder, ignore_errors=True)


def randn(*shape: int, seed: int = 0) -> torch.Tensor:
    """A tensor of standard normals from its own seeded generator (the global one untouched)."""
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def overrides(tmp_path, **extra) -> dict:
    """A small run config: digits, 2 rounds of 4 clients, two tiers, results under ``tmp_path``."""
    return {"dataset": "digits", "num-rounds": 2, "clients-per-round": 4, "partitioner": "iid",
            "device-mix": "0.25:0.5,1.0:0.5", "results-dir": str(tmp_path), "run-name": "run",
            "eval-samples": 60, "eval-fractions": "0.5,1.0", **extra}


def run(tmp_path, nodes: int = 4, **extra):
    """Run ``overrides(tmp_path, **extra)`` in process on ``nodes`` nodes; the run's store."""
    config = overrides(tmp_path, **extra)
    run_federation(InProcessGrid(nodes, config), parse_run_config(config))
    return RunStore(tmp_path / "run")
