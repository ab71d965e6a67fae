"""Named experiments: run-config overrides shared by every cell plus the axes a sweep crosses.

A scenario is data, not code: ``overrides`` (run-config keys, or ``supernodes``) apply to every
cell, and each axis lists levels. A level has a short label (what the cell id and the gathered
tables show) and the values it sets; a plain axis sets the key it is named after, a grouped axis
(e.g. ``non-iid``) sets several keys at once. ``supernodes`` is not a run-config key: it goes to the
federation config (``--federation-config num-supernodes=N``). Seeds are crossed by the sweep runner.

Values are checked against ``fl_maestro.config.KEYS`` when a sweep starts (``simulations.sweep``),
so a strategy that is not registered yet fails there, before any run starts.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from fl_maestro.methods import METHODS

SUPERNODES = "supernodes"  # the federation-config axis; every other key is a run-config key


@dataclass(frozen=True)
class Level:
    """One value of an axis: a label and the keys it sets."""

    label: str
    values: Mapping[str, Any]


@dataclass(frozen=True)
class Axis:
    """A sweep dimension: its name (a column in the gathered tables) and its levels, in order."""

    name: str
    levels: tuple[Level, ...]

    def keys(self) -> set[str]:
        """Every key some level of this axis sets."""
        return {key for level in self.levels for key in level.values}


@dataclass(frozen=True)
class Scenario:
    """A named experiment: fixed overrides, the axes to cross, default seeds and federation size."""

    name: str
    description: str
    overrides: Mapping[str, Any] = field(default_factory=dict)
    axes: tuple[Axis, ...] = ()
    supernodes: int = 100
    seeds: tuple[int, ...] = (0,)


def axis(name: str, values: Sequence[Any]) -> Axis:
    """A plain axis: each value sets the key ``name``; its label is the value as text."""
    return Axis(name, tuple(Level(label(v), {name: v}) for v in values))


def grouped_axis(name: str, levels: Mapping[str, Mapping[str, Any]]) -> Axis:
    """An axis whose levels set several keys at once, e.g. partitioner and alpha."""
    return Axis(name, tuple(Level(text, dict(values)) for text, values in levels.items()))


def label(value: Any) -> str:
    """A value as a level label: TOML-like text (true/false for booleans)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


DEVICE_MIXES = ("1.0:1.0", "0.2:0.2,0.4:0.2,0.6:0.2,0.8:0.2,1.0:0.2", "0.2:0.5,1.0:0.5",
                "0.2:0.8,1.0:0.2")

STRATEGY_NAMES = tuple(METHODS)  # every registered method, baselines included

