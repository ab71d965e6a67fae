"""Per-component diagnostics: step counts, coverage sums, movement from init, tidy rows."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits

from fl_maestro.components import (StepCounter, component_rows, coverage_from_metrics,
                                   coverage_metrics, movement, sum_coverage)
from fl_maestro.models import CNN
from fl_maestro.training import Recipe, train


def test_step_counter_counts_the_trained_prefixes() -> None:
    counter = StepCounter({"a": 4, "b": 2})
    counter.add({"a": 1, "b": 2})
    counter.add({"a": 3, "b": 2})
    counter.add({"a": 4, "b": 1})
    assert counter.counts["a"].tolist() == [3, 2, 2, 1]
    assert counter.counts["b"].tolist() == [3, 2]
    metrics = coverage_metrics(counter.counts)
    assert metrics == {"coverage.a": [3, 2, 2, 1], "coverage.b": [3, 2]}
    assert all(type(v) is int for v in metrics["coverage.a"])  # Flower's MetricRecord needs int
    back = coverage_from_metrics({**metrics, "steps": 3, "train-loss": 0.5})
    assert {k: v.tolist() for k, v in back.items()} == {"a": [3, 2, 2, 1], "b": [3, 2]}


def test_sum_coverage_pads_short_prefixes_and_counts_holders() -> None:
    replies = [{"a": np.array([5, 5, 2])}, {"a": np.array([4])}, {"b": np.array([1, 1])}]
    total = sum_coverage(replies)
    assert total["a"][0].tolist() == [9, 5, 2] and total["a"][1].tolist() == [2, 1, 1]
    assert total["b"][0].tolist() == [1, 1] and total["b"][1].tolist() == [1, 1]
    assert sum_coverage([]) == {}


def _arrays(u: list, v: list) -> dict[str, np.ndarray]:
    return {"l.U": np.array(u, np.float32), "l.V": np.array(v, np.float32)}


def test_movement_by_hand() -> None:
    initial = _arrays([[3.0, 0.0], [4.0, 1.0]], [[0.0, 0.0], [0.0, 0.0]])  # norms 5 and 1
    moved = _arrays([[3.0, 0.0], [4.0, 1.0]], [[3.0, 4.0], [0.0, 0.0]])  # component 0 moved by 5
    assert movement(moved, initial, "l").tolist() == pytest.approx([1.0, 0.0])
    shrunk = {"l.U": moved["l.U"][:, :1], "l.V": moved["l.V"][:1]}
    assert movement(shrunk, initial, "l").tolist() == pytest.approx([1.0])  # the common prefix


def test_component_rows_hold_coverage_movement_and_importance() -> None:
    initial = _arrays([[3.0, 0.0], [4.0, 1.0]], [[1.0, 0.0], [0.0, 2.0]])
    now = _arrays([[3.0, 0.0], [4.0, 1.0]], [[2.0, 0.0], [0.0, 2.0]])
    rows = component_rows(7, now, initial, [{"l": np.array([10, 4])}, {"l": np.array([6])}])
    first, second = rows
    assert (first["round"], first["layer"], first["component"]) == (7, "l", 0)
    assert (first["client-steps"], first["clients"]) == (16, 2)
    assert (second["client-steps"], second["clients"]) == (4, 1)
    # component 0: U column norm 5, V row norm 2 (was 1): norm 10 (was 5); moved 1 / sqrt(26)
    assert first["norm"] == pytest.approx(10.0) and first["norm-init"] == pytest.approx(5.0)
    assert first["moved"] == pytest.approx(1 / math.sqrt(26))
    # importance of component 1: ||V[1:]|| * ||U[:, 1:]|| = 2 * 1
    assert second["importance"] == pytest.approx(2.0) and second["moved"] == 0.0
    assert first["importance"] == pytest.approx(math.sqrt(8) * math.sqrt(26))
    assert "moved" not in component_rows(0, now, None, [])[0]  # no initial arrays kept
    width = component_rows(1, {"conv.weight": np.zeros((2, 2))}, None, [{"conv": np.array([3])}])
    assert width == [{"round": 1, "layer": "conv", "component": 0, "client-steps": 3,
                      "clients": 1}]


@pytest.fixture(scope="module")
def batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    data = load_digits()
    x = torch.tensor(data.images / 16.0, dtype=torch.float32)[:, None]
    y = torch.tensor(data.target)
    return [(x[i:i + 32], y[i:i + 32]) for i in range(0, 32 * 12, 32)]


@pytest.mark.parametrize("distill", [False, True])
def test_training_counts_the_steps_that_reach_each_component(batches, distill: bool) -> None:
    model = CNN((1, 8, 8), 10)
    max_ranks = {"conv2": 8, "fc": 16}
    out = train(model, batches, Recipe(sampler="single-layer", epochs=2, distill=distill),
                max_ranks, rng=np.random.default_rng(0))
    steps = out["steps"]
    for name, rank in max_ranks.items():
        counts = out["coverage"][name]
        assert len(counts) == rank and counts[0] == steps  # every step trains the first one
        assert np.all(np.diff(counts) <= 0)  # prefixes: never more steps further out
        if distill:  # the full pass reaches the client's whole prefix every step
            assert counts.tolist() == [steps] * rank
    if not distill:  # single-layer: a step cuts one layer; the tails sit out some steps
        assert min(out["coverage"][n][-1] for n in max_ranks) < steps
