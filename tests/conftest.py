"""Test-wide settings."""

import os
import shutil

import pytest
import torch

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
