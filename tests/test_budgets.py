"""Budgets to ranks (uniform and importance), bad budgets, device mixes and their assignment."""

from __future__ import annotations

import math
import re

import numpy as np
import pytest
import torch

from fl_maestro.budgets import assign_budgets, check_budget, parse_mix, ranks_for_budget
from fl_maestro.models import CNN, MLP, at_ranks, build_model
from fl_maestro.shrinking import importance

METHODS = ("uniform", "importance")
COSTS = ("macs", "params")
# Budgets are fractions of the dense CNN's cost. The CNN (ranks capped at the dense cost: conv2 52,
# fc 122) at rank 1 everywhere costs 299_328 / 4_241_152 = 0.071 of the dense MACs and
# 5_418 / 421_642 = 0.013 of its parameters (counts in test_models.py), so budgets from 0.08 run.
BUDGETS = [ 0.1, 0.13, 0.17, 0.2, 0.25, 0.3, 0.37, 0.45, 0.5, 0.55, 0.62, 0.7, 0.8,
           0.9, 0.95, 0.99, 1.0]


@pytest.fixture(scope="module")
def cnn() -> CNN:
    torch.manual_seed(0)  # the layers' SVD init of a random dense layer gives a decaying spectrum
    return build_model("cnn", (1, 28, 28), 10)


# --------------------------------------------------------------------------- ranks_for_budget


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("cost", COSTS)
def test_never_exceeds_the_budget(cnn: CNN, method: str, cost: str) -> None:
    full = cnn.dense_cost(cost)
    for budget in BUDGETS:
        ranks = ranks_for_budget(cnn, budget, method, cost)
        assert set(ranks) == {"conv2", "fc"}
        assert all(1 <= ranks[n] <= r for n, r in cnn.max_ranks().items())
        spent = cnn.cost(ranks, cost)
        assert spent <= budget * full, f"{method}/{cost} at {budget}: {spent / full:.4f} of full"


def test_uniform_by_hand_at_half_the_macs(cnn: CNN) -> None:
    # MACs(p) = 225_792 + 1_280 + 68_992 * ceil(52 p) + 3_264 * ceil(122 p) <= 0.5 * 4_241_152
    # (the dense CNN), so the low-rank share may be 1_893_504:
    #   p = 57/122: ceil(24.3) = 25, 57 -> 1_910_848 does not fit
    #   p = 24/52: 24, ceil(56.3) = 57 -> 1_841_856 fits, the largest candidate that does
    assert ranks_for_budget(cnn, 0.5, "uniform", "macs") == {"conv2": 24, "fc": 57}


@pytest.mark.parametrize("cost", COSTS)
def test_uniform_is_a_common_fraction_and_monotone(cnn: CNN, cost: str) -> None:
    previous = {"conv2": 0, "fc": 0}
    for budget in BUDGETS:
        ranks = ranks_for_budget(cnn, budget, "uniform", cost)
        p = min(ranks[n] / r for n, r in cnn.max_ranks().items())
        assert ranks == cnn.ranks_at_fraction(p), f"{ranks} is not one fraction at {budget}"
        assert all(ranks[n] >= previous[n] for n in ranks), f"{previous} -> {ranks} at {budget}"
        previous = ranks


@pytest.mark.parametrize("cost", COSTS)
def test_importance_is_monotone_and_maximal(cnn: CNN, cost: str) -> None:
    full, previous = cnn.dense_cost(cost), 0
    for budget in BUDGETS:
        ranks = ranks_for_budget(cnn, budget, "importance", cost)
        spent = cnn.cost(ranks, cost)
        assert spent >= previous, f"cost fell from {previous} to {spent} at budget {budget}"
        previous = spent
        for name, r in ranks.items():  # greedy stops only when no further component fits
            if r < cnn.max_ranks()[name]:
                assert cnn.cost({**ranks, name: r + 1}, cost) > budget * full


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("cost", COSTS)
def test_full_budget_gives_full_ranks(cnn: CNN, method: str, cost: str) -> None:
    assert ranks_for_budget(cnn, 1.0, method, cost) == {"conv2": 52, "fc": 122}
    assert ranks_for_budget(cnn, 1, method, cost) == {"conv2": 52, "fc": 122}


