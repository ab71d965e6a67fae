"""The rank-wise strategy: FedAvg over ordered factors, each client at its own rank prefix.

Only the steps that change are overridden: ``configure_train`` samples clients with a seeded
generator and sends each one the rank prefix of the global arrays that fits its budget;
``aggregate_train`` validates every reply, drops the bad ones (counted, reason logged) and merges the
rest with the one nested merge rule. Replies are merged in partition-id order, so a seeded run is
reproducible whatever node ids the SuperLink hands out.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from strategies.merge import (InvalidReply, check_reply, corner_arrays, merge_nested,
                              prefix_arrays)
from strategies.records import nbytes, to_numpy, to_record

log = logging.getLogger(__name__)

Arrays = dict[str, np.ndarray]
# What can go wrong with a client the strategy sent to, as seen in its reply (or its absence).
FAULTS = ("error", "invalid", "timeout")


@dataclass(frozen=True)
class ClientSpec:
    """What the strategy knows of one node: its data partition, budget and the ranks it trains."""

    partition_id: int
    budget: float
    ranks: Mapping[str, int] = field(default_factory=dict)
    shapes: Mapping[str, tuple[int, ...]] | None = None  # the slice's shapes, when not a prefix
    config: Mapping[str, int | float | str | bool] = field(default_factory=dict)  # sent with it


def _placeholder(array: np.ndarray) -> np.ndarray:
    """A zero-memory array with ``array``'s shape and dtype (all its strides are 0)."""
    return np.lib.stride_tricks.as_strided(np.zeros(1, array.dtype), array.shape,
                                           (0,) * array.ndim, writeable=False)


