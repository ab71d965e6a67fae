"""HGL and shrinking by hand, the local training loop, and Maestro's theorem (OD finds the SVD)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.linalg import subspace_angles
from sklearn.datasets import load_digits

from fl_maestro.layers import LowRankConv2d, LowRankLinear
from fl_maestro.models import CNN, MLP
from fl_maestro.sampling import full, uniform
from fl_maestro.shrinking import (
    component_sq_norms,
    hgl_penalty,
    importance,
    importance_from_arrays,
    shrink_ranks,
    tail_norms,
)
from fl_maestro.training import Recipe, evaluate, train


def _hand_layer() -> LowRankLinear:
    """U = [[3, 0], [4, 1]] (columns' squared norms 25, 1), V = [[0, 3], [0, 4]] (rows' 9, 16)."""
    layer = LowRankLinear(2, 2, bias=False)
    with torch.no_grad():
        layer.U.copy_(torch.tensor([[3.0, 0.0], [4.0, 1.0]]))
        layer.V.copy_(torch.tensor([[0.0, 3.0], [0.0, 4.0]]))
    return layer


# --------------------------------------------------------------------------- HGL and shrinking


def test_tail_norms_by_hand() -> None:
    # tails of [9, 7, 5, 4] are [25, 16, 9, 4]
    out = tail_norms(torch.tensor([9.0, 7.0, 5.0, 4.0]))
    torch.testing.assert_close(out, torch.tensor([5.0, 4.0, 3.0, 2.0]))


def test_tail_norms_gradient_is_finite_at_zero() -> None:
    x = torch.zeros(3, requires_grad=True)
    tail_norms(x).sum().backward()
    assert torch.isfinite(x.grad).all()


def test_hgl_penalty_by_hand() -> None:
    layer = _hand_layer()
    # V tails: sqrt(9 + 16) + sqrt(16) = 5 + 4; U tails: sqrt(25 + 1) + sqrt(1)
    total = hgl_penalty({"l": layer})
    assert total.item() == pytest.approx(10 + math.sqrt(26), abs=1e-5)
    # the first component only: sqrt(9) + sqrt(25)
    prefix = hgl_penalty({"l": layer}, {"l": 1})
    assert prefix.item() == pytest.approx(8.0, abs=1e-6)
    prefix.backward()
    assert torch.count_nonzero(layer.U.grad[:, 1:]) == 0
    assert torch.count_nonzero(layer.V.grad[1:]) == 0
    # d/dU[:, 0] of ||U[:, :1]|| is U[:, 0] / 5
    torch.testing.assert_close(layer.U.grad[:, 0], torch.tensor([0.6, 0.8]))


def test_hgl_penalty_sums_layers() -> None:
    a, b = _hand_layer(), _hand_layer()
    assert hgl_penalty({"a": a, "b": b}).item() == pytest.approx(2 * (10 + math.sqrt(26)), abs=1e-4)


def test_importance_by_hand_and_non_increasing() -> None:
    # importance_j = ||V[j:]|| * ||U[:, j:]||: [5 * sqrt(26), 4 * 1]
    np.testing.assert_allclose(importance(_hand_layer()), [5 * math.sqrt(26), 4.0], rtol=1e-6)
    for layer in (LowRankLinear(30, 20), LowRankConv2d(4, 16, 3)):
        with torch.no_grad():  # scrambled magnitudes: importance must still be non-increasing
            layer.U.mul_(torch.rand(layer.max_rank) * 3)
        imp = importance(layer)
        assert imp.shape == (layer.max_rank,)
        assert np.all(np.diff(imp) <= 0)


def test_component_sq_norms_by_hand() -> None:
    v_sq, u_sq = component_sq_norms(_hand_layer())
    torch.testing.assert_close(v_sq, torch.tensor([9.0, 16.0]))
    torch.testing.assert_close(u_sq, torch.tensor([25.0, 1.0]))


def test_shrink_ranks_cuts_exactly_under_the_threshold() -> None:
    importances = {"a": np.array([5.0, 3.0, 1.0, 0.5]), "b": np.array([0.1, 0.05]),
                   "c": np.array([2.0, 2.0])}
    assert shrink_ranks(importances, 1.0) == {"a": 3, "b": 1, "c": 2}  # 1.0 itself is kept
    assert shrink_ranks(importances, 1.0 + 1e-9) == {"a": 2, "b": 1, "c": 2}
    assert shrink_ranks(importances, 0.0) == {"a": 4, "b": 2, "c": 2}
    assert shrink_ranks(importances, 100.0) == {"a": 1, "b": 1, "c": 1}  # never below 1


@pytest.mark.parametrize("bad", [-0.1, float("nan")])
def test_shrink_ranks_rejects_bad_threshold(bad: float) -> None:
    with pytest.raises(ValueError, match=repr(bad)):
        shrink_ranks({"a": np.ones(3)}, bad)


def test_hgl_shrinks_trailing_components_first() -> None:
    """Component j sits in j + 1 nested groups, so steps on HGL alone shrink the tail first."""
    layer = LowRankLinear(8, 8, bias=False)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # every component starts with unit norm in both factors
        layer.U.copy_(torch.linalg.qr(torch.randn(8, 8, generator=g))[0])
        layer.V.copy_(torch.linalg.qr(torch.randn(8, 8, generator=g))[0])
    optimizer = torch.optim.SGD(layer.parameters(), lr=0.002)
    for _ in range(50):  # few enough that no norm reaches zero (where plain SGD would oscillate)
        optimizer.zero_grad()
        hgl_penalty({"l": layer}).backward()
        optimizer.step()
    norms = (layer.U.detach().norm(dim=0) * layer.V.detach().norm(dim=1)).numpy()
    assert np.all(np.diff(norms) < 0), f"component norms not decreasing: {norms}"
    assert norms[-1] < 0.5 * norms[0], f"tail {norms[-1]:.3f} vs lead {norms[0]:.3f}"


# --------------------------------------------------------------------------- training loop


@pytest.fixture(scope="module")
def digits() -> tuple[torch.Tensor, torch.Tensor]:
    data = load_digits()  # 1797 8x8 images, bundled with scikit-learn
    return torch.tensor(data.images / 16.0, dtype=torch.float32)[:, None], torch.tensor(data.target)


Batches = list[tuple[torch.Tensor, torch.Tensor]]


def _batches(x: torch.Tensor, y: torch.Tensor, size: int, seed: int) -> Batches:
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    return [(x[order[i:i + size]], y[order[i:i + size]]) for i in range(0, len(y), size)]


def _split(digits) -> tuple[tuple[torch.Tensor, torch.Tensor], Batches]:
    """1400 training examples and the 397 others as test batches."""
    x, y = digits
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    train_idx, test_idx = order[:1400], order[1400:]
    return (x[train_idx], y[train_idx]), _batches(x[test_idx], y[test_idx], 256, 0)


@pytest.mark.parametrize("optimizer", ["corner", "sgd"])
@pytest.mark.parametrize("distill", [True, False])
def test_train_never_touches_components_past_max_ranks(digits, distill: bool, optimizer: str) -> None:
    model = CNN((1, 8, 8), 10)  # conv2: max rank 64, fc (256 -> 128): 128
    max_ranks = {"conv2": 8, "fc": 16}
    before = {k: v.clone() for k, v in model.state_dict().items()}
    loader = _batches(*digits, 64, 0)[:8]
    recipe = Recipe(sampler="independent", epochs=2, lr=0.05, momentum=0.9, weight_decay=1e-2,
                    distill=distill, hgl_lambda=1e-2, optimizer=optimizer)
    metrics = train(model, loader, recipe, max_ranks, rng=np.random.default_rng(0))
    after = model.state_dict()
    for name, r in max_ranks.items():
        assert torch.equal(after[f"{name}.U"][:, r:], before[f"{name}.U"][:, r:]), name
        assert torch.equal(after[f"{name}.V"][r:], before[f"{name}.V"][r:]), name
        assert not torch.equal(after[f"{name}.U"][:, :r], before[f"{name}.U"][:, :r]), name
        assert not torch.equal(after[f"{name}.V"][:r], before[f"{name}.V"][:r]), name
    assert not torch.equal(after["conv1.weight"], before["conv1.weight"])  # shared parts train
    assert model.ranks() == max_ranks  # left at the client's maximum
    assert metrics["steps"] == 16 and metrics["examples"] == 8 * 64


def test_corner_steps_equal_textbook_steps_when_every_step_trains_the_whole_corner(digits) -> None:
    """With the self-distilling loss every step reaches the client's maximum ranks, so updating
    only that corner (views, CornerSGD) must give torch.optim.SGD's weights exactly."""
    models = {}
    for optimizer in ("corner", "sgd"):
        torch.manual_seed(0)
        model = CNN((1, 8, 8), 10)
        recipe = Recipe(sampler="independent", epochs=2, lr=0.05, momentum=0.9,
                        weight_decay=1e-2, distill=True, optimizer=optimizer)
        train(model, _batches(*digits, 64, 0)[:6], recipe, {"conv2": 8, "fc": 16},
              rng=np.random.default_rng(0))
        models[optimizer] = model.state_dict()
    for name, value in models["sgd"].items():
        torch.testing.assert_close(models["corner"][name], value, rtol=1e-5, atol=1e-6, msg=name)


