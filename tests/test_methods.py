"""Maestro's full method in federation: shrinking, SVD start, importance allocation, baselines."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.numpy import save_file

from conftest import overrides, run

from fl_maestro.budgets import ranks_for_budget
from fl_maestro.config import parse_run_config
from fl_maestro.federation import initial_arrays, run_federation, shrink_arrays
from fl_maestro.models import (MLP, build_model, dense_state, load_dense_state, model_arrays,
                               model_from_arrays)
from fl_maestro.shrinking import importance, tail_constants
from strategies.merge import prefix_arrays
from strategies.records import nbytes
from fl_maestro.methods import Planning, get_method
from fl_maestro.results import RunStore
from fl_maestro.width import build_width_model
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


def plan_ranks(strategy: str, model, budget: float, tiers) -> dict[str, int]:
    """The ranks ``strategy`` gives a device of ``budget`` among ``tiers`` (round 1)."""
    return get_method(strategy).plan(model, budget, Planning(tuple(tiers)))


def takes_part(strategy: str, budget: float) -> bool:
    return get_method(strategy).takes_part(budget)


def test_plans_of_the_baselines():
    model = _cnn()
    tiers = [0.25, 0.5, 1.0]
    full = model.max_ranks()
    assert plan_ranks("fedavg-full", model, 0.25, tiers) == full
    smallest = plan_ranks("fedavg-smallest", model, 1.0, tiers)
    assert smallest == plan_ranks("rankwise", model, 0.25, tiers)
    assert model.cost(smallest) <= 0.25 * model.dense_cost()
    assert not takes_part("fedavg-exclusive", 0.5) and takes_part("fedavg-exclusive", 1.0)
    assert takes_part("rankwise", 0.25)


@pytest.mark.parametrize("strategy", ["fedavg-full", "fedavg-full-factors", "fedavg-smallest",
                                      "fedavg-exclusive", "fjord", "heterofl", "fedrolex"])
def test_each_baseline_runs_end_to_end(tmp_path, strategy):
    # fedavg-exclusive: only the 2 budget-1.0 nodes of 4 take part (more per round is refused).
    per_round = {"clients-per-round": 2} if strategy == "fedavg-exclusive" else {}
    store = run(tmp_path, strategy=strategy, **per_round)
    clients = store.read("clients")
    assert len(store.read("rounds")) == 2 and len(clients) > 0
    if strategy == "fedavg-exclusive":
        assert set(clients["budget"]) == {1.0}
    elif strategy in ("fjord", "heterofl", "fedrolex"):  # width slices sized to each budget
        by_budget = clients.groupby("budget")["bytes-down"]
        assert by_budget.max()[0.25] < by_budget.min()[1.0]
    else:
        assert clients["bytes-down"].nunique() == 1  # one model size for every device
    tiers = store.read("evaluation").query("kind == 'tier' and metric == 'dense-relative-macs'")
    final = tiers[tiers["round"] == 2].set_index("level")["value"]
    if strategy == "fedavg-full":  # the upper bound ignores the budgets: the dense model
        assert final[0.25] == final[1.0] == 1.0
    if strategy == "fedavg-full-factors":  # ... or the factorised model at its maximum ranks
        assert final[0.25] == final[1.0] == _cnn().cost() / _cnn().dense_cost()
    if strategy == "fedavg-smallest":
        assert final[0.25] == final[1.0] <= 0.25
    if strategy in ("fjord", "heterofl", "fedrolex"):
        # Budgets are fractions of the dense model's cost for every strategy, so a width client
        # gets the MACs a rank-wise client of its tier gets; budget 1.0 is the dense model.
        assert final[0.25] <= 0.25 and final[1.0] == 1.0


@pytest.mark.parametrize("key, value", [("hgl-lambda", 1e-3), ("shrink-every", 2),
                                        ("rank-allocation", "importance"), ("init", "svd:x")])
def test_width_baselines_refuse_factor_only_settings(key, value):
    with pytest.raises(ValueError, match=key):
        parse_run_config({"strategy": "fjord", key: value})


def test_progressive_shrinking_shrinks_messages_and_resumes(tmp_path):
    extra = {"shrink-every": 1, "shrink-threshold": 1e9, "num-rounds": 2}
    store = run(tmp_path, **extra)
    rounds = store.read("rounds")
    clients = store.read("clients")
    assert rounds["global-params"].iloc[-1] < build_model("cnn", SHAPE, 10).cost(kind="params")
    assert clients[clients["round"] == 2]["bytes-down"].max() < \
        clients[clients["round"] == 1]["bytes-down"].min()
    _, arrays, _ = store.load_checkpoint()
    assert arrays["conv2.V"].shape[0] == 1  # the checkpoint carries the shrunk shapes
    resumed = overrides(tmp_path, **{**extra, "num-rounds": 3, "resume": True})
    run_federation(InProcessGrid(4, resumed), parse_run_config(resumed))
    assert store.checkpoint_round() == 3


def test_svd_init_starts_from_the_dense_model(tmp_path):
    dense = dense_state(_cnn(7))
    path = tmp_path / "dense.safetensors"
    save_file({k: np.ascontiguousarray(v) for k, v in dense.items()}, str(path))
    store = run(tmp_path, **{"init": f"svd:{path}", "num-rounds": 1})
    initial = store.read("evaluation").query("round == 0 and kind == 'fraction' and level == 1.0")
    reference = _cnn(7)
    from fl_maestro.data import load_dataset, make_loader
    from fl_maestro.federation import evaluation_subset
    from fl_maestro.training import evaluate
    _, _, x, y = load_dataset("digits")
    order = evaluation_subset(0, len(y), 60)  # the run's evaluation stream of seed 0
    expected = evaluate(reference, make_loader(x, y, np.sort(order), batch_size=500))
    got = initial.set_index("metric")["value"]
    assert got["accuracy"] == pytest.approx(expected["accuracy"])
    assert got["loss"] == pytest.approx(expected["loss"], rel=1e-4)


def test_importance_allocation_runs_from_the_run_config(tmp_path):
    """The federation sends a 0.25 device exactly the importance allocation of the global model,
    which here is not the uniform one (so a fall-back to uniform fails this)."""
    extra = {"rank-allocation": "importance", "num-rounds": 1}
    store = run(tmp_path, **extra)
    start = initial_arrays(parse_run_config(overrides(tmp_path, **extra)))
    model = model_from_arrays("cnn", SHAPE, 10, start)
    by_importance = ranks_for_budget(model, 0.25, "importance")
    assert by_importance != ranks_for_budget(model, 0.25, "uniform")
    sent = store.read("clients").query("budget == 0.25")["bytes-down"]
    assert len(sent) and (sent == nbytes(prefix_arrays(start, by_importance))).all()
    tiers = store.read("evaluation").query("kind == 'tier' and metric == 'dense-relative-macs'")
    assert (tiers[tiers["level"] == 0.25]["value"] <= 0.25).all()


def _diagonal_factors(layer, strengths) -> None:
    """Component j of ``layer`` = (s_j e_j, s_j e_j): importance_j = sum_{i >= j} s_i^2."""
    with torch.no_grad():
        layer.U.zero_()
        layer.V.zero_()
        for j, s in enumerate(strengths):
            layer.U[j, j] = layer.V[j, j] = s


def test_importance_allocation_matches_a_hand_computed_greedy():
    """Maestro's greedy: the next component of most importance per unit of cost, until the budget.

    hidden.0 (6 -> 6, 12 MACs a component) has importances 155, 55, 30, 14, 5, 1; hidden.1
    (6 -> 18, 24 MACs a component) 300, 100, 50, 20, 4, 1. Dense cost 36 + 108 + 36 = 180, so
    budget 0.55 allows 99 MACs; rank 1 everywhere with the classifier costs 72. Per MAC the
    next components rank A1 55/12 > B1 100/24 > A2 30/12 > ...: A1 (84), B1 would make 108 and
    drops out, A2 (96), A3 would make 108: {hidden.0: 3, hidden.1: 1}. (By importance alone:
    B1 first, {1, 2}; uniform: {1, 1}.)
    """
    model = MLP((1, 1, 6), 2, hidden=(6, 18))
    _diagonal_factors(model.hidden[0], np.sqrt([100, 25, 16, 9, 4, 1]))
    _diagonal_factors(model.hidden[1], np.sqrt([200, 50, 30, 16, 3, 1]))
    np.testing.assert_allclose(importance(model.hidden[0]), [155, 55, 30, 14, 5, 1])
    np.testing.assert_allclose(importance(model.hidden[1]), [300, 100, 50, 20, 4, 1])
    assert model.dense_cost() == 180
    assert ranks_for_budget(model, 0.55, "importance") == {"hidden.0": 3, "hidden.1": 1}
    assert ranks_for_budget(model, 0.55, "uniform") == {"hidden.0": 1, "hidden.1": 1}


def _captured_training(tmp_path, monkeypatch, **extra) -> list[dict]:
    """Run one round and record what every client's ``train`` call was given."""
    import fl_maestro.client_app as client_app
    calls, real_train = [], client_app.train

    def spy(model, loader, recipe, max_ranks, **kwargs):
        given = {k: v for k, v in vars(recipe).items() if v is not None}
        calls.append({**given, "max_ranks": dict(max_ranks), "hgl": recipe.hgl_lambda,
                      "scales": {n: getattr(m, "train_scale", None)
                                 for n, m in model.ranked_layers().items()}})
        return real_train(model, loader, recipe, max_ranks, **kwargs)
    monkeypatch.setattr(client_app, "train", spy)
    run(tmp_path, **{"num-rounds": 1, **extra})
    return calls


