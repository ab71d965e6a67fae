"""Budgets: a device's affordable fraction of the model's cost, turned into per-layer ranks.

A budget ``b`` in (0, 1] is the fraction of the *dense* (undecomposed) model's cost (MACs per sample
by default, or parameters) that a device can afford: budget 1.0 is a device that runs the model the
user knows. ``ranks_for_budget`` picks per-layer ranks whose cost stays within ``b`` times that cost. Device mixes such as ``"0.2:0.5,1.0:0.5"`` (budget:share)
assign budgets to clients.
"""

from __future__ import annotations

import heapq
import math
import numbers

import numpy as np

from fl_maestro.models import COST_KINDS, RankedModel
from fl_maestro.shrinking import importance

ALLOCATIONS = ("uniform", "importance")


def check_budget(budget: float) -> float:
    """Return ``budget`` as a float if it lies in (0, 1], else raise ValueError."""
    if isinstance(budget, bool) or not isinstance(budget, numbers.Real) or not 0 < budget <= 1:
        raise ValueError(f"budget {budget!r} is out of range: allowed (0, 1]")  # NaN too
    return float(budget)


def ranks_for_budget(model: RankedModel, budget: float, method: str = "uniform",
                     cost: str = "macs", reference_cost: float | None = None) -> dict[str, int]:
    """Per-layer ranks whose cost is at most ``budget`` times the model's dense cost.

    ``uniform`` takes the largest common rank fraction that fits; ``importance`` adds components
    greedily by importance per unit of cost (Maestro's deployment-time allocation).
    ``reference_cost`` measures the budget against another cost than the model's own dense cost
    (``model.dense_cost``). Raises ValueError when even rank 1 everywhere does not fit.
    """
    budget = check_budget(budget)
    if method not in ALLOCATIONS:
        raise ValueError(f"rank allocation {method!r} is not allowed: use one of {ALLOCATIONS}")
    if cost not in COST_KINDS:
        raise ValueError(f"cost kind {cost!r} is not allowed: use one of {COST_KINDS}")
    reference = model.dense_cost(cost) if reference_cost is None else reference_cost
    limit = budget * reference
    floor = {name: 1 for name in model.max_ranks()}
    if model.cost(floor, cost) > limit * (1 + 1e-12):
        smallest = model.cost(floor, cost) / reference
        raise ValueError(f"budget {budget} is below the smallest runnable model "
                         f"({smallest:.4f} of the dense model's cost at rank 1 everywhere)")
    if model.cost(kind=cost) <= limit:
        return model.max_ranks()
    if method == "uniform":
        return _uniform_ranks(model, limit, cost)
    return _importance_ranks(model, limit, cost)


def _uniform_ranks(model: RankedModel, limit: float, cost: str) -> dict[str, int]:
    """Largest fraction p with cost(ceil(p * R)) <= limit, by bisection over the candidate p."""
    candidates = sorted({j / r for r in model.max_ranks().values() for j in range(1, r + 1)})
    lo, hi = 0, len(candidates) - 1  # candidates[lo] fits (rank 1 everywhere fits, checked above)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if model.cost(model.ranks_at_fraction(candidates[mid]), cost) <= limit:
            lo = mid
        else:
            hi = mid - 1
    return model.ranks_at_fraction(candidates[lo])


def _importance_ranks(model: RankedModel, limit: float, cost: str) -> dict[str, int]:
    """Greedy: repeatedly add the next component with the most importance per unit of cost."""
    layers = model.low_rank_layers()
    ranks = {name: 1 for name in layers}
    unit = {name: model.cost({**ranks, name: 2}, cost) - model.cost(ranks, cost) for name in layers}
    scores = {name: importance(layer) for name, layer in layers.items()}
    spent = model.cost(ranks, cost)
    heap = [(-scores[n][1] / unit[n], n) for n, layer in layers.items() if layer.max_rank > 1]
    heapq.heapify(heap)
    while heap:
        _, name = heapq.heappop(heap)
        if spent + unit[name] > limit:
            continue  # this layer's next component no longer fits; cheaper ones still may
        spent += unit[name]
        ranks[name] += 1
        if ranks[name] < layers[name].max_rank:
            heapq.heappush(heap, (-scores[name][ranks[name]] / unit[name], name))
    return ranks


def parse_mix(mix: str) -> list[tuple[float, float]]:
    """Parse ``"budget:share,..."`` into sorted ``(budget, share)`` pairs; shares must sum to 1."""
    if not isinstance(mix, str) or not mix.strip():
        raise ValueError(f"device mix {mix!r} is malformed: expected 'budget:share,...' "
                         "e.g. '0.2:0.5,1.0:0.5'")
    pairs: dict[float, float] = {}
    for item in mix.split(","):
        parts = item.strip().split(":")
        try:
            budget, share = (float(p) for p in parts) if len(parts) == 2 else (None, None)
        except ValueError:
            budget = share = None
        if budget is None:
            raise ValueError(f"device mix {mix!r} has malformed entry {item.strip()!r}: "
                             "expected 'budget:share' with two numbers")
        if budget in pairs:
            raise ValueError(f"device mix {mix!r} lists budget {budget} twice")
        check_budget(budget)
        if not 0 < share <= 1:
            raise ValueError(f"device mix {mix!r}: share {share} of budget {budget} is out of "
                             "range: allowed (0, 1]")
        pairs[budget] = share
    if not math.isclose(sum(pairs.values()), 1.0, abs_tol=1e-6):
        raise ValueError(f"device mix {mix!r}: shares sum to {sum(pairs.values()):.6g}, must sum to 1")
    return sorted(pairs.items())


def assign_budgets(mix: str | list[tuple[float, float]], num_clients: int,
                   rng: np.random.Generator) -> np.ndarray:
    """Budgets of ``num_clients`` clients: counts by largest remainder, order shuffled by ``rng``."""
    if isinstance(num_clients, bool) or not isinstance(num_clients, int) or num_clients < 1:
        raise ValueError(f"num_clients {num_clients!r} is out of range: allowed integers >= 1")
    pairs = parse_mix(mix) if isinstance(mix, str) else mix
    exact = np.array([share for _, share in pairs]) * num_clients
    counts = np.floor(exact).astype(int)
    remainder_order = np.argsort(-(exact - counts), kind="stable")
    counts[remainder_order[: num_clients - counts.sum()]] += 1
    budgets = np.repeat([budget for budget, _ in pairs], counts)
    return rng.permutation(budgets)