def test_plain_ordered_dropout_differs_by_optimizer_only_in_what_sits_out(digits) -> None:
    """Without distillation the two optimizers part ways (lazy vs textbook momentum)."""
    states = []
    for optimizer in ("corner", "sgd"):
        torch.manual_seed(0)
        model = CNN((1, 8, 8), 10)
        recipe = Recipe(sampler="independent", lr=0.05, momentum=0.9, distill=False,
                        optimizer=optimizer)
        train(model, _batches(*digits, 64, 0)[:6], recipe, {"conv2": 8, "fc": 16},
              rng=np.random.default_rng(0))
        states.append(model.state_dict())
    assert not torch.equal(states[0]["fc.U"], states[1]["fc.U"])
    assert torch.equal(states[0]["fc.U"][:, 16:], states[1]["fc.U"][:, 16:])  # past max: untouched


def test_train_rejects_an_unknown_optimizer() -> None:
    with pytest.raises(ValueError, match=r"optimizer='adam' is not allowed.*corner"):
        train(CNN((1, 8, 8), 10), [], Recipe(optimizer="adam"))


def test_train_rejects_ranks_beyond_the_layer() -> None:
    with pytest.raises(ValueError, match=r"rank=65"):
        train(CNN((1, 8, 8), 10), [], Recipe(), {"conv2": 65, "fc": 1})


