"""Ordered-dropout samplers: which rank prefix each local step trains.

Each sampler draws ranks inside a client's own maximum ranks from a seeded numpy Generator. Small
prefixes are drawn far more often than large ones (every draw includes the first component), which
is what orders the components by importance.

``single-layer`` is Maestro's ``per_layer`` sampler as its code draws: one (layer, rank) pair drawn
uniformly, with replacement every step, from the union of every layer's ranks, so a layer's chance
of being truncated is proportional to its number of ranks; the others stay at their maximum.
``single-layer-walk`` is the same draw as Maestro's code makes it within a client's training: the
list of every (layer, rank) pair is shuffled and walked one pair per step, reshuffled when used up
(without replacement within a cycle; the same marginals as ``single-layer``).
``single-layer-uniform`` first picks the layer uniformly (every layer equally often), then the rank.
``tier_grid`` is FjORD's: one width fraction per step, drawn uniformly from the discrete grid of
tiers the client can afford, for every layer.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence

import numpy as np

Sampler = Callable[[Mapping[str, int], np.random.Generator], dict[str, int]]


def single_layer(max_ranks: Mapping[str, int], rng: np.random.Generator) -> dict[str, int]:
    """Maestro's default: a (layer, rank) pair uniform over all layers' ranks; others at max."""
    ranks = dict(max_ranks)
    if ranks:
        bounds = np.cumsum(list(ranks.values()))
        k = int(rng.integers(bounds[-1]))  # which of all (layer, rank) pairs
        i = int(np.searchsorted(bounds, k, side="right"))
        name = list(ranks)[i]
        ranks[name] = k - int(bounds[i - 1] if i else 0) + 1
    return ranks


class SingleLayerWalk:
    """Maestro's ``per_layer`` walk: a shuffled list of all (layer, rank) pairs, one per step.

    It keeps its place between calls, so ``get_sampler`` makes a fresh walk for each client's
    training (and the same fresh walk for the server's plan of that training's steps).
    """

    def __init__(self) -> None:
        self.pairs: list[tuple[str, int]] = []
        self.max_ranks: dict[str, int] | None = None

    def __call__(self, max_ranks: Mapping[str, int], rng: np.random.Generator) -> dict[str, int]:
        ranks = dict(max_ranks)
        if ranks != self.max_ranks:  # another client's ranks: a walk of its own pairs
            self.max_ranks, self.pairs = dict(ranks), []
        if not ranks:
            return ranks
        if not self.pairs:
            cycle = [(name, r) for name, top in ranks.items() for r in range(1, top + 1)]
            self.pairs = [cycle[i] for i in rng.permutation(len(cycle))]
        name, rank = self.pairs.pop()
        ranks[name] = rank
        return ranks


def single_layer_uniform(max_ranks: Mapping[str, int], rng: np.random.Generator) -> dict[str, int]:
    """One layer picked uniformly gets a uniform random rank, the others stay at max."""
    ranks = dict(max_ranks)
    if ranks:
        name = list(ranks)[rng.integers(len(ranks))]
        ranks[name] = int(rng.integers(1, ranks[name] + 1))
    return ranks


def uniform(max_ranks: Mapping[str, int], rng: np.random.Generator) -> dict[str, int]:
    """One continuous fraction p ~ U(0, 1] for every layer, rank ``ceil(p * max)``."""
    p = 1.0 - rng.random()  # in (0, 1]
    return {name: max(1, math.ceil(p * r)) for name, r in max_ranks.items()}


def independent(max_ranks: Mapping[str, int], rng: np.random.Generator) -> dict[str, int]:
    """Every layer its own uniform random rank in 1..max."""
    return {name: int(rng.integers(1, r + 1)) for name, r in max_ranks.items()}


def full(max_ranks: Mapping[str, int], rng: np.random.Generator) -> dict[str, int]:
    """No ordered dropout: always the client's maximum ranks."""
    return dict(max_ranks)


def tier_grid(grid: Sequence[Mapping[str, int]]) -> Sampler:
    """FjORD's sampler: each step one of ``grid`` (the ranks of every tier ``p <= p_max``), uniformly.

    The returned sampler checks that every grid point lies inside the client's maximum ranks.
    """
    points = [dict(g) for g in grid]
    if not points:
        raise ValueError("tier grid is empty: a FjORD client needs at least its own tier")

    def draw(max_ranks: Mapping[str, int], rng: np.random.Generator) -> dict[str, int]:
        ranks = points[int(rng.integers(len(points)))]
        if set(ranks) != set(max_ranks) or any(r > max_ranks[n] for n, r in ranks.items()):
            raise ValueError(f"tier-grid point {ranks} does not fit the client's ranks {dict(max_ranks)}")
        return dict(ranks)
    return draw


SAMPLERS: dict[str, Sampler] = {
    "single-layer": single_layer, "single-layer-uniform": single_layer_uniform,
    "uniform": uniform, "independent": independent, "none": full,
}


# Samplers that keep state within a client's training: a fresh one per training.
WALKS: dict[str, Callable[[], Sampler]] = {"single-layer-walk": SingleLayerWalk}
SAMPLER_NAMES = tuple(sorted([*SAMPLERS, *WALKS]))


def get_sampler(name: str) -> Sampler:
    """The sampler registered under ``name`` (a fresh one for a walk)."""
    if name in WALKS:
        return WALKS[name]()
    if name not in SAMPLERS:
        raise ValueError(f"sampler {name!r} is not allowed: use one of {SAMPLER_NAMES}")
    return SAMPLERS[name]
