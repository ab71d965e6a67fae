"""One seed, independent named streams: budgets, sampling, evaluation, partitions, shuffles."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import overrides

from fl_maestro import streams
from fl_maestro.budgets import assign_budgets
from fl_maestro.config import parse_run_config
from fl_maestro.federation import Federation, evaluation_subset, node_budgets

NAMES = ("budgets", "sampling", "evaluation", "partition", "shuffle", "training", "init")


def test_same_name_same_stream_other_name_other_stream() -> None:
    draws = {name: streams.rng(3, name).integers(2**62, size=4).tolist() for name in NAMES}
    assert draws["sampling"] == streams.rng(3, "sampling").integers(2**62, size=4).tolist()
    assert len({tuple(d) for d in draws.values()}) == len(NAMES)
    assert streams.rng(3, "shuffle", 1, 2).random() != streams.rng(3, "shuffle", 2, 1).random()
    assert streams.rng(3, "sampling").random() != streams.rng(4, "sampling").random()
    assert 0 <= streams.seed_int(3, "partition") < 2**63


@pytest.mark.parametrize("bad", [-1, 1.5, True, "0"])
def test_bad_seeds_and_names_are_refused(bad) -> None:
    with pytest.raises(ValueError, match="integers >= 0"):
        streams.rng(bad, "sampling")
    with pytest.raises(ValueError, match="stream name"):
        streams.rng(0, "")


def test_the_run_draws_each_purpose_from_its_own_stream(tmp_path) -> None:
    """Budgets, client sampling and the evaluation subset of one seed share no raw bits: none is
    the plain ``default_rng(seed)`` stream, and no two are the same permutation."""
    seed, n = 5, 40
    cfg = parse_run_config({"seed": seed, "device-mix": "0.2:0.5,1.0:0.5"})
    nodes = {i + 100: {"partition-id": i, "num-partitions": n} for i in range(n)}
    budgets = [node_budgets(cfg, nodes)[i + 100] for i in range(n)]
    plain = assign_budgets(cfg.device_mix, n, np.random.default_rng(seed)).tolist()
    assert budgets == assign_budgets(cfg.device_mix, n, streams.rng(seed, "budgets")).tolist()
    assert budgets != plain
    sampler = Federation(None, parse_run_config(overrides(tmp_path, seed=seed))).strategy.rng
    assert sampler.random() == streams.rng(seed, "sampling").random()
    assert streams.rng(seed, "sampling").random() != np.random.default_rng(seed).random()
    subset = evaluation_subset(seed, 1000, 1000)
    assert sorted(subset.tolist()) == list(range(1000))
    assert not np.array_equal(subset, np.random.default_rng(seed).permutation(1000))
    assert not np.array_equal(subset, streams.rng(seed, "budgets").permutation(1000))