@pytest.mark.parametrize("strategy", ["fedavg-full", "fedavg-smallest", "fedavg-exclusive",
                                      "heterofl"])
def test_plain_sgd_strategies_train_without_dropout_or_distillation(tmp_path, monkeypatch,
                                                                   strategy):
    # fedavg-exclusive: only the 2 budget-1.0 nodes of 4 take part (more per round is refused).
    per_round = {"clients-per-round": 2} if strategy == "fedavg-exclusive" else {}
    calls = _captured_training(tmp_path, monkeypatch, strategy=strategy, **per_round)
    assert calls and all(c["sampler"] == "none" and c["distill"] is False and c["hgl"] == 0
                         for c in calls)


def test_rankwise_trains_with_the_configured_sampler_and_maestros_loss(tmp_path, monkeypatch):
    extra = {"hgl-lambda": 1e-3, "sampler": "independent"}
    calls = _captured_training(tmp_path, monkeypatch, **extra)
    assert calls and all(c["sampler"] == "independent" and c["distill"] is True
                         and c["hgl"] == 1e-3 for c in calls)
    # HGL's groups are the global ones: each client got the squared norms past its ranks
    start = initial_arrays(parse_run_config(overrides(tmp_path, **extra)))
    assert {c["max_ranks"]["fc"] for c in calls} == {plan_ranks("rankwise", _cnn(), b, [])["fc"]
                                                     for b in (0.25, 1.0)}
    for c in calls:
        expected = tail_constants(start, c["max_ranks"])
        assert c["hgl_beyond"].keys() == expected.keys()
        for name, pair in expected.items():
            np.testing.assert_allclose(c["hgl_beyond"][name], pair, rtol=1e-12)