def test_train_with_hgl_shrinks_the_tail_relative_to_plain(digits) -> None:
    """The HGL term reaches the factors through train(): the tail/lead norm ratio drops."""
    def component_norms(hgl_lambda: float) -> torch.Tensor:
        torch.manual_seed(0)
        model = MLP((1, 8, 8), 10, hidden=(16,))
        train(model, _batches(*digits, 64, 0)[:10],
              Recipe(sampler="none", epochs=3, lr=0.01, weight_decay=0.0, distill=False,
                     hgl_lambda=hgl_lambda), rng=np.random.default_rng(0))
        layer = model.hidden[0]
        return layer.U.detach().norm(dim=0) * layer.V.detach().norm(dim=1)

    plain, with_hgl = component_norms(0.0), component_norms(0.05)
    ratio = lambda n: (n[-4:].sum() / n[:4].sum()).item()  # noqa: E731
    assert ratio(with_hgl) < 0.25 * ratio(plain), \
        f"tail/lead norms: with HGL {ratio(with_hgl):.4f}, without {ratio(plain):.4f}"
    assert with_hgl[0] > 0.5 * plain[0], "HGL at this strength must keep the leading component"


def test_evaluate_reports_accuracy_and_examples(digits) -> None:
    _, test = _split(digits)
    model = CNN((1, 8, 8), 10)
    model.set_ranks({"fc": 7})
    model.train()
    metrics = evaluate(model, test)
    assert 0.0 <= metrics["accuracy"] <= 1.0 and metrics["loss"] > 0
    assert metrics["examples"] == 1797 - 1400
    small = evaluate(model, test, {"conv2": 1, "fc": 1})
    assert small["examples"] == 397 and small["loss"] != metrics["loss"]
    assert model.ranks() == {"conv2": 64, "fc": 7} and model.training  # state restored


