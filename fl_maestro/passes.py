"""A local step's forward passes, with Maestro's self-distilling loss at the price of one shared pass.

Maestro's loss is ``CE(full, y) + CE(sampled, softmax(full).detach())``: a pass at the client's
maximum ranks ("full") and one at the step's sampled ranks. The model's forward pass is a chain of
stages (``RankedModel.stages``); the two passes run the same stages on the same input up to the
first stage whose ranks differ, so ``StepPasses`` computes that shared prefix once and runs only
the rest twice. Autograd then sends the sum of both losses' gradients back through the shared
activations once. It is the same loss and the same gradient as two passes from the input, up to
the order of float additions. Under Maestro's per-layer sampler on the default CNN, most steps
cut ``fc`` and share the whole conv stack.
"""

from __future__ import annotations

from collections.abc import Mapping
from functools import cached_property

import torch
import torch.nn.functional as F

from fl_maestro.models import RankedModel, stage_layers

Ranks = Mapping[str, int]


def self_distillation_loss(full: torch.Tensor, sampled: torch.Tensor,
                           y: torch.Tensor) -> torch.Tensor:
    """Maestro's loss: ``CE(full, y) + CE(sampled, softmax(full))``, the teacher detached.

    The full pass's logits get the gradient of ``CE(full, y)`` alone; the sampled pass's get that
    of the cross-entropy against the full pass's softmax, which is a constant target.
    """
    teacher = F.softmax(full.detach(), dim=1)
    return F.cross_entropy(full, y) + F.cross_entropy(sampled, teacher)


class StepPasses:
    """The logits of a step's passes through ``model``'s stage chain, sharing what the passes share.

    Built once per local training (stages, the layers each stage depends on, the layer modules),
    so a step's Python work is setting ranks and running stages. ``absent`` (HeteroFL's label
    mask, True where a class is absent) sets those logits to 0 in every pass.
    """

    def __init__(self, model: RankedModel, max_ranks: Ranks,
                 absent: torch.Tensor | None = None) -> None:
        self.model = model
        self.stages = model.stages()
        self.layers = stage_layers(model, self.stages)
        self.modules = model.ranked_layers()
        unknown = sorted(set(max_ranks) - set(self.modules))
        if unknown:
            raise ValueError(f"unknown ranked layer {unknown[0]!r}; layers are {sorted(self.modules)}")
        self.max_ranks = {**{n: m.max_rank for n, m in self.modules.items()}, **max_ranks}
        self.absent = absent

    @cached_property
    def low_rank_layers(self) -> dict:
        """The model's decomposed layers, looked up once (HGL's penalty reads them every step)."""
        return self.model.low_rank_layers()

    def first_difference(self, ranks: Ranks) -> int:
        """The index of the first stage whose layers' ranks differ from the maximum ranks
        (``len(stages)`` when ``ranks`` are the maximum ranks everywhere)."""
        for k, names in enumerate(self.layers):
            if any(ranks.get(n, self.max_ranks[n]) != self.max_ranks[n] for n in names):
                return k
        return len(self.stages)

    def run(self, x: torch.Tensor, ranks: Ranks, start: int = 0,
            stop: int | None = None) -> torch.Tensor:
        """Stages ``start`` to ``stop`` (default: the last) on ``x``, their layers at ``ranks``
        (layers ``ranks`` leaves out at their maximum)."""
        stop = len(self.stages) if stop is None else stop
        for stage, names in zip(self.stages[start:stop], self.layers[start:stop]):
            for n in names:
                self.modules[n].set_rank(ranks.get(n, self.max_ranks[n]))
            x = stage.run(x)
        return x

    def _masked(self, logits: torch.Tensor) -> torch.Tensor:
        return logits if self.absent is None else logits.masked_fill(self.absent, 0.0)

    def single(self, x: torch.Tensor, ranks: Ranks) -> torch.Tensor:
        """The logits of one pass at ``ranks``."""
        return self._masked(self.run(x, ranks))

    def pair(self, x: torch.Tensor, ranks: Ranks) -> tuple[torch.Tensor, torch.Tensor]:
        """The full pass's and the sampled pass's logits; the stages before the first one whose
        ranks differ run once. When ``ranks`` are the maximum everywhere both are the same tensor."""
        k = self.first_difference(ranks)
        shared = self.run(x, self.max_ranks, 0, k)
        full = self._masked(self.run(shared, self.max_ranks, k))
        if k == len(self.stages):  # the sampled pass is the full pass
            return full, full
        return full, self._masked(self.run(shared, ranks, k))

    def loss(self, x: torch.Tensor, y: torch.Tensor, ranks: Ranks,
             distill: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """The step's cross-entropy and the logits trained on the labels: Maestro's
        self-distilling loss with ``distill``, else plain ordered dropout ``CE(sampled, y)``."""
        if not distill:
            logits = self.single(x, ranks)
            return F.cross_entropy(logits, y), logits
        full, sampled = self.pair(x, ranks)
        return self_distillation_loss(full, sampled, y), full
