"""Hierarchical group lasso (HGL) and Maestro's progressive shrinking of trailing components.

HGL penalises nested groups of trailing components, ``sum_j ||V[j:]||_F + ||U[:, j:]||_F``, so the
tail of every layer shrinks first. The importance of component ``j`` is
``||V[j:]||_F * ||U[:, j:]||_F``, non-increasing in ``j``; components whose importance falls under a
threshold are cut.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch

from fl_maestro.layers import LowRankLayer


def tail_norms(factor_sq: torch.Tensor) -> torch.Tensor:
    """Norms of every trailing group from per-component squared norms: ``sqrt(sum_{i>=j} x_i)``."""
    tails = factor_sq.flip(0).cumsum(0).flip(0)
    return tails.clamp_min(1e-24).sqrt()  # clamp keeps the gradient finite at an all-zero tail


def component_sq_norms(layer: LowRankLayer, rank: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Squared norms of each of the first ``rank`` components' ``V`` row and ``U`` column."""
    r = layer.max_rank if rank is None else rank
    return layer.V[:r].pow(2).flatten(1).sum(1), layer.U[:, :r].pow(2).sum(0)


def hgl_penalty(layers: Mapping[str, LowRankLayer],
                ranks: Mapping[str, int] | None = None) -> torch.Tensor:
    """Differentiable HGL penalty over each layer's first ``ranks[name]`` components (default: all).

    Multiply by lambda yourself. Components past ``ranks`` get no gradient from it.
    """
    total = torch.zeros(())
    for name, layer in layers.items():
        v_sq, u_sq = component_sq_norms(layer, None if ranks is None else ranks[name])
        total = total + tail_norms(v_sq).sum() + tail_norms(u_sq).sum()
    return total


def importance_from_arrays(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Importance of each component, ``||V[j:]||_F * ||U[:, j:]||_F`` (non-increasing in j),
    from the factor arrays ``U`` (out x R) and ``V`` (R x ...), in float64."""
    v_sq = np.square(v.reshape(v.shape[0], -1), dtype=np.float64).sum(1)
    u_sq = np.square(u, dtype=np.float64).sum(0)
    tail = lambda x: np.sqrt(np.cumsum(x[::-1])[::-1])  # noqa: E731
    return tail(v_sq) * tail(u_sq)


@torch.no_grad()
def importance(layer: LowRankLayer) -> np.ndarray:
    """``importance_from_arrays`` of a layer's factors (all ``max_rank`` components)."""
    return importance_from_arrays(layer.U.detach().cpu().numpy(), layer.V.detach().cpu().numpy())


def shrink_ranks(importances: Mapping[str, np.ndarray], threshold: float) -> dict[str, int]:
    """Ranks that keep the components whose importance is at least ``threshold`` (never below 1)."""
    if not threshold >= 0:
        raise ValueError(f"shrink threshold {threshold!r} is out of range: allowed >= 0")
    return {name: max(1, int(np.count_nonzero(np.asarray(imp) >= threshold)))
            for name, imp in importances.items()}
