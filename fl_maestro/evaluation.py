"""Evaluation of one model at many rank levels, computing shared work once per batch.

A model's forward pass is a chain of stages (``RankedModel.stages``), each depending on its input
and on the ranks of the layers in its scope. Two levels that give every layer of the first k
stages the same ranks compute the same first k outputs, so ``evaluate_levels`` walks the levels
in an order where such levels are neighbours and keeps the outputs along the current path: the
dense stem is computed once per batch for every level, every stage before the first one whose
ranks differ once per group of levels, and levels with identical ranks once in all. Each level's
numbers are exactly those of evaluating it on its own: the same stages run on the same inputs.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import torch
import torch.nn.functional as F

from fl_maestro.models import RankedModel, Stage, at_ranks, stage_layers
from fl_maestro.precision import autocast, to_device, use_fast_layout

Ranks = Mapping[str, int]


def stage_keys(levels: Sequence[Ranks], layers: Sequence[tuple[str, ...]],
               max_ranks: Ranks) -> list[tuple[tuple[int, ...], ...]]:
    """Each level's ranks, stage by stage: equal prefixes mean equal stage outputs."""
    for level in levels:
        unknown = sorted(set(level) - set(max_ranks))
        if unknown:
            raise ValueError(f"unknown low-rank layer {unknown[0]!r}; layers are {sorted(max_ranks)}")
    return [tuple(tuple({**max_ranks, **level}[n] for n in names) for names in layers)
            for level in levels]


@torch.no_grad()
def evaluate_levels(model: RankedModel, loader: Iterable, levels: Sequence[Ranks],
                    precision: str = "fp32") -> list[dict[str, float]]:
    """Loss, accuracy and example count of ``model`` at each of ``levels`` (ranks per layer).

    Layers a level leaves out run at their maximum rank. The model's active ranks and train/eval
    mode are restored afterwards.
    """
    device = next(model.parameters()).device
    fmt = use_fast_layout(model)
    stages = model.stages()
    layers = stage_layers(model, stages)
    keys = stage_keys(levels, layers, model.max_ranks())
    order = sorted(range(len(levels)), key=lambda i: keys[i])
    sums = [[0.0, 0, 0] for _ in levels]  # loss sum, correct, seen
    was_training = model.training
    model.eval()
    with at_ranks(model, model.ranks()):
        for x, y in loader:
            x, y = to_device(x, device, fmt), y.to(device, non_blocking=True)
            path: list[tuple[tuple[int, ...], torch.Tensor]] = []  # (stage key, output) so far
            for i in order:
                logits = _run_level(stages, layers, keys[i], path, x, model, precision, device)
                sums[i][0] += F.cross_entropy(logits.float(), y, reduction="sum").item()
                sums[i][1] += (logits.argmax(1) == y).sum().item()
                sums[i][2] += len(y)
    model.train(was_training)
    return [{"loss": loss / max(seen, 1), "accuracy": correct / max(seen, 1), "examples": seen}
            for loss, correct, seen in sums]


def _run_level(stages: Sequence[Stage], layers: Sequence[tuple[str, ...]],
               key: tuple[tuple[int, ...], ...], path: list, x: torch.Tensor,
               model: RankedModel, precision: str, device: torch.device) -> torch.Tensor:
    """The logits of one level, reusing the outputs on ``path`` its key shares (updates ``path``)."""
    shared = 0
    while shared < len(path) and path[shared][0] == key[shared]:
        shared += 1
    del path[shared:]
    h = path[-1][1] if path else x
    with autocast(precision, device):
        for k in range(shared, len(stages)):
            model.set_ranks(dict(zip(layers[k], key[k])))
            h = stages[k].run(h)
            path.append((key[k], h))
    return h
