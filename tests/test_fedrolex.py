"""FedRolex: the rolling window of channels, the offset-aware merge, and the method in a run."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import ConfigRecord, Message, MetricRecord, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from fl_maestro.config import parse_run_config
from fl_maestro.federation import initial_arrays, run_federation
from fl_maestro.results import RunStore
from fl_maestro.rolling import rolling_window, window_indices
from fl_maestro.width import build_width_model
from simulations.inprocess import InProcessGrid
from strategies.merge import merge_nested, window_arrays
from strategies.plan import ClientSpec, FixedPlan
from strategies.rankwise import WidthFedAvg
from strategies.records import to_numpy, to_record

F32 = np.float32


def test_a_rate_half_client_trains_these_channels_in_rounds_1_2_3() -> None:
    """K = 4 channels, rate 0.5 (2 channels): arange(4) rolled by t - 1, first two entries."""
    assert rolling_window(4, 2, 1).tolist() == [0, 1]
    assert rolling_window(4, 2, 2).tolist() == [3, 0]  # roll by 1: [3, 0, 1, 2]; it wraps
    assert rolling_window(4, 2, 3).tolist() == [2, 3]
    assert rolling_window(4, 2, 5).tolist() == [0, 1]  # period K
    assert rolling_window(4, 4, 2).tolist() == [3, 0, 1, 2]  # the full model, reordered
    seen = set()
    for t in range(1, 5):  # within K rounds every channel is trained at rate 0.5
        seen |= set(rolling_window(4, 2, t).tolist())
    assert seen == {0, 1, 2, 3}
    with pytest.raises(ValueError, match="width=5"):
        rolling_window(4, 5, 1)


def test_merge_of_a_rolled_window_by_hand() -> None:
    """Round 2, a layer of 4 output channels and 2 inputs, whose input layer has 2 channels held
    whole. Client A (rate 0.5) holds rows [3, 0]; client B (rate 1.0) rows [3, 0, 1, 2]. With
    count weights, rows 3 and 0 are the mean of A and B, rows 1 and 2 B's alone; a row nobody
    holds keeps its value. A's reply row 0 lands on global row 3 (the window is no corner)."""
    glob = {"w": np.arange(8, dtype=F32).reshape(4, 2), "b": np.zeros(4, F32)}
    cols = np.arange(2)
    win_a = {"w": (rolling_window(4, 2, 2), cols), "b": (rolling_window(4, 2, 2),)}
    win_b = {"w": (rolling_window(4, 4, 2), cols), "b": (rolling_window(4, 4, 2),)}
    sent_a = window_arrays(glob, win_a)
    np.testing.assert_array_equal(sent_a["w"], [[6, 7], [0, 1]])  # global rows 3 and 0
    reply_a = {"w": np.array([[10, 11], [12, 13]], F32), "b": np.array([1, 2], F32)}
    reply_b = {"w": np.array([[20, 21], [22, 23], [24, 25], [26, 27]], F32),
               "b": np.array([3, 4, 5, 6], F32)}
    merged = merge_nested(glob, [(reply_a, 1.0), (reply_b, 1.0)], windows=[win_a, win_b])
    np.testing.assert_array_equal(merged["w"], [[17, 18], [24, 25], [26, 27], [15, 16]])
    np.testing.assert_array_equal(merged["b"], [3, 5, 6, 2])
    alone = merge_nested(glob, [(reply_a, 1.0)], windows=[win_a])
    np.testing.assert_array_equal(alone["w"], [[12, 13], [2, 3], [4, 5], [10, 11]])
    # windows and label rows together: rows narrow the reply's own positions
    rows = merge_nested(glob, [(reply_a, 1.0)], rows=[{"b": np.array([1])}], windows=[win_a])
    np.testing.assert_array_equal(rows["b"], [2, 0, 0, 0])


def test_merge_refuses_windows_that_do_not_fit() -> None:
    glob = {"w": np.zeros((4, 2), F32)}
    reply = {"w": np.ones((2, 2), F32)}
    with pytest.raises(ValueError, match="distinct indices"):
        merge_nested(glob, [(reply, 1.0)], windows=[{"w": (np.array([1, 1]), np.arange(2))}])
    with pytest.raises(ValueError, match="does not match its window"):
        merge_nested(glob, [(reply, 1.0)], windows=[{"w": (np.arange(3), np.arange(2))}])
    with pytest.raises(ValueError, match="windows has 0 entries for 1 replies"):
        merge_nested(glob, [(reply, 1.0)], windows=[])
    # without windows a reply is still the leading corner it always was
    np.testing.assert_array_equal(merge_nested(glob, [(reply, 1.0)])["w"], [[1, 1], [1, 1],
                                                                            [0, 0], [0, 0]])


