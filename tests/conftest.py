"""Test-wide settings."""

import pytest
import torch

# One intra-op thread: on a 2-core machine shared with Ray actors or other work, OpenMP threads
# spin-waiting for each other make small steps tens of times slower; tests check correctness only.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed() -> None:
    """Every test starts from the same torch generator (model init draws from it)."""
    torch.manual_seed(0)
