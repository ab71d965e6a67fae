"""Ordered low-rank layers: exact forwards, slicing, gradients, rank checks, layout, cost counts."""

from __future__ import annotations

import re

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from conftest import randn

from fl_maestro.layers import LowRankConv2d, LowRankLinear, leading


# --------------------------------------------------------------------------- forward


def test_linear_full_rank_equals_dense_product() -> None:
    layer = LowRankLinear(7, 5)  # max rank min(5, 7) = 5
    x = randn(3, 7)
    expected = F.linear(x, layer.U @ layer.V, layer.bias)
    assert layer.max_rank == layer.rank == 5
    torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize(("stride", "padding"), [(1, 0), (1, 1), (2, 1), (3, 2)])
def test_conv_full_rank_equals_composed_kernel(stride: int, padding: int) -> None:
    layer = LowRankConv2d(3, 4, 3, stride=stride, padding=padding)  # max rank min(4, 27) = 4
    x = randn(2, 3, 9, 9)
    kernel = layer.composed_weight()
    assert kernel.shape == (4, 3, 3, 3)
    expected = F.conv2d(x, kernel, layer.bias, stride, padding)
    torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=0)


def test_linear_from_dense_reproduces_module() -> None:
    dense = nn.Linear(12, 9)
    layer = LowRankLinear.from_dense(dense)
    x = randn(4, 12)
    torch.testing.assert_close(layer(x), dense(x), atol=1e-4, rtol=0)
    torch.testing.assert_close(layer.composed_weight(), dense.weight, atol=1e-5, rtol=0)


def test_conv_from_dense_reproduces_module() -> None:
    dense = nn.Conv2d(3, 8, 3, stride=2, padding=1)
    layer = LowRankConv2d.from_dense(dense)
    assert (layer.stride, layer.padding, layer.max_rank) == (2, 1, 8)
    x = randn(2, 3, 11, 11)
    torch.testing.assert_close(layer(x), dense(x), atol=1e-4, rtol=0)


def test_from_dense_rejects_unsupported_conv() -> None:
    with pytest.raises(ValueError, match="square, ungrouped"):
        LowRankConv2d.from_dense(nn.Conv2d(4, 4, 3, groups=2))


def test_from_dense_at_reduced_rank_is_the_best_approximation() -> None:
    dense = nn.Linear(8, 6, bias=False)
    layer = LowRankLinear.from_dense(dense, max_rank=2)
    p, s, qt = torch.linalg.svd(dense.weight.detach().double())
    best = (p[:, :2] * s[:2]) @ qt[:2]  # Eckart-Young: the top-2 SVD truncation
    torch.testing.assert_close(layer.composed_weight().double(), best, atol=1e-5, rtol=0)


def test_linear_rank_r_forward_equals_truncated_product() -> None:
    layer = LowRankLinear(10, 6)
    x = randn(5, 10)
    for r in (1, 3, 6):
        layer.set_rank(r)
        expected = x @ (layer.U[:, :r] @ layer.V[:r]).T + layer.bias
        torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=0)


def test_conv_rank_r_forward_equals_truncated_kernel() -> None:
    layer = LowRankConv2d(3, 8, 3, padding=1)
    x = randn(2, 3, 6, 6)
    for r in (1, 4, 8):
        layer.set_rank(r)
        kernel = (layer.U[:, :r] @ layer.V[:r].reshape(r, -1)).reshape(8, 3, 3, 3)
        out = layer(x)
        assert out.shape == (2, 8, 6, 6)  # the rank never changes the output shape
        torch.testing.assert_close(out, F.conv2d(x, kernel, layer.bias, 1, 1), atol=1e-5, rtol=0)


# --------------------------------------------------------------------------- gradients


@pytest.mark.parametrize("make", [lambda: LowRankLinear(10, 6),
                                  lambda: LowRankConv2d(3, 8, 3, padding=1)])
