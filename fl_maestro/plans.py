"""Who trains what: each strategy's ranks for a budget, and who takes part.

The rank-wise method gives a device the ranks its budget affords. The FedAvg baselines use the same
factorised model and the same nested merge, only with a different plan: ``fedavg-full`` gives every
device the full model whatever its budget (the unreachable upper bound), ``fedavg-smallest`` gives
every device the smallest tier's model (one model fits all), ``fedavg-exclusive`` trains only the
devices that afford the full model. A plan's ranks are both what a device trains and what it runs
at deployment, so the per-tier evaluation uses them too.
"""

from __future__ import annotations

from collections.abc import Iterable

from fl_maestro.budgets import ranks_for_budget
from fl_maestro.models import RankedModel

RANK_STRATEGIES = ("rankwise", "fedavg-full", "fedavg-smallest", "fedavg-exclusive")


def plan_ranks(strategy: str, model: RankedModel, budget: float, budgets: Iterable[float],
               allocation: str = "uniform", cost: str = "macs",
               reference_cost: float | None = None) -> dict[str, int]:
    """The ranks a device of ``budget`` trains and runs under ``strategy``.

    ``reference_cost`` is what budgets are fractions of (default: the model's own full cost).
    """
    if strategy in ("rankwise", "fedavg-exclusive"):
        return ranks_for_budget(model, budget, allocation, cost, reference_cost)
    if strategy == "fedavg-full":
        return model.max_ranks()
    if strategy == "fedavg-smallest":
        return ranks_for_budget(model, min(budgets), allocation, cost, reference_cost)
    raise ValueError(f"strategy {strategy!r} has no rank plan: use one of {RANK_STRATEGIES}")


def takes_part(strategy: str, budget: float) -> bool:
    """Whether a device of ``budget`` trains at all under ``strategy``."""
    return strategy != "fedavg-exclusive" or budget >= 1.0
