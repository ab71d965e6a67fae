"""Ordered-dropout samplers: which rank prefix each local step trains.

Each sampler draws ranks inside a client's own maximum ranks from a seeded numpy Generator. Small
prefixes are drawn far more often than large ones (every draw includes the first component), which
is what orders the components by importance.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping

import numpy as np

Sampler = Callable[[Mapping[str, int], np.random.Generator], dict[str, int]]


def single_layer(max_ranks: Mapping[str, int], rng: np.random.Generator) -> dict[str, int]:
    """Maestro's default: one random layer gets a uniform random rank, the others stay at max."""
    ranks = dict(max_ranks)
    if ranks:
        name = list(ranks)[rng.integers(len(ranks))]
        ranks[name] = int(rng.integers(1, ranks[name] + 1))
    return ranks


def uniform(max_ranks: Mapping[str, int], rng: np.random.Generator) -> dict[str, int]:
    """FjORD style: one fraction p ~ U(0, 1] for every layer, rank ``ceil(p * max)``."""
    p = 1.0 - rng.random()  # in (0, 1]
    return {name: max(1, math.ceil(p * r)) for name, r in max_ranks.items()}


def independent(max_ranks: Mapping[str, int], rng: np.random.Generator) -> dict[str, int]:
    """Every layer its own uniform random rank in 1..max."""
    return {name: int(rng.integers(1, r + 1)) for name, r in max_ranks.items()}


def full(max_ranks: Mapping[str, int], rng: np.random.Generator) -> dict[str, int]:
    """No ordered dropout: always the client's maximum ranks."""
    return dict(max_ranks)


SAMPLERS: dict[str, Sampler] = {
    "single-layer": single_layer, "uniform": uniform, "independent": independent, "none": full,
}


def get_sampler(name: str) -> Sampler:
    """The sampler registered under ``name``."""
    if name not in SAMPLERS:
        raise ValueError(f"sampler {name!r} is not allowed: use one of {sorted(SAMPLERS)}")
    return SAMPLERS[name]
