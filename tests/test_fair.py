"""A fair comparison's pieces: divergence stop, clipping, reply metrics, the tier-aware and
walking samplers, validation-split evaluation, and the tuning step."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from flwr.app import ConfigRecord, Message, MetricRecord, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from fl_maestro.client_app import partition_split
from fl_maestro.config import parse_run_config
from fl_maestro.federation import Federation
from fl_maestro.models import build_model
from fl_maestro.methods import (TIER_GRID, Planning, clip_for, get_method, recipe,
                                tier_grid_ranks)
from fl_maestro.results import RunStore
from fl_maestro.sampling import get_sampler, single_layer
from fl_maestro.training import DivergenceCheck, Recipe, train
from simulations.inprocess import InProcessGrid
from simulations.scenarios import Scenario, grouped_axis
from simulations.sweep import Cell, build_cells, run_sweep, tune
from simulations.tuning import (Tuning, choose, markdown_table, parse_tune, tuning_from_args,
                                tuning_tables, validation_scores)
from fl_maestro.rounds import round_totals
from strategies.plan import ClientSpec, FixedPlan
from strategies.rankwise import RankWiseFedAvg
from strategies.records import to_numpy, to_record

F32 = np.float32


# --------------------------------------------------------------------------- divergence


def test_divergence_check_by_hand() -> None:
    """First 5 steps' mean 1.0; factor 10: a last-5 mean of 12.8 (1,1,1,1,60) stops, one of
    8.8 (1,1,1,1,40) does not; a non-finite loss always stops; a start near zero is floored."""
    check = DivergenceCheck(10.0)
    assert not any(check.add(1.0) for _ in range(9))
    assert check.add(60.0) and check.metrics()["first-loss"] == 1.0
    calm = DivergenceCheck(10.0)
    assert not any(calm.add(v) for v in [1.0] * 9 + [40.0])
    assert DivergenceCheck(0.0).add(float("nan")) and not DivergenceCheck(0.0).add(1e9)
    low = DivergenceCheck(10.0)  # first mean 0.01 is floored at 0.1: 1.0 is the limit
    assert not any(low.add(v) for v in [0.01] * 5 + [0.9] * 5)
    assert low.add(1.3) is False  # (0.9 * 4 + 1.3) / 5 = 0.98
    assert low.add(1.5) is True  # (0.9 * 3 + 1.3 + 1.5) / 5 = 1.1
    with pytest.raises(ValueError, match="divergence factor -1"):
        DivergenceCheck(-1.0)


def _data(seed: int = 0, n: int = 64) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(n, 1, 8, 8, generator=g), torch.randint(0, 10, (n,), generator=g)
    return [(x[i:i + 8], y[i:i + 8]) for i in range(0, n, 8)]


def test_a_client_forced_to_diverge_stops_and_says_so() -> None:
    torch.manual_seed(0)
    model = build_model("mlp", (1, 8, 8), 10)
    result = train(model, _data(), Recipe(sampler="none", epochs=5, lr=50.0, momentum=0.9,
                                          distill=False, divergence_factor=10.0))
    assert result["diverged"] and result["steps"] < 40
    assert not np.isfinite(result["diverged-loss"]) or \
        result["diverged-loss"] > 10 * max(result["first-loss"], 0.1) / 5
    torch.manual_seed(0)
    calm = train(build_model("mlp", (1, 8, 8), 10), _data(),
                 Recipe(sampler="none", epochs=5, lr=0.01, distill=False, divergence_factor=10.0))
    assert not calm["diverged"] and calm["steps"] == 40


def test_clipping_bounds_every_steps_update() -> None:
    """Momentum and weight decay off: a clipped step moves the parameters by at most lr * norm."""
    for optimizer in ("corner", "sgd"):
        torch.manual_seed(0)
        model = build_model("mlp", (1, 8, 8), 10)
        before = torch.cat([p.detach().flatten().clone() for p in model.parameters()])
        train(model, _data(n=8), Recipe(sampler="none", lr=1.0, momentum=0.0, weight_decay=0.0,
                                        distill=False, optimizer=optimizer, clip_grad_norm=1e-3))
        after = torch.cat([p.detach().flatten() for p in model.parameters()])
        assert (after - before).norm() == pytest.approx(1e-3, rel=1e-3), optimizer


def test_clip_grad_norm_key_is_the_methods_own_by_default() -> None:
    assert clip_for(parse_run_config({"strategy": "heterofl"})) == 1.0
    assert clip_for(parse_run_config({"strategy": "fedrolex"})) == 1.0
    assert clip_for(parse_run_config({"strategy": "rankwise"})) == 0.0
    fjord = parse_run_config({"strategy": "fjord", "clip-grad-norm": 0.5})
    assert recipe(fjord, 1, {"tier-grid": "[{}]"}).clip_grad_norm == 0.5
    heterofl = recipe(parse_run_config({"strategy": "heterofl"}), 1, {})
    assert heterofl.clip_grad_norm == 1.0 and heterofl.divergence_factor == 10.0
    with pytest.raises(ValueError, match="'clip-grad-norm' has bad value 'off'"):
        parse_run_config({"clip-grad-norm": "off"})


@pytest.fixture
def task_identity(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("_run_id", "_task_id", "_node_id"):
        monkeypatch.setattr(TaskIdentity, name, 1)


def _strategy() -> RankWiseFedAvg:
    return RankWiseFedAvg(2, planner=FixedPlan({7: ClientSpec(0, 1.0, shapes={"w": (2,)}),
                                                8: ClientSpec(1, 1.0, shapes={"w": (2,)})}))


def _round(strategy: RankWiseFedAvg, metrics: list[dict], value: float = 1.0):
    """Send {"w": zeros} to two clients and merge their replies (arrays all ``value``)."""
    grid = type("Grid", (), {"get_node_ids": lambda self: [7, 8]})()
    sent = list(strategy.configure_train(1, to_record({"w": np.zeros(2, F32)}), ConfigRecord(),
                                         grid))
    replies = [Message(content=RecordDict({"arrays": to_record({"w": np.full(2, value, F32)}),
                                           "metrics": MetricRecord(m)}), reply_to=s)
               for s, m in zip(sent, metrics)]
    merged, round_metrics = strategy.aggregate_train(1, replies)
    return merged, round_metrics


def test_a_diverged_reply_is_its_own_row_counted_and_never_merged(task_identity) -> None:
    strategy = _strategy()
    merged, metrics = _round(strategy, [
        {"num-examples": 10, "train-loss": 0.5, "diverged": 0},
        {"num-examples": 10, "diverged": 1, "diverged-loss": float("inf"), "diverged-step": 3,
         "first-loss": 2.3}], value=4.0)
    rows = {r["partition-id"]: r for r in strategy.planner.rows}
    assert rows[0]["outcome"] == "ok" and rows[1]["outcome"] == "diverged"
    assert "loss inf at step 3" in rows[1]["reason"]
    totals = round_totals(strategy.planner.rows)
    assert totals["dropped-diverged"] == 1 and totals["clients"] == 1
    assert metrics["examples"] == 10
    np.testing.assert_array_equal(to_numpy(merged)["w"], [4.0, 4.0])  # client 0's only
    merged, _ = _round(_strategy(), [{"num-examples": 10, "diverged": 1}] * 2)
    assert merged is None


def test_a_reply_without_train_metrics_is_left_out_of_their_mean(task_identity) -> None:
    """0.8 from the one client that reports it; averaging the other in as 0 gave 0.4."""
    _, metrics = _round(_strategy(), [
        {"num-examples": 10, "train-loss": 0.8, "train-accuracy": 0.6}, {"num-examples": 10}])
    assert metrics["train-loss"] == pytest.approx(0.8)
    assert metrics["train-accuracy"] == pytest.approx(0.6)
    assert metrics["examples"] == 20
    _, none = _round(_strategy(), [{"num-examples": 10}, {"num-examples": 5}])
    assert "train-loss" not in none


# --------------------------------------------------------------------------- samplers


def test_rankwise_tier_grid_draws_the_tiers_joint_configurations() -> None:
    cfg = parse_run_config({"strategy": "rankwise", "sampler": "tier-grid"})
    rankwise = get_method("rankwise")
    assert rankwise.local(cfg).sampler == TIER_GRID and rankwise.local(cfg).distill
    model = build_model("cnn", (1, 28, 28), 10, device="meta")
    planning = Planning(tiers=(0.2, 0.4, 0.6, 0.8, 1.0))
    grid = tier_grid_ranks(rankwise, model, 0.6, planning)
    assert grid == [rankwise.plan(model, b, planning) for b in (0.2, 0.4, 0.6)]
    assert grid[0] != grid[1] != grid[2]  # each tier's own joint cut, every layer at once
    with pytest.raises(ValueError, match="'sampler' = 'tier-grid' is ignored"):
        parse_run_config({"strategy": "fjord", "sampler": "tier-grid"})


def test_single_layer_walk_visits_every_pair_once_per_cycle() -> None:
    """Maestro's walk: 2 + 3 = 5 (layer, rank) pairs, each drawn once in any 5 consecutive
    steps of a cycle, the others at max; the with-replacement draw repeats pairs."""
    max_ranks = {"a": 2, "b": 3}
    every_pair = sorted(tuple(sorted({**max_ranks, n: r}.items()))
                        for n, m in max_ranks.items() for r in range(1, m + 1))
    walk, rng = get_sampler("single-layer-walk"), np.random.default_rng(0)
    for _ in range(3):  # three cycles
        cycle = [tuple(sorted(walk(max_ranks, rng).items())) for _ in range(5)]
        assert sorted(cycle) == every_pair
    assert get_sampler("single-layer-walk") is not walk  # a fresh walk per training
    rng = np.random.default_rng(0)
    draws = [tuple(sorted(single_layer(max_ranks, rng).items())) for _ in range(5)]
    assert len(set(draws)) < 5  # with replacement (seed 0): some pair repeats


# --------------------------------------------------------------------------- validation split


def test_validation_evaluation_uses_the_clients_held_out_rows(tmp_path: Path) -> None:
    overrides = {"dataset": "digits", "results-dir": str(tmp_path), "run-name": "run",
                 "eval-split": "validation", "partitioner": "iid", "clients-per-round": 2}
    cfg = parse_run_config(overrides)
    federation = Federation(InProcessGrid(4, overrides), cfg)
    federation.set_nodes({n: {"partition-id": n, "num-partitions": 4, "train-examples": 1}
                          for n in range(4)})
    pool = federation.eval_pool
    splits = [partition_split(cfg, i, 4) for i in range(4)]
    np.testing.assert_array_equal(pool, np.sort(np.concatenate([v for _, v in splits])))
    trained = np.concatenate([t for t, _ in splits])
    assert not set(pool) & set(trained)  # never trained on
    assert len(federation.eval_y) == len(trained) + len(pool)  # rows of the training set


# --------------------------------------------------------------------------- tuning


def test_parse_tune_types_and_refusals() -> None:
    assert parse_tune(["lr=0.01,0.1", "momentum=0,0.9"]) == {"lr": (0.01, 0.1),
                                                             "momentum": (0.0, 0.9)}
    for bad, needle in [("lr", "malformed"), ("seed=1,2", "not a run-config key"),
                        ("lr=0.1,0.1", "repeats"), ("nope=1", "not a run-config key")]:
        with pytest.raises(ValueError, match=needle):
            parse_tune([bad])


def test_choose_takes_each_methods_best_and_breaks_ties_by_grid_order() -> None:
    scores = pd.DataFrame({"method": ["a", "a", "b", "b"], "lr": ["0.1", "0.2"] * 2,
                           "val-accuracy": [0.5, 0.7, 0.6, 0.6]})
    chosen = choose(scores, ["method"], ["lr"], [{"lr": "0.1"}, {"lr": "0.2"}])
    assert chosen["chosen"].tolist() == [False, True, True, False]
    evaluation = pd.DataFrame({"method": "a", "lr": "0.1", "metric": "accuracy",
                               "round": [0, 3, 3, 3], "kind": ["tier", "tier", "tier", "fraction"],
                               "level": [1.0, 0.5, 1.0, 1.0], "value": [0.1, 0.4, 0.6, 0.9]})
    scores = validation_scores(evaluation, ["method"], ["lr"])
    assert scores["val-accuracy"].tolist() == [pytest.approx(0.5)]  # round 3's tiers


def test_tuning_runs_the_grid_on_validation_data_and_runs_each_method_at_its_choice(
        tmp_path: Path) -> None:
    """Fake runs whose validation accuracy peaks at lr 0.1 for method x and 0.02 for y."""
    peak = {"x": 0.1, "y": 0.02}
    seen: list[dict] = []

    def run_cell(cell: Cell, resume: bool) -> int:
        rc = cell.run_config
        seen.append(dict(rc))
        store = RunStore(Path(rc["results-dir"]) / rc["run-name"])
        store.write_config(parse_run_config(rc).to_dict())
        method = "x" if rc["strategy"] == "fjord" else "y"
        accuracy = 1.0 - abs(rc["lr"] - peak[method])
        for rnd in range(1, cell.num_rounds + 1):
            store.append("evaluation", [{"round": rnd, "kind": "tier", "level": 1.0,
                                         "metric": "accuracy", "value": accuracy}])
            store.append("rounds", [{"round": rnd, "dropped-diverged": int(rc["lr"] == 0.1)}])
            store.save_checkpoint(rnd, {"w": np.zeros(1, F32)}, {})
        return 0

    scenario = Scenario("s", "two methods", overrides={"num-rounds": 4, "clients-per-round": 2},
                        supernodes=4, axes=(grouped_axis("method", {
                            "x": {"strategy": "fjord"}, "y": {"strategy": "heterofl"}}),))
    cells = build_cells(scenario, [0, 1], tmp_path)
    tuning = Tuning(parse_tune(["lr=0.02,0.05,0.1"]), seed=7, rounds=3)
    tuned, table = tune(scenario, cells, tuning, tmp_path, run_cell)
    assert len(seen) == 6 and all(r["eval-split"] == "validation" and r["seed"] == 7
                                  and r["num-rounds"] == 3 for r in seen)
    assert {c.axes["method"]: c.run_config["lr"] for c in tuned} == {"x": 0.1, "y": 0.02}
    assert table["chosen"].sum() == 2 and (tmp_path / "tuning" / "table.csv").exists()
    assert table.set_index(["method", "lr"])["diverged-clients"].to_dict() == {
        ("x", "0.02"): 0, ("x", "0.05"): 0, ("x", "0.1"): 3,
        ("y", "0.02"): 0, ("y", "0.05"): 0, ("y", "0.1"): 3}  # one per round, 3 rounds
    cells_table = run_sweep(tuned, run_cell, tmp_path)
    assert cells_table.set_index("cell-id")["tuned-lr"].to_dict() == {
        "method=x__seed=0": 0.1, "method=x__seed=1": 0.1,
        "method=y__seed=0": 0.02, "method=y__seed=1": 0.02}
    assert len(seen) == 10 and all(r.get("eval-split", "test") == "test" for r in seen[6:])
    on_page = tuning_tables([tmp_path])
    assert len(on_page) == 6 and on_page.loc[on_page["chosen"], "lr"].tolist() == [0.1, 0.02]


def _fake_runs(accuracy: dict, seen: list | None = None) -> Callable[[Cell, bool], int]:
    """A run_cell whose runs end at ``accuracy[(strategy, lr, seed)]`` (missing: the run fails),
    noting each (strategy, lr, seed) it is asked for in ``seen``."""
    def run_cell(cell: Cell, resume: bool) -> int:
        rc = cell.run_config
        if seen is not None:
            seen.append((rc["strategy"], rc["lr"], rc["seed"]))
        value = accuracy.get((rc["strategy"], rc["lr"], rc["seed"]))
        if value is None:
            return 1
        store = RunStore(Path(rc["results-dir"]) / rc["run-name"])
        store.write_config(parse_run_config(rc).to_dict())
        for rnd in range(1, cell.num_rounds + 1):
            store.append("evaluation", [{"round": rnd, "kind": "tier", "level": 1.0,
                                         "metric": "accuracy", "value": value}])
            store.append("rounds", [{"round": rnd, "dropped-diverged": 1}])
            store.save_checkpoint(rnd, {"w": np.zeros(1, F32)}, {})
        return 0
    return run_cell


def test_confirmation_reruns_each_methods_best_points_and_chooses_by_the_mean(
        tmp_path: Path) -> None:
    """Seed 7 ranks x's points 0.1 > 0.05 > 0.02 and y's 0.02 > 0.05 > 0.1; with K = 2 the
    second seed (8) runs only x@{0.1, 0.05} and y@{0.02, 0.05}. On seed 8 x@0.1 fails (a point
    failing on either seed cannot be chosen), so x takes 0.05; y@0.02 scores 0.4 there, so the
    means are y@0.02 (0.9 + 0.4) / 2 = 0.65 < y@0.05 (0.8 + 0.8) / 2 = 0.8: y takes 0.05."""
    x, y = "fjord", "heterofl"  # the strategies of methods x and y
    accuracy = {(x, 0.1, 7): 0.9, (x, 0.05, 7): 0.8, (x, 0.02, 7): 0.7,
                (y, 0.02, 7): 0.9, (y, 0.05, 7): 0.8, (y, 0.1, 7): 0.7,
                (x, 0.05, 8): 0.6, (y, 0.02, 8): 0.4, (y, 0.05, 8): 0.8}  # x@0.1 fails on 8
    seen: list[tuple[str, float, int]] = []
    run_cell = _fake_runs(accuracy, seen)

    scenario = Scenario("s", "two methods", overrides={"num-rounds": 4, "clients-per-round": 2},
                        supernodes=4, axes=(grouped_axis("method", {
                            "x": {"strategy": "fjord"}, "y": {"strategy": "heterofl"}}),))
    cells = build_cells(scenario, [0], tmp_path)
    tuning = Tuning(parse_tune(["lr=0.02,0.05,0.1"]), seed=7, rounds=2, confirm=2,
                    confirm_seed=8)
    tuned, table = tune(scenario, cells, tuning, tmp_path, run_cell)
    assert sorted(s for s in seen if s[2] == 8) == [(x, 0.05, 8), (x, 0.1, 8),
                                                   (y, 0.02, 8), (y, 0.05, 8)]
    assert {c.axes["method"]: c.run_config["lr"] for c in tuned} == {"x": 0.05, "y": 0.05}
    rows = table.set_index(["method", "lr"])
    assert rows.loc[("x", "0.1"), "confirm-status"] == "failed"
    assert pd.isna(rows.loc[("x", "0.1"), "score"]) and pd.isna(rows.loc[("x", "0.02"), "score"])
    assert rows.loc[("y", "0.02"), "score"] == pytest.approx(0.65)
    assert rows.loc[("y", "0.05"), "score"] == pytest.approx(0.8)
    assert (tmp_path / "tuning" / "confirm" / "cells.csv").exists()
    lines = markdown_table(pd.read_csv(tmp_path / "tuning" / "table.csv")).splitlines()
    # (each fake run loses one client per round to divergence: 2 in its 2 rounds)
    assert lines[2] == "| `x` | 70.0 (2d) | **80.0 (2d) / 60.0 (2d)** | 90.0 (2d) / failed |"
    # The confirmation alone, on the finished table (--tuned TABLE --tune-confirm K): nothing
    # of the first seed runs again, and the same choice comes out.
    seen.clear()
    again, table2 = tune(scenario, cells, tuning, tmp_path / "again", run_cell,
                         table=pd.read_csv(tmp_path / "tuning" / "table.csv"))
    assert all(s[2] == 8 for s in seen) and len(seen) == 4
    assert {c.axes["method"]: c.run_config["lr"] for c in again} == {"x": 0.05, "y": 0.05}


def test_confirmation_again_in_the_same_folder_reads_only_its_own_runs(tmp_path: Path) -> None:
    """Axis named after a run-config key (``strategy``), table read back from its CSV. Seed 8
    confirms both points; a second confirmation on seed 9, in the same folder, where every run
    fails, must not score them with seed 8's accuracy: no point is usable on both seeds, and
    the error names the confirmation."""
    scenario = Scenario("s", "", overrides={"num-rounds": 4, "clients-per-round": 2},
                        supernodes=4, axes=(grouped_axis("strategy", {
                            "fjord": {"strategy": "fjord"}}),))
    cells = build_cells(scenario, [0], tmp_path)
    run_cell = _fake_runs({("fjord", 0.05, 7): 0.8, ("fjord", 0.1, 7): 0.9,
                           ("fjord", 0.05, 8): 0.7, ("fjord", 0.1, 8): 0.5})
    tune(scenario, cells, Tuning(parse_tune(["lr=0.05,0.1"]), seed=7, rounds=2), tmp_path,
         run_cell)
    table = pd.read_csv(tmp_path / "tuning" / "table.csv")
    args = argparse.Namespace(tune=[], tune_seed=None, tune_rounds=15, tune_only=True,
                              tune_confirm=2, tune_confirm_seed=None)
    tuning = tuning_from_args(args, [0], table, ["strategy"])
    assert tuning.grid == {"lr": (0.05, 0.1)} and tuning.confirm_seed == 8
    tuned, confirmed_table = tune(scenario, cells, tuning, tmp_path, run_cell, table=table)
    assert tuned[0].run_config["lr"] == 0.05  # means 0.75 vs 0.7
    assert confirmed_table["diverged-clients"].tolist() == [2, 2]  # one per round, this seed's
    nine = tuning_from_args(argparse.Namespace(**{**vars(args), "tune_confirm_seed": 9}), [0],
                            table, ["strategy"])
    with pytest.raises(RuntimeError, match="failed on seed 9"):
        tune(scenario, cells, nine, tmp_path, run_cell, table=table)
    again = pd.read_csv(tmp_path / "tuning" / "table.csv")
    assert again["confirm-val-accuracy"].isna().all() and not again["chosen"].any()


def test_tuning_where_every_run_fails_says_so(tmp_path: Path) -> None:
    scenario = Scenario("s", "", overrides={"num-rounds": 4, "clients-per-round": 2},
                        supernodes=4, axes=(grouped_axis("method", {
                            "x": {"strategy": "fjord"}}),))
    cells = build_cells(scenario, [0], tmp_path)
    tuning = Tuning(parse_tune(["lr=0.05,0.1"]), seed=7, rounds=2, confirm=1, confirm_seed=8)
    with pytest.raises(RuntimeError, match=r"no usable grid point for \[\('x',\)\]: every run"):
        tune(scenario, cells, tuning, tmp_path, _fake_runs({}))


def test_confirmation_options_are_checked() -> None:
    args = argparse.Namespace(tune=["lr=0.1,0.2"], tune_seed=None, tune_rounds=15,
                              tune_only=False, tune_confirm=3, tune_confirm_seed=None)
    tuning = tuning_from_args(args, [0, 1, 2])
    assert (tuning.seed, tuning.confirm, tuning.confirm_seed) == (3, 3, 4)
    for bad in ({"tune_confirm_seed": 3}, {"tune_confirm_seed": 1}, {"tune_confirm": -1}):
        with pytest.raises(ValueError, match="--tune-confirm"):
            tuning_from_args(argparse.Namespace(**{**vars(args), **bad}), [0, 1, 2])
    with pytest.raises(ValueError, match="need --tune"):
        tuning_from_args(argparse.Namespace(**{**vars(args), "tune": []}), [0, 1, 2])
    # Without a confirmation its seed is not checked (tuning seed 3, seed 4 in the sweep) ...
    plain = {**vars(args), "tune_seed": 3, "tune_confirm": 0}
    assert tuning_from_args(argparse.Namespace(**plain), [0, 1, 2, 4]).confirm == 0
    # ... and a confirmation seed without a confirmation is refused.
    with pytest.raises(ValueError, match="--tune-confirm-seed needs --tune-confirm"):
        tuning_from_args(argparse.Namespace(**{**plain, "tune_confirm_seed": 9}), [0, 1, 2])
    table = pd.DataFrame({"method": ["a", "a"], "lr": [0.1, 0.2], "chosen": [True, False],
                          "tuning-seed": 5, "horizon": 15})
    from_table = tuning_from_args(argparse.Namespace(**{**vars(args), "tune": []}), [0], table)
    assert (from_table.grid, from_table.seed, from_table.rounds, from_table.confirm_seed) == (
        {"lr": (0.1, 0.2)}, 5, 15, 6)


def test_tuning_seed_is_none_of_the_comparisons() -> None:
    args = argparse.Namespace(tune=["lr=0.1,0.2"], tune_seed=None, tune_rounds=15,
                              tune_only=False)
    assert tuning_from_args(args, [0, 1, 2]).seed == 3
    with pytest.raises(ValueError, match="not among the sweep's seeds"):
        tuning_from_args(argparse.Namespace(**{**vars(args), "tune_seed": 1}), [0, 1, 2])
    assert tuning_from_args(argparse.Namespace(**{**vars(args), "tune": []}), [0]) is None


def test_tuning_markdown_marks_choice_divergence_and_failure() -> None:
    table = pd.DataFrame({"cell-id": ["a", "b", "c"], "method": ["x", "x", "x"],
                          "lr": [0.1, 0.2, 0.4], "status": ["done", "done", "failed"],
                          "val-accuracy": [0.5, 0.75, np.nan], "diverged-clients": [0, 2, np.nan],
                          "chosen": [False, True, False]})
    lines = markdown_table(table).splitlines()
    assert lines[0] == "| method | lr 0.1 | lr 0.2 | lr 0.4 |"
    assert lines[2] == "| `x` | 50.0 | **75.0 (2d)** | failed |"


def test_a_finished_tuning_table_sets_each_methods_cells(tmp_path: Path) -> None:
    """--tuned runs every method at the point its table chose, typed as the key's default."""
    from simulations.sweep import tuned_cells
    scenario = Scenario("t", "", overrides={"dataset": "digits"},
                        axes=(grouped_axis("method", {"rankwise": {"strategy": "rankwise"},
                                                      "fjord": {"strategy": "fjord"}}),))
    table = pd.DataFrame({"method": ["rankwise", "rankwise", "fjord", "fjord"],
                          "lr": [0.05, 0.1, 0.05, 0.1], "momentum": [0.9, 0.0, 0.9, 0.0],
                          "val-accuracy": [0.8, 0.7, 0.6, 0.9],
                          "chosen": [True, False, False, True]})
    path = tmp_path / "table.csv"
    table.to_csv(path, index=False)
    cells, read = tuned_cells(scenario, build_cells(scenario, [0, 1], tmp_path), path)
    got = {(c.axes["method"], c.seed): (c.run_config["lr"], c.run_config["momentum"]) for c in cells}
    assert got == {("rankwise", 0): (0.05, 0.9), ("rankwise", 1): (0.05, 0.9),
                   ("fjord", 0): (0.1, 0.0), ("fjord", 1): (0.1, 0.0)}
    assert all(c.tuned == {"lr": c.run_config["lr"], "momentum": c.run_config["momentum"]}
               for c in cells)
    assert len(read) == 4
    table.loc[3, "chosen"] = False  # fjord has no choice left
    table.to_csv(path, index=False)
    with pytest.raises(ValueError, match=r"no chosen setting for \[\('fjord',\)\]"):
        tuned_cells(scenario, build_cells(scenario, [0], tmp_path), path)


