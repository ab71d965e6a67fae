"""Each method is what its paper runs: FedAvg against Flower's own, defaults, refused keys."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp.strategy import FedAvg
from flwr.supercore.task_identity import TaskIdentity

from conftest import overrides

from fl_maestro.client_app import local_loaders, node_identity
from fl_maestro.config import KEYS, STRATEGY_KEYS, defaults, parse_run_config
from fl_maestro.data import DATASET_SHAPES, NUM_CLASSES
from fl_maestro.federation import initial_arrays, run_federation
from fl_maestro.budgets import ranks_for_budget
from fl_maestro.models import build_model, model_arrays, model_from_arrays
from fl_maestro.shrinking import hgl_penalty, tail_constants
from fl_maestro.training import Recipe, train
from fl_maestro.width import build_width_model, set_scaler
from fl_maestro.methods import METHODS
from fl_maestro.results import RunStore
from simulations.inprocess import InProcessGrid
from simulations.scenarios import SCENARIOS
from simulations.sweep import build_cells
from strategies.merge import merge_nested, prefix_arrays
from strategies.plan import ClientSpec, FixedPlan
from strategies.rankwise import WidthFedAvg
from strategies.records import to_numpy, to_record

plain_app = ClientApp()


class PlainCNN(torch.nn.Module):
    """The dense CNN in plain PyTorch modules (``models.CNN`` undecomposed): what FedAvg trains."""

    def __init__(self, input_shape: tuple[int, ...], num_classes: int) -> None:
        super().__init__()
        c, h, w = input_shape
        self.conv1 = torch.nn.Conv2d(c, 32, 3, padding=1)
        self.conv2 = torch.nn.Conv2d(32, 64, 3, padding=1)
        self.fc = torch.nn.Linear(64 * (h // 4) * (w // 4), 128)
        self.classifier = torch.nn.Linear(128, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(F.max_pool2d(self.conv1(x), 2))
        x = torch.relu(F.max_pool2d(self.conv2(x), 2))
        return self.classifier(torch.relu(self.fc(x.flatten(1))))


@plain_app.train()
def plain_train(msg: Message, context: Context) -> Message:
    """A plain PyTorch FedAvg client: torch.optim.SGD and cross-entropy on the dense CNN."""
    cfg = parse_run_config(context.run_config)
    partition_id, num_partitions = node_identity(context)
    server_round = int(msg.content["config"]["server-round"])
    model = PlainCNN(DATASET_SHAPES[cfg.dataset], NUM_CLASSES[cfg.dataset])
    model.load_state_dict({k: torch.as_tensor(v)
                           for k, v in to_numpy(msg.content["arrays"]).items()})
    loader, _ = local_loaders(cfg, partition_id, num_partitions, server_round)
    sgd = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum,
                          weight_decay=cfg.weight_decay)
    model.train()
    for _ in range(cfg.local_epochs):
        for x, y in loader:
            sgd.zero_grad()
            F.cross_entropy(model(x), y).backward()
            sgd.step()
    content = RecordDict({"arrays": ArrayRecord(model.state_dict()),
                          "metrics": MetricRecord({"num-examples": loader.num_examples})})
    return Message(content=content, reply_to=msg)


def _overrides(tmp_path, **extra) -> dict:
    return overrides(tmp_path, **{"eval-fractions": "1.0", **extra})


def test_fedavg_full_is_flowers_fedavg_with_a_plain_pytorch_client(tmp_path):
    """``fedavg-full`` is FedAvg as published: the dense, undecomposed CNN (a plain PyTorch
    client trains the same state dict), not the factorised model at its maximum ranks."""
    overrides = _overrides(tmp_path, strategy="fedavg-full")
    assert set(initial_arrays(parse_run_config(overrides))) == set(
        PlainCNN(DATASET_SHAPES["digits"], 10).state_dict())  # no factors: conv2.weight, ...
    cfg = parse_run_config(overrides)
    run_federation(InProcessGrid(4, overrides), cfg)
    _, ours, _ = RunStore(tmp_path / "run").load_checkpoint()

    flower = FedAvg(fraction_train=1.0, fraction_evaluate=0.0, min_train_nodes=4,
                    min_available_nodes=4)
    result = flower.start(grid=InProcessGrid(4, overrides, app=plain_app),
                          initial_arrays=to_record(initial_arrays(cfg)),
                          num_rounds=2, train_config=ConfigRecord())
    theirs = to_numpy(result.arrays)
    assert set(theirs) == set(ours)
    start = initial_arrays(cfg)
    for name in ours:
        assert not np.allclose(ours[name], start[name])  # both trained
        np.testing.assert_allclose(ours[name], theirs[name], rtol=0, atol=1e-6, err_msg=name)


def test_maestro_loss_is_the_default():
    cfg = parse_run_config({})
    assert cfg.strategy == "rankwise" and cfg.distill and cfg.sampler == "single-layer"


STRATEGY_KEY_CASES = [(key, value) for key, value in [
    ("sampler", "uniform"), ("distill", False), ("hgl-lambda", 1e-4), ("shrink-every", 2),
    ("shrink-threshold", 1e-3), ("rank-allocation", "importance"), ("init", "svd:x"),
    ("cost", "params"), ("fjord-kd", True)]]


@pytest.mark.parametrize(("key", "value"), STRATEGY_KEY_CASES)
def test_keys_a_strategy_ignores_are_refused(key, value):
    assert KEYS[key].default != value
    for strategy in METHODS:
        config = {"strategy": strategy, key: value}
        if strategy in STRATEGY_KEYS[key]:
            assert parse_run_config(config).strategy == strategy
        else:
            with pytest.raises(ValueError) as info:
                parse_run_config(config)
            message = str(info.value)
            assert repr(key) in message and repr(value) in message and repr(strategy) in message
            assert str(list(STRATEGY_KEYS[key])) in message


def test_every_strategy_accepts_the_defaults():
    for strategy in METHODS:
        assert parse_run_config({**defaults(), "strategy": strategy}).strategy == strategy


def test_every_committed_scenario_validates(tmp_path):
    for scenario in SCENARIOS.values():
        assert build_cells(scenario, [0], tmp_path)


# --------------------------------------------------------------------------- HGL on a client


@pytest.mark.parametrize("ranks", [{"conv2": 1, "fc": 1}, {"conv2": 13, "fc": 26},
                                   {"conv2": 40, "fc": 7}, {"conv2": 52, "fc": 122}])
def test_client_hgl_gradient_is_the_global_gradient_restricted_to_its_components(ranks):
    torch.manual_seed(3)
    model = build_model("cnn", (1, 28, 28), 10)
    with torch.no_grad():  # components of very different sizes, as after training
        for layer in model.low_rank_layers().values():
            layer.V.mul_(torch.rand(layer.max_rank, *[1] * (layer.V.dim() - 1)) * 3)
    hgl_penalty(model.low_rank_layers()).backward()
    arrays = model_arrays(model)
    client = model_from_arrays("cnn", (1, 28, 28), 10, prefix_arrays(arrays, ranks))
    hgl_penalty(client.low_rank_layers(), None, tail_constants(arrays, ranks)).backward()
    alone = model_from_arrays("cnn", (1, 28, 28), 10, prefix_arrays(arrays, ranks))
    hgl_penalty(alone.low_rank_layers()).backward()  # today's penalty: the prefix on its own
    full_rank = all(r == model.max_ranks()[n] for n, r in ranks.items())
    for name, layer in client.low_rank_layers().items():
        whole, r = model.low_rank_layers()[name], ranks[name]
        torch.testing.assert_close(layer.V.grad, whole.V.grad[:r], rtol=0, atol=1e-6)
        torch.testing.assert_close(layer.U.grad, whole.U.grad[:, :r], rtol=0, atol=1e-6)
        if not full_rank:
            assert not torch.allclose(alone.low_rank_layers()[name].V.grad, whole.V.grad[:r],
                                      rtol=0, atol=1e-6)


# --------------------------------------------------------------------------- budgets vs dense


def test_budget_one_is_the_dense_model_and_no_layer_costs_more_than_dense():
    """The CNN's conv2 (64 x 288) caps at rank 64 * 288 // 352 = 52, fc (128 x 3136) at
    128 * 3136 // 3264 = 122; with the cap the full model costs no more than the dense CNN."""
    capped = build_model("cnn", (1, 28, 28), 10, device="meta")
    assert capped.max_ranks() == {"conv2": 52, "fc": 122}
    assert capped.cost() <= capped.dense_cost() == 4_241_152
    for name, layer in capped.low_rank_layers().items():
        assert layer.macs(layer.max_rank) <= layer.dense_macs()
        assert (layer.max_rank + 1) * (layer.fan_in + layer.out_features) > layer.dense_macs()
    assert ranks_for_budget(capped, 1.0) == capped.max_ranks()
    uncapped = build_model("cnn", (1, 28, 28), 10, device="meta", rank_cap="none")
    assert uncapped.max_ranks() == {"conv2": 64, "fc": 128}
    at_one = ranks_for_budget(uncapped, 1.0)  # budget 1.0 = the dense cost, uncapped or not
    assert at_one != uncapped.max_ranks() and uncapped.cost(at_one) <= uncapped.dense_cost()
    cfg = parse_run_config({"rank-cap": "none"})
    assert cfg.rank_cap == "none"
    with pytest.raises(ValueError, match="'rank-cap'.*'fjord'"):
        parse_run_config({"rank-cap": "none", "strategy": "fjord"})


