"""The federation driven in one process (no SuperLink, no Ray): budgets, tiers and results."""

from __future__ import annotations

import numpy as np
import pytest

from fl_maestro.config import parse_run_config
from fl_maestro.results import RunStore
from fl_maestro.discovery import Discovery
from fl_maestro.federation import run_federation
from simulations.inprocess import InProcessGrid


def _overrides(tmp_path, **extra) -> dict:
    return {"dataset": "digits", "num-rounds": 2, "clients-per-round": 3, "partitioner": "iid",
            "device-mix": "0.25:0.5,1.0:0.5", "results-dir": str(tmp_path), "run-name": "run",
            "eval-samples": 100, "eval-fractions": "0.5,1.0", **extra}


def test_node_config_budget_overrides_the_device_mix(tmp_path):
    overrides = _overrides(tmp_path, **{"clients-per-round": 4})
    # A deployment sets each SuperNode's budget in its node config: 0.5 is no tier of the mix.
    grid = InProcessGrid(4, overrides, node_configs={i: {"budget": 0.5} for i in range(4)})
    table = run_federation(grid, parse_run_config(overrides))
    clients = RunStore(tmp_path / "run").read("clients")
    assert set(clients["budget"]) == {0.5}
    assert clients["bytes-down"].nunique() == 1
    assert 0.5 in table.index  # deployed budgets are evaluated as tiers too
    assert clients["val-accuracy"].between(0, 1).all() and (clients["val-examples"] > 0).all()


def test_tiers_get_their_ranks_and_the_table_has_every_tier(tmp_path):
    overrides = _overrides(tmp_path)
    table = run_federation(InProcessGrid(6, overrides), parse_run_config(overrides))
    assert list(table.index) == [0.25, 1.0]
    assert table.loc[0.25, "dense-relative-macs"] <= 0.25
    assert 0.99 < table.loc[1.0, "dense-relative-macs"] <= 1.0  # full model, ranks capped
    assert table.loc[1.0, "eval-examples"] == 360  # final round: the whole test split
    store = RunStore(tmp_path / "run")
    evaluation = store.read("evaluation")
    midway = evaluation[(evaluation["round"] == 1) & (evaluation["metric"] == "eval-examples")]
    assert (midway["value"] == 100).all()  # earlier rounds: the eval-samples subset
    clients = store.read("clients")
    small = clients[clients["budget"] == 0.25]["bytes-down"]
    large = clients[clients["budget"] == 1.0]["bytes-down"]
    assert small.max() < large.min()


def test_existing_run_is_not_overwritten_without_resume(tmp_path):
    overrides = _overrides(tmp_path, **{"num-rounds": 1})
    run_federation(InProcessGrid(3, overrides), parse_run_config(overrides))
    with pytest.raises(ValueError, match="resume=true"):
        run_federation(InProcessGrid(3, overrides), parse_run_config(overrides))


def test_resume_refuses_a_changed_config(tmp_path):
    overrides = _overrides(tmp_path, **{"num-rounds": 1})
    run_federation(InProcessGrid(3, overrides), parse_run_config(overrides))
    changed = {**overrides, "resume": True, "lr": 0.5}
    with pytest.raises(ValueError, match="'lr'"):
        run_federation(InProcessGrid(3, changed), parse_run_config(changed))


def test_resume_continues_to_the_same_model(tmp_path):
    full = _overrides(tmp_path / "a", **{"num-rounds": 3})
    run_federation(InProcessGrid(4, full), parse_run_config(full))
    first = _overrides(tmp_path / "b", **{"num-rounds": 1})
    run_federation(InProcessGrid(4, first), parse_run_config(first))
    rest = {**first, "num-rounds": 3, "resume": True}
    run_federation(InProcessGrid(4, rest), parse_run_config(rest))
    _, a, _ = RunStore(tmp_path / "a" / "run").load_checkpoint()
    _, b, _ = RunStore(tmp_path / "b" / "run").load_checkpoint()
    for name in a:
        np.testing.assert_allclose(b[name], a[name], atol=1e-6, err_msg=name)


def test_discovery_asks_in_chunks_and_finds_every_node() -> None:
    grid = InProcessGrid(5, {})
    pushed = []
    push = grid.push_messages
    grid.push_messages = lambda messages: pushed.append(len(messages)) or push(messages)
    discovery = Discovery(grid, chunk=2)
    assert pushed == [2]  # the first chunk goes out at once, before anyone waits
    nodes = discovery.result()
    assert pushed == [2, 2, 1]
    assert {n: info["partition-id"] for n, info in nodes.items()} == {i + 1: i for i in range(5)}
    assert {info["num-partitions"] for info in nodes.values()} == {5}