def test_window_indices_follow_the_chain_of_layers() -> None:
    """Each layer's input indices are the previous layer's window; the CNN's flatten expands a
    conv channel c to its 49 features c*49 .. c*49+48; the classifier keeps every output."""
    cnn = build_width_model("cnn", (1, 28, 28), 10, device="meta")
    widths = {"conv1": 16, "conv2": 32, "fc": 64}
    windows = window_indices(cnn, widths, 3)
    conv1, conv2 = windows["conv1.weight"], windows["conv2.weight"]
    assert conv1[0].tolist() == [30, 31, *range(14)] and conv1[1].tolist() == [0]
    assert conv2[1].tolist() == conv1[0].tolist()  # conv2's inputs: conv1's window
    assert conv2[0][:3].tolist() == [62, 63, 0]
    fc_in = windows["fc.weight"][1]
    assert fc_in[:2].tolist() == [62 * 49, 62 * 49 + 1] and len(fc_in) == 32 * 49
    assert windows["classifier.weight"][0].tolist() == list(range(10))
    assert windows["classifier.weight"][1].tolist() == windows["fc.weight"][0].tolist()
    assert {k: tuple(len(i) for i in v) for k, v in windows.items()} == cnn.slice_shapes(widths)
    resnet = build_width_model("resnet18", (3, 8, 8), 10, device="meta")
    with pytest.raises(ValueError, match="chain models only"):
        window_indices(resnet, resnet.max_ranks(), 1)


@pytest.fixture
def task_identity(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("_run_id", "_task_id", "_node_id"):
        monkeypatch.setattr(TaskIdentity, name, 1)


def test_strategy_sends_each_client_its_window_and_merges_it_back(task_identity) -> None:
    glob = {"w": np.arange(8, dtype=F32).reshape(4, 2)}
    window = {"w": (np.array([3, 0]), np.arange(2))}
    spec = ClientSpec(0, 0.5, {"w": 2}, {"w": (2, 2)}, windows=window)
    strategy = WidthFedAvg(1, merge_weight="clients", planner=FixedPlan({7: spec}))
    grid = type("Grid", (), {"get_node_ids": lambda self: [7]})()
    sent = list(strategy.configure_train(2, to_record(glob), ConfigRecord(), grid))
    np.testing.assert_array_equal(to_numpy(sent[0].content["arrays"])["w"], [[6, 7], [0, 1]])
    reply = Message(content=RecordDict({"arrays": to_record({"w": np.full((2, 2), -1, F32)}),
                                        "metrics": MetricRecord({"num-examples": 3})}),
                    reply_to=sent[0])
    merged, _ = strategy.aggregate_train(2, [reply])
    np.testing.assert_array_equal(to_numpy(merged)["w"], [[-1, -1], [2, 3], [4, 5], [-1, -1]])


def test_fedrolex_trains_every_channel_where_heterofl_trains_the_leading_ones(tmp_path) -> None:
    """Every client at budget 0.25: HeteroFL never touches conv1's last channel; FedRolex's
    window of round 2 starts there, so after two rounds it has moved."""
    moved = {}
    for strategy in ("heterofl", "fedrolex"):
        overrides = {"dataset": "digits", "num-rounds": 2, "clients-per-round": 3,
                     "device-mix": "0.25:1.0", "partitioner": "iid", "strategy": strategy,
                     "results-dir": str(tmp_path), "run-name": strategy, "eval-samples": 60,
                     "eval-fractions": "1.0"}
        cfg = parse_run_config(overrides)
        run_federation(InProcessGrid(3, overrides), cfg)
        _, arrays, _ = RunStore(tmp_path / strategy).load_checkpoint()
        start = initial_arrays(cfg)["conv1.weight"]
        moved[strategy] = ~np.isclose(arrays["conv1.weight"], start).all(axis=(1, 2, 3))
        evaluation = RunStore(tmp_path / strategy).read("evaluation")
        assert (evaluation["round"] == 2).any()
    assert not moved["heterofl"][-1] and moved["fedrolex"][-1]
    assert moved["heterofl"][0] and moved["fedrolex"][0]


def test_fedrolex_refuses_a_model_its_window_cannot_roll_before_anything_runs() -> None:
    """ResNet-18 has norm and residual arrays the window cannot follow: refused by the config,
    naming the key, the value and the models allowed."""
    from fl_maestro.config import parse_run_config
    with pytest.raises(ValueError, match=r"'model' = 'resnet18'.*'fedrolex'.*\['mlp', 'cnn', 'lenet'\]"):
        parse_run_config({"strategy": "fedrolex", "model": "resnet18"})
    assert parse_run_config({"strategy": "fedrolex", "model": "lenet"}).model == "lenet"
