"""Plain-PyTorch local training and evaluation at rank prefixes (nothing of Flower in here).

``train`` runs ordered dropout inside a client's maximum ranks as its ``Recipe`` says (one
dataclass, built once from the method and the run config by ``fl_maestro.methods.recipe``): every
step draws a rank prefix with the sampler and trains only it. With ``distill`` it uses Maestro's self-distilling loss,
``CE(full pass, y) + CE(sampled pass, softmax(full pass).detach())``, "full" meaning the client's
maximum ranks; without it, plain ordered dropout ``CE(sampled pass, y)``. The two passes share
every stage before the first whose ranks differ, computed once (``fl_maestro.passes``).
``hgl_lambda`` adds the hierarchical group lasso (with ``hgl_beyond``, the server's constants for the components the client
does not hold, it is the global penalty restricted to the client's components). ``classes`` masks the
loss as HeteroFL does: the logits of classes outside the client's data are set to 0, so their
classifier rows get no gradient from it.

With ``optimizer="corner"`` (the default) each step reads and writes only the components it
trains (``fl_maestro.optim``): the client's maximum ranks with the self-distilling loss or HGL,
the sampled prefix in plain ordered dropout. A component past a step's sampled rank then keeps its
weight, momentum and weight decay until it is trained again. ``optimizer="sgd"`` is the textbook
step instead: ``torch.optim.SGD`` over whole parameters, so momentum keeps moving components a step
did not reach, and weight decay applies to the client's whole trained corner every step. Either
way, components past the client's maximum ranks are never changed.

``precision`` (``fl_maestro.precision``) picks the dtype of the forward passes (``fp32``, or
``bf16`` autocast); conv models train in the channels_last layout.

``clip_grad_norm`` > 0 clips every step's gradient to that total norm before the update, as
HeteroFL's and FedRolex's code do (``clip_grad_norm_(..., 1)``). ``divergence_factor`` > 0 stops a
client whose training blows up: at a non-finite loss, or once the mean loss of its last
``DIVERGENCE_WINDOW`` steps exceeds ``divergence_factor`` times the mean of its first
``DIVERGENCE_WINDOW`` steps (that mean floored at ``DIVERGENCE_FLOOR``, so a client that starts
near zero loss is not stopped by one hard batch). The metrics then say ``diverged`` and the
server drops the reply.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

import numpy as np
import torch

from fl_maestro import streams
from fl_maestro.components import StepCounter
from fl_maestro.evaluation import evaluate_levels
from fl_maestro.layers import leading
from fl_maestro.models import RankedModel
from fl_maestro.optim import CornerSGD, corner_view
from fl_maestro.passes import StepPasses
from fl_maestro.precision import autocast, check_precision, to_device, use_fast_layout
from fl_maestro.sampling import Sampler, get_sampler
from fl_maestro.shrinking import hgl_penalty

log = logging.getLogger(__name__)

# Backward costs about twice the forward, so one training pass costs ~3x its forward MACs.
TRAIN_MACS_PER_FORWARD = 3
OPTIMIZERS = ("corner", "sgd")
DIVERGENCE_WINDOW = 5  # steps in the reference mean (first steps) and in the current mean
DIVERGENCE_FLOOR = 0.1  # the least reference loss a blow-up is measured against


class DivergenceCheck:
    """Watches a client's step losses: ``add(loss)`` returns True once training has diverged."""

    def __init__(self, factor: float, window: int = DIVERGENCE_WINDOW,
                 floor: float = DIVERGENCE_FLOOR) -> None:
        if not (factor == 0 or factor > 1):
            raise ValueError(f"divergence factor {factor!r}: allowed 0 (only non-finite losses) "
                             "or a number > 1 (at or under 1 a healthy client's loss trips it)")
        self.factor, self.window, self.floor = factor, window, floor
        self.losses: list[float] = []
        self.first: float | None = None  # mean of the first ``window`` steps

    def add(self, loss: float) -> bool:
        """Record one step's loss; whether the client has diverged."""
        self.losses.append(loss)
        if not np.isfinite(loss):
            return True
        if self.factor == 0:
            return False
        if self.first is None and len(self.losses) == self.window:
            self.first = float(np.mean(self.losses))
        if self.first is None:
            return False
        recent = float(np.mean(self.losses[-self.window:]))
        return recent > self.factor * max(self.first, self.floor)

    def metrics(self) -> dict[str, float]:
        """What the check saw: the last loss and the first steps' mean (NaN before it is set)."""
        return {"diverged-loss": self.losses[-1] if self.losses else float("nan"),
                "diverged-step": len(self.losses),
                "first-loss": float("nan") if self.first is None else self.first}


