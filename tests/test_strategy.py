"""RankWiseFedAvg without a SuperLink: a fake Grid, real Flower Messages and hand-built replies."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
from flwr.app import ArrayRecord, ConfigRecord, Error, Message, MetricRecord, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from fl_maestro.rounds import round_totals
from strategies import merge_nested
from strategies.plan import ClientSpec, FixedPlan
from strategies.rankwise import RankWiseFedAvg, WidthFedAvg, sample_nodes
from strategies.records import to_numpy, to_record

F32 = np.float32
RANKS = {0: 1, 1: 2, 2: 3, 3: 2, 4: 1}  # partition id -> rank of layer "fc" (max rank 3)


class FakeGrid:
    """The part of ``flwr.serverapp.Grid`` the strategy uses: the connected node ids."""

    def __init__(self, node_ids: list[int]) -> None:
        self.node_ids = list(node_ids)

    def get_node_ids(self) -> list[int]:
        return list(self.node_ids)


@pytest.fixture(autouse=True)
def task_identity(monkeypatch: pytest.MonkeyPatch) -> None:
    """Instruction messages read the run, task and node ids the SuperLink would have set."""
    monkeypatch.setattr(TaskIdentity, "_run_id", 1)
    monkeypatch.setattr(TaskIdentity, "_task_id", 1)
    monkeypatch.setattr(TaskIdentity, "_node_id", 0)


@pytest.fixture
def caplog_strategies(caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch):
    """caplog that also sees the 'strategies' loggers when the ServerApp turned propagation off."""
    monkeypatch.setattr(logging.getLogger("strategies"), "propagate", True)
    caplog.set_level(logging.WARNING, logger="strategies")
    return caplog


def global_arrays() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(123)
    return {
        "fc.U": rng.normal(size=(4, 3)).astype(F32),
        "fc.V": rng.normal(size=(3, 5)).astype(F32),
        "fc.bias": rng.normal(size=4).astype(F32),
        "out.weight": rng.normal(size=(2, 4)).astype(F32),
    }


def node_id(partition: int) -> int:
    """Node ids unrelated to partition order, as a SuperLink hands them out."""
    return 9000 - 37 * partition


def make_strategy(clients_per_round: int = 5, seed: int = 0,
                  partitions: tuple[int, ...] = tuple(RANKS)) -> RankWiseFedAvg:
    return RankWiseFedAvg(clients_per_round, seed=seed, planner=FixedPlan(
        {node_id(p): ClientSpec(p, round(0.2 * (p + 1), 2), {"fc": RANKS[p]})
         for p in partitions}))


def sent_rows(strategy: RankWiseFedAvg) -> list[dict]:
    """Every sent client's row of the last round, as the strategy handed them to its planner."""
    return strategy.planner.rows


def totals(strategy: RankWiseFedAvg) -> dict:
    """The round's totals of those rows (counted in one place, fl_maestro.rounds)."""
    return round_totals(sent_rows(strategy))


def send(strategy: RankWiseFedAvg, server_round: int = 1, grid: FakeGrid | None = None,
         arrays: dict | None = None) -> list[Message]:
    grid = grid or FakeGrid([node_id(p) for p in RANKS])
    arrays = global_arrays() if arrays is None else arrays
    return list(strategy.configure_train(server_round, to_record(arrays),
                                         ConfigRecord({"lr": 0.1}), grid))


def partition_of(strategy: RankWiseFedAvg, message: Message) -> int:
    """Partition of the client a message goes to (instruction) or comes from (reply)."""
    meta = message.metadata
    specs = strategy.planner.specs
    node = meta.src_node_id if meta.src_node_id in specs else meta.dst_node_id
    return specs[node].partition_id


def trained(message: Message, partition: int) -> dict[str, np.ndarray]:
    """What a client would send back: its received prefix, moved by a partition-specific amount."""
    arrays = to_numpy(message.content["arrays"])
    rng = np.random.default_rng(partition)
    return {k: (v + rng.normal(size=v.shape)).astype(v.dtype) for k, v in arrays.items()}