def test_gradients_vanish_exactly_outside_the_prefix(make) -> None:
    layer = make()
    layer.set_rank(2)
    x = randn(2, 3, 5, 5) if isinstance(layer, LowRankConv2d) else randn(4, 10)
    layer(x).square().sum().backward()
    assert torch.count_nonzero(layer.U.grad[:, 2:]) == 0
    assert torch.count_nonzero(layer.V.grad[2:]) == 0
    assert torch.count_nonzero(layer.U.grad[:, :2]) == layer.U.grad[:, :2].numel()
    assert torch.count_nonzero(layer.V.grad[:2]) == layer.V.grad[:2].numel()


@pytest.mark.parametrize(("make", "x_shape"), [(lambda: LowRankLinear(64, 48), (8, 64)),
                                               (lambda: LowRankConv2d(4, 16, 3, padding=1),
                                                (2, 4, 6, 6))])
def test_compute_shrinks_with_the_rank(make, x_shape: tuple[int, ...]) -> None:
    """Forward + backward FLOPs are exactly proportional to the rank: slicing, not masking."""
    layer = make()
    x = randn(*x_shape)

    def flops(rank: int) -> int:
        layer.set_rank(rank)
        with FlopCounterMode(display=False) as counter:
            layer(x).sum().backward()
        return counter.get_total_flops()

    one = flops(1)
    for r in (2, 5, layer.max_rank):
        assert flops(r) == r * one, f"rank {r}: {flops(r)} FLOPs, expected {r} x {one}"


def test_forward_flops_match_hand_count() -> None:
    # LowRankLinear(10, 6) at rank 2: per sample 2*10 + 6*2 = 32 MACs; batch 4 -> 2*4*32 FLOPs.
    layer = LowRankLinear(10, 6)
    layer.set_rank(2)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        layer(randn(4, 10))
    assert counter.get_total_flops() == 2 * 4 * 32


# --------------------------------------------------------------------------- rank control


@pytest.mark.parametrize("bad", [0, -1, 7, 1.5, True, "2"])
def test_set_rank_rejects_out_of_range_and_non_int(bad) -> None:
    layer = LowRankLinear(10, 6)  # allowed ranks 1..6
    with pytest.raises(ValueError, match=re.escape(repr(bad)) + r".*1\.\.6"):
        layer.set_rank(bad)
    assert layer.rank == 6  # a rejected rank leaves the layer as it was


def test_set_rank_max_plus_one_names_the_range() -> None:
    layer = LowRankConv2d(2, 5, 3)  # max rank min(5, 18) = 5
    with pytest.raises(ValueError, match=r"rank=6 .*allowed 1\.\.5"):
        layer.set_rank(6)


def test_max_rank_argument_is_checked() -> None:
    assert LowRankLinear(10, 6, max_rank=3).max_rank == 3
    with pytest.raises(ValueError, match=r"max_rank=7.*1\.\.6"):
        LowRankLinear(10, 6, max_rank=7)


def test_truncate_keeps_the_prefix() -> None:
    layer = LowRankConv2d(3, 8, 3, padding=1)
    u, v = layer.U.detach().clone(), layer.V.detach().clone()
    x = randn(1, 3, 5, 5)
    layer.set_rank(3)
    before = layer(x)
    layer.truncate(3)
    assert (layer.max_rank, layer.rank) == (3, 3)
    assert layer.U.shape == (8, 3) and layer.V.shape == (3, 3, 3, 3)
    assert torch.equal(layer.U, u[:, :3]) and torch.equal(layer.V, v[:3])
    torch.testing.assert_close(layer(x), before, atol=0, rtol=0)
    layer.set_rank(2)
    layer.truncate(3)  # a rank under the new maximum is kept
    assert layer.rank == 2
    with pytest.raises(ValueError, match=r"max_rank=4"):
        layer.truncate(4)


# --------------------------------------------------------------------------- state and layout


def test_state_dict_names_and_shapes() -> None:
    model = nn.Sequential()
    model.add_module("fc", LowRankLinear(10, 6, max_rank=4))
    model.add_module("conv", LowRankConv2d(3, 8, 3, max_rank=5, bias=False))
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert shapes == {"fc.U": (6, 4), "fc.V": (4, 10), "fc.bias": (6,),
                      "conv.U": (8, 5), "conv.V": (5, 3, 3, 3)}