def test_heterofl_trains_with_its_masked_loss_and_scaler(tmp_path, monkeypatch):
    """HeteroFL: the classes of the client's own data, and no scaler in the CNN, which has no
    norm layer for the scaler to precede (``width.set_scaler``)."""
    calls = _captured_training(tmp_path, monkeypatch, strategy="heterofl",
                               partitioner="pathological", **{"classes-per-client": 2})
    full = build_width_model("cnn", SHAPE, 10, device="meta").max_ranks()
    assert {c["max_ranks"]["fc"] for c in calls} == {full["fc"], plan_ranks(
        "heterofl", build_width_model("cnn", SHAPE, 10, device="meta"), 0.25, [])["fc"]}
    for c in calls:
        assert len(c["classes"]) == 2 and set(c["classes"]) <= set(range(10))
        assert all(v == 1.0 for v in c["scales"].values())
        assert c["clip_grad_norm"] == 1.0  # HeteroFL's code clips every step to norm 1
    clients = RunStore(tmp_path / "run").read("clients")
    assert len(clients) == len(calls)  # every reply's classes were accepted for the merge


@pytest.mark.parametrize("switch", ["heterofl-masked-loss", "heterofl-scaler"])
def test_heterofl_simplifications_are_switches(tmp_path, monkeypatch, switch):
    calls = _captured_training(tmp_path, monkeypatch, strategy="heterofl", **{switch: False})
    full = build_width_model("cnn", SHAPE, 10, device="meta").max_ranks()
    assert any(c["max_ranks"] != full for c in calls)
    for c in calls:
        if switch == "heterofl-masked-loss":
            assert "classes" not in c
        else:
            assert "classes" in c and all(v == 1.0 for v in c["scales"].values())


@pytest.mark.parametrize("kd", [False, True])
def test_fjord_draws_from_the_tiers_it_affords(tmp_path, monkeypatch, kd):
    """FjORD: every step one tier p <= p_max, for every layer; a 1.0 device draws both tiers'
    widths, a 0.25 device only its own; the KD switch turns on the distilling loss."""
    calls = _captured_training(tmp_path, monkeypatch, strategy="fjord", **{"fjord-kd": kd})
    width = build_width_model("cnn", SHAPE, 10, device="meta")  # budgets: of its dense cost
    tiers = {b: plan_ranks("fjord", width, b, [0.25, 1.0]) for b in (0.25, 1.0)}
    rng = np.random.default_rng(0)
    seen_by_cap: dict[tuple, set] = {}
    for call in calls:
        assert call["distill"] is kd and call["hgl"] == 0
        draws = {tuple(sorted(call["sampler"](call["max_ranks"], rng).items())) for _ in range(60)}
        seen_by_cap.setdefault(tuple(sorted(call["max_ranks"].items())), set()).update(draws)
    as_key = lambda r: tuple(sorted(r.items()))  # noqa: E731
    assert seen_by_cap[as_key(tiers[1.0])] == {as_key(tiers[0.25]), as_key(tiers[1.0])}
    assert seen_by_cap[as_key(tiers[0.25])] == {as_key(tiers[0.25])}