def reply(message: Message, arrays: dict[str, np.ndarray] | None, examples: object = 10,
          with_metrics: bool = True, **metrics: float) -> Message:
    """A reply Message as the ClientApp builds it: arrays plus a metrics record."""
    content = RecordDict()
    if arrays is not None:
        content["arrays"] = to_record(arrays)
    if with_metrics:
        content["metrics"] = MetricRecord({"num-examples": examples, "train-loss": 1.0, **metrics})
    return Message(content=content, reply_to=message)


def good_replies(strategy: RankWiseFedAvg, messages: list[Message]) -> list[Message]:
    out = []
    for m in messages:
        p = partition_of(strategy, m)
        out.append(reply(m, trained(m, p), examples=10 * (p + 1), **{"train-accuracy": 0.1 * p}))
    return out


def hand_merge(strategy: RankWiseFedAvg, replies: list[Message]) -> dict[str, np.ndarray]:
    """The expected merge: merge_nested over (arrays, num-examples) of the given replies."""
    pairs = [(to_numpy(r.content["arrays"]), float(r.content["metrics"]["num-examples"]))
             for r in replies]
    return merge_nested(global_arrays(), pairs)


def assert_arrays_equal(got: dict, expected: dict) -> None:
    assert list(got) == list(expected)
    for name in expected:
        assert got[name].dtype == expected[name].dtype, name
        assert got[name].shape == expected[name].shape, name
        assert got[name].tobytes() == expected[name].tobytes(), name


# --------------------------------------------------------------------------- configure_train


def test_each_node_gets_its_rank_prefix() -> None:
    strategy = make_strategy()
    g = global_arrays()
    messages = send(strategy, arrays=g)
    assert len(messages) == len(RANKS)
    for m in messages:
        p = partition_of(strategy, m)
        r = RANKS[p]
        sent = to_numpy(m.content["arrays"])
        assert {k: v.shape for k, v in sent.items()} == {
            "fc.U": (4, r), "fc.V": (r, 5), "fc.bias": (4,), "out.weight": (2, 4)}
        np.testing.assert_array_equal(sent["fc.U"], g["fc.U"][:, :r])
        np.testing.assert_array_equal(sent["fc.V"], g["fc.V"][:r])
        np.testing.assert_array_equal(sent["fc.bias"], g["fc.bias"])
        assert all(v.dtype == F32 for v in sent.values())
        config = m.content["config"]
        assert config["lr"] == pytest.approx(0.1)
        assert config["server-round"] == 1
        assert "budget" not in config  # the ClientApp never reads it
        assert m.metadata.message_type == "train"
        expected_bytes = 4 * (4 * r + r * 5 + 4 + 2 * 4)
        assert strategy._bytes_down[m.metadata.dst_node_id] == expected_bytes


def test_bytes_down_reach_client_rows() -> None:
    strategy = make_strategy()
    messages = send(strategy)
    strategy.aggregate_train(1, good_replies(strategy, messages))
    for row in sent_rows(strategy):
        r = RANKS[row["partition-id"]]
        assert row["bytes-down"] == 4 * (4 * r + r * 5 + 4 + 2 * 4)


def test_sampling_is_seeded_distinct_and_known_only() -> None:
    connected = [node_id(p) for p in RANKS] + [12345]  # 12345: connected but unknown
    grid = FakeGrid(connected)
    known = set(make_strategy().planner.specs)

    def rounds(seed: int) -> list[list[int]]:
        strategy = make_strategy(clients_per_round=3, seed=seed)
        return [[m.metadata.dst_node_id for m in send(strategy, rnd, grid)] for rnd in range(1, 6)]

    first = rounds(0)
    assert first == rounds(0)
    for picked in first:
        assert len(picked) == 3 and len(set(picked)) == 3
        assert set(picked) <= known
    assert rounds(1) != first or rounds(2) != first
    assert len({tuple(p) for p in first}) > 1, "a seeded sampler still varies across rounds"


def test_sampling_skips_disconnected_nodes_and_caps_at_known() -> None:
    strategy = make_strategy(clients_per_round=10)
    grid = FakeGrid([node_id(0), node_id(2), node_id(4), 777])
    picked = [m.metadata.dst_node_id for m in send(strategy, grid=grid)]
    assert picked == [node_id(0), node_id(2), node_id(4)]  # all known connected, partition order
    with pytest.raises(RuntimeError):
        send(strategy, grid=FakeGrid([777]))


