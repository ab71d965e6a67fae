"""What a strategy is given to send a round, and what it hands back about the replies.

A strategy keeps its own state (its sampling generator) and is told the rest by a ``Planner`` it
is given at construction: every node that may train with its ``ClientSpec`` (``clients``), which
of the nodes it sampled to send and with what extra config (``orders``), and, after the merge,
every sent client's row (``replies``). ``FixedPlan`` is the plain planner: fixed specs, every
sampled node sent, the last round's rows kept for the caller. Nothing here imports Flower's
server, torch or ``fl_maestro``.

A reply is usable (``ok``) or failed: ``error`` (the client raised), ``invalid`` (a reply check
failed), ``timeout`` (no reply) or ``diverged`` (the client's own training stopped on a
non-finite or exploding loss, ``fl_maestro.training``; never merged); those are the only outcomes
a strategy knows.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

USABLE = ("ok",)
FAILED = ("error", "invalid", "timeout", "diverged")

# sample(among, count): the strategy's seeded sample of up to ``count`` (default: its clients per
# round) known, connected nodes, drawn from ``among`` when given, in partition-id order.
Sample = Callable[[Iterable[int] | None, int | None], list[int]]


@dataclass(frozen=True)
class ClientSpec:
    """What the strategy knows of one node: its data partition, budget and the ranks it trains."""

    partition_id: int
    budget: float
    ranks: Mapping[str, int] = field(default_factory=dict)
    # The slice's shapes: the federation always gives them (its plan's corner of every array);
    # None, for a strategy driven on its own, sends the rank prefix of ``ranks``.
    shapes: Mapping[str, tuple[int, ...]] | None = None
    config: Mapping[str, int | float | str | bool] = field(default_factory=dict)  # sent with it
    max_examples: int | None = None  # its partition's training examples, known at discovery
    # Per array, the global indices on every axis the client holds (FedRolex's rolling window);
    # None: the leading corner of ``shapes``.
    windows: Mapping[str, tuple[Any, ...]] | None = None


class Planner(Protocol):
    """The strategy's collaborator: who may train, who is sent what, where the rows go."""

    def clients(self, server_round: int) -> Mapping[int, ClientSpec]:
        """Every node that may train in ``server_round``, by node id."""

    def orders(self, server_round: int, sample: Sample) -> Mapping[int, Mapping[str, Any]]:
        """The nodes to send, each with extra config of its own (e.g. its local steps)."""

    def replies(self, server_round: int, rows: list[dict], lists: list[dict[str, list]]) -> None:
        """Every sent client's row (partition-id order) and each usable reply's list metrics."""


class FixedPlan:
    """A planner with fixed client specs that sends every sampled node; keeps the last rows."""

    def __init__(self, specs: Mapping[int, ClientSpec]) -> None:
        self.specs = dict(specs)
        self.rows: list[dict] = []  # every sent client's row of the last round
        self.lists: list[dict[str, list]] = []  # each usable reply's list-valued metrics

    def clients(self, server_round: int) -> Mapping[int, ClientSpec]:
        """The fixed specs."""
        return self.specs

    def orders(self, server_round: int, sample: Sample) -> Mapping[int, Mapping[str, Any]]:
        """The strategy's own sample, no extra config."""
        return {node: {} for node in sample(None, None)}

    def replies(self, server_round: int, rows: list[dict], lists: list[dict[str, list]]) -> None:
        """Keep the round's rows."""
        self.rows, self.lists = rows, lists
