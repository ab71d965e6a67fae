"""Width layers: dense layers whose *rank* is the number of leading output channels they run.

A width layer holds an ordinary dense ``weight`` / ``bias`` and computes with
``weight[:rank, :x.shape[1]]``: its input width is read from the input itself, so a layer keeps
no state from another and every array is cut as a leading corner. ``fl_maestro.width`` builds the
FjORD and HeteroFL baselines' models from them.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from fl_maestro.layers import check_rank, leading

Shape = tuple[int, ...]
# What width models can and cannot do, in the refusals of factor-only features.
WIDTH_MODELS_SUPPORT = ("width models support uniform allocation, plain ordered dropout and "
                        "FedAvg-style merging only, not importance allocation, HGL or factor "
                        "weight decay")


class NotFactorised(AttributeError, ValueError):
    """Asked a width layer for ordered factors ``U`` / ``V``, which it does not have.

    An AttributeError so ``hasattr`` stays False; a ValueError so factor-only features (importance
    allocation, HGL, shrinking) fail on width models with this message, not a bare one.
    """


class WidthLayer:
    """Rank interface of a width layer: ``rank`` active output channels of the ``max_rank`` held."""

    weight: nn.Parameter
    bias: nn.Parameter | None
    rank: int
    sliceable_out: bool
    train_scale: float = 1.0  # HeteroFL's scaler: outputs are divided by it in training mode

    def _scaled(self, out: torch.Tensor) -> torch.Tensor:
        return out / self.train_scale if self.training and self.train_scale != 1.0 else out

    @property
    def max_rank(self) -> int:
        """Output channels the layer holds."""
        return self.weight.shape[0]

    def set_rank(self, rank: int) -> None:
        """Run the first ``rank`` output channels (1..max_rank; only max_rank if not sliceable)."""
        rank = check_rank(rank, self.max_rank)
        if not self.sliceable_out and rank != self.max_rank:
            raise ValueError(f"rank={rank!r}: the output is not sliceable, only {self.max_rank}")
        self.rank = rank

    def slice_shapes(self, rank: int | None = None,
                     in_width: int | None = None) -> dict[str, Shape]:
        """Shapes of ``weight`` / ``bias`` used at ``rank`` outputs and ``in_width`` inputs."""
        r, fan_in = self._active(rank, in_width)
        shapes = {"weight": (r, fan_in, *self.weight.shape[2:])}
        return shapes if self.bias is None else {**shapes, "bias": (r,)}

    def params(self, rank: int | None = None, in_width: int | None = None) -> int:
        """Parameters used at ``rank`` outputs and ``in_width`` inputs (default: active / held)."""
        return sum(math.prod(s) for s in self.slice_shapes(rank, in_width).values())

    def macs(self, rank: int | None = None, positions: int = 1, in_width: int | None = None) -> int:
        """Multiply-accumulates per sample; ``positions`` = output pixels of a conv."""
        return math.prod(self.slice_shapes(rank, in_width)["weight"]) * positions

    def dense_params(self) -> int:
        """Parameters of the whole held layer."""
        return self.params(self.max_rank, self.weight.shape[1])

    def dense_macs(self, positions: int = 1) -> int:
        """Multiply-accumulates per sample of the whole held layer."""
        return self.weight.numel() * positions

    def _active(self, rank: int | None, in_width: int | None) -> tuple[int, int]:
        r = self.rank if rank is None else check_rank(rank, self.max_rank)
        held_in = self.weight.shape[1]
        return r, held_in if in_width is None else check_rank(in_width, held_in, "in_width")

    def __getattr__(self, name: str):
        if name in ("U", "V"):
            raise NotFactorised(f"{type(self).__name__} has no ordered factors {name!r}: "
                                f"{WIDTH_MODELS_SUPPORT}")
        return super().__getattr__(name)  # nn.Module's lookup of parameters and submodules


class WidthLinear(WidthLayer, nn.Linear):
    """``y = x @ W[:r, :in]^T + b[:r]``, ``in = x.shape[-1]``: a linear layer on a leading slice.

    Shape:
        - Input: ``(*, in)`` with ``in <= in_features``
        - Output: ``(*, rank)``; ``rank`` is ``out_features`` when ``sliceable_out`` is False.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True,
                 sliceable_out: bool = True, device=None, dtype=None) -> None:
        super().__init__(in_features, out_features, bias, device, dtype)
        self.sliceable_out, self.rank = sliceable_out, out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        r = self.rank
        bias = None if self.bias is None else leading(self.bias, r)
        return self._scaled(F.linear(x, leading(self.weight, r, x.shape[-1]), bias))

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, rank={self.rank}, sliceable_out={self.sliceable_out}"


class WidthConv2d(WidthLayer, nn.Conv2d):
    """A conv run with ``weight[:r, :c_in]``, ``c_in = x.shape[1]``: ``r`` of its output channels.

    Shape:
        - Input: ``(N, c_in, H, W)`` with ``c_in <= in_channels``
        - Output: ``(N, rank, H_out, W_out)`` with ``H_out, W_out`` as for ``nn.Conv2d``.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1,
                 padding: int = 0, bias: bool = True, device=None, dtype=None) -> None:
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, bias=bias,
                         device=device, dtype=dtype)
        self.sliceable_out, self.rank = True, out_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        r = self.rank
        bias = None if self.bias is None else leading(self.bias, r)
        return self._scaled(F.conv2d(x, leading(self.weight, r, x.shape[1]), bias, self.stride,
                                     self.padding))

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, rank={self.rank}"


class WidthGroupNorm(nn.Module):
    """GroupNorm over the input's leading channels with a fixed number of channels per group.

    A fixed group size keeps every whole group of a leading corner identical to the global one; a
    trailing partial group (odd widths) is normalised on its own.
    """

    def __init__(self, num_channels: int, group_size: int, eps: float = 1e-5, device=None,
                 dtype=None) -> None:
        super().__init__()
        self.group_size, self.eps = group_size, eps
        self.weight = nn.Parameter(torch.ones(num_channels, device=device, dtype=dtype))
        self.bias = nn.Parameter(torch.zeros(num_channels, device=device, dtype=dtype))

    def slice_shapes(self, rank: int | None = None,
                     in_width: int | None = None) -> dict[str, Shape]:
        """Shapes of ``weight`` / ``bias`` used on ``in_width`` channels."""
        c = self.weight.shape[0] if in_width is None else in_width
        return {"weight": (c,), "bias": (c,)}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c, g = x.shape[1], self.group_size
        whole = c - c % g
        parts = [F.group_norm(x[:, :whole], whole // g, self.weight[:whole], self.bias[:whole],
                              self.eps)] if whole else []
        if whole < c:
            parts.append(F.group_norm(x[:, whole:], 1, self.weight[whole:c], self.bias[whole:c],
                                      self.eps))
        return parts[0] if len(parts) == 1 else torch.cat(parts, 1)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, group_size={self.group_size}, eps={self.eps}"
