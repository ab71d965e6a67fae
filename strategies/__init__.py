"""Flower strategies for fl-maestro: the nested merge, the rank-wise strategy and the baselines."""

from strategies.merge import (
    InvalidReply,
    check_reply,
    corner_arrays,
    factor_axis,
    merge_nested,
    prefix_arrays,
)

from strategies.rankwise import ClientSpec, RankWiseFedAvg, WidthFedAvg

__all__ = [
    "ClientSpec",
    "RankWiseFedAvg",
    "WidthFedAvg",
    "InvalidReply",
    "check_reply",
    "corner_arrays",
    "factor_axis",
    "merge_nested",
    "prefix_arrays",
]