def test_state_dict_reproduces_next_sample() -> None:
    grid = FakeGrid([node_id(p) for p in RANKS])
    a = make_strategy(clients_per_round=2, seed=4)
    send(a, 1, grid)
    state = json.loads(json.dumps(a.state_dict()))  # as the checkpoint stores it
    expected = [[m.metadata.dst_node_id for m in send(a, rnd, grid)] for rnd in (2, 3, 4)]

    b = make_strategy(clients_per_round=2, seed=99)
    b.load_state_dict(state)
    assert set(state) == {"rng"}  # the generator is all the strategy keeps
    assert [[m.metadata.dst_node_id for m in send(b, rnd, grid)] for rnd in (2, 3, 4)] == expected


# --------------------------------------------------------------------------- aggregate_train


def test_merge_equals_merge_nested() -> None:
    strategy = make_strategy()
    messages = send(strategy)
    replies = good_replies(strategy, messages)
    merged, metrics = strategy.aggregate_train(1, replies)
    assert isinstance(merged, ArrayRecord)
    got = to_numpy(merged)
    assert_arrays_equal(got, hand_merge(strategy, replies))
    # Column 2 of fc.U is covered only by partition 2 (rank 3): it is exactly that client's value.
    only = next(r for r in replies if partition_of(strategy, r) == 2)
    np.testing.assert_array_equal(got["fc.U"][:, 2], to_numpy(only.content["arrays"])["fc.U"][:, 2])
    assert totals(strategy)["dropped"] == 0 and totals(strategy)["clients"] == len(RANKS)
    weights = np.array([10.0 * (p + 1) for p in RANKS])
    assert metrics["examples"] == pytest.approx(weights.sum())
    assert metrics["train-accuracy"] == pytest.approx(
        np.average([0.1 * p for p in RANKS], weights=weights))


def test_client_rows() -> None:
    strategy = make_strategy()
    messages = send(strategy)
    replies = good_replies(strategy, messages)
    _, metrics = strategy.aggregate_train(4, replies)
    rows = sent_rows(strategy)
    assert [r["partition-id"] for r in rows] == sorted(RANKS)
    for row in rows:
        p, r = row["partition-id"], RANKS[row["partition-id"]]
        assert row["round"] == 4
        assert row["outcome"] == "ok" and row["reason"] == ""
        assert row["budget"] == pytest.approx(round(0.2 * (p + 1), 2))
        assert row["num-examples"] == 10 * (p + 1)
        assert row["bytes-up"] == row["bytes-down"] == 4 * (4 * r + r * 5 + 4 + 2 * 4)
    assert totals(strategy)["bytes-up"] == sum(r["bytes-up"] for r in rows)
    assert totals(strategy)["bytes-down"] == sum(r["bytes-down"] for r in rows)


def test_shuffled_replies_merge_bit_identically() -> None:
    strategy = make_strategy()
    messages = send(strategy)
    replies = good_replies(strategy, messages)
    reference = to_numpy(strategy.aggregate_train(1, replies)[0])
    reference_rows = sent_rows(strategy)
    rng = np.random.default_rng(7)
    for _ in range(4):
        shuffled = [replies[i] for i in rng.permutation(len(replies))]
        assert_arrays_equal(to_numpy(strategy.aggregate_train(1, shuffled)[0]), reference)
        assert sent_rows(strategy) == reference_rows  # rows in partition-id order


def _bad_variants(strategy: RankWiseFedAvg, message: Message) -> dict[str, Message]:
    """One bad reply of each kind, all for the same sent message."""
    p = partition_of(strategy, message)
    good = trained(message, p)
    nan = {**good, "fc.V": good["fc.V"].copy()}
    nan["fc.V"][0, 0] = np.nan
    g = global_arrays()
    larger = {**good, "out.weight": np.ones((3, 4), F32)}
    missing = {k: v for k, v in good.items() if k != "fc.bias"}
    wrong_dtype = {**good, "fc.bias": good["fc.bias"].astype(np.float64)}
    cut_shared = {**good, "out.weight": g["out.weight"][:, :2].copy()}
    return {
        "nan": reply(message, nan),
        "larger": reply(message, larger),
        "missing": reply(message, missing),
        "zero-examples": reply(message, good, examples=0),
        "wrong-dtype": reply(message, wrong_dtype),
        "no-metrics": reply(message, good, with_metrics=False),
        "no-arrays": reply(message, None),
        "cut-shared": reply(message, cut_shared),
    }