@dataclass(frozen=True)
class Recipe:
    """How a client trains locally, built once from its method and the run config
    (``fl_maestro.methods.recipe``) and passed unchanged to ``train``.

    ``sampler`` draws each step's rank prefix; ``distill`` turns on the self-distilling loss;
    ``hgl_lambda`` the hierarchical group lasso, with ``hgl_beyond`` the server's constants for the
    components past the client's; ``classes`` masks the loss to the client's classes (HeteroFL);
    ``max_steps`` stops training after that many steps (a straggler's partial work);
    ``clip_grad_norm`` > 0 clips every step's gradient norm; ``divergence_factor`` stops a client
    whose loss blows up (``DivergenceCheck``; 0: only at a non-finite loss).
    """

    sampler: str | Sampler = "single-layer"
    distill: bool = True
    hgl_lambda: float = 0.0
    hgl_beyond: Mapping[str, tuple[float, float]] | None = None
    classes: tuple[int, ...] | None = None
    epochs: int = 1
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 1e-4
    optimizer: str = "corner"
    precision: str = "fp32"
    max_steps: int | None = None
    clip_grad_norm: float = 0.0
    divergence_factor: float = 0.0


def train(model: RankedModel, loader: Iterable, recipe: Recipe = Recipe(),
          max_ranks: Mapping[str, int] | None = None,
          rng: np.random.Generator | None = None) -> dict[str, float]:
    """Train ``model`` in place with ordered dropout inside ``max_ranks`` as ``recipe`` says;
    return plain metrics.

    Metrics: ``loss`` (mean per example of the last epoch), ``accuracy`` (of the pass trained on
    labels), ``examples`` (training-set size), ``steps``, ``seconds``, ``macs`` (training MACs,
    the same per step as ``planned_step_macs`` predicts), ``coverage`` (per layer, the steps
    whose loss reached each component) and ``diverged`` (with what the check saw, when True).
    """
    sampler, epochs, distill, hgl_lambda = (recipe.sampler, recipe.epochs, recipe.distill,
                                            recipe.hgl_lambda)
    hgl_beyond, classes, precision, max_steps = (recipe.hgl_beyond, recipe.classes,
                                                 recipe.precision, recipe.max_steps)
    max_ranks = dict(model.max_ranks() if max_ranks is None else max_ranks)
    model.set_ranks(max_ranks)  # validates the ranks
    draw = get_sampler(sampler) if isinstance(sampler, str) else sampler
    rng = np.random.default_rng(0) if rng is None else rng
    check_precision(precision)
    fmt = use_fast_layout(model)  # before make_step: momentum buffers take the parameters' layout
    step = make_step(model, recipe.optimizer, recipe.lr, recipe.momentum, recipe.weight_decay,
                     max_ranks, recipe.clip_grad_norm)
    watch = DivergenceCheck(recipe.divergence_factor)
    device = next(model.parameters()).device
    full_macs = model.cost(max_ranks, "macs")
    absent = None
    if classes is not None:  # HeteroFL's label mask: True where a class is not in the data
        absent = torch.ones(model.classifier.out_features, dtype=torch.bool, device=device)
        absent[list(classes)] = False
    passes = StepPasses(model, max_ranks, absent)
    step_cost = _cached_costs(model)
    start, steps, macs, diverged = time.perf_counter(), 0, 0, False
    coverage = StepCounter(max_ranks)
    loss_sum, correct, seen = 0.0, 0, 0
    model.train()
    for epoch in range(epochs):
        if steps == max_steps or diverged:
            break
        loss_sum, correct, seen = 0.0, 0, 0
        for x, y in loader:
            if steps == max_steps:
                break
            x, y = to_device(x, device, fmt), y.to(device, non_blocking=True)
            ranks = draw(max_ranks, rng)
            trained = max_ranks if distill or hgl_lambda > 0 else ranks  # what the loss reaches
            coverage.add(trained)
            loss, logits = step(trained, lambda: _step_loss(passes, x, y, max_ranks, ranks,
                                                            distill, hgl_lambda, hgl_beyond,
                                                            precision))
            steps += 1
            seen += len(y)
            loss_value = loss.item()
            loss_sum += loss_value * len(y)
            correct += (logits.argmax(1) == y).sum().item()
            macs += step_macs(len(y), step_cost(ranks), full_macs, distill)
            if watch.add(loss_value):
                diverged = True
                log.warning("training diverged at step %d: %s", steps, watch.metrics())
                break
        log.debug("epoch %d/%d: loss %.4f over %d examples", epoch + 1, epochs,
                  loss_sum / max(seen, 1), seen)
    model.set_ranks(max_ranks)
    return {"loss": loss_sum / max(seen, 1), "accuracy": correct / max(seen, 1),
            "examples": seen, "steps": steps, "seconds": time.perf_counter() - start,
            "macs": float(macs), "coverage": coverage.counts, "diverged": diverged,
            **(watch.metrics() if diverged else {})}


def step_macs(batch: int, sampled_macs: float, full_macs: float, distill: bool) -> float:
    """Training MACs of one step on ``batch`` examples (the full pass too when distilling)."""
    return float(batch * TRAIN_MACS_PER_FORWARD * (sampled_macs + (full_macs if distill else 0)))


def step_rng(seed: int, server_round: int, partition_id: int) -> np.random.Generator:
    """The generator of a client's ordered-dropout draws in a round (client and server agree)."""
    return streams.rng(seed, "training", server_round, partition_id)


