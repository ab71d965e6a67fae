"""Maestro's full method in federation: shrinking, SVD start, importance allocation, baselines."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.numpy import save_file

from fl_maestro.config import parse_run_config
from fl_maestro.federation import run_federation, shrink_arrays
from fl_maestro.models import (build_model, dense_state, load_dense_state, model_arrays,
                               model_from_arrays)
from fl_maestro.plans import plan_ranks, takes_part
from fl_maestro.results import RunStore
from simulations.inprocess import InProcessGrid

SHAPE = (1, 8, 8)


def _cnn(seed: int = 0):
    torch.manual_seed(seed)
    return build_model("cnn", SHAPE, 10)


def test_shrinking_cuts_exactly_the_components_under_the_threshold():
    model = _cnn()
    with torch.no_grad():  # make components 5.. of conv2 and 20.. of fc tiny
        model.conv2.V[5:] *= 1e-6
        model.conv2.U[:, 5:] *= 1e-6
        model.fc.V[20:] *= 1e-6
        model.fc.U[:, 20:] *= 1e-6
    shrunk = shrink_arrays(model_arrays(model), threshold=1e-4)
    assert shrunk["conv2.V"].shape[0] == 5 and shrunk["conv2.U"].shape[1] == 5
    assert shrunk["fc.V"].shape[0] == 20 and shrunk["fc.U"].shape[1] == 20
    small = model_from_arrays("cnn", SHAPE, 10, shrunk)
    x = torch.randn(16, *SHAPE)
    model.set_ranks({"conv2": 5, "fc": 20})
    torch.testing.assert_close(small(x), model(x), rtol=0, atol=1e-6)


def test_shrinking_never_drops_a_layer_below_rank_one():
    shrunk = shrink_arrays(model_arrays(_cnn()), threshold=1e9)
    assert shrunk["conv2.V"].shape[0] == 1 and shrunk["fc.U"].shape[1] == 1


def test_dense_state_round_trips_through_svd_init():
    source, target = _cnn(0), _cnn(1)
    load_dense_state(target, dense_state(source))
    x = torch.randn(8, *SHAPE)
    torch.testing.assert_close(target(x), source(x), rtol=1e-4, atol=1e-4)


def test_dense_state_of_another_architecture_is_refused():
    state = dense_state(_cnn())
    state.pop("fc.bias")
    with pytest.raises(ValueError, match="fc.bias"):
        load_dense_state(_cnn(), state)


def test_plans_of_the_baselines():
    model = _cnn()
    tiers = [0.25, 0.5, 1.0]
    full = model.max_ranks()
    assert plan_ranks("fedavg-full", model, 0.25, tiers) == full
    smallest = plan_ranks("fedavg-smallest", model, 1.0, tiers)
    assert smallest == plan_ranks("rankwise", model, 0.25, tiers)
    assert model.cost(smallest) <= 0.25 * model.cost()
    assert not takes_part("fedavg-exclusive", 0.5) and takes_part("fedavg-exclusive", 1.0)
    assert takes_part("rankwise", 0.25)


def _overrides(tmp_path, **extra) -> dict:
    return {"dataset": "digits", "num-rounds": 2, "clients-per-round": 4, "partitioner": "iid",
            "device-mix": "0.25:0.5,1.0:0.5", "results-dir": str(tmp_path), "run-name": "run",
            "eval-samples": 60, "eval-fractions": "0.5,1.0", **extra}


def _run(tmp_path, nodes: int = 4, **extra) -> RunStore:
    overrides = _overrides(tmp_path, **extra)
    run_federation(InProcessGrid(nodes, overrides), parse_run_config(overrides))
    return RunStore(tmp_path / "run")


@pytest.mark.parametrize("strategy", ["fedavg-full", "fedavg-smallest", "fedavg-exclusive",
                                      "fjord", "heterofl"])
def test_each_baseline_runs_end_to_end(tmp_path, strategy):
    store = _run(tmp_path, strategy=strategy)
    clients = store.read("clients")
    assert len(store.read("rounds")) == 2 and len(clients) > 0
    if strategy == "fedavg-exclusive":
        assert set(clients["budget"]) == {1.0}
    elif strategy in ("fjord", "heterofl"):  # width slices sized to each budget
        by_budget = clients.groupby("budget")["bytes-down"]
        assert by_budget.max()[0.25] < by_budget.min()[1.0]
    else:
        assert clients["bytes-down"].nunique() == 1  # one model size for every device
    tiers = store.read("evaluation").query("kind == 'tier' and metric == 'relative-macs'")
    final = tiers[tiers["round"] == 2].set_index("level")["value"]
    if strategy == "fedavg-full":
        assert (final == 1.0).all()  # the upper bound ignores the budgets, and says so
    if strategy == "fedavg-smallest":
        assert final[0.25] == final[1.0] <= 0.25
    if strategy in ("fjord", "heterofl"):
        # Budgets are fractions of the factorised model's cost for every strategy, so a width
        # client gets the MACs a rank-wise client of its tier gets, capped at the dense model.
        dense = store.read("evaluation").query("kind == 'tier' and metric == 'dense-relative-macs'")
        dense = dense[dense["round"] == 2].set_index("level")["value"]
        assert final[0.25] <= 0.25 and dense[1.0] == 1.0


@pytest.mark.parametrize("key, value", [("hgl-lambda", 1e-3), ("shrink-every", 2),
                                        ("rank-allocation", "importance"), ("init", "svd:x")])
def test_width_baselines_refuse_factor_only_settings(key, value):
    with pytest.raises(ValueError, match=key):
        parse_run_config({"strategy": "fjord", key: value})


def test_progressive_shrinking_shrinks_messages_and_resumes(tmp_path):
    extra = {"shrink-every": 1, "shrink-threshold": 1e9, "num-rounds": 2}
    store = _run(tmp_path, **extra)
    rounds = store.read("rounds")
    clients = store.read("clients")
    assert rounds["global-params"].iloc[-1] < build_model("cnn", SHAPE, 10).cost(kind="params")
    assert clients[clients["round"] == 2]["bytes-down"].max() < \
        clients[clients["round"] == 1]["bytes-down"].min()
    _, arrays, _ = store.load_checkpoint()
    assert arrays["conv2.V"].shape[0] == 1  # the checkpoint carries the shrunk shapes
    resumed = _overrides(tmp_path, **{**extra, "num-rounds": 3, "resume": True})
    run_federation(InProcessGrid(4, resumed), parse_run_config(resumed))
    assert store.checkpoint_round() == 3


def test_svd_init_starts_from_the_dense_model(tmp_path):
    dense = dense_state(_cnn(7))
    path = tmp_path / "dense.safetensors"
    save_file({k: np.ascontiguousarray(v) for k, v in dense.items()}, str(path))
    store = _run(tmp_path, **{"init": f"svd:{path}", "num-rounds": 1})
    initial = store.read("evaluation").query("round == 0 and kind == 'fraction' and level == 1.0")
    reference = _cnn(7)
    from fl_maestro.data import load_dataset, make_loader
    from fl_maestro.training import evaluate
    _, _, x, y = load_dataset("digits")
    order = np.random.default_rng(0).permutation(len(y))[:60]
    expected = evaluate(reference, make_loader(x, y, np.sort(order), batch_size=500))
    got = initial.set_index("metric")["value"]
    assert got["accuracy"] == pytest.approx(expected["accuracy"])
    assert got["loss"] == pytest.approx(expected["loss"], rel=1e-4)


def test_importance_allocation_runs_from_the_run_config(tmp_path):
    store = _run(tmp_path, **{"rank-allocation": "importance", "num-rounds": 1})
    tiers = store.read("evaluation").query("kind == 'tier' and metric == 'relative-macs'")
    assert (tiers[tiers["level"] == 0.25]["value"] <= 0.25).all()
