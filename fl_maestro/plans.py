"""Who trains what: each strategy's ranks for a budget, and who takes part.

The rank-wise method gives a device the ranks its budget affords. The FedAvg baselines use the same
factorised model and the same nested merge, only with a different plan: ``fedavg-full`` gives every
device the full model whatever its budget (the unreachable upper bound), ``fedavg-smallest`` gives
every device the smallest tier's model (one model fits all), ``fedavg-exclusive`` trains only the
devices that afford the full model. The width baselines, ``fjord`` (ordered dropout over channel
width) and ``heterofl`` (a static width per device), train width-sliced dense versions of the same
architectures (``fl_maestro/width.py``) where a "rank" is a layer's channel count, and give each
device the widest common width fraction its budget affords. A plan's ranks are both what a device trains and what it runs
at deployment, so the per-tier evaluation uses them too.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import numpy as np

from fl_maestro.budgets import ranks_for_budget
from fl_maestro.models import RankedModel, build_model, model_from_arrays
from fl_maestro.width import build_width_model, width_model_from_arrays

RANK_STRATEGIES = ("rankwise", "fedavg-full", "fedavg-smallest", "fedavg-exclusive")
WIDTH_STRATEGIES = ("fjord", "heterofl")
STRATEGIES = RANK_STRATEGIES + WIDTH_STRATEGIES
# The width baselines fix how a device trains inside its slice: FjORD samples one width fraction
# p <= p_max per step for all layers; HeteroFL always trains its whole, static slice.
WIDTH_SAMPLERS = {"fjord": "uniform", "heterofl": "none"}


def plan_ranks(strategy: str, model: RankedModel, budget: float, budgets: Iterable[float],
               allocation: str = "uniform", cost: str = "macs",
               reference_cost: float | None = None) -> dict[str, int]:
    """The ranks a device of ``budget`` trains and runs under ``strategy``.

    ``reference_cost`` is what budgets are fractions of (default: the model's own full cost).
    """
    if strategy in WIDTH_STRATEGIES:
        return ranks_for_budget(model, budget, "uniform", cost, reference_cost)
    if strategy in ("rankwise", "fedavg-exclusive"):
        return ranks_for_budget(model, budget, allocation, cost, reference_cost)
    if strategy == "fedavg-full":
        return model.max_ranks()
    if strategy == "fedavg-smallest":
        return ranks_for_budget(model, min(budgets), allocation, cost, reference_cost)
    raise ValueError(f"strategy {strategy!r} is not allowed: use one of {STRATEGIES}")


def takes_part(strategy: str, budget: float) -> bool:
    """Whether a device of ``budget`` trains at all under ``strategy``."""
    return strategy != "fedavg-exclusive" or budget >= 1.0


def local_sampler(strategy: str, configured: str) -> str:
    """The ordered-dropout sampler a client uses: the width baselines' own, else the configured."""
    return WIDTH_SAMPLERS.get(strategy, configured)


def is_width(strategy: str) -> bool:
    """Whether ``strategy`` trains width-sliced dense models instead of ordered factors."""
    return strategy in WIDTH_STRATEGIES


def build_for(strategy: str, name: str, input_shape: tuple[int, ...], num_classes: int,
              device: str | None = None) -> RankedModel:
    """The full global model ``strategy`` trains: ordered factors, or width-sliced for baselines."""
    if is_width(strategy):
        return build_width_model(name, input_shape, num_classes, device=device)
    return build_model(name, input_shape, num_classes, device=device)


def model_for(strategy: str, name: str, input_shape: tuple[int, ...], num_classes: int,
              arrays: Mapping[str, np.ndarray], device: str = "cpu") -> RankedModel:
    """The model holding exactly the slice ``arrays`` of ``strategy``'s model family."""
    if is_width(strategy):
        return width_model_from_arrays(name, input_shape, num_classes, arrays, device=device)
    return model_from_arrays(name, input_shape, num_classes, arrays, device=device)