def batch_sizes(num_examples: int, batch_size: int, epochs: int) -> list[int]:
    """The size of every local step's batch: ``epochs`` passes, the last batch of each short."""
    full, rest = divmod(int(num_examples), int(batch_size))
    return ([batch_size] * full + ([rest] if rest else [])) * int(epochs)


def planned_step_macs(model: RankedModel, max_ranks: Mapping[str, int],
                      sampler: str | Sampler, rng: np.random.Generator, batches: Iterable[int],
                      distill: bool) -> list[float]:
    """The training MACs of each step ``train`` would take: the same draws from the same ``rng``.

    Known before training, so a device's simulated time (and which steps fit a deadline) costs
    no host compute. ``max_ranks`` must list the layers in the model's order, as the client's do.
    """
    draw = get_sampler(sampler) if isinstance(sampler, str) else sampler
    full_macs = model.cost(max_ranks, "macs")
    cost = _cached_costs(model)
    return [step_macs(batch, cost(draw(max_ranks, rng)), full_macs, distill) for batch in batches]


def make_step(model: RankedModel, optimizer: str, lr: float, momentum: float, weight_decay: float,
              max_ranks: Mapping[str, int], clip_grad_norm: float = 0.0) -> Callable:
    """``step(trained, closure)``: one update of the parameters from the loss ``closure()`` returns
    (with the logits), ``trained`` being the ranks that loss reaches. ``clip_grad_norm`` > 0
    clips the gradient's total norm (over what the step trained) before the update."""
    if not clip_grad_norm >= 0:
        raise ValueError(f"clip_grad_norm={clip_grad_norm!r}: allowed a number >= 0 (0: off)")
    if optimizer == "corner":
        corner_sgd = CornerSGD(model, lr, momentum, weight_decay)
        shapes: dict[tuple, dict] = {}  # per trained ranks; the model's layout is fixed meanwhile

        def corner_step(trained: Mapping[str, int], closure: Callable):
            key = tuple(trained.items())
            if key not in shapes:
                shapes[key] = model.slice_shapes(trained)
            with corner_view(model, shapes[key], corner_sgd.slots):
                loss, logits = closure()
                loss.backward()
                if clip_grad_norm:  # the views' gradients: exactly what this step trained
                    _clip(model.parameters(), clip_grad_norm)
                corner_sgd.step()
            return loss, logits
        return corner_step
    if optimizer == "sgd":
        sgd = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum)
        corners = model.slice_shapes(max_ranks)

        def sgd_step(trained: Mapping[str, int], closure: Callable):
            loss, logits = closure()
            sgd.zero_grad(set_to_none=True)
            loss.backward()
            if clip_grad_norm:  # before weight decay, as torch.optim.SGD adds it in its step
                _clip(model.parameters(), clip_grad_norm)
            _decay_corners(model, corners, weight_decay)
            sgd.step()
            return loss, logits
        return sgd_step
    raise ValueError(f"optimizer={optimizer!r} is not allowed; expected one of {OPTIMIZERS}")


def _clip(parameters: Iterable[torch.Tensor], max_norm: float) -> None:
    """Scale the gradients so their total 2-norm is at most ``max_norm``."""
    torch.nn.utils.clip_grad_norm_([p for p in parameters if p.grad is not None], max_norm)


@torch.no_grad()
def _decay_corners(model: RankedModel, corners: Mapping[str, tuple[int, ...]], weight_decay: float) -> None:
    """Add L2 weight decay to the gradient of each parameter's trained corner (never past it)."""
    if weight_decay:
        for name, p in model.named_parameters():
            if p.grad is not None:
                leading(p.grad, *corners[name]).add_(leading(p, *corners[name]), alpha=weight_decay)


def _step_loss(passes: StepPasses, x: torch.Tensor, y: torch.Tensor,
               max_ranks: Mapping[str, int], ranks: Mapping[str, int], distill: bool,
               hgl_lambda: float,
               hgl_beyond: Mapping[str, tuple[float, float]] | None = None,
               precision: str = "fp32"):
    """The step's loss and the logits of the pass trained on the labels."""
    with autocast(precision, x.device):
        loss, logits = passes.loss(x, y, ranks, distill)
    if hgl_lambda > 0:  # in float32, outside autocast: norms of the factors themselves
        layers = passes.low_rank_layers
        loss = loss + hgl_lambda * hgl_penalty(layers, max_ranks, hgl_beyond)
    return loss, logits


def _cached_costs(model: RankedModel) -> Callable[[Mapping[str, int]], float]:
    """``model.cost(ranks, "macs")``, computed once per distinct ranks (a sampler repeats them)."""
    costs: dict[tuple, float] = {}

    def cost(ranks: Mapping[str, int]) -> float:
        key = tuple(ranks.items())
        if key not in costs:
            costs[key] = model.cost(ranks, "macs")
        return costs[key]
    return cost


def evaluate(model: RankedModel, loader: Iterable, ranks: Mapping[str, int] | None = None,
             precision: str = "fp32") -> dict[str, float]:
    """Loss and accuracy of ``model`` at ``ranks`` (default: its maximum ranks)."""
    return evaluate_levels(model, loader, [model.max_ranks() if ranks is None else ranks],
                           precision)[0]