def test_budget_below_the_smallest_model_raises(cnn: CNN) -> None:
    with pytest.raises(ValueError, match=r"0\.05 is below .*0\.0706"):
        ranks_for_budget(cnn, 0.05, "uniform", "macs")
    assert ranks_for_budget(cnn, 0.05, "uniform", "params")  # 0.013 of the params fits


@pytest.mark.parametrize("bad", [0, -0.1, 1.5, True, float("nan"), "0.5", None])
def test_bad_budget_raises_naming_the_value(cnn: CNN, bad) -> None:
    message = re.escape(repr(bad)) + r" is out of range: allowed \(0, 1\]"
    with pytest.raises(ValueError, match=message):
        ranks_for_budget(cnn, bad)
    with pytest.raises(ValueError, match=re.escape(repr(bad))):
        check_budget(bad)


def test_bad_method_and_cost_kind_raise(cnn: CNN) -> None:
    with pytest.raises(ValueError, match="'greedy'.*uniform"):
        ranks_for_budget(cnn, 0.5, "greedy")
    with pytest.raises(ValueError, match="'flops'.*macs"):
        ranks_for_budget(cnn, 0.5, cost="flops")


def _lopsided_mlp() -> MLP:
    """hidden.0 has singular values 10, 8 and 38 x 0.01; hidden.1 a flat spectrum of 40 ones."""
    torch.manual_seed(0)
    model = MLP(input_shape=(40,), num_classes=10, hidden=(40, 40))
    g = torch.Generator().manual_seed(1)
    p, _ = torch.linalg.qr(torch.randn(40, 40, generator=g))
    q, _ = torch.linalg.qr(torch.randn(40, 40, generator=g))
    steep = torch.cat([torch.tensor([10.0, 8.0]), torch.full((38,), 0.01)])
    model.hidden[0].set_dense_weight((p * steep) @ q.T)
    p, _ = torch.linalg.qr(torch.randn(40, 40, generator=g))
    q, _ = torch.linalg.qr(torch.randn(40, 40, generator=g))
    model.hidden[1].set_dense_weight(p @ q.T)  # every singular value 1
    return model


