"""Ranked models: rank control for the whole net, hand-counted costs, the client-side meta build."""

from __future__ import annotations

import pytest
import torch

from conftest import randn

from fl_maestro.layers import LowRankConv2d, LowRankLinear
from fl_maestro.models import CNN, MLP, ResNet18, at_ranks, build_model


# CNN on 1 x 28 x 28 (fashion-mnist), counted by hand:
#   conv1  dense 1 -> 32, 3x3, pad 1, 28 x 28 outputs:  784 * 32 * 9              =   225_792 MACs
#   conv2  low-rank 32 -> 64, 3x3, pad 1, on 14 x 14:   fan_in 32*9 = 288, max rank 64
#          rank r:  196 * r * (288 + 64) = 68_992 r;    full (r = 64)              = 4_415_488 MACs
#   fc     low-rank 64*7*7 = 3136 -> 128:               max rank 128
#          rank r:  r * (3136 + 128) = 3_264 r;         full (r = 128)             =   417_792 MACs
#   classifier dense 128 -> 10:                         128 * 10                   =     1_280 MACs
CONV1_MACS, CONV2_PER_RANK, FC_PER_RANK, CLASSIFIER_MACS = 225_792, 68_992, 3_264, 1_280
CNN_FULL_MACS = CONV1_MACS + 64 * CONV2_PER_RANK + 128 * FC_PER_RANK + CLASSIFIER_MACS
# Params: conv1 32*9 + 32 = 320; conv2 r*352 + 64; fc r*3264 + 128; classifier 1280 + 10 = 1290.
CNN_FULL_PARAMS = 320 + (64 * 352 + 64) + (128 * 3264 + 128) + 1290


def test_cnn_hand_counts_are_what_the_test_claims() -> None:
    assert CONV2_PER_RANK == 196 * 352 and FC_PER_RANK == 3136 + 128
    assert CNN_FULL_MACS == 5_060_352
    assert CNN_FULL_PARAMS == 442_122


def test_cnn_full_rank_costs_by_hand() -> None:
    model = CNN()
    assert model.max_ranks() == {"conv2": 64, "fc": 128}
    assert model.cost() == CNN_FULL_MACS
    assert model.cost(kind="params") == CNN_FULL_PARAMS
    assert model.cost(kind="params") == sum(p.numel() for p in model.parameters())


def test_cnn_costs_at_given_ranks_by_hand() -> None:
    model = CNN()
    ranks = {"conv2": 16, "fc": 32}
    # 225_792 + 16 * 68_992 + 32 * 3_264 + 1_280 = 225_792 + 1_103_872 + 104_448 + 1_280
    assert model.cost(ranks) == 1_435_392
    assert model.cost(ranks, "params") == 320 + (16 * 352 + 64) + (32 * 3264 + 128) + 1290
    # a layer left out keeps its maximum rank
    assert model.cost({"conv2": 1}) == (CONV1_MACS + CONV2_PER_RANK + 128 * FC_PER_RANK
                                        + CLASSIFIER_MACS)
    # the active ranks do not change what cost() counts by default (maximum ranks)
    model.set_ranks(ranks)
    assert model.cost() == CNN_FULL_MACS


def test_cnn_dense_cost_by_hand() -> None:
    model = CNN()
    # conv2 dense 196 * 64 * 288, fc dense 3136 * 128
    assert model.dense_cost() == CONV1_MACS + 196 * 64 * 288 + 3136 * 128 + CLASSIFIER_MACS
    assert model.dense_cost() == 4_241_152
    assert model.dense_cost("params") == 320 + (64 * 288 + 64) + (3136 * 128 + 128) + 1290
    assert model.dense_cost("params") == 421_642
    # a full-rank factor pair costs more than the dense weight it replaces
    assert model.cost() > model.dense_cost()


def test_cost_rejects_unknown_kind() -> None:
    with pytest.raises(ValueError, match="'flops'"):
        CNN().cost(kind="flops")


def _resnet18() -> ResNet18:
    """ResNet-18 with cheap random values (the SVD init of 19 layers is slow and not under test)."""
    model = build_model("resnet18", (3, 32, 32), 10, device="meta")
    model.to_empty(device="cpu")
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=generator) * 0.05)
    return model


def test_resnet_params_cost_counts_norms() -> None:
    model = build_model("resnet18", (3, 32, 32), 10, device="meta")  # costs need no values
    assert model.cost(kind="params") == sum(p.numel() for p in model.parameters())


# --------------------------------------------------------------------------- rank control


def test_set_ranks_and_ranks() -> None:
    model = CNN()
    model.set_ranks({"fc": 5})
    assert model.ranks() == {"conv2": 64, "fc": 5}  # conv2 not named keeps its rank
    model.reset_ranks()
    assert model.ranks() == model.max_ranks()


@pytest.mark.parametrize("method", ["set_ranks", "truncate"])
def test_unknown_layer_name_raises(method: str) -> None:
    model = CNN()
    with pytest.raises(ValueError, match="'conv3'.*conv2"):
        getattr(model, method)({"conv3": 1})


def test_set_ranks_checks_the_range() -> None:
    with pytest.raises(ValueError, match=r"rank=65.*1\.\.64"):
        CNN().set_ranks({"conv2": 65})