BAD_KINDS = ["nan", "larger", "missing", "zero-examples", "wrong-dtype", "no-metrics",
             "no-arrays", "cut-shared"]


@pytest.mark.parametrize("kind", BAD_KINDS)
def test_bad_reply_dropped_counted_and_logged(kind: str, caplog_strategies) -> None:
    strategy = make_strategy()
    messages = send(strategy)
    replies = good_replies(strategy, messages)
    victim = next(i for i, m in enumerate(messages) if partition_of(strategy, m) == 3)
    bad = _bad_variants(strategy, messages[victim])[kind]
    others = replies[:victim] + replies[victim + 1:]

    merged, metrics = strategy.aggregate_train(1, others + [bad])
    assert_arrays_equal(to_numpy(merged), hand_merge(strategy, others))
    assert totals(strategy)["dropped"] == 1
    assert totals(strategy)["clients"] == len(others)
    assert totals(strategy)["dropped-invalid"] == 1 and totals(strategy)["dropped-error"] == 0
    row = next(r for r in sent_rows(strategy) if r["partition-id"] == 3)
    assert row["outcome"] == "invalid" and row["reason"].startswith("invalid: ")
    assert row["bytes-up"] == 0 and row["bytes-down"] > 0
    assert totals(strategy)["bytes-down"] == sum(r["bytes-down"] for r in sent_rows(strategy))
    assert [r["outcome"] for r in sent_rows(strategy)].count("ok") == len(others)
    warnings = [r.getMessage() for r in caplog_strategies.records if r.levelno >= logging.WARNING]
    assert any("partition 3" in w for w in warnings), warnings


def test_error_reply_counts_as_dropped() -> None:
    strategy = make_strategy()
    messages = send(strategy)
    replies = good_replies(strategy, messages)
    error = Message(Error(code=1, reason="client crashed"), reply_to=messages[0])
    merged, metrics = strategy.aggregate_train(1, [error] + replies[1:])
    assert_arrays_equal(to_numpy(merged), hand_merge(strategy, replies[1:]))
    assert totals(strategy)["dropped"] == 1 and totals(strategy)["clients"] == len(replies) - 1
    assert totals(strategy)["dropped-error"] == 1 and totals(strategy)["dropped-invalid"] == 0
    failed = next(r for r in sent_rows(strategy) if r["outcome"] == "error")
    assert failed["partition-id"] == partition_of(strategy, messages[0])
    assert "client crashed" in failed["reason"] and failed["bytes-up"] == 0


def test_missing_reply_is_a_timeout_row_and_its_bytes_count() -> None:
    strategy = make_strategy()
    messages = send(strategy)
    replies = good_replies(strategy, messages)
    merged, metrics = strategy.aggregate_train(1, replies[1:])
    assert_arrays_equal(to_numpy(merged), hand_merge(strategy, replies[1:]))
    assert totals(strategy)["dropped-timeout"] == 1 and totals(strategy)["dropped"] == 1
    rows = sent_rows(strategy)
    assert len(rows) == len(messages)
    late = next(r for r in rows if r["outcome"] == "timeout")
    assert late["partition-id"] == partition_of(strategy, messages[0])
    assert totals(strategy)["bytes-down"] == sum(r["bytes-down"] for r in rows)  # sent to it too


class Orders(FixedPlan):
    """A planner that sends given nodes with their own config, in the first round only."""

    def __init__(self, specs, given) -> None:
        super().__init__(specs)
        self.given, self.samples = given, []

    def orders(self, server_round, sample):
        self.samples.append(sample([node_id(0), node_id(2), 777], 5))
        return self.given if server_round == 1 else super().orders(server_round, sample)