def test_discovery_fails_loudly_when_a_node_cannot_describe_itself() -> None:
    grid = InProcessGrid(2, {}, node_configs={1: {"partition-id": "x"}})
    with pytest.raises(RuntimeError, match="node 2 failed to describe itself"):
        Discovery(grid).result()


def test_timeline_records_every_phase_of_every_round(tmp_path):
    overrides = _overrides(tmp_path)
    run_federation(InProcessGrid(4, overrides), parse_run_config(overrides))
    timeline = RunStore(tmp_path / "run").read("timeline")
    assert list(timeline.loc[timeline["round"] == 0, "phase"]) == ["set-up", "discovery", "evaluation"]
    parts = ["training:plan", "training:configure", "training:clients", "training:merge"]
    for rnd in (1, 2):
        phases = list(timeline.loc[timeline["round"] == rnd, "phase"])
        assert phases == [*parts, "training", "evaluation", "results"]
        rows = timeline[timeline["round"] == rnd].set_index("phase")
        assert rows.loc[parts, "seconds"].sum() <= rows.loc["training", "seconds"]
    assert (timeline["seconds"] >= 0).all() and (timeline["cpu-seconds"] >= 0).all()
    clients = RunStore(tmp_path / "run").read("clients")
    for part in ("decode", "build", "data", "validate", "train", "encode"):
        assert (clients[f"{part}-seconds"] > 0).all(), part
    part = timeline["phase"].str.contains(":")
    assert timeline.loc[~part, "start"].is_monotonic_increasing  # a phase's row follows its parts'
    assert timeline.loc[part, "start"].is_monotonic_increasing


def test_discovery_leaves_out_a_silent_node_and_still_asks_the_next_chunk(caplog) -> None:
    grid = InProcessGrid(4, {})
    pull = grid.pull_messages
    grid.pull_messages = lambda ids: [m for m in pull(ids) if m.metadata.src_node_id != 1]
    with caplog.at_level("WARNING"):
        nodes = Discovery(grid, chunk=2).result(timeout=0.2, poll=0.01)
    assert sorted(nodes) == [2, 3, 4]  # the second chunk gets its own time to answer
    assert "1 nodes did not answer within 0.2 s" in caplog.text


def test_components_table_records_coverage_and_movement_every_round(tmp_path):
    overrides = _overrides(tmp_path, **{"num-rounds": 2})
    run_federation(InProcessGrid(4, overrides), parse_run_config(overrides))
    store = RunStore(tmp_path / "run")
    components, clients = store.read("components"), store.read("clients")
    assert sorted(components["round"].unique()) == [0, 1, 2]
    start = components[components["round"] == 0]
    assert (start["client-steps"] == 0).all() and (start["moved"] == 0).all()
    assert np.allclose(start["importance"], start["importance-init"])
    for rnd in (1, 2):
        mine = components[components["round"] == rnd]
        first = mine[mine["component"] == 0].set_index("layer")
        # every step of every client trains each layer's first component
        assert (first["client-steps"] == clients[clients["round"] == rnd]["steps"].sum()).all()
        assert (first["clients"] == 3).all()
        # the tier-0.25 clients hold only a prefix: the tail is held by the 1.0 clients only
        assert mine["clients"].min() < 3
    totals = components[components["round"] > 0].groupby(["layer", "component"])[
        ["client-steps", "clients"]].sum()
    final = components[components["round"] == 2].set_index(["layer", "component"])["moved"]
    assert (final[totals["client-steps"] > 0] > 0).all()  # what was trained moved
    assert (final[totals["clients"] == 0] == 0).all()  # what no client held did not
    assert store.load_initial() is not None


def test_sweep_cells_run_in_process_and_resume(tmp_path):
    from simulations.runners import InProcessCells
    from simulations.scenarios import Scenario, axis
    from simulations.sweep import build_cells, run_sweep

    scenario = Scenario("tiny", "one cell", overrides={
        k: v for k, v in _overrides(tmp_path).items() if k not in ("results-dir", "run-name")},
        supernodes=4, axes=(axis("lr", (0.05,)),))
    cells = build_cells(scenario, [0], tmp_path)
    table = run_sweep(cells, InProcessCells(threads=1, timeout=300), tmp_path)
    assert table.loc[0, "status"] == "done" and table.loc[0, "rounds"] == 2
    assert "final global-model accuracy by tier" in (tmp_path / cells[0].cell_id / "run.log").read_text()
    longer = build_cells(scenario, [0], tmp_path)
    longer = [c.__class__(**{**c.__dict__, "num_rounds": 3,
                             "run_config": {**c.run_config, "num-rounds": 3}}) for c in longer]
    run_sweep(longer, InProcessCells(threads=1), tmp_path)
    evaluation = RunStore(tmp_path / cells[0].cell_id).read("evaluation")
    assert sorted(evaluation["round"].unique()) == [0, 1, 2, 3]  # resumed, not restarted
