"""Flower strategies for fl-maestro: the nested merge, the rank-wise strategy and the baselines."""

from strategies.merge import (
    InvalidReply,
    check_reply,
    corner_arrays,
    factor_axis,
    merge_nested,
    prefix_arrays,
)

__all__ = [
    "InvalidReply",
    "check_reply",
    "corner_arrays",
    "factor_axis",
    "merge_nested",
    "prefix_arrays",
]