SCENARIOS: dict[str, Scenario] = {s.name: s for s in (
    Scenario("default", "the default experiment: Fashion-MNIST, CNN, 100 clients, five tiers"),
    Scenario("budget-mixes", "how the share of weak devices changes accuracy at every rank",
             axes=(axis("device-mix", DEVICE_MIXES),)),
    Scenario("non-iid-levels", "IID versus Dirichlet label skew of decreasing alpha",
             axes=(grouped_axis("non-iid", {
                 "iid": {"partitioner": "iid"},
                 "dirichlet-1.0": {"partitioner": "dirichlet", "alpha": 1.0},
                 "dirichlet-0.5": {"partitioner": "dirichlet", "alpha": 0.5},
                 "dirichlet-0.1": {"partitioner": "dirichlet", "alpha": 0.1}}),)),
    Scenario("strategies", "rank-wise Maestro against the FedAvg, FjORD and HeteroFL baselines",
             axes=(axis("strategy", STRATEGY_NAMES),)),
    Scenario("comparison", "the reference comparison: rank-wise with and without Maestro's "
             "distillation and HGL, and with the tier-aware sampler, against the seven baselines, "
             "equal budgets, 5 seeds; tune it first (--tune, simulations.tuning) and run it "
             "with --until-converged (its num-rounds is the first chunk)",
             overrides={"num-rounds": 40, "eval-every": 5}, seeds=(0, 1, 2, 3, 4),
             axes=(grouped_axis("method", {
                 "rankwise": {"strategy": "rankwise"},  # Maestro's loss (the default)
                 "rankwise-plain-od": {"strategy": "rankwise", "distill": False},
                 "rankwise-distill-hgl": {"strategy": "rankwise", "distill": True,
                                          "hgl-lambda": 1e-4},
                 "rankwise-tier-grid": {"strategy": "rankwise", "sampler": "tier-grid"},
                 "fedavg-full": {"strategy": "fedavg-full"},  # the dense model
                 "fedavg-full-factors": {"strategy": "fedavg-full-factors"},
                 "fedavg-smallest": {"strategy": "fedavg-smallest"},
                 "fedavg-exclusive": {"strategy": "fedavg-exclusive"},
                 "fjord": {"strategy": "fjord"},
                 "heterofl": {"strategy": "heterofl"},
                 "fedrolex": {"strategy": "fedrolex"}}),)),
    Scenario("reference", "budget mixes x non-IID levels for the rank-wise strategy, 5 seeds; "
             "run it with --until-converged (its num-rounds is the first chunk)",
             overrides={"num-rounds": 40, "eval-every": 5}, seeds=(0, 1, 2, 3, 4),
             axes=(axis("device-mix", DEVICE_MIXES[1:]),
                   grouped_axis("non-iid", {
                       "iid": {"partitioner": "iid"},
                       "dirichlet-0.5": {"partitioner": "dirichlet", "alpha": 0.5},
                       "dirichlet-0.1": {"partitioner": "dirichlet", "alpha": 0.1}}))),
    Scenario("schedule", "learning-rate decay x local epochs for the default experiment: which "
             "converges, how high, in how many rounds (run with --until-converged)",
             overrides={"num-rounds": 40, "eval-every": 5},
             axes=(axis("lr-decay", (1.0, 0.98, 0.95)), axis("local-epochs", (1, 2)))),
    Scenario("deadlines", "round deadlines x policy on the default setup: who a deadline drops, "
             "what partial work buys, and the simulated time it saves (10 rounds, one seed)",
             overrides={"num-rounds": 10, "eval-every": 5},
             axes=(grouped_axis("deadline", {
                 "wait": {"deadline-policy": "wait"},
                 "drop-2.5s": {"deadline-policy": "drop", "round-deadline": 2.5},
                 "partial-2.5s": {"deadline-policy": "partial", "round-deadline": 2.5},
                 "drop-4s": {"deadline-policy": "drop", "round-deadline": 4.0},
                 "partial-4s": {"deadline-policy": "partial", "round-deadline": 4.0}}),)),
    Scenario("smoke", "a two-cell end-to-end check: digits, 4 clients, 2 rounds (about 2 min)",
             overrides={"dataset": "digits", "num-rounds": 2, "clients-per-round": 3,
                        "eval-samples": 0}, supernodes=4,
             axes=(axis("device-mix", ("0.2:0.5,1.0:0.5", "1.0:1.0")),)),
    Scenario("tiny", "the small committed reference: Fashion-MNIST, 20 clients, 3 per round, "
             "5 rounds, four methods x 3 seeds (about 5 CPU-minutes in process); a test re-runs "
             "one cell and checks it against results/reference/tiny",
             overrides={"num-rounds": 5, "clients-per-round": 3, "device-mix": "0.25:0.5,1.0:0.5",
                        "eval-samples": 500, "eval-fractions": "0.25,0.5,1.0"},
             supernodes=20, seeds=(0, 1, 2),
             axes=(grouped_axis("method", {"rankwise": {"strategy": "rankwise"},
                                           "fedavg-full": {"strategy": "fedavg-full"},
                                           "fjord": {"strategy": "fjord"},
                                           "heterofl": {"strategy": "heterofl"}}),)),
    Scenario("scaling-clients", "the same 10 clients per round drawn from a growing population",
             overrides={"clients-per-round": 10}, axes=(axis(SUPERNODES, (100, 300, 1000)),)),
)}


def get_scenario(name: str) -> Scenario:
    """The scenario called ``name``; ValueError listing the known names otherwise."""
    if name not in SCENARIOS:
        raise ValueError(f"scenario {name!r} is unknown: allowed {sorted(SCENARIOS)}")
    return SCENARIOS[name]
