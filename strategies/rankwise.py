"""The rank-wise strategy: FedAvg over ordered factors, each client at its own rank prefix.

In the style of Flower's ``FedAvg``: configured in ``__init__``, pure helpers for sampling and
merging, and only the steps that change overridden. ``configure_train`` asks its ``Planner``
(``strategies.plan``) which nodes may train and what each holds, samples among them with its own
seeded generator, and sends each chosen node its slice of the global arrays; ``aggregate_train``
validates every reply, drops the bad ones (reason logged), merges the rest with the one nested
merge rule, hands every sent client's row to the planner and returns the merged arrays with the
training metrics. Replies are merged in partition-id order, so a seeded run is reproducible
whatever node ids the SuperLink hands out.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from strategies.merge import (InvalidReply, check_reply, corner_arrays, merge_nested, window_arrays,
                              prefix_arrays)
from strategies.plan import USABLE, ClientSpec, FixedPlan, Planner
from strategies.records import METRICS, nbytes, to_numpy, to_record

log = logging.getLogger(__name__)

__all__ = ["RankWiseFedAvg", "WidthFedAvg", "sample_nodes"]

Arrays = dict[str, np.ndarray]


def sample_nodes(rng: np.random.Generator, clients: Mapping[int, ClientSpec],
                 candidates: Iterable[int], count: int) -> list[int]:
    """Seeded sample of ``count`` nodes of ``clients`` among ``candidates``, in partition-id
    order (fewer when fewer are there); RuntimeError when none is."""
    candidates = set(candidates)
    nodes = sorted((n for n in clients if n in candidates), key=lambda n: clients[n].partition_id)
    if not nodes:
        raise RuntimeError("no known node is connected: nothing to train on")
    picked = np.sort(rng.choice(len(nodes), size=min(count, len(nodes)), replace=False))
    return [nodes[i] for i in picked]


def _placeholder(array: np.ndarray) -> np.ndarray:
    """A zero-memory array with ``array``'s shape and dtype (all its strides are 0)."""
    return np.lib.stride_tricks.as_strided(np.zeros(1, array.dtype), array.shape,
                                           (0,) * array.ndim, writeable=False)


