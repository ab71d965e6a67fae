"""A training round in the simulated device world: each sampled client's work before it trains,
and every sampled client's row of ``clients.csv`` and the round's totals after the replies.

The rows share one schema (``outcome``, ``reason``, ``steps``, ``planned-steps``,
``sim-seconds``): the device world decides ``straggler`` and ``dropout`` before anyone trains,
the replies say ``ok``, ``error``, ``invalid`` or ``timeout``, and a merged reply whose device
had only time for part of its steps is ``partial``. Bytes are the simulated devices' traffic: a
straggler or a dropout downloaded its slice before it was given up.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from fl_maestro.config import RunConfig
from fl_maestro.models import RankedModel
from fl_maestro.methods import recipe
from fl_maestro.training import batch_sizes, planned_step_macs, step_rng
from fl_maestro.world import BEFORE_TRAINING, MERGED, OUTCOMES, DeviceWorld, Fate, Work, round_rng
from strategies.plan import ClientSpec
from strategies.records import slice_nbytes


def client_work(cfg: RunConfig, server_round: int, model: RankedModel,
                arrays: Mapping[str, np.ndarray], node: int, spec: ClientSpec,
                train_examples: int) -> Work:
    """What ``node`` must do this round: the MACs of each local step it would take (the same
    draws its ClientApp makes) and the bytes of its slice each way."""
    order = list(model.max_ranks())  # the client's model lists its layers in this order
    ranks = {name: spec.ranks[name] for name in order}
    local = recipe(cfg, server_round, spec.config)  # what its ClientApp will train with
    macs = planned_step_macs(model, ranks, local.sampler,
                             step_rng(cfg.seed, server_round, spec.partition_id),
                             batch_sizes(train_examples, cfg.batch_size, local.epochs),
                             local.distill)
    size = slice_nbytes(arrays, spec.shapes or {})
    return Work(node, spec.partition_id, spec.budget, tuple(macs), size, size)


def orders(fates: Sequence[Fate]) -> dict[int, dict]:
    """The extra config of every client sent to train: its steps, and a crash when one was drawn."""
    return {f.work.node: {"steps": f.steps, **({"crash": True} if f.crash else {})}
            for f in fates if f.trains}


def fate_rows(server_round: int, fates: Sequence[Fate], sent_rows: Sequence[Mapping]
              ) -> list[dict]:
    """Every sampled client's row: the strategy's rows of those sent, rows of the others."""
    by_partition = {row["partition-id"]: row for row in sent_rows}
    rows = []
    for fate in fates:
        work = fate.work
        timing = {"planned-steps": len(work.step_macs), "sim-seconds": fate.seconds}
        if fate.trains:
            row = dict(by_partition[work.partition])
            if row["outcome"] == "ok" and fate.outcome == "partial":
                row.update(outcome="partial", reason=fate.reason)
            rows.append({**row, **timing})
        else:
            rows.append({"round": server_round, "partition-id": work.partition,
                         "budget": work.budget, "outcome": fate.outcome, "reason": fate.reason,
                         "steps": fate.steps, **timing, "bytes-down": work.bytes_down,
                         "bytes-up": 0})
    return sorted(rows, key=lambda r: r["partition-id"])


def round_totals(rows: Sequence[Mapping]) -> dict:
    """The round's totals, the one place they are counted: usable replies (``clients``: ok and
    partial), clients sent to train, every other outcome (``dropped``, ``dropped-<outcome>``),
    the simulated traffic, the merged replies' training MACs, the clients sampled and how many
    of the merged ones trained only part of their steps."""
    counts = {o: sum(r["outcome"] == o for r in rows) for o in OUTCOMES}
    dropped = {f"dropped-{o}": n for o, n in counts.items() if o not in MERGED}
    merged = [r for r in rows if r["outcome"] in MERGED]
    return {"clients": len(merged),
            "sent": len(rows) - sum(counts[o] for o in BEFORE_TRAINING),
            "dropped": sum(dropped.values()), **dropped,
            "bytes-down": float(sum(r["bytes-down"] for r in rows)),
            "bytes-up": float(sum(r["bytes-up"] for r in rows)),
            "train-macs": float(sum(r.get("train-macs", 0.0) for r in merged)),
            "sampled": len(rows), "partial": counts["partial"]}


class RoundPlanner:
    """The strategy's planner in a federation (``strategies.plan.Planner``): the round's client
    specs, the device world's decisions on whom the strategy sampled, and the rows of every
    sampled client once the replies are judged.

    ``start`` opens a round; after the strategy's ``configure_train`` and ``aggregate_train``,
    ``fates``, ``rows`` and ``lists`` hold what the round decided and learned.
    """

    def __init__(self, cfg: RunConfig, world: DeviceWorld) -> None:
        self.cfg, self.world = cfg, world
        self.specs: dict[int, ClientSpec] = {}
        self.online: list[int] = []
        self.begin = 0.0  # the round's simulated start
        self.fates: list[Fate] = []
        self.rows: list[dict] = []  # every sampled client's row (clients.csv)
        self.lists: list[dict[str, list]] = []  # each usable reply's list-valued metrics
        self._model: RankedModel | None = None
        self._arrays: Mapping[str, np.ndarray] = {}

    def start(self, server_round: int, model: RankedModel, arrays: Mapping[str, np.ndarray],
              specs: Mapping[int, ClientSpec], clock: float) -> None:
        """Open round ``server_round``: who may train, on the global ``model``; who is online."""
        self.specs, self._model, self._arrays = dict(specs), model, arrays
        members = {n: (s.partition_id, s.budget) for n, s in self.specs.items()}
        self.begin, self.online = self.world.round_start(members, clock)
        self.fates, self.rows, self.lists = [], [], []

    def clients(self, server_round: int) -> Mapping[int, ClientSpec]:
        """Every node that takes part, with its slice."""
        return self.specs

    def orders(self, server_round: int, sample) -> dict[int, dict]:
        """Sample among the online nodes, let the device world decide their fates, and send the
        ones that train (with their steps, and a crash when one was drawn)."""
        nodes = sample(self.online, self.world.sample_size(self.cfg.clients_per_round))
        self.fates = self.world.decide(
            [client_work(self.cfg, server_round, self._model, self._arrays, n, self.specs[n],
                         self.specs[n].max_examples) for n in nodes],
            self.cfg.clients_per_round, round_rng(self.cfg.seed, server_round))
        return orders(self.fates)

    def replies(self, server_round: int, rows: list[dict], lists: list[dict[str, list]]) -> None:
        """Every sampled client's row: the strategy's rows of those sent, the world's of the rest."""
        self.rows, self.lists = fate_rows(server_round, self.fates, rows), lists

    @property
    def injected_crashes(self) -> int:
        """Clients of the round the device world told to crash (simulated faults)."""
        return sum(f.crash for f in self.fates if f.trains)
