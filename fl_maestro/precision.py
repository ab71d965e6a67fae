"""Numeric precision and memory layout of local training and evaluation, chosen in one place.

``precision`` (a run-config key) is the dtype convolutions and matmuls run in. ``fp32`` runs
everything in float32. ``bf16`` runs the forward passes under ``torch.autocast`` with bfloat16
(on CPU: AMX / AVX-512 BF16 kernels; on CUDA: tensor cores): parameters, gradients, optimizer
state, the merge and every array a client sends stay float32, and losses and softmax are
computed in float32 (autocast's own lists), so only the convolution and matmul inputs are rounded
to bfloat16's 8 significant bits.

Conv models run ``channels_last`` (NHWC) on every device and precision: oneDNN's and cuDNN's
fastest convolution and pooling kernels are NHWC ones. The layout changes no array's shape or
name, only strides, and every array leaves a client as a C-contiguous copy.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext

import torch
from torch import nn

PRECISIONS = ("fp32", "bf16")
_AUTOCAST_DTYPES = {"bf16": torch.bfloat16}


def check_precision(precision: str) -> str:
    """Return ``precision`` if it is one of ``PRECISIONS``, else raise ValueError naming it."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision={precision!r} is not allowed; expected one of {PRECISIONS}")
    return precision


def autocast(precision: str, device: torch.device | str) -> AbstractContextManager:
    """The context the forward passes of ``precision`` run in on ``device``.

    Enter it per step, around the forward passes and the loss only: autocast caches the
    low-precision copies of the weights until its context exits, so a context spanning several
    optimizer steps would keep using stale copies.
    """
    dtype = _AUTOCAST_DTYPES.get(check_precision(precision))
    if dtype is None:
        return nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=dtype)


def memory_format(model: nn.Module) -> torch.memory_format:
    """``channels_last`` for a model with convolutions (4-d parameters), else the default layout."""
    has_conv = any(p.dim() == 4 for p in model.parameters())
    return torch.channels_last if has_conv else torch.contiguous_format


def use_fast_layout(model: nn.Module) -> torch.memory_format:
    """Lay ``model``'s parameters out in ``memory_format(model)`` (in place); return that format.

    Parameters stay the same objects (only their data is re-strided), so it is safe to call at the
    start of every training or evaluation and costs nothing once the layout is right.
    """
    fmt = memory_format(model)
    if fmt is torch.channels_last and any(p.dim() == 4 and not p.is_contiguous(memory_format=fmt)
                                          for p in model.parameters()):
        model.to(memory_format=fmt)
    return fmt


def to_device(x: torch.Tensor, device: torch.device, fmt: torch.memory_format) -> torch.Tensor:
    """A batch of inputs on ``device`` in layout ``fmt`` (4-d image batches only; others as they are).

    A one-channel image batch holds the same memory in both layouts, and PyTorch keeps calling it
    NCHW, so the first conv would take its NCHW kernels and hand NCHW activations to the pooling
    (measured on the 28x28 stem, batch 200: 68 ms against 10 ms). Strides that say NHWC, a view
    of the same memory, make the whole network run channels_last.
    """
    if x.dim() != 4:
        return x.to(device, non_blocking=True)
    x = x.to(device, memory_format=fmt, non_blocking=True)
    if fmt is torch.channels_last and x.shape[1] == 1 and x.is_contiguous():
        n, _, h, w = x.shape
        x = x.as_strided(x.shape, (h * w, 1, w, 1))
    return x