def test_importance_beats_uniform_on_a_lopsided_model() -> None:
    model = _lopsided_mlp()
    x = torch.randn(512, 40, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        reference = model(x)

    def output_error(ranks: dict[str, int]) -> float:
        with torch.no_grad(), at_ranks(model, ranks):
            return ((model(x) - reference).norm() / reference.norm()).item()

    def kept_importance(ranks: dict[str, int]) -> float:
        # importance[j] is the tail sum of singular values from j, so importance[0] - importance[r]
        # is the part the first r components carry; sum the retained share over layers
        total = 0.0
        for name, layer in model.low_rank_layers().items():
            imp = np.append(importance(layer), 0.0)
            total += (imp[0] - imp[ranks[name]]) / imp[0]
        return total

    # Each component costs 40 + 40 MACs in either layer, the dense classifier 400: full 6_800,
    # budget 3_400 (half of this uncapped model's own full-rank cost, as reference_cost). Uniform: 18 + 18 components (3_280). Importance (tail sums of singular values):
    # hidden.0 [18.38, 8.38, 0.38, ...], hidden.1 [40, 39, ..., 1]; from rank 1 each (560 spent) the
    # greedy adds 35 components: hidden.1 j = 1..31 (39..9), hidden.0 j = 1 (8.38), hidden.1 32..34.
    uniform = ranks_for_budget(model, 0.5, "uniform", reference_cost=model.cost())
    by_importance = ranks_for_budget(model, 0.5, "importance", reference_cost=model.cost())
    assert uniform == {"hidden.0": 18, "hidden.1": 18}
    assert by_importance == {"hidden.0": 2, "hidden.1": 35}
    e_uni, e_imp = output_error(uniform), output_error(by_importance)
    k_uni, k_imp = kept_importance(uniform), kept_importance(by_importance)
    assert e_imp < 0.8 * e_uni, f"output error: importance {e_imp:.4f} vs uniform {e_uni:.4f}"
    assert k_imp > k_uni, f"importance kept: importance {k_imp:.4f} vs uniform {k_uni:.4f}"


# --------------------------------------------------------------------------- device mixes


def test_parse_mix_sorts_by_budget() -> None:
    assert parse_mix("1.0:0.5, 0.2:0.25,0.5:0.25") == [(0.2, 0.25), (0.5, 0.25), (1.0, 0.5)]
    assert parse_mix("1:1") == [(1.0, 1.0)]


@pytest.mark.parametrize(("mix", "named"), [
    ("", "''"),
    ("   ", "'   '"),
    ("0.2", "'0.2'"),
    ("a:b", "'a:b'"),
    ("0.2:0.5:1", "'0.2:0.5:1'"),
    ("0.2:0.5,0.2:0.5", "budget 0.2 twice"),
    ("0.2:0.3,1.0:0.3", "sum to 0.6"),
    ("1.2:1.0", "1.2"),
    ("0:1.0", "budget 0.0"),
    ("0.5:0,1.0:1.0", "share 0.0"),
    ("0.5:1.5", "share 1.5"),
])
def test_malformed_mix_raises_naming_the_value(mix: str, named: str) -> None:
    with pytest.raises(ValueError, match=re.escape(named)):
        parse_mix(mix)


def test_parse_mix_rejects_non_string() -> None:
    with pytest.raises(ValueError, match="None"):
        parse_mix(None)


def test_assign_budgets_counts_by_largest_remainder() -> None:
    rng = np.random.default_rng(0)
    # five equal tiers, 7 clients: 1.4 each -> 1 each; the 2 left go to the first two (equal
    # remainders, stable order)
    mix = "0.2:0.2,0.4:0.2,0.6:0.2,0.8:0.2,1.0:0.2"
    budgets = assign_budgets(mix, 7, rng)
    assert len(budgets) == 7
    values, counts = np.unique(budgets, return_counts=True)
    assert dict(zip(values.tolist(), counts.tolist())) == {0.2: 2, 0.4: 2, 0.6: 1, 0.8: 1, 1.0: 1}
    # shares 0.5/0.3/0.2 of 7 clients: 3.5, 2.1, 1.4 -> 3, 2, 1 and the one left to the .5 remainder
    budgets = assign_budgets("0.25:0.5,0.5:0.3,1.0:0.2", 7, rng)
    values, counts = np.unique(budgets, return_counts=True)
    assert dict(zip(values.tolist(), counts.tolist())) == {0.25: 4, 0.5: 2, 1.0: 1}
    # every client is assigned even when a share rounds to nothing
    assert sorted(assign_budgets("0.2:0.9,1.0:0.1", 3, rng).tolist()) == [0.2, 0.2, 0.2]


def test_assign_budgets_is_seeded() -> None:
    mix = "0.2:0.2,0.4:0.2,0.6:0.2,0.8:0.2,1.0:0.2"
    a = assign_budgets(mix, 20, np.random.default_rng(7))
    b = assign_budgets(mix, 20, np.random.default_rng(7))
    c = assign_budgets(mix, 20, np.random.default_rng(8))
    assert a.tolist() == b.tolist()
    assert a.tolist() != c.tolist()
    assert sorted(a.tolist()) == sorted(c.tolist())  # same counts, different order


def test_assign_budgets_accepts_parsed_pairs() -> None:
    pairs = parse_mix("0.5:0.5,1.0:0.5")
    budgets = assign_budgets(pairs, 4, np.random.default_rng(0))
    assert sorted(budgets.tolist()) == [0.5, 0.5, 1.0, 1.0]


@pytest.mark.parametrize("bad", [0, -3, True, 2.0])
def test_assign_budgets_rejects_bad_client_count(bad) -> None:
    with pytest.raises(ValueError, match=re.escape(repr(bad))):
        assign_budgets("1.0:1.0", bad, np.random.default_rng(0))


def test_hand_counts_used_above() -> None:
    assert 225_792 + 68_992 + 3_264 + 1_280 == 299_328 and math.isclose(299_328 / 5_060_352, 0.0592,
                                                                          abs_tol=1e-4)
    assert 320 + (352 + 64) + (3_264 + 128) + 1_290 == 5_418


def test_numpy_budgets_are_numbers_too() -> None:
    assert check_budget(np.float32(0.5)) == 0.5
