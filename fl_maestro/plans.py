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
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from fl_maestro.budgets import ranks_for_budget
from fl_maestro.models import RankedModel, build_model, model_from_arrays
from fl_maestro.width import build_width_model, width_model_from_arrays

if TYPE_CHECKING:  # config imports this module
    from fl_maestro.config import RunConfig

RANK_STRATEGIES = ("rankwise", "fedavg-full", "fedavg-smallest", "fedavg-exclusive")
WIDTH_STRATEGIES = ("fjord", "heterofl")
STRATEGIES = RANK_STRATEGIES + WIDTH_STRATEGIES
TIER_GRID = "tier-grid"  # FjORD's sampler: its ranks come from the server, one grid per client
HGL_BEYOND = "hgl-beyond"  # per layer, the squared norms of the global components past a client's


@dataclass(frozen=True)
class LocalTraining:
    """How a device trains inside its slice: the sampler, the self-distilling loss, HGL, and
    HeteroFL's label-masked loss and scaler."""

    sampler: str
    distill: bool
    hgl_lambda: float
    masked_loss: bool = False
    scaler: bool = False


def local_training(cfg: RunConfig) -> LocalTraining:
    """What each strategy's paper trains locally.

    ``rankwise`` (Maestro): the configured sampler, self-distilling loss and HGL. The FedAvg
    baselines: plain SGD on their whole model (no ordered dropout, no distillation). FjORD: one
    tier of the discrete grid ``{p <= p_max}`` per step, with its knowledge distillation as a
    switch (``fjord-kd``, the same loss as Maestro's: CE at ``p_max`` plus CE to its softmax at
    ``p``). HeteroFL: its whole static slice, with its label-masked loss and scaler (switches).
    """
    if cfg.strategy == "rankwise":
        return LocalTraining(cfg.sampler, cfg.distill, cfg.hgl_lambda)
    if cfg.strategy == "fjord":
        return LocalTraining(TIER_GRID, cfg.fjord_kd, 0.0)
    if cfg.strategy == "heterofl":
        return LocalTraining("none", False, 0.0, cfg.heterofl_masked_loss, cfg.heterofl_scaler)
    if cfg.strategy in STRATEGIES:
        return LocalTraining("none", False, 0.0)
    raise ValueError(f"strategy {cfg.strategy!r} is not allowed: use one of {STRATEGIES}")


def plan_ranks(strategy: str, model: RankedModel, budget: float, budgets: Iterable[float],
               allocation: str = "uniform", cost: str = "macs",
               reference_cost: float | None = None) -> dict[str, int]:
    """The ranks a device of ``budget`` trains and runs under ``strategy``.

    ``reference_cost`` is what budgets are fractions of (default: the model's dense cost).
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


def tier_grid_ranks(strategy: str, model: RankedModel, budget: float, tiers: Iterable[float],
                    cost: str = "macs", reference_cost: float | None = None) -> list[dict[str, int]]:
    """FjORD's grid for a device of ``budget``: the ranks of every tier ``<= budget``, ascending."""
    return [plan_ranks(strategy, model, t, tiers, "uniform", cost, reference_cost)
            for t in sorted(set(tiers)) if t <= budget]


def is_width(strategy: str) -> bool:
    """Whether ``strategy`` trains width-sliced dense models instead of ordered factors."""
    return strategy in WIDTH_STRATEGIES


def build_for(strategy: str, name: str, input_shape: tuple[int, ...], num_classes: int,
              device: str | None = None, rank_cap: str = "dense") -> RankedModel:
    """The full global model ``strategy`` trains: ordered factors (maximum ranks capped by
    ``rank_cap``, see ``models.build_model``), or width-sliced dense layers for the baselines."""
    if is_width(strategy):
        return build_width_model(name, input_shape, num_classes, device=device)
    return build_model(name, input_shape, num_classes, device=device, rank_cap=rank_cap)


def model_for(strategy: str, name: str, input_shape: tuple[int, ...], num_classes: int,
              arrays: Mapping[str, np.ndarray], device: str = "cpu") -> RankedModel:
    """The model holding exactly the slice ``arrays`` of ``strategy``'s model family."""
    if is_width(strategy):
        return width_model_from_arrays(name, input_shape, num_classes, arrays, device=device)
    return model_from_arrays(name, input_shape, num_classes, arrays, device=device)
