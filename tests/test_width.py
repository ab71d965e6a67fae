"""Width-sliced layers and models (FjORD / HeteroFL baselines): slicing, costs, merge, training."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import randn

from fl_maestro.budgets import ranks_for_budget
from fl_maestro.data import load_digits, make_loader
from fl_maestro.models import CNN, at_ranks, model_arrays
from fl_maestro.training import Recipe, evaluate, train
from fl_maestro.width import (
    WidthCNN,
    WidthConv2d,
    WidthGroupNorm,
    WidthLinear,
    WidthMLP,
    build_width_model,
    width_model_from_arrays,
)
from strategies.merge import check_reply, corner_arrays, merge_nested


def _randomise(model: nn.Module, seed: int = 0) -> nn.Module:
    """Fill every parameter with noise (norms too, so their slicing is under test)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=generator) * 0.2)
    return model


# --------------------------------------------------------------------------- layers


def test_full_width_layers_equal_their_dense_modules() -> None:
    linear, conv = WidthLinear(7, 5), WidthConv2d(3, 4, 3, stride=2, padding=1)
    dense_linear, dense_conv = nn.Linear(7, 5), nn.Conv2d(3, 4, 3, stride=2, padding=1)
    dense_linear.load_state_dict(linear.state_dict())
    dense_conv.load_state_dict(conv.state_dict())
    x, image = randn(2, 7), randn(2, 3, 9, 9)
    torch.testing.assert_close(linear(x), dense_linear(x), atol=1e-6, rtol=0)
    torch.testing.assert_close(conv(image), dense_conv(image), atol=1e-6, rtol=0)


def test_sliced_forward_equals_the_dense_layer_of_the_slice() -> None:
    linear, conv = WidthLinear(7, 5), WidthConv2d(3, 4, 3, padding=1)
    linear.set_rank(2)
    conv.set_rank(3)
    x, image = randn(2, 4), randn(2, 2, 6, 6)  # inputs narrower than held: 4 of 7, 2 of 3
    expected_linear = F.linear(x, linear.weight[:2, :4], linear.bias[:2])
    expected_conv = nn.Conv2d(2, 3, 3, padding=1)
    with torch.no_grad():
        expected_conv.weight.copy_(conv.weight[:3, :2])
        expected_conv.bias.copy_(conv.bias[:3])
    assert linear(x).shape == (2, 2) and conv(image).shape == (2, 3, 6, 6)
    torch.testing.assert_close(linear(x), expected_linear, atol=1e-6, rtol=0)
    torch.testing.assert_close(conv(image), expected_conv(image), atol=1e-6, rtol=0)


def test_gradients_outside_the_active_slice_are_exactly_zero() -> None:
    linear, conv = WidthLinear(7, 5), WidthConv2d(3, 4, 3, padding=1)
    linear.set_rank(2)
    conv.set_rank(3)
    (linear(randn(2, 4)).sum() + conv(randn(2, 2, 6, 6)).square().sum()).backward()
    for layer, (r, c) in ((linear, (2, 4)), (conv, (3, 2))):
        grad = layer.weight.grad.clone()
        assert grad[:r, :c].abs().sum() > 0
        grad[:r, :c] = 0
        assert torch.count_nonzero(grad) == 0
        assert torch.count_nonzero(layer.bias.grad[r:]) == 0 and layer.bias.grad[:r].abs().sum() > 0


def test_set_rank_checks_the_range_and_the_fixed_output() -> None:
    layer = WidthLinear(4, 3)
    with pytest.raises(ValueError, match=r"rank=4.*1\.\.3"):
        layer.set_rank(4)
    with pytest.raises(ValueError, match="not sliceable"):
        WidthLinear(4, 3, sliceable_out=False).set_rank(2)


def test_group_norm_keeps_whole_groups_of_a_leading_corner() -> None:
    norm = _randomise(WidthGroupNorm(8, group_size=2))
    dense = nn.GroupNorm(4, 8)
    dense.load_state_dict(norm.state_dict())
    x = randn(2, 8, 3, 3)
    torch.testing.assert_close(norm(x), dense(x), atol=1e-6, rtol=0)
    # 4 channels: the first two groups, exactly as at full width (stats are per group)
    torch.testing.assert_close(norm(x[:, :4]), dense(x)[:, :4], atol=1e-6, rtol=0)
    # 5 channels: two whole groups plus channel 4 normalised on its own
    alone = F.group_norm(x[:, 4:5], 1, norm.weight[4:5], norm.bias[4:5])
    torch.testing.assert_close(norm(x[:, :5]), torch.cat([dense(x)[:, :4], alone], 1),
                               atol=1e-6, rtol=0)


