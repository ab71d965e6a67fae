"""Hierarchical group lasso (HGL) and Maestro's progressive shrinking of trailing components.

HGL penalises nested groups of trailing components, ``sum_j ||V[j:]||_F + ||U[:, j:]||_F``, so the
tail of every layer shrinks first. A client holds only the first ``r`` components of a layer, but
each of its groups ``j < r`` also holds the global components ``r..R``: the server sends their
squared norms (``tail_constants``) and the client adds them inside its group norms as constants, so
the gradient of its penalty on its components is the global penalty's gradient restricted to them. The importance of component ``j`` is
``||V[j:]||_F * ||U[:, j:]||_F``, non-increasing in ``j``; components whose importance falls under a
threshold are cut.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch

from fl_maestro.layers import LowRankLayer


def tail_norms(factor_sq: torch.Tensor, beyond: float = 0.0) -> torch.Tensor:
    """Norms of every trailing group from per-component squared norms: ``sqrt(sum_{i>=j} x_i + c)``.

    ``beyond`` (``c``) is the squared norm of the components past the last one given.
    """
    tails = factor_sq.flip(0).cumsum(0).flip(0) + beyond
    return tails.clamp_min(1e-24).sqrt()  # clamp keeps the gradient finite at an all-zero tail


def component_sq_norms(layer: LowRankLayer, rank: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Squared norms of each of the first ``rank`` components' ``V`` row and ``U`` column."""
    r = layer.max_rank if rank is None else rank
    return layer.V[:r].pow(2).flatten(1).sum(1), layer.U[:, :r].pow(2).sum(0)


def hgl_penalty(layers: Mapping[str, LowRankLayer], ranks: Mapping[str, int] | None = None,
                beyond: Mapping[str, tuple[float, float]] | None = None) -> torch.Tensor:
    """Differentiable HGL penalty over each layer's first ``ranks[name]`` components (default: all).

    ``beyond[name]`` = (squared norm of ``V``'s rows, of ``U``'s columns) past those components,
    held elsewhere (``tail_constants``): added inside every group norm as constants, so the groups
    are the global model's. Multiply by lambda yourself. Components past ``ranks`` get no gradient.
    """
    total = torch.zeros(())
    for name, layer in layers.items():
        v_sq, u_sq = component_sq_norms(layer, None if ranks is None else ranks[name])
        v_beyond, u_beyond = (0.0, 0.0) if beyond is None else beyond[name]
        total = total + tail_norms(v_sq, v_beyond).sum() + tail_norms(u_sq, u_beyond).sum()
    return total


def tail_constants(arrays: Mapping[str, np.ndarray],
                   ranks: Mapping[str, int]) -> dict[str, tuple[float, float]]:
    """Per layer, the squared norms of ``V[r:]`` and ``U[:, r:]`` of the global ``arrays``: what a
    client holding the first ``r = ranks[layer]`` components needs for the global HGL groups."""
    out = {}
    for name, r in ranks.items():
        v, u = arrays[f"{name}.V"], arrays[f"{name}.U"]
        out[name] = (float(np.square(v[r:], dtype=np.float64).sum()),
                     float(np.square(u[:, r:], dtype=np.float64).sum()))
    return out


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