@pytest.mark.parametrize("distill", [True, False])
def test_training_learns_digits(digits, distill: bool) -> None:
    (x, y), test = _split(digits)
    model = CNN((1, 8, 8), 10)
    before = evaluate(model, test)
    for epoch in range(3):
        metrics = train(model, _batches(x, y, 32, epoch),
                        Recipe(sampler="single-layer", lr=0.05, distill=distill),
                        rng=np.random.default_rng(epoch))
    after = evaluate(model, test)
    quarter = evaluate(model, test, model.ranks_at_fraction(0.25))
    assert metrics["examples"] == 1400 and metrics["steps"] == 44 and metrics["macs"] > 0
    assert after["loss"] < 0.5 * before["loss"], f"loss {before['loss']:.3f} -> {after['loss']:.3f}"
    assert after["accuracy"] > 0.6 and quarter["accuracy"] > 0.4, (after, quarter)


# --------------------------------------------------------------------------- Maestro's theorem

N = 16
SINGULAR_VALUES = 0.7 ** np.arange(N)  # 1, 0.7, 0.49, ...: well-separated leading gaps


def _fit_linear_map(seed: int, ordered_dropout: bool) -> tuple[list[float], float]:
    """Fit A = P diag(s) Q^T with a LowRankLinear by SGD on isotropic inputs; return the largest
    principal angles (degrees) between U[:, :k] and P[:, :k] for k = 1, 2, 3, and ||UV - A||_F."""
    g = torch.Generator().manual_seed(seed)
    rng = np.random.default_rng(seed)
    p = torch.linalg.qr(torch.randn(N, N, generator=g, dtype=torch.float64))[0]
    q = torch.linalg.qr(torch.randn(N, N, generator=g, dtype=torch.float64))[0]
    a = ((p * torch.from_numpy(SINGULAR_VALUES)) @ q.T).float()
    layer = LowRankLinear(N, N, bias=False)
    with torch.no_grad():  # a small random start, unrelated to A
        layer.U.copy_(torch.randn(N, N, generator=g) * 0.3 / math.sqrt(N))
        layer.V.copy_(torch.randn(N, N, generator=g) * 0.3 / math.sqrt(N))
    steps = 3000
    optimizer = torch.optim.SGD(layer.parameters(), lr=0.4)
    schedule = torch.optim.lr_scheduler.MultiStepLR(optimizer, [int(0.85 * steps)], gamma=0.1)
    draw = uniform if ordered_dropout else full  # one layer: rank uniform in 1..N, or always N
    for _ in range(steps):
        x = torch.randn(128, N, generator=g)
        layer.set_rank(draw({"map": N}, rng)["map"])
        loss = (layer(x) - x @ a.T).square().sum(1).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
    u = layer.U.detach().double().numpy()
    angles = [math.degrees(subspace_angles(u[:, :k], p[:, :k].numpy()).max()) for k in (1, 2, 3)]
    layer.set_rank(N)
    return angles, (layer.composed_weight() - a).norm().item()


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_ordered_dropout_recovers_the_singular_subspaces(seed: int) -> None:
    angles, misfit = _fit_linear_map(seed, ordered_dropout=True)
    assert max(angles) < 5.0, f"principal angles k=1,2,3 with OD: {np.round(angles, 2)} degrees"
    assert misfit < 0.05, misfit


def test_without_ordered_dropout_the_factors_are_not_ordered() -> None:
    angles, misfit = _fit_linear_map(0, ordered_dropout=False)
    assert misfit < 0.01, f"plain SGD must fit A as well (misfit {misfit:.4f})"
    assert max(angles) > 20.0, f"principal angles k=1,2,3 without OD: {np.round(angles, 2)} degrees"