class RankWiseFedAvg(FedAvg):
    """FedAvg whose clients each train and return the rank prefix that fits their budget."""

    cut_shared = False  # rank-wise replies keep shared arrays whole; width baselines cut them

    def __init__(self, clients_per_round: int, seed: int = 0, merge_weight: str = "examples",
                 label_rows: tuple[str, ...] = (), *, planner: Planner | None = None,
                 rng: np.random.Generator | None = None,
                 weighted_by_key: str = "num-examples", arrayrecord_key: str = "arrays",
                 configrecord_key: str = "config", metricrecord_key: str = METRICS) -> None:
        """Only FedAvg's arguments this strategy honours are taken: it samples exactly
        ``clients_per_round`` nodes itself and never evaluates on clients, so FedAvg's fractions
        and minimum node counts would be silently ignored (passing them is a TypeError).

        ``planner`` says who may train and who is sent what (default: a ``FixedPlan`` with no
        clients); ``rng`` is the sampling generator (default: ``default_rng(seed)``).
        """
        if merge_weight not in ("examples", "clients"):
            raise ValueError(f"merge_weight {merge_weight!r} is not allowed: use 'examples' or "
                             "'clients'")
        super().__init__(fraction_train=1.0, fraction_evaluate=0.0,
                         min_train_nodes=clients_per_round, weighted_by_key=weighted_by_key,
                         arrayrecord_key=arrayrecord_key, configrecord_key=configrecord_key)
        # The reply's MetricRecord (FedAvg has no argument for it; the ClientApp writes METRICS).
        self.metricrecord_key = metricrecord_key
        self.clients_per_round = clients_per_round
        # FedAvg weighs a reply by its examples; HeteroFL counts clients (every reply weighs 1).
        self.merge_weight = merge_weight
        # Arrays whose rows are classes, merged only on the rows of the classes a client reports
        # in its "classes" metric (HeteroFL's masked output layer).
        self.label_rows = tuple(label_rows)
        self.planner: Planner = planner if planner is not None else FixedPlan({})
        self.rng = rng if rng is not None else np.random.default_rng(seed)
        # What the last configure_train sent, for aggregate_train to check the replies against.
        self._clients: Mapping[int, ClientSpec] = {}
        self._sent: Arrays = {}
        self._bytes_down: dict[int, int] = {}
        self._sent_shapes: dict[int, Arrays] = {}

    def client_arrays(self, spec: ClientSpec, global_arrays: Arrays) -> Arrays:
        """The slice of the global arrays a client trains: its window (``spec.windows``), the
        corner of ``spec.shapes``, or the rank prefix of ``spec.ranks`` when neither is given."""
        if spec.windows is not None:
            return window_arrays(global_arrays, spec.windows)
        if spec.shapes is not None:
            return corner_arrays(global_arrays, spec.shapes)
        return prefix_arrays(global_arrays, spec.ranks)

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        """Send each chosen client its own slice of the global arrays and the round's config."""
        clients = self._clients = dict(self.planner.clients(server_round))

        def sample(among: Iterable[int] | None = None, count: int | None = None) -> list[int]:
            connected = set(grid.get_node_ids())
            candidates = connected if among is None else connected & set(among)
            return sample_nodes(self.rng, clients, candidates, count or self.clients_per_round)

        orders = self.planner.orders(server_round, sample)
        self._sent = to_numpy(arrays)
        self._bytes_down, self._sent_shapes = {}, {}
        messages = []
        for node_id, extra in orders.items():
            spec = clients[node_id]
            sliced = self.client_arrays(spec, self._sent)
            self._bytes_down[node_id] = nbytes(sliced)
            self._sent_shapes[node_id] = {k: _placeholder(a) for k, a in sliced.items()}
            node_config = ConfigRecord({**config, **spec.config, **extra,
                                        "server-round": server_round})
            content = RecordDict({self.arrayrecord_key: to_record(sliced),
                                  self.configrecord_key: node_config})
            messages.append(Message(content=content, message_type=MessageType.TRAIN,
                                    dst_node_id=node_id))
        log.info("round %d: sent %d clients %.2f MB in all", server_round, len(messages),
                 sum(self._bytes_down.values()) / 1e6)
        return messages

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Judge every sent client's reply (ok, error, invalid or none), merge the good ones.

        Every sent client's row goes to the planner; the returned metrics are the usable
        replies' example-weighted training loss and accuracy and their examples.
        """
        by_node = self._replies_by_node(server_round, replies)
        good, label_rows, windows, rows, lists = [], [], [], [], []
        for node_id in sorted(self._bytes_down, key=lambda n: self._clients[n].partition_id):
            row, accepted = self._judge(server_round, node_id, by_node.get(node_id))
            rows.append(row)
            if accepted is not None:
                good.append(accepted[:2])
                label_rows.append(accepted[2])
                lists.append(accepted[3])
                windows.append(self._clients[node_id].windows)
        self.planner.replies(server_round, rows, lists)
        metrics = training_metrics(rows, self.weighted_by_key)
        if not good:
            log.warning("round %d: no usable reply; the global model is unchanged", server_round)
            return None, metrics
        return to_record(merge_nested(self._sent, good, label_rows, windows)), metrics

    def _replies_by_node(self, server_round: int, replies: Iterable[Message]
                         ) -> dict[int, Message]:
        """The first reply of each node this round was sent to; anything else is logged."""
        by_node: dict[int, Message] = {}
        for message in replies:
            node_id = message.metadata.src_node_id
            if node_id not in self._bytes_down or node_id in by_node:
                log.warning("round %d: ignored an unexpected reply from node %d", server_round,
                            node_id)
                continue
            by_node[node_id] = message
        return by_node

    def _judge(self, server_round: int, node_id: int, message: Message | None
               ) -> tuple[dict, tuple[Arrays, float, dict | None, dict] | None]:
        """The client's row of ``clients.csv`` and, for a usable reply, its (arrays, weight,
        label rows, list-valued metrics)."""
        spec = self._clients[node_id]
        row = {"round": server_round, "partition-id": spec.partition_id, "budget": spec.budget,
               "outcome": "ok", "reason": "", "steps": 0,
               "bytes-down": self._bytes_down[node_id], "bytes-up": 0}
        if message is None:
            row.update(outcome="timeout", reason="no reply before the round's timeout")
        elif message.has_error():
            row.update(outcome="error", reason=f"code {message.error.code}: {message.error.reason}")
        elif _diverged(message, self.metricrecord_key):
            metrics = message.content.metric_records[self.metricrecord_key]
            row.update({k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))},
                       outcome="diverged", reason=f"diverged: {_divergence_reason(metrics)}")
        else:
            try:
                arrays, examples, metrics = self._checked(node_id, message)
                label_rows = self._label_rows(metrics.get("classes")) if self.label_rows else None
            except InvalidReply as err:
                row.update(outcome="invalid", reason=f"invalid: {err}")
            else:
                row.update({k: float(v) for k, v in metrics.items()
                            if isinstance(v, (int, float))}, **{"bytes-up": nbytes(arrays)})
                lists = {k: list(v) for k, v in metrics.items() if isinstance(v, list)}
                weight = 1.0 if self.merge_weight == "clients" else float(examples)
                return row, (arrays, weight, label_rows, lists)
        log.warning("round %d: dropped partition %d (%s): %s", server_round, spec.partition_id,
                    row["outcome"], row["reason"])
        return row, None

    def _label_rows(self, classes: object) -> dict[str, np.ndarray]:
        """The rows of ``label_rows`` arrays a reply's ``classes`` metric covers."""
        outputs = min(self._sent[name].shape[0] for name in self.label_rows)
        if not isinstance(classes, list) or not classes or len(set(classes)) != len(classes) \
                or not all(isinstance(c, int) and 0 <= c < outputs for c in classes):
            raise InvalidReply(f"'classes' metric must list distinct class indices in "
                               f"0..{outputs - 1}, got {classes!r}")
        return {name: np.array(sorted(classes)) for name in self.label_rows}

    def _checked(self, node_id: int, message: Message) -> tuple[Arrays, float, MetricRecord]:
        """The reply's arrays, example count and metrics; InvalidReply if any check fails."""
        record = message.content.array_records.get(self.arrayrecord_key)
        metrics = message.content.metric_records.get(self.metricrecord_key)
        if record is None or metrics is None:
            raise InvalidReply("reply lacks its 'arrays' or 'metrics' record")
        arrays = to_numpy(record)
        examples = metrics.get(self.weighted_by_key)
        # Against exactly what this node was sent, and no more examples than its partition holds.
        check_reply(self._sent_shapes[node_id], arrays, examples, cut_shared=self.cut_shared,
                    exact=True, max_examples=self._clients[node_id].max_examples)
        return arrays, examples, metrics

    def state_dict(self) -> dict:
        """Strategy state to checkpoint: the sampling generator."""
        return {"rng": self.rng.bit_generator.state}

    def load_state_dict(self, state: Mapping) -> None:
        """Restore what ``state_dict`` returned (older checkpoints' extra keys are ignored)."""
        self.rng.bit_generator.state = state["rng"]


