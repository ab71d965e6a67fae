"""Low-rank layers with ordered factors (Maestro's low-rank ordered decomposition).

A layer holds its dense weight ``W`` (out x fan_in) as ``W = U @ V`` with ``U`` (out x R) and ``V``
(R x fan_in, or R x in x k x k for a conv). Component ``j`` is the pair (``U[:, j]``, ``V[j]``) and a
layer run at rank ``r`` uses the first ``r`` components only, by slicing: the compute of a rank-``r``
step is about ``r / R`` of the full-rank step and components ``>= r`` get no gradient at all.

``U`` is stored rank-major (its memory is an R x out block, exposed as its out x R transpose), so
the prefix ``U[:, :r]`` is one contiguous block of memory like ``V[:r]``: slicing then reads and
writes only the prefix, which is what makes small ranks proportionally cheap.
"""

from __future__ import annotations

import math
import numbers

import torch
import torch.nn.functional as F
from torch import nn


def _rank_major(rows: int, rank: int, **factory) -> nn.Parameter:
    """An uninitialised ``rows x rank`` parameter whose memory is laid out rank-major."""
    return nn.Parameter(torch.empty(rank, rows, **factory).t())


def leading(tensor: torch.Tensor, *sizes: int) -> torch.Tensor:
    """``tensor[:sizes[0], :sizes[1], ...]``, or ``tensor`` itself when that is the whole of it.

    Slicing even the whole of a tensor costs autograd a zero-filled full-size gradient and a copy
    on every backward pass, so the whole tensor is never sliced.
    """
    if tensor.shape[:len(sizes)] == sizes:
        return tensor
    return tensor[tuple(slice(0, s) for s in sizes)]


def check_rank(rank: int, max_rank: int, what: str = "rank") -> int:
    """Return ``rank`` as an int if ``1 <= rank <= max_rank``, else raise ValueError."""
    if isinstance(rank, bool) or not isinstance(rank, numbers.Real) or int(rank) != rank \
            or not 1 <= rank <= max_rank:
        raise ValueError(f"{what}={rank!r} is out of range: allowed 1..{max_rank}")
    return int(rank)


class LowRankLayer(nn.Module):
    """Shared machinery of the ordered factor pair ``U`` (out x R), ``V`` (R x ...).

    Subclasses set ``fan_in`` and ``out_features`` before calling ``_init_factors`` and implement
    ``forward`` and ``dense_weight_shape``.
    """

    U: nn.Parameter
    V: nn.Parameter
    fan_in: int
    out_features: int

    def _init_factors(self, v_tail: tuple[int, ...], max_rank: int | None, bias: bool, factory) -> None:
        """Create ``U``, ``V`` and ``bias`` with room for ``max_rank`` components."""
        full = min(self.out_features, self.fan_in)
        max_rank = full if max_rank is None else check_rank(max_rank, full, "max_rank")
        self.U = _rank_major(self.out_features, max_rank, **factory)
        self.V = nn.Parameter(torch.empty(max_rank, *v_tail, **factory))
        self.bias = nn.Parameter(torch.empty(self.out_features, **factory)) if bias else None
        self.rank = max_rank
        self.reset_parameters()

    @property
    def max_rank(self) -> int:
        """Number of components the layer holds."""
        return self.V.shape[0]

    def set_rank(self, rank: int) -> None:
        """Run the layer on its first ``rank`` components (1 <= rank <= max_rank)."""
        self.rank = check_rank(rank, self.max_rank)

    def reset_parameters(self) -> None:
        """Initialise as the SVD factors of a dense layer drawn with PyTorch's default init."""
        if self.U.is_meta:
            return
        dense = torch.empty(self.out_features, self.fan_in)
        nn.init.kaiming_uniform_(dense, a=math.sqrt(5))  # nn.Linear / nn.Conv2d default
        self.set_dense_weight(dense)
        if self.bias is not None:
            bound = 1 / math.sqrt(self.fan_in)
            nn.init.uniform_(self.bias, -bound, bound)

    @torch.no_grad()
    def set_dense_weight(self, weight: torch.Tensor) -> None:
        """Set the factors to the best rank-R approximation of ``weight`` (out x fan_in), by SVD.

        ``U = P sqrt(S)`` and ``V = sqrt(S) Q^T`` so both factors carry the same scale and the
        components come out ordered by singular value.
        """
        weight = weight.reshape(self.out_features, self.fan_in).to(torch.float64)
        p, s, qt = torch.linalg.svd(weight, full_matrices=False)
        root = s[: self.max_rank].sqrt()
        self.U.copy_(p[:, : self.max_rank] * root)
        self.V.copy_((root[:, None] * qt[: self.max_rank]).reshape(self.V.shape))
        self.rank = self.max_rank

    @torch.no_grad()
    def truncate(self, max_rank: int) -> None:
        """Keep only the first ``max_rank`` components (the layer's new maximum rank)."""
        max_rank = check_rank(max_rank, self.max_rank, "max_rank")
        u = _rank_major(self.out_features, max_rank, device=self.U.device, dtype=self.U.dtype)
        u.data.copy_(self.U[:, :max_rank])
        self.U = u
        self.V = nn.Parameter(self.V[:max_rank].clone())
        self.rank = min(self.rank, max_rank)

    def composed_weight(self, rank: int | None = None) -> torch.Tensor:
        """The dense weight ``U[:, :r] @ V[:r]`` in the dense layer's shape."""
        r = self.rank if rank is None else check_rank(rank, self.max_rank)
        return (self.u_prefix(r) @ self.v_prefix(r).reshape(r, -1)).reshape(self.dense_weight_shape)

    def u_prefix(self, rank: int) -> torch.Tensor:
        """``U[:, :rank]``, sliced through U's rank-major memory so its gradient keeps U's layout.

        Slicing the out x R view directly makes autograd build a row-major full-size gradient that
        must then be transposed into ``U.grad``: a strided full-size copy on every step. (At full
        rank ``U`` itself is used; the conv's 1x1 backward still hands over a row-major gradient,
        which autograd lays out as ``U``: one copy of out x r values.)
        """
        return leading(self.U.t(), rank).t()

    def v_prefix(self, rank: int) -> torch.Tensor:
        """``V[:rank]``."""
        return leading(self.V, rank)

    @property
    def dense_weight_shape(self) -> tuple[int, ...]:
        raise NotImplementedError

    def params(self, rank: int | None = None) -> int:
        """Parameters used at ``rank`` (default: the active rank), bias included."""
        r = self.rank if rank is None else check_rank(rank, self.max_rank)
        return r * (self.fan_in + self.out_features) + self._bias_size()

    def macs(self, rank: int | None = None, positions: int = 1) -> int:
        """Multiply-accumulates per sample at ``rank``; ``positions`` = output pixels of a conv."""
        r = self.rank if rank is None else check_rank(rank, self.max_rank)
        return r * (self.fan_in + self.out_features) * positions

    def dense_params(self) -> int:
        """Parameters of the equivalent dense (undecomposed) layer."""
        return self.out_features * self.fan_in + self._bias_size()

    def dense_macs(self, positions: int = 1) -> int:
        """Multiply-accumulates per sample of the equivalent dense layer."""
        return self.out_features * self.fan_in * positions

    def _bias_size(self) -> int:
        return 0 if self.bias is None else self.out_features

    def extra_repr(self) -> str:
        return f"max_rank={self.max_rank}, rank={self.rank}, bias={self.bias is not None}"