def test_width_layers_have_no_factors() -> None:
    layer = WidthLinear(4, 3)
    assert not hasattr(layer, "U")
    with pytest.raises(ValueError, match="no ordered factors"):
        _ = layer.V


# --------------------------------------------------------------------------- models


def test_cnn_layers_and_rank_control() -> None:
    model = WidthCNN()
    assert model.max_ranks() == {"conv1": 32, "conv2": 64, "fc": 128}  # not the classifier
    layers = ("conv1", "conv2", "fc", "classifier")  # the names of models.CNN's layers
    assert list(model.state_dict()) == [f"{n}.{p}" for n in layers for p in ("weight", "bias")]
    assert {k.rsplit(".", 1)[0] for k in CNN().state_dict()} == set(layers)
    model.set_ranks(model.ranks_at_fraction(0.5))
    assert model.ranks() == {"conv1": 16, "conv2": 32, "fc": 64}
    with pytest.raises(ValueError, match="not truncated"):
        model.truncate({"fc": 3})
    with pytest.raises(ValueError, match="unknown layers"):
        WidthCNN(widths={"classifier": 3})


def _dense_cnn_of_slice(model: WidthCNN, r: dict[str, int]) -> nn.Sequential:
    """The plain nn CNN holding the leading corners of ``model``'s weights at ranks ``r``."""
    c1, c2, f = r["conv1"], r["conv2"], r["fc"]
    dense = nn.Sequential(
        nn.Conv2d(1, c1, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(c1, c2, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
        nn.Linear(c2 * 7 * 7, f), nn.ReLU(), nn.Linear(f, 10))
    corners = {0: (model.conv1, c1, 1), 3: (model.conv2, c2, c1), 7: (model.fc, f, c2 * 49),
               9: (model.classifier, 10, f)}
    with torch.no_grad():
        for index, (layer, out, fan_in) in corners.items():
            dense[index].weight.copy_(layer.weight[:out, :fan_in])
            dense[index].bias.copy_(layer.bias[:out])
    return dense


@pytest.mark.parametrize("fraction", [0.25, 0.5, 1.0])
def test_cnn_at_a_width_equals_a_dense_cnn_of_the_sliced_weights(fraction: float) -> None:
    model = WidthCNN()
    ranks = model.ranks_at_fraction(fraction)
    x = randn(3, 1, 28, 28)
    with at_ranks(model, ranks):
        out = model(x)
    assert out.shape == (3, 10)
    torch.testing.assert_close(out, _dense_cnn_of_slice(model, ranks)(x), atol=1e-5, rtol=1e-5)


def test_cnn_gradients_stay_inside_the_slice() -> None:
    model = WidthCNN((1, 8, 8), 10)
    ranks = {"conv1": 5, "conv2": 9, "fc": 11}
    shapes = model.slice_shapes(ranks)
    with at_ranks(model, ranks):
        F.cross_entropy(model(randn(4, 1, 8, 8)), torch.tensor([0, 1, 2, 3])).backward()
    for name, p in model.named_parameters():
        corner = tuple(slice(0, a) for a in shapes[name])
        grad = p.grad.clone()
        assert grad[corner].abs().sum() > 0, name
        grad[corner] = 0
        assert torch.count_nonzero(grad) == 0, name


@pytest.mark.parametrize("name, input_shape", [("mlp", (1, 8, 8)), ("cnn", (1, 8, 8)),
                                               ("resnet18", (3, 8, 8))])
def test_slice_shapes_are_the_shapes_of_the_model_built_at_those_widths(name, input_shape) -> None:
    full = build_width_model(name, input_shape, 10, device="meta")
    rng = np.random.default_rng(0)
    ranks = {n: int(rng.integers(1, r + 1)) for n, r in full.max_ranks().items()}  # uneven widths
    built = build_width_model(name, input_shape, 10, widths=ranks, device="meta")
    assert full.slice_shapes(ranks) == {
        k: tuple(v.shape) for k, v in built.state_dict().items()}


@pytest.mark.parametrize("name, input_shape, fraction", [
    ("cnn", (1, 8, 8), 0.4), ("mlp", (1, 8, 8), 0.3), ("resnet18", (3, 8, 8), 0.3),
    ("resnet18", (3, 8, 8), None)])  # None: an uneven width per layer
def test_client_model_from_a_slice_equals_the_global_model_at_those_ranks(
        name, input_shape, fraction) -> None:
    model = _randomise(build_width_model(name, input_shape, 10))
    rng = np.random.default_rng(1)
    ranks = model.ranks_at_fraction(fraction) if fraction else {
        n: int(rng.integers(1, r + 1)) for n, r in model.max_ranks().items()}
    arrays = corner_arrays(model_arrays(model), model.slice_shapes(ranks))
    client = width_model_from_arrays(name, input_shape, 10, arrays)
    assert client.max_ranks() == ranks
    assert all(np.array_equal(v, arrays[k]) for k, v in model_arrays(client).items())
    x = randn(2, *input_shape)
    with at_ranks(model, ranks):
        torch.testing.assert_close(client(x), model(x), atol=1e-5, rtol=1e-5)


# --------------------------------------------------------------------------- costs

# WidthCNN on 1 x 28 x 28, counted by hand (out * in * k*k * positions):
#   full:  conv1  32 * 1 * 9 * 784          =   225_792
#          conv2  64 * 32 * 9 * 196         = 3_612_672
#          fc     128 * (64*7*7 = 3136)     =   401_408
#          classifier 10 * 128              =     1_280   -> 4_241_152 = CNN().dense_cost()
#   p=0.5: conv1  16 * 1 * 9 * 784          =   112_896
#          conv2  32 * 16 * 9 * 196         =   903_168
#          fc     64 * (32*7*7 = 1568)      =   100_352
#          classifier 10 * 64               =       640   -> 1_117_056
#   params at p=0.5: conv1 144 + 16, conv2 4_608 + 32, fc 100_352 + 64, classifier 640 + 10
WIDTH_CNN_FULL_MACS = 225_792 + 3_612_672 + 401_408 + 1_280
WIDTH_CNN_HALF_MACS = 112_896 + 903_168 + 100_352 + 640
WIDTH_CNN_HALF_PARAMS = 160 + 4_640 + 100_416 + 650


def test_hand_counts_are_what_the_test_claims() -> None:
    assert WIDTH_CNN_FULL_MACS == 4_241_152 and WIDTH_CNN_HALF_MACS == 1_117_056
    assert WIDTH_CNN_HALF_PARAMS == 105_866


def test_cnn_costs_by_hand() -> None:
    model = WidthCNN()
    assert model.cost() == model.dense_cost() == WIDTH_CNN_FULL_MACS == CNN().dense_cost()
    assert model.cost(kind="params") == sum(p.numel() for p in model.parameters())
    assert model.dense_cost("params") == CNN().dense_cost("params")
    half = model.ranks_at_fraction(0.5)
    assert model.cost(half) == WIDTH_CNN_HALF_MACS
    assert model.cost(half, "params") == WIDTH_CNN_HALF_PARAMS
    # only conv1 narrower: conv2's input shrinks with it, 8*9*784 + 64*8*9*196, the rest full
    assert model.cost({"conv1": 8}) == 56_448 + 903_168 + 401_408 + 1_280
    with pytest.raises(ValueError, match="'flops'"):
        model.cost(kind="flops")


def test_resnet_costs_at_full_width_match_the_dense_network() -> None:
    model = build_width_model("resnet18", (3, 32, 32), 10, device="meta")
    assert model.cost() == model.dense_cost() == 555_422_720  # the usual 0.56 GMACs on CIFAR
    assert model.cost(kind="params") == sum(p.numel() for p in model.parameters()) == 11_173_962


@pytest.mark.parametrize("cost", ["macs", "params"])
def test_uniform_budget_takes_the_widest_fraction_that_fits(cost: str) -> None:
    model = WidthCNN()
    full = model.cost(kind=cost)
    grid = [model.cost(model.ranks_at_fraction(q / 500), cost) for q in range(1, 501)]
    for budget in (0.05, 0.1, 0.2, 0.25, 0.4, 0.5, 0.6, 0.8, 0.95, 1.0):
        chosen = model.cost(ranks_for_budget(model, budget, "uniform", cost), cost)
        assert chosen <= budget * full
        assert chosen >= max(c for c in grid if c <= budget * full)  # no common fraction is wider


def test_uniform_budget_on_resnet() -> None:
    model = build_width_model("resnet18", (3, 32, 32), 10, device="meta")
    for budget in (0.1, 0.25, 0.6):
        ranks = ranks_for_budget(model, budget)
        assert model.cost(ranks) <= budget * model.cost()
        # MACs grow about quadratically with the width (linearly in the stem and classifier)
        assert 0.9 * budget ** 0.5 <= ranks["conv1"] / 64 <= 1.1 * budget ** 0.5


def test_importance_allocation_is_refused_for_width_models() -> None:
    with pytest.raises(ValueError, match="WidthCNN has no low-rank layers.*not importance"):
        ranks_for_budget(WidthCNN(), 0.5, "importance")
    assert set(WidthCNN().ranked_layers()) == set(WidthCNN().max_ranks())  # what ranks address


# --------------------------------------------------------------------------- merge


def test_nested_merge_of_width_slices_by_hand() -> None:
    # MLP 2 -> hidden 2 -> 1: hidden.0.weight 2x2, hidden.0.bias 2, classifier.weight 1x2, .bias 1
    model = WidthMLP((1, 1, 2), num_classes=1, hidden=(2,))
    global_arrays = {k: np.zeros_like(v) for k, v in model_arrays(model).items()}
    half = model.slice_shapes({"hidden.0": 1})  # p = 0.5
    assert half == {"hidden.0.weight": (1, 2), "hidden.0.bias": (1,),
                    "classifier.weight": (1, 1), "classifier.bias": (1,)}
    small = corner_arrays({k: np.ones_like(v) for k, v in global_arrays.items()}, half)
    large = {k: np.full_like(v, 5.0) for k, v in global_arrays.items()}  # p = 1.0
    for arrays in (small, large):
        check_reply(global_arrays, arrays, 1, cut_shared=True)
    merged = merge_nested(global_arrays, [(small, 1.0), (large, 3.0)])
    # covered by both: (1 * 1 + 3 * 5) / 4 = 4; by the full client only: 5
    expected = {"hidden.0.weight": [[4, 4], [5, 5]], "hidden.0.bias": [4, 5],
                "classifier.weight": [[4, 5]], "classifier.bias": [4]}
    for name, value in expected.items():
        np.testing.assert_allclose(merged[name], np.array(value, np.float32))


# --------------------------------------------------------------------------- training


@pytest.fixture(scope="module")
def digits_loader():
    x_train, y_train, _, _ = load_digits()  # 1437 8x8 images
    return make_loader(x_train, y_train, batch_size=32, shuffle=True, seed=0)


@pytest.mark.parametrize("sampler", ["uniform", "none"])  # FjORD, HeteroFL
def test_train_on_digits_reduces_the_loss(digits_loader, sampler: str) -> None:
    model = WidthCNN((1, 8, 8), 10, widths={"conv1": 16, "conv2": 32, "fc": 64})  # p_max 0.5
    before = evaluate(model, digits_loader)["loss"]
    metrics = train(model, digits_loader, Recipe(sampler=sampler, epochs=3, lr=0.05,
                                                 weight_decay=0.0, distill=False),
                    rng=np.random.default_rng(0))
    after = evaluate(model, digits_loader)["loss"]
    assert metrics["examples"] == 1437 and after < 0.5 * before, (before, after)
    assert metrics["macs"] <= 3 * 3 * 1437 * model.cost()  # sampled widths cost at most p_max


def test_train_with_weight_decay_leaves_the_untrained_corner_alone(digits_loader) -> None:
    model = WidthCNN((1, 8, 8), 10)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    train(model, digits_loader, Recipe(sampler="none", weight_decay=1e-2),
          max_ranks={"conv1": 16, "conv2": 32, "fc": 64})
    after = model.state_dict()
    assert torch.equal(after["conv2.weight"][32:], before["conv2.weight"][32:])
    assert torch.equal(after["fc.weight"][64:], before["fc.weight"][64:])
    assert not torch.equal(after["fc.weight"][:64], before["fc.weight"][:64])
