"""The device world acting during real (in-process) federations: deadlines, partial work, dropouts,
crashes and availability, checked against the ClientApp's own replies."""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import pandas as pd
import pytest
from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from fl_maestro import client_app
from fl_maestro.config import parse_run_config
from fl_maestro.devices import DOWNLINK_BYTES_PER_SECOND, UPLINK_BYTES_PER_SECOND, profiles_for
from fl_maestro.federation import run_federation
from fl_maestro.results import RunStore
from simulations.inprocess import InProcessGrid
from strategies import merge_nested
from strategies.records import to_numpy

NODES = 4
# Plain training (no ordered dropout, no distillation): every example costs the same MACs
PLAIN = {"sampler": "none", "distill": False}


def _overrides(tmp_path, name: str, **extra) -> dict:
    return {"dataset": "digits", "num-rounds": 1, "clients-per-round": NODES, "partitioner": "iid",
            "device-mix": "0.25:0.5,1.0:0.5", "results-dir": str(tmp_path), "run-name": name,
            "eval-samples": 100, "eval-fractions": "1.0", **extra}


def recording_app(calls: list[dict],
                  crash: Callable[[int, int], bool] = lambda partition, rnd: False) -> ClientApp:
    """The project's ClientApp, recording what each call got and returned; ``crash`` makes the
    call of a (partition, round) raise, as a buggy or out-of-memory client would."""
    app = ClientApp()

    @app.query()
    def describe(msg: Message, context: Context) -> Message:
        return client_app.describe(msg, context)

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        partition = int(context.node_config["partition-id"])
        rnd = int(msg.content["config"]["server-round"])
        if crash(partition, rnd):
            raise MemoryError(f"partition {partition} ran out of memory")
        reply = client_app.train_prefix(msg, context)
        calls.append({"round": rnd, "partition": partition, "sent": to_numpy(msg.content["arrays"]),
                      "config": dict(msg.content["config"]),
                      "arrays": to_numpy(reply.content["arrays"]),
                      "metrics": dict(reply.content["metrics"])})
        return reply
    return app


def _run(tmp_path, name: str, calls: list | None = None, crash=None, **extra):
    overrides = _overrides(tmp_path, name, **extra)
    app = recording_app([] if calls is None else calls, *([crash] if crash else []))
    run_federation(InProcessGrid(NODES, overrides, app=app), parse_run_config(overrides))
    return RunStore(tmp_path / name)


def _merge_of(calls: list[dict], rnd: int, global_arrays: dict) -> dict:
    return merge_nested(global_arrays, [(c["arrays"], float(c["metrics"]["num-examples"]))
                                        for c in calls if c["round"] == rnd])


def _assert_same(a: dict, b: dict) -> None:
    assert sorted(a) == sorted(b)
    for name in a:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)


@pytest.fixture(scope="module")
def slow_tier(tmp_path_factory) -> dict:
    """A run without a deadline in which tier 0.25 computes at 1 MMAC/s (hours per round)."""
    tmp_path = tmp_path_factory.mktemp("waited")
    calls: list[dict] = []
    store = _run(tmp_path, "wait", calls, **{"device-profiles": "0.25:macs-per-second=1e6",
                                             **PLAIN})
    return {"store": store, "calls": calls, "clients": store.read("clients")}


def test_server_predicts_each_clients_macs_and_bytes_before_it_trains(slow_tier) -> None:
    clients = slow_tier["clients"]
    assert (clients["outcome"] == "ok").all() and len(clients) == NODES
    profiles = profiles_for([0.25, 1.0], {"0.25": {"macs-per-second": 1e6}})
    for _, row in clients.iterrows():
        # the ClientApp reports the MACs it trained; the server priced them before sending
        seconds = profiles[row["budget"]].seconds(row["train-macs"], row["bytes-down"],
                                                  row["bytes-up"])
        assert row["sim-seconds"] == pytest.approx(seconds, rel=1e-9)
        assert row["steps"] == row["planned-steps"]
    rounds = slow_tier["store"].read("rounds")
    assert rounds.loc[0, "sim-seconds"] == pytest.approx(clients["sim-seconds"].max())
    assert rounds.loc[0, "sim-time"] == pytest.approx(clients["sim-seconds"].max())


