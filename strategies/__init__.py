"""Flower strategies for fl-maestro: the nested merge, the rank-wise strategy and the baselines."""

from strategies.merge import (
    InvalidReply,
    check_reply,
    corner_arrays,
    window_arrays,
    factor_axis,
    merge_nested,
    prefix_arrays,
)

from strategies.plan import ClientSpec, FixedPlan, Planner
from strategies.rankwise import RankWiseFedAvg, WidthFedAvg

__all__ = [
    "ClientSpec",
    "FixedPlan",
    "Planner",
    "RankWiseFedAvg",
    "WidthFedAvg",
    "InvalidReply",
    "check_reply",
    "corner_arrays",
    "window_arrays",
    "factor_axis",
    "merge_nested",
    "prefix_arrays",
]