def test_default_run_reports_costs_against_the_dense_model(tmp_path):
    overrides = _overrides(tmp_path, **{"num-rounds": 1, "clients-per-round": 2})
    table = run_federation(InProcessGrid(2, overrides), parse_run_config(overrides))
    assert "relative-macs" not in table and table.loc[0.25, "dense-relative-macs"] <= 0.25
    dense = build_model("cnn", (1, 8, 8), 10, device="meta")
    assert table.loc[1.0, "dense-relative-macs"] == dense.cost() / dense.dense_cost() <= 1.0


# --------------------------------------------------------------------------- LeNet


def test_lenet_macs_by_hand():
    """28 -> 24 -> 12 -> 8 -> 4: conv1 6*1*25 per pixel * 576, conv2 16*6*25 * 64, fc1 256 x 120,
    fc2 120 x 84, classifier 84 x 10. Factorised: conv2 (16 x 150) capped at 16*150//166 = 14,
    fc1 (120 x 256) at 30720//376 = 81, fc2 (84 x 120) at 10080//204 = 49."""
    conv1, conv2, fc1, fc2, head = 6 * 25 * 576, 16 * 150 * 64, 256 * 120, 120 * 84, 84 * 10
    model = build_model("lenet", (1, 28, 28), 10)
    assert model(torch.zeros(2, 1, 28, 28)).shape == (2, 10)
    assert model.dense_cost() == conv1 + conv2 + fc1 + fc2 + head == 281_640
    assert model.max_ranks() == {"conv2": 14, "fc1": 81, "fc2": 49}
    assert model.cost() == conv1 + 14 * 166 * 64 + 81 * 376 + 49 * 204 + head == 276_428
    assert model.cost({"conv2": 1, "fc1": 1, "fc2": 1}) == conv1 + 166 * 64 + 376 + 204 + head
    uncapped = build_model("lenet", (1, 28, 28), 10, rank_cap="none")
    assert uncapped.max_ranks() == {"conv2": 16, "fc1": 120, "fc2": 84}
    width = build_width_model("lenet", (1, 28, 28), 10)
    assert width.cost() == 281_640 and width(torch.zeros(2, 1, 28, 28)).shape == (2, 10)
    with pytest.raises(ValueError, match="16x16"):
        build_model("lenet", (1, 8, 8), 10)


