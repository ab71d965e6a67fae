"""The comparison-cost benchmark's arithmetic and its judgement of runs (no timings asserted)."""

from __future__ import annotations

import pandas as pd
import pytest

from fl_maestro.results import RunStore
from simulations.bench_comparison import (HERE, comparison_methods, projected_cell, run_method,
                                          summary)
from simulations.bench_federation import check_finished
from simulations.bench_throughput import judge_inprocess

DIGITS = {"dataset": "digits", "clients-per-round": 3, "eval-samples": 100,
          "device-mix": "0.5:0.5,1.0:0.5", "partitioner": "iid"}


def test_projection_by_hand() -> None:
    """100 rounds, evaluation every 5: rounds 0, 5, ..., 95 on the subset (20), the last on all."""
    costs = {"start-cpu": 7.0, "training-cpu-per-round": 3.0, "framework-cpu-per-round": 0.1,
             "evaluation-cpu-per-eval": 0.5, "final-evaluation-cpu": 4.0}
    assert projected_cell(costs) == pytest.approx(7 + 100 * 3.1 + 20 * 0.5 + 4)
    assert projected_cell(costs, rounds=10, eval_every=1) == pytest.approx(7 + 31 + 10 * 0.5 + 4)


def test_methods_are_the_comparison_scenarios() -> None:
    methods = comparison_methods()
    assert methods["rankwise-plain-od"] == {"strategy": "rankwise", "distill": False}
    assert methods["fedrolex"] == {"strategy": "fedrolex"}
    assert methods["fedavg-full"] == {"strategy": "fedavg-full"}
    assert len(methods) == 11  # the comparison's methods, FedRolex and the dense FedAvg among them


def test_a_diverging_run_is_recorded_as_failed_and_a_finished_one_costed(tmp_path) -> None:
    """A forced failure: at lr 1e9 every reply is NaN, refused, and min-reply-share stops the run."""
    failed = run_method(HERE, tmp_path, "nan", {**DIGITS, "lr": 1e9}, rounds=2, nodes=4)
    assert failed == {"failed": True, "reason": "exit code 1"}
    done = run_method(HERE, tmp_path, "ok", DIGITS, rounds=2, nodes=4)
    assert not done["failed"]
    for key in ("training-cpu-per-round", "evaluation-cpu-per-eval", "final-evaluation-cpu",
                "framework-cpu-per-round", "start-cpu"):
        assert done[key] > 0, key
    frame = pd.DataFrame([{"code": "this", "method": "a", **failed},
                          {"code": "this", "method": "b", **done,
                           "projected-cell-cpu": projected_cell(done)}])
    text = summary(frame, 2)
    assert "this a: the run FAILED (exit code 1); not costed." in text
    assert "not projected: a method's run failed" in text


def test_every_benchmark_judges_runs_as_the_launcher_does(tmp_path) -> None:
    """``flwr run --stream`` exits 0 when the ServerApp fails: Flower's status says so."""
    overrides = {"results-dir": str(tmp_path), "run-name": "x", "num-rounds": 2}
    with pytest.raises(RuntimeError, match="finished:failed"):
        check_finished(0, overrides, "finished:failed")
    with pytest.raises(RuntimeError, match="no run folder|did not finish"):
        check_finished(0, overrides, "finished:completed")  # completed, but no rounds on disk
    assert judge_inprocess(0, RunStore(tmp_path / "x"), 2) == "no checkpoint of round 2"
    assert judge_inprocess(3, RunStore(tmp_path / "x"), 2) == "exit code 3"


def test_only_this_checkouts_failures_fail_the_benchmark() -> None:
    """A base checkout that predates a method fails on it: listed, not costed, not an error."""
    from simulations.bench_comparison import exit_code
    rows = [{"code": "this", "method": "a", "failed": False},
            {"code": "base", "method": "a", "failed": True}]
    assert exit_code(pd.DataFrame(rows)) == 0
    rows.append({"code": "this", "method": "b", "failed": True})
    assert exit_code(pd.DataFrame(rows)) == 1
