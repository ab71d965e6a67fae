"""Maestro's self-distilling loss, pinned by hand, and its shared-prefix passes against two passes."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fl_maestro.models import build_model
from fl_maestro.passes import StepPasses, self_distillation_loss
from fl_maestro.sampling import SAMPLERS, tier_grid
from fl_maestro.width import build_width_model

SHAPES = {"cnn": (1, 28, 28), "lenet": (1, 28, 28), "mlp": (1, 8, 8), "resnet18": (3, 16, 16)}


def _two_passes(model, x, y, max_ranks, ranks) -> torch.Tensor:
    """The loss as two passes from the input (the code before the shared prefix)."""
    model.set_ranks(max_ranks)
    full = model(x)
    model.set_ranks(ranks)
    sampled = model(x)
    return F.cross_entropy(full, y) + F.cross_entropy(sampled, F.softmax(full.detach(), dim=1))


def _grads(model, loss: torch.Tensor) -> dict[str, torch.Tensor | None]:
    model.zero_grad(set_to_none=True)
    loss.backward()
    return {n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters()}


def _assert_same(model, x, y, max_ranks, ranks) -> None:
    """Loss and every parameter's gradient of the shared passes equal the two passes' (1e-6)."""
    reference = _two_passes(model, x, y, max_ranks, ranks)
    expected = _grads(model, reference)
    loss, _ = StepPasses(model, max_ranks).loss(x, y, ranks, distill=True)
    got = _grads(model, loss)
    torch.testing.assert_close(loss, reference, rtol=0, atol=1e-6)
    for name, grad in expected.items():
        if grad is None:
            assert got[name] is None, name
        else:
            torch.testing.assert_close(got[name], grad, rtol=1e-6, atol=1e-6, msg=name)


# --------------------------------------------------------------------------- the loss by hand


def test_self_distillation_loss_and_its_gradients_by_hand() -> None:
    """full = [0, 0] (softmax 1/2, 1/2), label 0; sampled = [ln 3, 0] (softmax 3/4, 1/4).

    loss = CE(full, 0) + CE(sampled, [1/2, 1/2]) = ln 2 + (ln 4/3 + ln 4) / 2.
    d/d full = softmax(full) - onehot = [-1/2, 1/2] (the teacher is a constant);
    d/d sampled = softmax(sampled) - softmax(full) = [1/4, -1/4].
    A teacher left attached adds a term to d/d full; teacher and student swapped make d/d sampled 0.
    """
    full = torch.tensor([[0.0, 0.0]], requires_grad=True)
    sampled = torch.tensor([[math.log(3.0), 0.0]], requires_grad=True)
    loss = self_distillation_loss(full, sampled, torch.tensor([0]))
    loss.backward()
    assert loss.item() == pytest.approx(math.log(2) + (math.log(4 / 3) + math.log(4)) / 2, abs=1e-6)
    torch.testing.assert_close(full.grad, torch.tensor([[-0.5, 0.5]]))
    torch.testing.assert_close(sampled.grad, torch.tensor([[0.25, -0.25]]))


def test_the_full_pass_gets_ce_on_labels_alone_and_the_sampled_pass_ce_to_the_teacher() -> None:
    """Through a real model: the classifier's output gradient in each pass, by the formula."""
    model = build_model("cnn", (1, 28, 28), 10)
    max_ranks = model.max_ranks()
    ranks = {**max_ranks, "fc": 3}
    outputs: list[torch.Tensor] = []
    grads: list[torch.Tensor] = []

    def keep(_module, _inputs, out):
        outputs.append(out.detach().clone())
        out.register_hook(lambda g: grads.append(g.clone()))

    handle = model.classifier.register_forward_hook(keep)
    x, y = torch.randn(4, 1, 28, 28), torch.tensor([0, 3, 3, 9])
    loss, logits = StepPasses(model, max_ranks).loss(x, y, ranks, distill=True)
    loss.backward()
    handle.remove()
    full, sampled = outputs  # full pass first
    g_sampled, g_full = grads  # backward visits the later pass first
    onehot = F.one_hot(y, 10).float()
    torch.testing.assert_close(logits, full)
    torch.testing.assert_close(g_full, (F.softmax(full, 1) - onehot) / 4, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(g_sampled, (F.softmax(sampled, 1) - F.softmax(full, 1)) / 4,
                               rtol=1e-5, atol=1e-7)


# ----------------------------------------------------- shared prefix: the same loss and gradients


@pytest.mark.parametrize("name", sorted(SHAPES))
@pytest.mark.parametrize("sampler", sorted(SAMPLERS))
def test_shared_passes_equal_two_passes(name: str, sampler: str) -> None:
    model = build_model(name, SHAPES[name], 10)
    rng = np.random.default_rng(1)
    batch = 2 if name == "resnet18" else 5
    x, y = torch.randn(batch, *SHAPES[name]), torch.randint(0, 10, (batch,))
    fractions = (1.0, 0.3) if name == "resnet18" else (1.0, 0.6, 0.2)
    for fraction in fractions:  # several clients' maximum ranks
        max_ranks = model.ranks_at_fraction(fraction)
        for _ in range(2 if name == "resnet18" else 4):
            _assert_same(model, x, y, max_ranks, SAMPLERS[sampler](max_ranks, rng))
        model.reset_ranks()


@pytest.mark.parametrize("name", sorted(SHAPES))
def test_shared_passes_equal_two_passes_when_only_the_last_stage_differs(name: str) -> None:
    """The largest sharing: every stage but the last is computed once."""
    model = build_model(name, SHAPES[name], 10)
    passes = StepPasses(model, model.max_ranks())
    k = max(i for i, names in enumerate(passes.layers) if names)
    ranks = {**model.max_ranks(), passes.layers[k][-1]: 1}
    assert passes.first_difference(ranks) == k > 0
    x, y = torch.randn(2, *SHAPES[name]), torch.randint(0, 10, (2,))
    _assert_same(model, x, y, model.max_ranks(), ranks)


@pytest.mark.parametrize("name", ["cnn", "lenet", "mlp", "resnet18"])
def test_fjord_distillation_on_width_models_equals_two_passes(name: str) -> None:
    model = build_width_model(name, SHAPES[name], 10)
    grid = [model.ranks_at_fraction(p) for p in (0.2, 0.6, 1.0)]
    draw, rng = tier_grid(grid), np.random.default_rng(0)
    x, y = torch.randn(2, *SHAPES[name]), torch.randint(0, 10, (2,))
    for _ in range(3):
        _assert_same(model, x, y, model.max_ranks(), draw(model.max_ranks(), rng))


def test_a_cut_in_fc_computes_the_conv_stack_once() -> None:
    model = build_model("cnn", (1, 28, 28), 10)
    calls = {"conv1": 0, "conv2": 0, "fc": 0}
    for n in calls:
        getattr(model, n).register_forward_hook(lambda *_, n=n: calls.__setitem__(n, calls[n] + 1))
    passes = StepPasses(model, model.max_ranks())
    passes.loss(torch.randn(2, 1, 28, 28), torch.tensor([1, 2]), {"fc": 5}, distill=True)
    assert calls == {"conv1": 1, "conv2": 1, "fc": 2}
    passes.loss(torch.randn(2, 1, 28, 28), torch.tensor([1, 2]), {"conv2": 5}, distill=True)
    assert calls == {"conv1": 2, "conv2": 3, "fc": 4}
    passes.loss(torch.randn(2, 1, 28, 28), torch.tensor([1, 2]), model.max_ranks(), distill=True)
    assert calls == {"conv1": 3, "conv2": 4, "fc": 5}  # sampled == full: one pass


def test_plain_ordered_dropout_is_one_pass_at_the_sampled_ranks() -> None:
    model = build_model("cnn", (1, 28, 28), 10)
    x, y = torch.randn(3, 1, 28, 28), torch.tensor([1, 2, 3])
    ranks = {**model.max_ranks(), "conv2": 4}
    loss, logits = StepPasses(model, model.max_ranks()).loss(x, y, ranks, distill=False)
    model.set_ranks(ranks)
    torch.testing.assert_close(logits, model(x), rtol=0, atol=0)
    torch.testing.assert_close(loss, F.cross_entropy(model(x), y), rtol=0, atol=0)


def test_label_mask_applies_to_both_passes() -> None:
    model = build_model("cnn", (1, 28, 28), 10)
    absent = torch.ones(10, dtype=torch.bool)
    absent[[1, 2]] = False
    x, y = torch.randn(2, 1, 28, 28), torch.tensor([1, 2])
    ranks = {**model.max_ranks(), "fc": 2}
    loss, logits = StepPasses(model, model.max_ranks(), absent).loss(x, y, ranks, distill=True)
    model.set_ranks(model.max_ranks())
    full = model(x).masked_fill(absent, 0.0)
    model.set_ranks(ranks)
    sampled = model(x).masked_fill(absent, 0.0)
    torch.testing.assert_close(logits, full)
    torch.testing.assert_close(loss, self_distillation_loss(full, sampled, y))


def test_unknown_layer_is_refused_by_name() -> None:
    model = build_model("cnn", (1, 28, 28), 10)
    with pytest.raises(ValueError, match="'nope'"):
        StepPasses(model, {"nope": 1})