def test_u_is_rank_major_and_stays_so() -> None:
    layer = LowRankLinear(10, 6)
    assert layer.U.t().is_contiguous() and not layer.U.is_contiguous()
    assert layer.U[:, :3].t().is_contiguous()  # the prefix is one contiguous block

    source = LowRankLinear(10, 6)
    layer.load_state_dict({k: v.contiguous() for k, v in source.state_dict().items()})
    assert layer.U.t().is_contiguous()
    assert torch.equal(layer.U, source.U)

    layer.truncate(4)
    assert layer.U.t().is_contiguous()

    layer(randn(2, 10)).sum().backward()
    assert layer.U.grad.t().is_contiguous()  # the gradient follows the parameter's layout


@pytest.mark.parametrize(("make", "x"), [(lambda: LowRankLinear(10, 6), (4, 10)),
                                         (lambda: LowRankConv2d(3, 8, 3, padding=1), (2, 3, 5, 5))])
def test_u_gradient_arrives_in_u_layout(make, x: tuple[int, ...]) -> None:
    """Below full rank, the gradient autograd hands to U already has U's rank-major strides, so
    accumulating it is a plain add, not a full-size transposing copy on every step. At any rank
    ``U.grad`` ends up in U's layout."""
    layer = make()
    arrived = []
    layer.U.register_hook(lambda grad: arrived.append(grad.stride()))
    for r in (2, 3):
        layer.set_rank(r)
        layer(randn(*x)).sum().backward()
    assert arrived == [layer.U.stride()] * 2
    layer.U.grad = None
    layer.set_rank(layer.max_rank)
    layer(randn(*x)).sum().backward()
    assert layer.U.grad.stride() == layer.U.stride()


def test_meta_layer_truncates_and_materialises_rank_major() -> None:
    layer = LowRankLinear(10, 6, device="meta")
    layer.truncate(2)
    layer.to_empty(device="cpu")
    assert layer.U.shape == (6, 2) and layer.U.t().is_contiguous()


def test_extra_repr_shows_ranks() -> None:
    layer = LowRankConv2d(3, 8, 3, padding=1)
    layer.set_rank(2)
    text = repr(layer)
    assert "max_rank=8" in text and "rank=2" in text and "padding=1" in text
    assert "max_rank=6, rank=6" in repr(LowRankLinear(10, 6))


# --------------------------------------------------------------------------- costs


def test_linear_costs_by_hand() -> None:
    layer = LowRankLinear(10, 6)
    # rank 2: V is 2 x 10 (20 MACs), U is 6 x 2 (12 MACs) -> 2 * (10 + 6) = 32
    assert layer.macs(2) == 32
    assert layer.params(2) == 32 + 6  # + bias
    assert layer.macs() == 6 * 16 == 96  # active rank = max rank 6
    assert layer.dense_macs() == 60 and layer.dense_params() == 66
    assert LowRankLinear(10, 6, bias=False).params(2) == 32


def test_conv_costs_by_hand() -> None:
    layer = LowRankConv2d(3, 8, 3, padding=1)
    positions = layer(torch.zeros(1, 3, 5, 5)).shape[-2:].numel()
    assert positions == 25  # padding 1 keeps 5 x 5
    # fan_in 3 * 3 * 3 = 27; rank 2: V conv 27 -> 2, U conv 2 -> 8, per output position
    assert layer.macs(2, positions) == 25 * 2 * (27 + 8) == 1750
    assert layer.params(2) == 2 * (27 + 8) + 8
    assert layer.dense_macs(25) == 25 * 8 * 27
    assert layer.dense_params() == 8 * 27 + 8


def test_cost_rejects_bad_rank() -> None:
    with pytest.raises(ValueError, match=r"rank=7"):
        LowRankLinear(10, 6).macs(7)


def test_leading_slices_a_corner_and_never_the_whole_tensor() -> None:
    t = randn(4, 5, 3)
    assert leading(t, 4, 5, 3) is t and leading(t, 4) is t  # a whole slice would cost a copy
    assert torch.equal(leading(t, 2, 5), t[:2]) and torch.equal(leading(t, 4, 1, 2), t[:, :1, :2])
