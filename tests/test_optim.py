"""Corner-only training steps: views that write through, and SGD that touches only what it trained."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fl_maestro.layers import LowRankLinear
from fl_maestro.models import CNN, MLP
from fl_maestro.optim import CornerSGD, corner_view, parameter_slots


def _batch(seed: int, shape=(16, 1, 8, 8)) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g), torch.randint(0, 10, (shape[0],), generator=g)


def test_corner_view_shares_memory_and_restores_the_parameters() -> None:
    model = CNN((1, 8, 8), 10)
    originals = dict(model.named_parameters())
    shapes = model.slice_shapes({"conv2": 5, "fc": 7})
    with corner_view(model, shapes):
        inside = dict(model.named_parameters())
        assert {n: tuple(p.shape) for n, p in inside.items()} == shapes
        assert inside["conv1.weight"] is originals["conv1.weight"]  # whole: left as it is
        assert inside["fc.U"].is_leaf and inside["fc.U"].stride() == originals["fc.U"].stride()
        assert model.fc.max_rank == 7
        with torch.no_grad():
            inside["fc.U"].fill_(3.0)
            inside["conv2.V"].fill_(-1.0)
    assert all(model.get_parameter(n) is p for n, p in originals.items())
    assert torch.all(model.fc.U[:, :7] == 3.0) and not torch.any(model.fc.U[:, 7:] == 3.0)
    assert torch.all(model.conv2.V[:5] == -1.0) and not torch.any(model.conv2.V[5:] == -1.0)


def test_corner_view_restores_on_error_and_rejects_a_corner_that_does_not_fit() -> None:
    model = MLP((1, 8, 8), 10, hidden=(16,))
    originals = dict(model.named_parameters())
    with pytest.raises(RuntimeError, match="boom"):
        with corner_view(model, model.slice_shapes({"hidden.0": 3})):
            raise RuntimeError("boom")
    assert all(model.get_parameter(n) is p for n, p in originals.items())
    with pytest.raises(ValueError, match=r"corner \(16, 17\) does not fit"):
        with corner_view(model, {"hidden.0.U": (16, 17)}):
            pass
    assert all(model.get_parameter(n) is p for n, p in originals.items())


@pytest.mark.parametrize("momentum,weight_decay", [(0.0, 0.0), (0.9, 0.0), (0.9, 1e-2)])
def test_corner_sgd_on_whole_parameters_equals_torch_sgd(momentum: float, weight_decay: float) -> None:
    torch.manual_seed(0)
    ours, theirs = CNN((1, 8, 8), 10), CNN((1, 8, 8), 10)
    theirs.load_state_dict(ours.state_dict())
    optimizer = CornerSGD(ours, lr=0.05, momentum=momentum, weight_decay=weight_decay)
    reference = torch.optim.SGD(theirs.parameters(), lr=0.05, momentum=momentum,
                                weight_decay=weight_decay)
    for step in range(5):
        x, y = _batch(step)
        with corner_view(ours, ours.slice_shapes()):
            F.cross_entropy(ours(x), y).backward()
            optimizer.step()
        reference.zero_grad()
        F.cross_entropy(theirs(x), y).backward()
        reference.step()
    for name, p in theirs.state_dict().items():
        torch.testing.assert_close(ours.state_dict()[name], p, rtol=1e-5, atol=1e-6, msg=name)


def test_a_step_at_rank_r_changes_nothing_past_r_momentum_included() -> None:
    torch.manual_seed(0)
    layer = LowRankLinear(12, 10)  # max rank 10
    optimizer = CornerSGD(layer, lr=0.1, momentum=0.9, weight_decay=1e-2)
    x, target = torch.randn(32, 12), torch.randn(32, 10)

    def step(rank: int) -> None:
        with corner_view(layer, {"U": (10, rank), "V": (rank, 12)}):
            layer.set_rank(rank)
            F.mse_loss(layer(x), target).backward()
            optimizer.step()

    step(10)  # every component now has momentum
    u, v, buf_u = layer.U.detach().clone(), layer.V.detach().clone(), optimizer.buffers["U"].clone()
    step(4)
    assert torch.equal(layer.U[:, 4:], u[:, 4:]) and torch.equal(layer.V[4:], v[4:])
    assert torch.equal(optimizer.buffers["U"][:, 4:], buf_u[:, 4:])
    assert not torch.equal(layer.U[:, :4], u[:, :4]) and not torch.equal(layer.V[:4], v[:4])


def test_a_component_that_sits_out_keeps_its_momentum_for_its_next_step() -> None:
    """By hand: m1 = g1; (sits out); m3 = 0.9 m1 + g3; w3 = w0 - lr (m1 + m3)."""
    layer = LowRankLinear(2, 2, bias=False)
    with torch.no_grad():
        layer.U.copy_(torch.eye(2))
        layer.V.copy_(torch.eye(2))
    optimizer = CornerSGD(layer, lr=0.5, momentum=0.9)
    x = torch.tensor([[1.0, 1.0]])

    def step(rank: int) -> None:  # loss = sum of outputs: dL/dU[:, j] = V[j] @ x, dL/dV[j] = U[:, j] . 1
        with corner_view(layer, {"U": (2, rank), "V": (rank, 2)}):
            layer.set_rank(rank)
            layer(x).sum().backward()
            optimizer.step()

    step(2)  # g1 for component 1: dU[:, 1] = 1, dV[1] = (1, 1)
    after_first = layer.U[:, 1].detach().clone()
    torch.testing.assert_close(after_first, torch.tensor([-0.5, 0.5]))
    step(1)  # component 1 sits out: neither it nor its momentum moves
    torch.testing.assert_close(layer.U[:, 1], after_first)
    v1 = layer.V[1].detach().clone()
    step(2)
    g3 = (v1 @ x[0]).item()  # dL/dU[i, 1] at step 3, the same for both rows
    expected = after_first - 0.5 * (0.9 * 1.0 + g3)
    torch.testing.assert_close(layer.U[:, 1].detach(), expected)


@pytest.mark.parametrize("key,kwargs", [("lr", {"lr": -0.1}), ("momentum", {"lr": 0.1, "momentum": -1}),
                                        ("weight_decay", {"lr": 0.1, "weight_decay": float("nan")})])
def test_corner_sgd_rejects_bad_hyperparameters(key: str, kwargs: dict) -> None:
    with pytest.raises(ValueError, match=rf"{key}=.*allowed a number >= 0"):
        CornerSGD(LowRankLinear(4, 4), **kwargs)


def test_parameter_slots_name_every_parameter_where_it_lives() -> None:
    model = CNN((1, 8, 8), 10)
    slots = parameter_slots(model)
    assert [name for name, _, _ in slots] == [name for name, _ in model.named_parameters()]
    assert all(getattr(owner, attr) is model.get_parameter(name) for name, owner, attr in slots)
    with corner_view(model, model.slice_shapes({"fc": 3}), slots):
        assert model.fc.U.shape == (128, 3)  # the kept slots still find the swapped parameters