@pytest.mark.parametrize("strategy", ["rankwise", "heterofl"])
def test_lenet_trains_in_federation(tmp_path, strategy):
    overrides = _overrides(tmp_path, **{"model": "lenet", "dataset": "fashion-mnist",
                                        "device-mix": "0.5:0.5,1.0:0.5",
                                        "num-rounds": 1, "clients-per-round": 2, "strategy": strategy,
                                        "eval-samples": 50})
    table = run_federation(InProcessGrid(50, overrides), parse_run_config(overrides))
    assert table.loc[0.5, "dense-relative-macs"] <= 0.5


# --------------------------------------------------------------------------- HeteroFL pieces


def test_masked_loss_gives_absent_classes_no_gradient():
    torch.manual_seed(0)
    model = build_model("mlp", (1, 8, 8), 10)
    x, y = torch.randn(16, 1, 8, 8), torch.tensor([2, 5] * 8)
    before = model.classifier.weight.detach().clone()
    train(model, [(x, y)], Recipe(sampler="none", lr=0.5, momentum=0.0, weight_decay=0.0,
                                  distill=False, classes=(2, 5)))
    changed = (model.classifier.weight != before).any(1)
    assert changed.tolist() == [i in (2, 5) for i in range(10)]


def test_scaler_divides_outputs_before_a_norm_by_the_rate_in_training_only():
    """HeteroFL's conv -> scaler -> norm: ResNet-18's convs (each before a GroupNorm) divide by
    their rate in training; models without norm layers (MLP, CNN) get no scaler, since nothing
    would undo it and the per-layer factors would compound."""
    full = build_width_model("resnet18", (3, 8, 8), 10, device="meta")
    widths = {n: w // 4 if n.startswith("layer4") else w // 2 for n, w in full.max_ranks().items()}
    half = build_width_model("resnet18", (3, 8, 8), 10, widths=widths)
    scaled = set_scaler(half, full.max_ranks())
    assert set(scaled) == set(full.max_ranks())
    layer = half.layer4[0].conv1
    assert layer.train_scale == 0.25 and half.conv1.train_scale == 0.5
    x = torch.randn(2, 64, 4, 4)
    half.eval()
    plain = layer(x)
    half.train()
    torch.testing.assert_close(layer(x), plain / 0.25)
    assert half.classifier.train_scale == 1.0  # the classifier's output is not sliced
    mlp_full = build_width_model("mlp", (1, 8, 8), 10)
    mlp = build_width_model("mlp", (1, 8, 8), 10, widths={"hidden.0": 128, "hidden.1": 32})
    assert set_scaler(mlp, mlp_full.max_ranks()) == []
    assert mlp.hidden[0].train_scale == mlp.hidden[1].train_scale == 1.0


def _two_clients() -> FixedPlan:
    """A planner of two clients, nodes 7 and 8, at full budget."""
    return FixedPlan({7: ClientSpec(0, 1.0), 8: ClientSpec(1, 1.0)})


def _merge_two(monkeypatch, strategy, arrays, replies) -> dict:
    """Send ``arrays`` to the two clients of ``_two_clients`` and merge their ``(arrays,
    metrics)`` replies."""
    for name in ("_run_id", "_task_id", "_node_id"):
        monkeypatch.setattr(TaskIdentity, name, 1)
    grid = type("Grid", (), {"get_node_ids": lambda self: [7, 8]})()
    sent = list(strategy.configure_train(1, to_record(arrays), ConfigRecord(), grid))
    messages = [Message(content=RecordDict({"arrays": to_record(a), "metrics": MetricRecord(m)}),
                        reply_to=message) for message, (a, m) in zip(sent, replies)]
    merged, _ = strategy.aggregate_train(1, messages)
    return to_numpy(merged) if merged is not None else {}


@pytest.mark.parametrize(("weight", "expected"), [("clients", 2.0), ("examples", 2.5)])
def test_heterofl_merges_by_client_count(monkeypatch, weight, expected):
    """HeteroFL: each element is the plain mean over the clients holding it, whatever their
    example counts (10 and 30 here); ``heterofl-merge-weight=examples`` weighs as FedAvg does."""
    replies = [({"w": np.full((2, 3), v, np.float32)}, {"num-examples": n})
               for v, n in [(1.0, 10), (3.0, 30)]]
    merged = _merge_two(monkeypatch, WidthFedAvg(2, merge_weight=weight, planner=_two_clients()),
                        {"w": np.zeros((2, 3), np.float32)}, replies)
    np.testing.assert_allclose(merged["w"], expected)
    with pytest.raises(ValueError, match="merge_weight"):
        WidthFedAvg(2, merge_weight="bytes")


def test_merge_can_narrow_a_reply_to_rows():
    zeros = {"w": np.zeros((4, 2), np.float32), "b": np.zeros(4, np.float32)}
    one = {k: np.ones_like(v) for k, v in zeros.items()}
    three = {k: np.full_like(v, 3.0) for k, v in zeros.items()}
    merged = merge_nested(zeros, [(one, 1.0), (three, 1.0)],
                          [{"w": np.array([0, 1]), "b": np.array([0, 1])}, {"w": np.array([1, 2])}])
    np.testing.assert_allclose(merged["w"][:, 0], [1, 2, 3, 0])  # row 3: nobody's, kept
    np.testing.assert_allclose(merged["b"], [2, 2, 3, 3])
    with pytest.raises(ValueError, match="rows has 1 entries for 2 replies"):
        merge_nested(zeros, [(one, 1.0), (three, 1.0)], [None])


def test_heterofl_merges_output_rows_of_each_clients_classes_only(monkeypatch):
    """Client 0 holds classes 0 and 1, client 1 classes 1 and 2: row 1 is their mean, rows 0 and
    2 each one client's, row 3 keeps its value; other arrays merge whole. A reply whose classes
    metric is missing or out of range is dropped."""
    arrays = {"classifier.weight": np.full((4, 2), 9, np.float32),
              "classifier.bias": np.full(4, 9, np.float32), "fc.weight": np.zeros((2, 2), np.float32)}
    strategy = WidthFedAvg(2, merge_weight="clients", planner=_two_clients(),
                           label_rows=("classifier.weight", "classifier.bias"))
    replies = [({k: np.full_like(v, value) for k, v in arrays.items()},
                {"num-examples": 5, "classes": classes})
               for value, classes in [(1.0, [0, 1]), (3.0, [2, 1])]]
    merged = _merge_two(monkeypatch, strategy, arrays, replies)
    np.testing.assert_allclose(merged["classifier.weight"][:, 1], [1, 2, 3, 9])
    np.testing.assert_allclose(merged["classifier.bias"], [1, 2, 3, 9])
    np.testing.assert_allclose(merged["fc.weight"], 2.0)
    replies[1][1]["classes"] = [1, 4]
    merged = _merge_two(monkeypatch, strategy, arrays, replies)
    np.testing.assert_allclose(merged["classifier.bias"], [1, 1, 9, 9])  # the bad reply dropped