def training_metrics(rows: list[dict], weighted_by_key: str = "num-examples") -> MetricRecord:
    """Example-weighted training loss and accuracy of the usable replies' rows, and their
    examples (empty when none is usable)."""
    ok = [r for r in rows if r["outcome"] in USABLE]
    if not ok:
        return MetricRecord({})
    weights = np.array([r[weighted_by_key] for r in ok])
    means = {key: _mean_of_those_with(ok, key, weighted_by_key)
             for key in ("train-loss", "train-accuracy")}
    return MetricRecord({**{k: v for k, v in means.items() if v is not None},
                         "examples": float(weights.sum())})


def _mean_of_those_with(rows: list[dict], key: str, weight_key: str) -> float | None:
    """Weighted mean of ``key`` over the rows that report it (None if none does): a reply
    without it is left out, not averaged in as 0."""
    having = [r for r in rows if isinstance(r.get(key), (int, float))]
    if not having:
        return None
    return float(np.average([r[key] for r in having], weights=[r[weight_key] for r in having]))


def _diverged(message: Message, metricrecord_key: str) -> bool:
    """Whether the reply says its local training diverged (``diverged`` metric set)."""
    metrics = message.content.metric_records.get(metricrecord_key)
    return metrics is not None and bool(metrics.get("diverged", 0))


def _divergence_reason(metrics: MetricRecord) -> str:
    """What the client's divergence check saw, from its reply's metrics."""
    return (f"loss {float(metrics.get('diverged-loss', float('nan'))):.4g} at step "
            f"{int(metrics.get('diverged-step', 0))} (first steps' mean "
            f"{float(metrics.get('first-loss', float('nan'))):.4g})")


class WidthFedAvg(RankWiseFedAvg):
    """The same nested FedAvg for width-sliced models (FjORD, HeteroFL): every array may be cut.

    A client's slice is the leading corner of every weight (its first channels), so the one
    nested merge averages each element over the clients that hold it.
    """

    cut_shared = True