def test_a_deadline_only_the_slow_tier_misses_drops_exactly_its_replies(slow_tier,
                                                                        tmp_path) -> None:
    clients = slow_tier["clients"]
    fast = clients[clients["budget"] == 1.0]["sim-seconds"].max()
    slow = clients[clients["budget"] == 0.25]["sim-seconds"].min()
    assert fast < slow, "the profile should make tier 0.25 the slow one"
    deadline = (fast + slow) / 2
    calls: list[dict] = []
    store = _run(tmp_path, "drop", calls, **{"device-profiles": "0.25:macs-per-second=1e6",
                                             "round-deadline": deadline,
                                             "deadline-policy": "drop", **PLAIN})
    rows = store.read("clients").set_index("partition-id")
    outcome = rows["outcome"].to_dict()
    assert outcome == {p: "straggler" if b == 0.25 else "ok" for p, b in rows["budget"].items()}
    # the stragglers never trained on the host, and the others trained what they would have
    assert sorted(c["partition"] for c in calls) == sorted(rows.index[rows["budget"] == 1.0])
    waited = {c["partition"]: c for c in slow_tier["calls"]}
    for call in calls:
        _assert_same(call["arrays"], waited[call["partition"]]["arrays"])
    _, merged, _ = store.load_checkpoint()
    _assert_same(merged, _merge_of(calls, 1, calls[0]["sent"]))  # tier 1.0 is sent everything
    rounds = store.read("rounds")
    assert rounds.loc[0, "dropped-straggler"] == 2 and rounds.loc[0, "clients"] == 2
    assert rounds.loc[0, "sim-seconds"] == pytest.approx(deadline)
    assert (rows.loc[rows["budget"] == 0.25, "reason"].str.contains("over the")).all()


def test_partial_trains_exactly_the_steps_that_fit(slow_tier, tmp_path) -> None:
    clients = slow_tier["clients"]
    slow = clients[clients["budget"] == 0.25].iloc[0]
    # plain training: each example costs train-macs / examples, so a full batch of 32 costs
    per_step = 32 * slow["train-macs"] / slow["num-examples"]
    transfers = slow["bytes-down"] / DOWNLINK_BYTES_PER_SECOND \
        + slow["bytes-up"] / UPLINK_BYTES_PER_SECOND
    deadline = transfers + 2.5 * per_step / 1e6  # room for 2.5 steps of tier 0.25
    calls: list[dict] = []
    store = _run(tmp_path, "partial", calls, **{
        "device-profiles": "0.25:macs-per-second=1e6", "round-deadline": deadline,
        "deadline-policy": "partial", "batch-size": 32, **PLAIN})
    rows = store.read("clients").set_index("partition-id")
    small = rows[rows["budget"] == 0.25]
    assert (small["outcome"] == "partial").all() and (small["steps"] == 2).all()
    assert (small["planned-steps"] > 2).all()
    assert small["train-macs"].tolist() == pytest.approx([2 * per_step] * 2, rel=1e-12)
    for call in calls:
        done = call["metrics"]["steps"]
        assert done == call["config"]["steps"]  # trained exactly what the server asked
        assert done == rows.loc[call["partition"], "steps"]
    assert (rows.loc[rows["budget"] == 1.0, "outcome"] == "ok").all()
    assert (small["sim-seconds"] <= deadline).all()
    rounds = store.read("rounds")
    assert rounds.loc[0, "partial"] == 2 and rounds.loc[0, "clients"] == NODES
    _, merged, _ = store.load_checkpoint()
    full = next(c["sent"] for c in calls if c["partition"] in rows.index[rows["budget"] == 1.0])
    _assert_same(merged, _merge_of(calls, 1, full))  # partial work is merged like any reply


def test_dropouts_are_reproducible_under_a_seed(tmp_path) -> None:
    extra = {"device-profiles": "default:dropout=0.5", "num-rounds": 3, "eval-every": 3}
    first = _run(tmp_path, "a", **extra).read("clients")
    again = _run(tmp_path, "b", **extra).read("clients")
    other = _run(tmp_path, "c", **extra, seed=1).read("clients")
    columns = ["round", "partition-id", "outcome"]
    pd.testing.assert_frame_equal(first[columns], again[columns])
    assert not first[columns].equals(other[columns])
    dropped = first[first["outcome"] == "dropout"]
    assert 0 < len(dropped) < len(first)
    assert (dropped["steps"] == 0).all() and dropped["reason"].str.startswith("dropout").all()
    rounds = RunStore(tmp_path / "a").read("rounds")
    assert rounds["dropped-dropout"].tolist() == first.groupby("round")["outcome"].apply(
        lambda o: int((o == "dropout").sum())).tolist()


