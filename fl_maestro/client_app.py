"""Flower ClientApp: trains the received rank prefix on the node's own data partition.

The model is built holding exactly the ranks it received, trained with ordered dropout inside them
(``training.train``), and the trained prefix goes back with the round's metrics. The server may
cap the local steps (``steps``: a straggler's work that fits the deadline) or, to inject a crash
its device profile drew, ask the ClientApp to raise (``crash``).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fl_maestro import streams
from fl_maestro.components import coverage_metrics
from fl_maestro.config import RunConfig, parse_run_config
from fl_maestro.data import DATASET_SHAPES, NUM_CLASSES, client_partition, load_dataset, make_loader
from fl_maestro.models import model_arrays
from fl_maestro.methods import get_method, recipe
from fl_maestro.runtime import keep_freed_memory
from fl_maestro.width import build_width_model, set_scaler
from fl_maestro.training import evaluate, step_rng, train
from strategies.records import METRICS, to_numpy, to_record

log = logging.getLogger(__name__)

app = ClientApp()


class InjectedCrash(RuntimeError):
    """The failure a device profile's ``crash`` probability injects into a ClientApp."""


def node_identity(context: Context) -> tuple[int, int]:
    """The node's (partition id, number of partitions) from its node config."""
    node = context.node_config
    missing = [k for k in ("partition-id", "num-partitions") if k not in node]
    if missing:
        raise ValueError(f"node config lacks {missing}: start the SuperNode with --node-config "
                         "'partition-id=<i> num-partitions=<n>' (simulation sets both)")
    return int(node["partition-id"]), int(node["num-partitions"])


@app.query()
def describe(msg: Message, context: Context) -> Message:
    """Tell the server this node's partition, its number of training examples (the most a reply
    may claim) and, in a deployment, its configured budget."""
    partition_id, num_partitions = node_identity(context)
    # The training-set size lets the server know a round's local steps before anyone trains.
    train_idx, _ = partition_split(parse_run_config(context.run_config), partition_id,
                                   num_partitions)
    info = {"partition-id": partition_id, "num-partitions": num_partitions,
            "train-examples": len(train_idx)}
    if "budget" in context.node_config:
        info["budget"] = float(context.node_config["budget"])
    return Message(content=RecordDict({"node": ConfigRecord(info)}), reply_to=msg)


def partition_split(cfg: RunConfig, partition_id: int, num_partitions: int):
    """This node's (train, validation) indices into the dataset's training set."""
    return client_partition(cfg.dataset, partition_id, num_partitions, cfg.partitioner, cfg.alpha,
                            cfg.classes_per_client, streams.seed_int(cfg.seed, "partition"),
                            cfg.val_fraction)


def local_loaders(cfg: RunConfig, partition_id: int, num_partitions: int, server_round: int,
                  device: str = "cpu"):
    """This node's shuffled training batches for this round and its validation batches, on ``device``."""
    x_train, y_train, _, _ = load_dataset(cfg.dataset)
    train_idx, val_idx = partition_split(cfg, partition_id, num_partitions)
    seed = streams.seed_int(cfg.seed, "shuffle", server_round, partition_id)
    return (make_loader(x_train, y_train, train_idx, cfg.batch_size, shuffle=True, seed=seed,
                        device=device),
            make_loader(x_train, y_train, val_idx, batch_size=256, device=device))


def prepare_model(cfg: RunConfig, model) -> None:
    """Set up the received model as its method trains it: HeteroFL's scaler divides the output of
    every sliced layer that feeds a norm layer by its width rate (``width.set_scaler``)."""
    if get_method(cfg.strategy).local(cfg).scaler:
        full = build_width_model(cfg.model, DATASET_SHAPES[cfg.dataset],
                                 NUM_CLASSES[cfg.dataset], device="meta")
        set_scaler(model, full.max_ranks())


@app.train()
def train_prefix(msg: Message, context: Context) -> Message:
    """Train the received prefix with ordered dropout and return it with metrics.

    Besides ``train-seconds``, the reply says how long the client's own framework work took:
    ``decode-seconds`` (arrays out of the message), ``build-seconds`` (the model),
    ``data-seconds`` (its partition's batches), ``validate-seconds`` (the local evaluation) and
    ``encode-seconds`` (the trained arrays into the reply).
    """
    keep_freed_memory()
    cfg = parse_run_config(context.run_config)
    partition_id, num_partitions = node_identity(context)
    config = msg.content["config"]
    server_round = int(config["server-round"])
    if config.get("crash", False):
        raise InjectedCrash(f"partition {partition_id}, round {server_round}: a crash injected by "
                            "its tier's device profile")
    took: dict[str, float] = {}
    with _timed(took, "decode"):
        arrays = to_numpy(msg.content["arrays"])
    # Ray hides GPUs from actors given client-resources-num-gpus = 0, so this is the CPU there.
    device = "cuda" if torch.cuda.is_available() else "cpu"
    with _timed(took, "build"):
        model = get_method(cfg.strategy).model_family.from_arrays(
            cfg.model, DATASET_SHAPES[cfg.dataset], NUM_CLASSES[cfg.dataset], arrays,
            device=device)
    with _timed(took, "data"):
        loader, val_loader = local_loaders(cfg, partition_id, num_partitions, server_round, device)
    # The received model on this device's own held-out data, at the ranks it runs: what a
    # device of this tier would see locally, before it trains.
    with _timed(took, "validate"):
        local = evaluate(model, val_loader, precision=cfg.precision)
    prepare_model(cfg, model)
    # the classes in this client's own training data (a masked loss keeps only these)
    local_recipe = recipe(cfg, server_round, config, torch.unique(loader.y).tolist())
    result = train(model, loader, local_recipe, model.max_ranks(),
                   rng=step_rng(cfg.seed, server_round, partition_id))
    with _timed(took, "encode"):
        reply = to_record(model_arrays(model))
    metrics = MetricRecord({
        "num-examples": loader.num_examples, "train-loss": result["loss"],
        "train-accuracy": result["accuracy"], "train-seconds": result["seconds"],
        "train-macs": result["macs"], "steps": result["steps"],
        "val-accuracy": local["accuracy"], "val-loss": local["loss"],
        "val-examples": local["examples"], **{f"{k}-seconds": v for k, v in took.items()},
        **coverage_metrics(result["coverage"]),
        # A diverged client's reply is counted by the server, never merged.
        "diverged": int(result["diverged"]),
        **{k: float(result[k]) for k in ("diverged-loss", "diverged-step", "first-loss")
           if k in result},
    })
    if local_recipe.classes is not None:  # HeteroFL merges the output rows of these classes only
        metrics["classes"] = [int(c) for c in local_recipe.classes]
    return Message(content=RecordDict({"arrays": reply, METRICS: metrics}), reply_to=msg)


@contextmanager
def _timed(took: dict[str, float], part: str) -> Iterator[None]:
    """Add the block's wall-clock seconds to ``took[part]``."""
    start = time.perf_counter()
    try:
        yield
    finally:
        took[part] = took.get(part, 0.0) + time.perf_counter() - start