class RankWiseFedAvg(FedAvg):
    """FedAvg whose clients each train and return the rank prefix that fits their budget."""

    cut_shared = False  # rank-wise replies keep shared arrays whole; width baselines cut them

    def __init__(self, clients_per_round: int, seed: int = 0, merge_weight: str = "examples",
                 label_rows: tuple[str, ...] = (), **fedavg_kwargs) -> None:
        if merge_weight not in ("examples", "clients"):
            raise ValueError(f"merge_weight {merge_weight!r} is not allowed: use 'examples' or "
                             "'clients'")
        fedavg_kwargs.setdefault("fraction_evaluate", 0.0)
        super().__init__(min_train_nodes=clients_per_round, **fedavg_kwargs)
        self.clients_per_round = clients_per_round
        # FedAvg weighs a reply by its examples; HeteroFL counts clients (every reply weighs 1).
        self.merge_weight = merge_weight
        # Arrays whose rows are classes, merged only on the rows of the classes a client reports
        # in its "classes" metric (HeteroFL's masked output layer).
        self.label_rows = tuple(label_rows)
        self.rng = np.random.default_rng(seed)
        self.clients: dict[int, ClientSpec] = {}
        self.client_rows: list[dict] = []  # one row per client reply of the last round
        self.dropped_total = 0
        self._sent: Arrays = {}
        self._bytes_down: dict[int, int] = {}
        self._orders: dict[int, dict[str, Any]] | None = None

    def set_clients(self, clients: Mapping[int, ClientSpec]) -> None:
        """Tell the strategy every node's spec (node id -> ClientSpec)."""
        self.clients = dict(clients)

    def client_arrays(self, spec: ClientSpec, global_arrays: Arrays) -> Arrays:
        """The slice of the global arrays a client trains: its rank prefix (or given corner)."""
        if spec.shapes is not None:
            return corner_arrays(global_arrays, spec.shapes)
        return prefix_arrays(global_arrays, spec.ranks)

    def set_round(self, orders: Mapping[int, Mapping[str, Any]] | None) -> None:
        """The nodes the next ``configure_train`` sends to, each with extra config of its own
        (e.g. how many local steps to train); None: it samples ``clients_per_round`` itself."""
        self._orders = None if orders is None else {n: dict(c) for n, c in orders.items()}

    def sample_nodes(self, grid: Grid, among: Iterable[int] | None = None,
                     count: int | None = None) -> list[int]:
        """Seeded sample of ``count`` (default ``clients_per_round``) known, connected nodes,
        drawn from ``among`` when given (e.g. the online ones), in partition-id order."""
        connected = set(grid.get_node_ids())
        if among is not None:
            connected &= set(among)
        nodes = sorted((n for n in self.clients if n in connected),
                       key=lambda n: self.clients[n].partition_id)
        if not nodes:
            raise RuntimeError("no known node is connected: nothing to train on")
        k = min(count or self.clients_per_round, len(nodes))
        picked = np.sort(self.rng.choice(len(nodes), size=k, replace=False))
        return [nodes[i] for i in picked]

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        """Send each chosen client its own slice of the global arrays and the round's config."""
        orders = self._orders if self._orders is not None else {
            n: {} for n in self.sample_nodes(grid)}
        self._orders = None
        self._sent = to_numpy(arrays)
        self._bytes_down: dict[int, int] = {}
        self._sent_shapes: dict[int, Arrays] = {}
        messages = []
        for node_id, extra in orders.items():
            spec = self.clients[node_id]
            sliced = self.client_arrays(spec, self._sent)
            self._bytes_down[node_id] = nbytes(sliced)
            self._sent_shapes[node_id] = {k: _placeholder(a) for k, a in sliced.items()}
            node_config = ConfigRecord({**config, **spec.config, **extra,
                                        "server-round": server_round,
                                        "budget": spec.budget})
            content = RecordDict({self.arrayrecord_key: to_record(sliced),
                                  self.configrecord_key: node_config})
            messages.append(Message(content=content, message_type=MessageType.TRAIN,
                                    dst_node_id=node_id))
        log.info("round %d: sent %d clients %.2f MB in all", server_round, len(messages),
                 sum(self._bytes_down.values()) / 1e6)
        return messages

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Validate every reply, drop and count bad ones, merge the rest rank by rank.

        Every client sent to gets a row in ``client_rows`` with its ``outcome``: ``ok`` (merged),
        ``error`` (its ClientApp failed), ``invalid`` (a check failed) or ``timeout`` (no reply).
        """
        rows: dict[int, dict] = {}
        good: list[tuple[int, tuple[Arrays, float]]] = []
        for message in replies:
            node_id = message.metadata.src_node_id
            if node_id not in self._bytes_down or node_id in rows:
                log.warning("round %d: ignored a reply from node %d, which was not asked",
                            server_round, node_id)
                continue
            if message.has_error():
                rows[node_id] = self._row(server_round, node_id, "error", message.error.reason)
                log.warning("round %d: partition %d failed: %s", server_round,
                            self.clients[node_id].partition_id, message.error.reason)
                continue
            rows[node_id], accepted = self._accept(server_round, message)
            if accepted is not None:
                good.append((self.clients[node_id].partition_id, accepted))
        for node_id in self._bytes_down.keys() - rows.keys():
            rows[node_id] = self._row(server_round, node_id, "timeout", "no reply")
        self.client_rows = sorted(rows.values(), key=lambda r: r["partition-id"])
        dropped = len(self._bytes_down) - len(good)  # bad, failed or never answered
        self.dropped_total += dropped
        metrics = self._round_metrics(self.client_rows)
        if not good:
            log.warning("round %d: no usable reply; the global model is unchanged", server_round)
            return None, metrics
        # partition-id order: a seeded run merges bit-identically whatever the reply order
        good.sort(key=lambda g: g[0])
        merged = merge_nested(self._sent, [(a, w) for _, (a, w, _) in good],
                              [rows for _, (_, _, rows) in good])
        return to_record(merged), metrics

    def _row(self, server_round: int, node_id: int, outcome: str, reason: str = "",
             **values: Any) -> dict:
        """One client's row of the round: who, its outcome, and the bytes it was sent."""
        spec = self.clients[node_id]
        return {"round": server_round, "partition-id": spec.partition_id, "budget": spec.budget,
                "outcome": outcome, "reason": reason, **values,
                "bytes-down": self._bytes_down.get(node_id, 0), "bytes-up": values.get(
                    "bytes-up", 0)}

    def _accept(self, server_round: int, message: Message
                ) -> tuple[dict, tuple[Arrays, float, dict[str, np.ndarray] | None] | None]:
        """The reply's row and its (arrays, weight, label rows) if it passes every check."""
        node_id = message.metadata.src_node_id
        metrics = message.content.metric_records.get("metrics")
        values = {k: float(v) for k, v in (metrics or {}).items() if isinstance(v, (int, float))}
        try:
            record = message.content.array_records.get(self.arrayrecord_key)
            if record is None or metrics is None:
                raise InvalidReply("reply lacks its 'arrays' or 'metrics' record")
            arrays = to_numpy(record)
            examples = metrics.get(self.weighted_by_key)
            # Against what this node was sent: a reply may not grow past its own slice.
            check_reply(self._sent_shapes[node_id], arrays, examples, cut_shared=self.cut_shared)
            rows = self._label_rows(metrics.get("classes")) if self.label_rows else None
        except InvalidReply as err:
            log.warning("round %d: dropped reply of partition %d: %s", server_round,
                        self.clients[node_id].partition_id, err)
            return self._row(server_round, node_id, "invalid", f"invalid: {err}", **values), None
        row = self._row(server_round, node_id, "ok", **values, **{"bytes-up": nbytes(arrays)})
        weight = 1.0 if self.merge_weight == "clients" else float(examples)
        return row, (arrays, weight, rows)

    def _label_rows(self, classes: object) -> dict[str, np.ndarray]:
        """The rows of ``label_rows`` arrays a reply's ``classes`` metric covers."""
        outputs = min(self._sent[name].shape[0] for name in self.label_rows)
        if not isinstance(classes, list) or not classes or len(set(classes)) != len(classes) \
                or not all(isinstance(c, int) and 0 <= c < outputs for c in classes):
            raise InvalidReply(f"'classes' metric must list distinct class indices in "
                               f"0..{outputs - 1}, got {classes!r}")
        return {name: np.array(sorted(classes)) for name in self.label_rows}

    def _round_metrics(self, rows: list[dict]) -> MetricRecord:
        """Example-weighted training loss and accuracy of the merged replies plus round totals."""
        merged = [r for r in rows if r["outcome"] == "ok"]
        counts = {f"dropped-{o}": sum(r["outcome"] == o for r in rows) for o in FAULTS}
        totals = {"clients": len(merged), "dropped": len(rows) - len(merged), **counts,
                  "bytes-down": float(sum(r["bytes-down"] for r in rows)),
                  "bytes-up": float(sum(r["bytes-up"] for r in rows)),
                  "train-macs": float(sum(r.get("train-macs", 0.0) for r in merged))}
        if not merged:
            return MetricRecord(totals)
        weights = np.array([r[self.weighted_by_key] for r in merged])
        mean = lambda key: float(np.average([r.get(key, 0.0) for r in merged], weights=weights))  # noqa: E731
        return MetricRecord({"train-loss": mean("train-loss"),
                             "train-accuracy": mean("train-accuracy"),
                             "examples": float(weights.sum()), **totals})

    def state_dict(self) -> dict:
        """Strategy state to checkpoint: the sampling generator and counters."""
        return {"rng": self.rng.bit_generator.state, "dropped_total": self.dropped_total}

    def load_state_dict(self, state: Mapping) -> None:
        """Restore what ``state_dict`` returned."""
        self.rng.bit_generator.state = state["rng"]
        self.dropped_total = int(state["dropped_total"])


class WidthFedAvg(RankWiseFedAvg):
    """The same nested FedAvg for width-sliced models (FjORD, HeteroFL): every array may be cut.

    A client's slice is the leading corner of every weight (its first channels), so the one
    nested merge averages each element over the clients that hold it.
    """

    cut_shared = True
