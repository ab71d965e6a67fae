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
from fl_maestro.world import MERGED, OUTCOMES, Fate, Work
from strategies.rankwise import ClientSpec
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
    """Counts of every outcome but ``ok`` (``dropped-<outcome>``, and ``partial``, which is
    merged) and the round's simulated traffic."""
    counts = {o: sum(r["outcome"] == o for r in rows) for o in OUTCOMES}
    dropped = {f"dropped-{o}": n for o, n in counts.items() if o not in MERGED}
    return {"sampled": len(rows), "clients": counts["ok"] + counts["partial"],
            "partial": counts["partial"], "dropped": sum(dropped.values()), **dropped,
            "bytes-down": float(sum(r["bytes-down"] for r in rows)),
            "bytes-up": float(sum(r["bytes-up"] for r in rows))}