class LowRankLinear(LowRankLayer):
    """``y = U[:, :r] @ (V[:r] @ x) + b``: a linear layer held as ordered factors.

    Shape:
        - Input: ``(*, in_features)``
        - Output: ``(*, out_features)``, whatever the active rank.

    Attributes:
        U: ``(out_features, max_rank)``; its rank axis is 1.
        V: ``(max_rank, in_features)``; its rank axis is 0.
    """

    def __init__(self, in_features: int, out_features: int, max_rank: int | None = None,
                 bias: bool = True, device=None, dtype=None) -> None:
        super().__init__()
        self.in_features, self.out_features, self.fan_in = in_features, out_features, in_features
        self._init_factors((in_features,), max_rank, bias, {"device": device, "dtype": dtype})

    @property
    def dense_weight_shape(self) -> tuple[int, ...]:
        return (self.out_features, self.in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        r = self.rank
        return F.linear(F.linear(x, self.v_prefix(r)), self.u_prefix(r), self.bias)

    @classmethod
    def from_dense(cls, module: nn.Linear, max_rank: int | None = None) -> LowRankLinear:
        """A factorised copy of ``module`` initialised by SVD (exact when max_rank is full)."""
        layer = cls(module.in_features, module.out_features, max_rank, module.bias is not None,
                    device=module.weight.device, dtype=module.weight.dtype)
        layer.set_dense_weight(module.weight.detach())
        if module.bias is not None:
            layer.bias.data.copy_(module.bias.detach())
        return layer

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, " + super().extra_repr()


class LowRankConv2d(LowRankLayer):
    """A conv held as a k x k conv ``V[:r]`` (in -> r channels) followed by a 1x1 conv ``U[:, :r]``.

    The rank changes only the inner width, never the output shape.

    Shape:
        - Input: ``(N, in_channels, H, W)``
        - Output: ``(N, out_channels, H_out, W_out)`` as for ``nn.Conv2d`` with the same arguments.

    Attributes:
        U: ``(out_channels, max_rank)``; its rank axis is 1.
        V: ``(max_rank, in_channels, k, k)``; its rank axis is 0.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1,
                 padding: int = 0, max_rank: int | None = None, bias: bool = True,
                 device=None, dtype=None) -> None:
        super().__init__()
        self.in_channels, self.out_channels, self.out_features = in_channels, out_channels, out_channels
        self.kernel_size, self.stride, self.padding = kernel_size, stride, padding
        self.fan_in = in_channels * kernel_size * kernel_size
        v_tail = (in_channels, kernel_size, kernel_size)
        self._init_factors(v_tail, max_rank, bias, {"device": device, "dtype": dtype})

    @property
    def dense_weight_shape(self) -> tuple[int, ...]:
        return (self.out_channels, self.in_channels, self.kernel_size, self.kernel_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        r = self.rank
        inner = F.conv2d(x, self.v_prefix(r), None, self.stride, self.padding)
        return F.conv2d(inner, self.u_prefix(r)[:, :, None, None], self.bias)

    @classmethod
    def from_dense(cls, module: nn.Conv2d, max_rank: int | None = None) -> LowRankConv2d:
        """A factorised copy of a square-kernel, ungrouped ``module``, initialised by SVD."""
        k, s, p = module.kernel_size, module.stride, module.padding
        if k[0] != k[1] or s[0] != s[1] or isinstance(p, str) or p[0] != p[1] \
                or module.groups != 1 or module.dilation != (1, 1) or module.padding_mode != "zeros":
            raise ValueError("from_dense supports square, ungrouped, undilated, zero-padded convs; "
                             f"got {module}")
        layer = cls(module.in_channels, module.out_channels, k[0], s[0], p[0], max_rank,
                    module.bias is not None, device=module.weight.device, dtype=module.weight.dtype)
        layer.set_dense_weight(module.weight.detach())
        if module.bias is not None:
            layer.bias.data.copy_(module.bias.detach())
        return layer

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
                f"stride={self.stride}, padding={self.padding}, " + super().extra_repr())