def test_ranks_at_fraction() -> None:
    model = CNN()  # max ranks conv2 64, fc 128
    assert model.ranks_at_fraction(1.0) == {"conv2": 64, "fc": 128}
    assert model.ranks_at_fraction(0.5) == {"conv2": 32, "fc": 64}
    assert model.ranks_at_fraction(0.25) == {"conv2": 16, "fc": 32}
    assert model.ranks_at_fraction(0.1) == {"conv2": 7, "fc": 13}  # ceil(6.4), ceil(12.8)
    assert model.ranks_at_fraction(0.001) == {"conv2": 1, "fc": 1}  # never below 1
    for bad in (0, -0.5, 1.5):
        with pytest.raises(ValueError, match=f"{bad!r}"):
            model.ranks_at_fraction(bad)


def test_at_ranks_restores_previous_ranks() -> None:
    model = CNN()
    model.set_ranks({"conv2": 10})
    x = randn(2, 1, 28, 28)
    with at_ranks(model, {"conv2": 3, "fc": 4}) as m:
        assert m.ranks() == {"conv2": 3, "fc": 4}
        m(x)
    assert model.ranks() == {"conv2": 10, "fc": 128}
    with pytest.raises(RuntimeError), at_ranks(model, {"fc": 2}):
        raise RuntimeError("boom")
    assert model.ranks() == {"conv2": 10, "fc": 128}  # restored on the error path too


def test_rank_changes_output_but_not_shape() -> None:
    model = CNN()
    x = randn(3, 1, 28, 28)
    full = model(x)
    with at_ranks(model, model.ranks_at_fraction(0.25)):
        small = model(x)
    assert small.shape == full.shape == (3, 10)
    assert not torch.allclose(small, full)


# --------------------------------------------------------------------------- client-side build


def test_meta_build_truncate_load_round_trip() -> None:
    """A client builds the model at the received ranks without ever allocating the full model."""
    server = build_model("cnn", (1, 28, 28), 10)
    ranks = {"conv2": 12, "fc": 20}
    prefix = {}
    for name, array in server.state_dict().items():
        layer = name.rsplit(".", 1)[0]
        if name.endswith(".U"):
            array = array[:, : ranks[layer]]
        elif name.endswith(".V"):
            array = array[: ranks[layer]]
        prefix[name] = array.clone()

    client = build_model("cnn", (1, 28, 28), 10, device="meta")
    assert client.conv2.U.is_meta
    client.truncate(ranks)
    client.to_empty(device="cpu")
    client.load_state_dict(prefix)

    assert client.max_ranks() == client.ranks() == ranks
    assert client.conv2.U.t().is_contiguous() and client.fc.U.t().is_contiguous()
    x = randn(2, 1, 28, 28)
    with at_ranks(server, ranks):
        expected = server(x)
    torch.testing.assert_close(client(x), expected, atol=1e-5, rtol=0)
    # the client's cost at its own maximum equals the server's cost at those ranks
    assert client.cost() == server.cost(ranks)


# --------------------------------------------------------------------------- the zoo


def test_mlp_layers_and_forward() -> None:
    model = MLP(input_shape=(1, 8, 8), num_classes=10, hidden=(32, 16))
    assert model.max_ranks() == {"hidden.0": 32, "hidden.1": 16}
    assert all(isinstance(m, LowRankLinear) for m in model.low_rank_layers().values())
    assert model(randn(4, 1, 8, 8)).shape == (4, 10)
    # 64 -> 32 at rank 32: 32 * 96; 32 -> 16 at 16: 16 * 48; classifier 16 * 10
    assert model.cost() == 32 * 96 + 16 * 48 + 160


def test_resnet18_forward_shape_and_layers() -> None:
    model = _resnet18()
    assert isinstance(model, ResNet18)
    layers = model.low_rank_layers()
    # 8 blocks x 2 convs + 3 projection shortcuts; the stem and the classifier stay dense
    assert len(layers) == 19
    assert all(isinstance(m, LowRankConv2d) for m in layers.values())
    # ranks capped at the dense cost: 512 * 4608 // (512 + 4608) = 460; 1x1 shortcut 64 -> 128:
    # 128 * 64 // 192 = 42 (uncapped: min(out, fan_in) = 512 and 64)
    assert layers["layer4.1.conv2"].max_rank == 460
    assert layers["layer2.0.shortcut.0"].max_rank == 42
    assert model.cost() <= model.dense_cost()
    uncapped = build_model("resnet18", (3, 32, 32), 10, device="meta", rank_cap="none")
    assert uncapped.max_ranks()["layer4.1.conv2"] == 512
    assert uncapped.max_ranks()["layer2.0.shortcut.0"] == 64
    x = randn(2, 3, 32, 32)
    assert model(x).shape == (2, 10)
    with at_ranks(model, model.ranks_at_fraction(0.25)):
        assert model(x).shape == (2, 10)
    assert model.cost(model.ranks_at_fraction(0.25)) < 0.3 * model.cost()


def test_build_model_rejects_unknown_name() -> None:
    with pytest.raises(ValueError, match="'vgg'.*cnn"):
        build_model("vgg", (1, 28, 28), 10)