def test_a_crashing_clientapp_costs_its_round_one_reply_and_nothing_else(tmp_path) -> None:
    extra = {"device-mix": "1.0:1.0", "num-rounds": 2, "eval-every": 2}
    clean: list[dict] = []
    _run(tmp_path, "clean", clean, **extra)
    calls: list[dict] = []
    store = _run(tmp_path, "crash", calls, crash=lambda p, rnd: (p, rnd) == (2, 1), **extra)
    rows = store.read("clients")
    failed = rows[rows["outcome"] == "error"]
    assert failed[["round", "partition-id"]].values.tolist() == [[1, 2]]
    assert "MemoryError: partition 2 ran out of memory" in failed["reason"].iloc[0]
    rounds = store.read("rounds").set_index("round")
    assert rounds.loc[1, "dropped-error"] == 1 and rounds.loc[1, "clients"] == NODES - 1
    assert rounds.loc[2, "dropped"] == 0 and rounds.loc[2, "clients"] == NODES
    # round 1 merged exactly the other replies, which were what they are without the crash
    same_round = {c["partition"]: c for c in clean if c["round"] == 1}
    for call in (c for c in calls if c["round"] == 1):
        _assert_same(call["arrays"], same_round[call["partition"]]["arrays"])
    after_round_1 = next(c["sent"] for c in calls if c["round"] == 2)
    _assert_same(after_round_1, _merge_of(calls, 1, calls[0]["sent"]))
    assert store.load_checkpoint()[0] == 2  # the run went on to its end


def test_a_crash_injected_by_the_profile_is_counted_like_any_crash(tmp_path) -> None:
    store = _run(tmp_path, "injected", **{"device-profiles": "1.0:crash=0.5", "num-rounds": 3,
                                          "eval-every": 3})
    rows = store.read("clients")
    crashed = rows[rows["outcome"] == "error"]
    assert len(crashed) > 0 and (crashed["budget"] == 1.0).all()
    assert crashed["reason"].str.contains("InjectedCrash").all()
    rounds = store.read("rounds")
    assert rounds["dropped-error"].sum() == len(crashed)
    assert (rounds["clients"] + rounds["dropped"] == NODES).all()


def test_an_availability_trace_excludes_offline_clients_from_sampling(tmp_path) -> None:
    trace = tmp_path / "trace.csv"
    # partitions 0 and 3 come online only after a day; tier 0.25 is online from 0 to 10 hours
    trace.write_text("client,tier,from,until\n0,,86400,1e9\n3,,86400,1e9\n,0.25,0,36000\n")
    store = _run(tmp_path, "trace", **{"availability": str(trace), "num-rounds": 3,
                                       "eval-every": 3})
    rows = store.read("clients")
    assert set(rows["partition-id"]) == {1, 2}
    rounds = store.read("rounds")
    assert (rounds["online"] == 2).all() and (rounds["sampled"] == 2).all()
    assert rounds["sim-start"].iloc[0] == 0 and math.isclose(
        rounds["sim-start"].iloc[1], rounds["sim-time"].iloc[0])


@pytest.mark.parametrize("extra", [{}, {"strategy": "fjord"}, {"strategy": "heterofl"},
                                   {"distill": False, "sampler": "independent"}],
                         ids=["rankwise", "fjord", "heterofl", "independent"])
def test_every_method_trains_the_macs_and_steps_the_server_priced(tmp_path, extra) -> None:
    clients = _run(tmp_path, "priced", **extra).read("clients")
    profiles = profiles_for([0.25, 1.0])
    assert (clients["outcome"] == "ok").all() and len(clients) == NODES
    for _, row in clients.iterrows():
        seconds = profiles[row["budget"]].seconds(row["train-macs"], row["bytes-down"],
                                                  row["bytes-up"])
        assert row["sim-seconds"] == pytest.approx(seconds, rel=1e-9)
        assert row["steps"] == row["planned-steps"]


def test_over_selection_keeps_the_first_clients_to_finish(tmp_path) -> None:
    calls: list[dict] = []
    store = _run(tmp_path, "over", calls, **{"clients-per-round": 2, "over-selection": 1.0})
    rows = store.read("clients").sort_values("sim-seconds")
    assert len(rows) == NODES  # 2 x (1 + 1.0) sampled
    assert rows["outcome"].tolist() == ["ok", "ok", "straggler", "straggler"]
    assert rows["reason"].iloc[2:].str.contains("over-selection").all()
    assert sorted(c["partition"] for c in calls) == sorted(rows["partition-id"].iloc[:2])
    rounds = store.read("rounds")
    assert rounds.loc[0, "sim-seconds"] == pytest.approx(rows["sim-seconds"].iloc[1])