def test_the_planner_says_whom_to_send_with_their_config() -> None:
    planner = Orders(make_strategy().planner.specs,
                     {node_id(1): {"steps": 3}, node_id(4): {"steps": 1, "crash": True}})
    strategy = RankWiseFedAvg(5, planner=planner)
    grid = FakeGrid([node_id(p) for p in RANKS])
    messages = send(strategy, 1, grid)
    assert [partition_of(strategy, m) for m in messages] == [1, 4]
    assert messages[0].content["config"]["steps"] == 3
    assert messages[1].content["config"]["crash"] is True
    assert len(send(strategy, 2, grid)) == len(RANKS)  # the orders were for one round only
    # the strategy's sample: only the known nodes given, in partition order
    assert planner.samples[0] == [node_id(0), node_id(2)]


def test_sample_nodes_is_a_pure_seeded_draw_in_partition_order() -> None:
    specs = {node_id(p): ClientSpec(p, 1.0) for p in RANKS}
    draw = lambda: sample_nodes(np.random.default_rng(3), specs, specs, 3)  # noqa: E731
    picked = draw()
    assert picked == draw() and len(set(picked)) == 3
    assert [specs[n].partition_id for n in picked] == sorted(specs[n].partition_id for n in picked)
    with pytest.raises(RuntimeError, match="no known node"):
        sample_nodes(np.random.default_rng(0), specs, [777], 3)


def test_all_bad_returns_none_and_counts() -> None:
    strategy = make_strategy()
    messages = send(strategy)
    bad = [_bad_variants(strategy, m)[kind]
           for m, kind in zip(messages, ["nan", "missing", "zero-examples", "wrong-dtype"])]
    bad.append(Message(Error(code=1, reason="boom"), reply_to=messages[4]))
    merged, metrics = strategy.aggregate_train(1, bad)
    assert merged is None
    assert isinstance(metrics, MetricRecord) and totals(strategy)["dropped"] == 5
    assert [r["outcome"] for r in sent_rows(strategy)] == ["invalid"] * 4 + ["error"]
    assert totals(strategy)["dropped-invalid"] == 4 and totals(strategy)["dropped-error"] == 1
    assert [r["outcome"] for r in sent_rows(strategy)].count("ok") == 0


def test_mismatched_factor_ranks_dropped() -> None:
    strategy = make_strategy()
    messages = send(strategy)
    m = next(m for m in messages if partition_of(strategy, m) == 2)  # rank 3
    arrays = trained(m, 2)
    arrays["fc.U"] = arrays["fc.U"][:, :2].copy()  # U at rank 2, V at rank 3
    merged, metrics = strategy.aggregate_train(1, [reply(m, arrays)])
    # 1 invalid reply + 4 sampled clients that never answered (as after a timeout)
    assert merged is None and totals(strategy)["dropped"] == 5
    assert totals(strategy)["dropped-invalid"] == 1 and totals(strategy)["dropped-timeout"] == 4


# --------------------------------------------------------------------------- reply checks, faults


def test_reply_must_have_exactly_the_sent_shapes() -> None:
    """A reply smaller than what its client was sent (a leading corner of it) is not merged."""
    strategy = make_strategy()
    messages = send(strategy)
    m = next(m for m in messages if partition_of(strategy, m) == 2)  # sent rank 3
    arrays = trained(m, 2)
    arrays["fc.U"], arrays["fc.V"] = arrays["fc.U"][:, :2].copy(), arrays["fc.V"][:2].copy()
    merged, metrics = strategy.aggregate_train(1, [reply(m, arrays)])
    assert merged is None and totals(strategy)["dropped-invalid"] == 1
    row = next(r for r in sent_rows(strategy) if r["partition-id"] == 2)
    assert "exactly the shapes it was sent" in row["reason"]


