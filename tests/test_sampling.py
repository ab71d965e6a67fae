"""Ordered-dropout samplers: ranges, the shape of each draw, coverage and seeding."""

from __future__ import annotations

import numpy as np
import pytest

from fl_maestro.sampling import (SAMPLERS, full, get_sampler, independent, single_layer,
                                 single_layer_uniform, tier_grid, uniform)

MAX_RANKS = {"a": 5, "b": 1, "c": 17, "d": 64}
DRAWS = 2000


def _draws(sampler, max_ranks=MAX_RANKS, seed: int = 0, n: int = DRAWS) -> list[dict[str, int]]:
    rng = np.random.default_rng(seed)
    return [sampler(max_ranks, rng) for _ in range(n)]


@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_ranks_stay_within_one_and_max(name: str) -> None:
    for ranks in _draws(get_sampler(name)):
        assert set(ranks) == set(MAX_RANKS)
        for layer, r in ranks.items():
            assert isinstance(r, int) and 1 <= r <= MAX_RANKS[layer], (name, ranks)


@pytest.mark.parametrize("sampler", [single_layer, single_layer_uniform])
def test_single_layer_changes_at_most_one_layer(sampler) -> None:
    touched = set()
    for ranks in _draws(sampler):
        changed = [n for n in MAX_RANKS if ranks[n] != MAX_RANKS[n]]
        assert len(changed) <= 1, ranks
        touched.update(changed)
    assert touched == {"a", "c", "d"}  # "b" has max rank 1: drawing it changes nothing


def test_single_layer_uniform_picks_layers_evenly() -> None:
    # a layer drawn gets a rank below its max w.p. 1 - 1/max; "d" (64) is below max ~1/4 of draws
    below = sum(r["d"] < 64 for r in _draws(single_layer_uniform))
    assert 0.2 * DRAWS < below < 0.3 * DRAWS


def test_single_layer_draws_layers_in_proportion_to_their_ranks() -> None:
    """Maestro's per_layer sampler: "d" holds 64 of the 87 (layer, rank) pairs, so it is cut
    below its max in 63/87 of the steps (a uniform choice of layer would give ~1/4)."""
    below = sum(r["d"] < 64 for r in _draws(single_layer, n=4000))
    assert abs(below / 4000 - 63 / 87) < 0.03, below


def test_single_layer_draws_every_layer_rank_pair_equally() -> None:
    """{x: 2, y: 6} has 8 pairs: x at 1, y at 1..5 each 1/8; no change (x at 2 or y at 6) 2/8."""
    n = 16000
    outcomes: dict[tuple, int] = {}
    for ranks in _draws(single_layer, {"x": 2, "y": 6}, n=n):
        key = ("x", ranks["x"]) if ranks["x"] < 2 else ("y", ranks["y"]) if ranks["y"] < 6 else ()
        outcomes[key] = outcomes.get(key, 0) + 1
    expected = {("x", 1): 1 / 8, **{("y", r): 1 / 8 for r in range(1, 6)}, (): 2 / 8}
    assert set(outcomes) == set(expected)
    for key, p in expected.items():
        assert abs(outcomes[key] / n - p) < 0.012, (key, outcomes[key] / n)


def test_tier_grid_draws_each_tier_uniformly_for_every_layer() -> None:
    grid = [{"a": 1, "b": 2}, {"a": 2, "b": 5}, {"a": 3, "b": 8}]
    draws = _draws(tier_grid(grid), {"a": 3, "b": 8}, n=3000)
    counts = [sum(d == g for d in draws) for g in grid]
    assert sum(counts) == 3000 and min(counts) > 0.9 * 1000 and max(counts) < 1.1 * 1000
    with pytest.raises(ValueError, match="does not fit"):
        tier_grid(grid)({"a": 2, "b": 8}, np.random.default_rng(0))
    with pytest.raises(ValueError, match="empty"):
        tier_grid([])


def test_uniform_uses_one_common_fraction() -> None:
    for ranks in _draws(uniform):
        # rank ceil(p R) means p in ((r - 1) / R, r / R]; the intervals must share a point
        low = max((r - 1) / MAX_RANKS[n] for n, r in ranks.items())
        high = min(r / MAX_RANKS[n] for n, r in ranks.items())
        assert low < high, ranks


def test_independent_covers_the_range_evenly() -> None:
    draws = _draws(independent, n=3000)
    counts = np.bincount([r["a"] for r in draws], minlength=6)[1:]
    assert counts.min() > 0.8 * 3000 / 5 and counts.max() < 1.2 * 3000 / 5
    assert {r["c"] for r in draws} == set(range(1, 18))
    assert {r["d"] for r in draws} == set(range(1, 65))
    # layers are drawn independently: a and c are not tied to one fraction
    assert any(r["a"] == 1 and r["c"] == 17 for r in draws)


@pytest.mark.parametrize("sampler", [uniform, independent])
def test_one_layer_draw_is_uniform_over_the_ranks(sampler) -> None:
    """For a single layer, uniform and independent give the same law: rank uniform in 1..R."""
    draws = [r["x"] for r in _draws(sampler, {"x": 8}, n=4000)]
    counts = np.bincount(draws, minlength=9)[1:]
    assert counts.min() > 0.85 * 500 and counts.max() < 1.15 * 500, counts


def test_full_is_always_the_maximum() -> None:
    assert all(r == MAX_RANKS for r in _draws(full, n=10))


@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_draws_are_determined_by_the_seed(name: str) -> None:
    sampler = get_sampler(name)
    assert _draws(sampler, seed=3, n=50) == _draws(sampler, seed=3, n=50)
    if name != "none":
        assert _draws(sampler, seed=3, n=50) != _draws(sampler, seed=4, n=50)


def test_empty_model_is_fine() -> None:
    rng = np.random.default_rng(0)
    assert all(get_sampler(n)({}, rng) == {} for n in SAMPLERS)


def test_registry_and_unknown_name() -> None:
    assert get_sampler("single-layer") is single_layer
    assert get_sampler("single-layer-uniform") is single_layer_uniform
    assert get_sampler("uniform") is uniform
    assert get_sampler("independent") is independent
    assert get_sampler("none") is full
    with pytest.raises(ValueError, match="'pufferfish'.*single-layer"):
        get_sampler("pufferfish")