@pytest.mark.parametrize("factor", [0.5, 1.0, -1.0])
def test_a_divergence_factor_a_healthy_client_would_trip_is_refused(factor: float) -> None:
    """At or under 1 the rule flags a client whose loss merely stays put (its recent mean equals
    its first steps' mean at step 5), so such factors are refused, naming the key."""
    with pytest.raises(ValueError, match="divergence-factor"):
        parse_run_config({"divergence-factor": factor})
    with pytest.raises(ValueError, match="divergence factor"):
        DivergenceCheck(factor)
    assert parse_run_config({"divergence-factor": 0.0}).divergence_factor == 0.0
    assert parse_run_config({"divergence-factor": 1.5}).divergence_factor == 1.5


def test_a_tuned_sweep_resumes_with_more_seeds(tmp_path: Path) -> None:
    """A finished cell made at its tuned lr is the same cell when the sweep is run again with
    --tuned and another seed: it is not refused as 'made with other settings'."""
    from simulations.scenarios import get_scenario
    from simulations.sweep import main, tuned_cells
    methods = [lv.label for lv in get_scenario("tiny").axes[0].levels]
    table = pd.DataFrame({"method": methods * 2, "lr": [0.1] * len(methods) + [0.05] * len(methods),
                          "chosen": [True] * len(methods) + [False] * len(methods)})
    table.to_csv(tmp_path / "table.csv", index=False)
    out = tmp_path / "sweep"
    cells, _ = tuned_cells(get_scenario("tiny"), build_cells(get_scenario("tiny"), [0], out),
                           tmp_path / "table.csv")
    done = RunStore(out / cells[0].cell_id)
    done.write_config(parse_run_config(cells[0].run_config).to_dict())
    done.save_checkpoint(1, {"w": np.zeros(1, F32)}, {})
    argv = ["tiny", "--runner", "inprocess", "--out", str(out), "--tuned",
            str(tmp_path / "table.csv"), "--dry-run"]
    assert main([*argv, "--seeds", "0,1"]) == 0
    table.loc[:, "chosen"] = ~table["chosen"]  # now the table says 0.05: the cell differs
    table.to_csv(tmp_path / "table.csv", index=False)
    with pytest.raises(SystemExit):
        main([*argv, "--seeds", "0,1"])