def test_width_reply_cutting_any_axis_is_dropped() -> None:
    """Width baselines cut shared arrays too, but never below what the server sent."""
    strategy = WidthFedAvg(2, seed=0, planner=FixedPlan(
        {node_id(p): ClientSpec(p, 1.0, {}, {"out.weight": (2, 3)}) for p in (0, 1)}))
    messages = send(strategy, grid=FakeGrid([node_id(0), node_id(1)]))
    replies = []
    for m in messages:
        arrays = trained(m, partition_of(strategy, m))
        assert arrays["out.weight"].shape == (2, 3)
        if partition_of(strategy, m) == 1:
            arrays["out.weight"] = arrays["out.weight"][:1].copy()  # cuts the class axis
        replies.append(reply(m, arrays))
    _, metrics = strategy.aggregate_train(1, replies)
    assert totals(strategy)["clients"] == 1 and totals(strategy)["dropped-invalid"] == 1


def test_example_count_above_the_partition_size_is_dropped() -> None:
    strategy = RankWiseFedAvg(2, seed=0, planner=FixedPlan(
        {node_id(p): ClientSpec(p, 1.0, {"fc": 3}, max_examples=50) for p in (0, 1)}))
    messages = send(strategy, grid=FakeGrid([node_id(0), node_id(1)]))
    claims = {0: 50, 1: 51}
    replies = [reply(m, trained(m, partition_of(strategy, m)),
                     examples=claims[partition_of(strategy, m)]) for m in messages]
    _, metrics = strategy.aggregate_train(1, replies)
    assert totals(strategy)["clients"] == 1 and metrics["examples"] == 50
    row = next(r for r in sent_rows(strategy) if r["partition-id"] == 1)
    assert row["outcome"] == "invalid" and "exceeds the 50 training examples" in row["reason"]


def test_zero_dimensional_arrays_round_trip_and_are_accepted() -> None:
    g = {**global_arrays(), "step": np.array(7.0, F32)}
    record = to_numpy(to_record(g))
    assert record["step"].shape == () and float(record["step"]) == 7.0
    strategy = make_strategy(clients_per_round=2)
    messages = send(strategy, arrays=g)
    replies = [reply(m, to_numpy(m.content["arrays"])) for m in messages]  # echo what was sent
    merged, metrics = strategy.aggregate_train(1, replies)
    assert totals(strategy)["dropped"] == 0 and to_numpy(merged)["step"].shape == ()


def test_unanswered_clients_get_timeout_rows_and_their_bytes_count() -> None:
    strategy = make_strategy()
    messages = send(strategy)
    replies = good_replies(strategy, messages)[:3]
    _, metrics = strategy.aggregate_train(1, replies)
    outcomes = [r["outcome"] for r in sent_rows(strategy)]
    assert outcomes.count("timeout") == 2 and totals(strategy)["dropped-timeout"] == 2
    assert totals(strategy)["sent"] == 5 and totals(strategy)["clients"] == 3
    assert totals(strategy)["bytes-down"] == sum(strategy._bytes_down.values())
    assert totals(strategy)["bytes-up"] == sum(r["bytes-up"] for r in sent_rows(strategy))


@pytest.mark.parametrize("argument", ["fraction_train", "min_available_nodes",
                                      "fraction_evaluate", "min_evaluate_nodes"])
def test_fedavg_arguments_the_strategy_would_ignore_are_refused(argument: str) -> None:
    with pytest.raises(TypeError, match=argument):
        RankWiseFedAvg(5, **{argument: 1})


def test_reply_records_are_read_under_the_keys_given() -> None:
    strategy = RankWiseFedAvg(5, seed=0, weighted_by_key="n", metricrecord_key="stats",
                              planner=FixedPlan(make_strategy().planner.specs))
    messages = send(strategy)
    replies = []
    for i, m in enumerate(messages):
        content = RecordDict({"arrays": to_record(trained(m, partition_of(strategy, m))),
                              "stats": MetricRecord({"n": 10 + i, "train-loss": 1.0})})
        replies.append(Message(content=content, reply_to=m))
    _, metrics = strategy.aggregate_train(1, replies)
    assert totals(strategy)["clients"] == len(messages) and metrics["examples"] == sum(
        10 + i for i in range(len(messages)))
    _, metrics = strategy.aggregate_train(1, good_replies(strategy, messages))  # under "metrics"
    assert totals(strategy)["clients"] == 0 and totals(strategy)["dropped-invalid"] == len(messages)
