"""Training steps that read and write only the leading corner of each parameter they train.

A rank-``r`` step needs the first ``r`` components of each factor pair, and nothing else. Run on
the whole parameters, PyTorch would still build a full-size gradient (zeros past ``r``) for every
factor, and ``torch.optim.SGD`` would then read and write all of every weight, gradient and
momentum buffer: at a quarter of the rank that is as much work as the rank-``r`` matmuls themselves.

``corner_view(model, shapes)`` swaps every parameter, for the length of one step, for a parameter
that *views* its leading corner (``shapes`` as from ``model.slice_shapes(ranks)``): the step's
gradients come out corner-sized, and in-place updates of the views land in the full parameters.
``CornerSGD`` is SGD with momentum and L2 weight decay over whatever corner each parameter shows.

Semantics: a step changes only the components it trained, its momentum included. A component that
sits out a step (past that step's sampled rank) keeps its weight *and* its momentum until it is
trained again, as sparse updates do for embedding rows; ``torch.optim.SGD`` would keep moving it
by its old momentum. When every step trains the same corner (for instance the self-distilling loss,
whose full pass covers the client's maximum ranks) the two are the same update.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager

import torch
from torch import nn

from fl_maestro.layers import leading

Shape = tuple[int, ...]


def _corner(tensor: torch.Tensor, shape: Shape) -> torch.Tensor:
    """The view of ``tensor``'s leading corner of ``shape`` (the tensor itself when whole)."""
    if len(shape) != tensor.dim() or any(s > n for s, n in zip(shape, tensor.shape)):
        raise ValueError(f"corner {tuple(shape)} does not fit in a tensor of shape {tuple(tensor.shape)}")
    return leading(tensor, *shape)


Slot = tuple[str, nn.Module, str]  # a parameter's name, the module holding it, its attribute


def parameter_slots(model: nn.Module) -> list[Slot]:
    """Where each parameter lives, in ``named_parameters`` order. Computing this once saves the
    module traversal on every step (it is most of a small model's per-step Python time)."""
    return [(f"{path}.{attr}" if path else attr, module, attr)
            for path, module in model.named_modules()
            for attr, _ in module.named_parameters(recurse=False)]


@contextmanager
def corner_view(model: nn.Module, shapes: Mapping[str, Shape],
                slots: list[Slot] | None = None) -> Iterator[nn.Module]:
    """Within the block, each parameter named in ``shapes`` is a parameter viewing that corner.

    The views share memory with the full parameters, so in-place updates write through; the
    gradients of the block's backward pass are the corners' size. A parameter whose corner is the
    whole of it is left as it is. The full parameters are put back on leaving, also on error.
    ``slots``: ``parameter_slots(model)``, when the caller keeps it across steps.
    """
    swapped = []
    try:
        for name, owner, attr in parameter_slots(model) if slots is None else slots:
            full, shape = getattr(owner, attr), shapes.get(name)
            if shape is None or full.shape == tuple(shape):
                continue
            view = nn.Parameter(_corner(full.detach(), shape), full.requires_grad)
            setattr(owner, attr, view)
            swapped.append((owner, attr, full))
        yield model
    finally:
        for owner, attr, full in reversed(swapped):
            setattr(owner, attr, full)


class CornerSGD:
    """SGD with momentum and L2 weight decay over the corner each parameter shows at ``step()``.

    Call ``step()`` inside ``corner_view`` after the backward pass: for every parameter with a
    gradient, the update ``g += weight_decay * w; m = momentum * m + g; w -= lr * m`` runs on the
    parameter's corner and the matching corner of its momentum buffer, which is kept full-size
    (same memory layout as the parameter, so a rank prefix stays one contiguous block).
    Gradients are consumed: they are set to ``None`` after the update. Build it outside
    ``corner_view`` (the buffers take the shapes the parameters show then). It is not a
    ``torch.optim.Optimizer``: one group of hyperparameters, no state dict, no LR schedulers; a
    client builds a fresh one for each round's local training.
    """

    def __init__(self, model: nn.Module, lr: float, momentum: float = 0.0,
                 weight_decay: float = 0.0) -> None:
        for key, value in (("lr", lr), ("momentum", momentum), ("weight_decay", weight_decay)):
            if not value >= 0:
                raise ValueError(f"{key}={value!r}: allowed a number >= 0")
        self.model, self.lr, self.momentum, self.weight_decay = model, lr, momentum, weight_decay
        self.slots = parameter_slots(model)
        self.buffers = {name: torch.zeros_like(getattr(owner, attr))
                        for name, owner, attr in self.slots} if momentum else {}

    @torch.no_grad()
    def step(self) -> None:
        """Apply one update to every parameter (corner) that has a gradient, then drop the gradients."""
        for name, owner, attr in self.slots:
            p = getattr(owner, attr)
            grad = p.grad
            if grad is None:
                continue
            if self.weight_decay:
                grad.add_(p, alpha=self.weight_decay)
            if self.momentum:
                buf = _corner(self.buffers[name], tuple(p.shape))
                grad = buf.mul_(self.momentum).add_(grad)
            p.add_(grad, alpha=-self.lr)
            p.grad = None
