"""One federated run, round by round: plans, training, merging, shrinking, evaluation, results.

``run_federation(grid, cfg)`` drives any ``flwr.serverapp.Grid``: Flower's own (``flwr run .``)
or ``simulations.inprocess.InProcessGrid``. Each round it re-plans every client's ranks on the
current global model (so importance allocation and shrinking take effect), lets the strategy
sample, send, validate and merge, optionally shrinks the global model, evaluates it at a grid of
rank fractions and at every tier's ranks, appends the rows to ``results/<run>/`` and checkpoints.
"""

from __future__ import annotations

import json
import logging
import time
from collections import Counter
from collections.abc import Mapping

import numpy as np
import pandas as pd
import torch
from flwr.app import ConfigRecord
from flwr.serverapp import Grid
from safetensors.numpy import load_file

from fl_maestro import streams
from fl_maestro.budgets import assign_budgets
from fl_maestro.components import component_rows, coverage_from_metrics
from fl_maestro.config import RunConfig, defaults
from fl_maestro.data import (DATASET_SHAPES, NUM_CLASSES, load_dataset, make_loader,
                             validation_rows)
from fl_maestro.discovery import Discovery
from fl_maestro.evaluation import evaluate_levels
from fl_maestro.models import RankedModel, build_model, load_dense_state, model_arrays
from fl_maestro.methods import HGL_BEYOND, TIER_GRID, Planning, get_method, tier_grid_ranks
from fl_maestro.results import RunLock, RunStore, check_finite
from fl_maestro.rounds import RoundPlanner, round_totals
from fl_maestro.scalars import Scalars
from fl_maestro.shrinking import importance_from_arrays, shrink_ranks, tail_constants
from fl_maestro.timeline import Timeline
from fl_maestro.world import MERGED, load_world
from strategies.merge import factor_layer, prefix_arrays
from strategies.plan import FAILED, ClientSpec
from strategies.rankwise import RankWiseFedAvg, WidthFedAvg
from strategies.records import to_numpy, to_record

log = logging.getLogger(__name__)

# The output layer's arrays (rows = classes) of every model: HeteroFL merges a client's rows only.
OUTPUT_ROWS = ("classifier.weight", "classifier.bias")

class RoundFailed(RuntimeError):
    """A round lost too many replies for its result to mean anything."""


# Keys a resumed run may change: they do not alter what the finished rounds computed.
RESUMABLE_CHANGES = frozenset({"resume", "num-rounds", "eval-every", "results-dir",
                               "min-reply-share", "tensorboard"})


def resume_changes(saved: Mapping, now: Mapping) -> dict:
    """Keys (saved value, new value) a resumed run may not change but does."""
    return {k: (saved.get(k), v) for k, v in now.items()
            if k not in RESUMABLE_CHANGES and saved.get(k) != v}


def node_budgets(cfg: RunConfig, nodes: Mapping[int, Mapping]) -> dict[int, float]:
    """Each node's budget: its node-config budget if set, else the device mix's draw for its partition."""
    counts = {int(info["num-partitions"]) for info in nodes.values()}
    if len(counts) != 1:
        raise ValueError(f"nodes disagree on num-partitions: {sorted(counts)}")
    mix_budgets = assign_budgets(cfg.mix, counts.pop(), streams.rng(cfg.seed, "budgets"))
    return {node: float(info["budget"]) if "budget" in info
            else float(mix_budgets[int(info["partition-id"])]) for node, info in nodes.items()}


def evaluation_subset(seed: int, size: int, n: int) -> np.ndarray:
    """The ``n`` test examples (of ``size``) the global model is evaluated on, by seed."""
    return streams.rng(seed, "evaluation").permutation(size)[:n]


def evaluation_rows(model: RankedModel, loader, fractions: list[float], server_round: int,
                    tier_ranks: Mapping[float, Mapping[str, int]],
                    precision: str = "fp32") -> list[dict]:
    """Tidy rows of the global model's accuracy, loss and cost at every fraction and tier.

    Every level is evaluated in one pass over the batches, work shared between levels computed
    once (``fl_maestro.evaluation``). ``dense-relative-macs`` is relative to the same network
    undecomposed (what budgets are fractions of; shrinking does not change it).
    """
    levels = [("fraction", p, model.ranks_at_fraction(p)) for p in fractions]
    levels += [("tier", b, ranks) for b, ranks in tier_ranks.items()]
    dense_macs = model.dense_cost("macs")
    rows = []
    results = evaluate_levels(model, loader, [ranks for _, _, ranks in levels], precision)
    for (kind, level, ranks), result in zip(levels, results):
        macs = model.cost(ranks, "macs")
        values = {"accuracy": result["accuracy"], "loss": result["loss"], "macs": macs,
                  "params": model.cost(ranks, "params"),
                  "dense-relative-macs": macs / dense_macs, "eval-examples": result["examples"]}
        rows += [{"round": server_round, "kind": kind, "level": level, "metric": k, "value": v}
                 for k, v in values.items()]
    return rows


def shrink_arrays(arrays: Mapping[str, np.ndarray], threshold: float) -> dict[str, np.ndarray]:
    """Cut every layer's trailing components whose importance is under ``threshold``."""
    layers = sorted({factor_layer(n) for n in arrays if factor_layer(n) is not None})
    importances = {layer: importance_from_arrays(arrays[f"{layer}.U"], arrays[f"{layer}.V"])
                   for layer in layers}
    return prefix_arrays(arrays, shrink_ranks(importances, threshold))


def initial_arrays(cfg: RunConfig) -> dict[str, np.ndarray]:
    """The global model at round 0: drawn from the run's seed, or SVD of a dense model."""
    with torch.random.fork_rng():
        torch.manual_seed(streams.seed_int(cfg.seed, "init"))
        model = get_method(cfg.strategy).model_family.build(
            cfg.model, DATASET_SHAPES[cfg.dataset], NUM_CLASSES[cfg.dataset],
            rank_cap=cfg.rank_cap)
    if cfg.init.startswith("svd:"):
        load_dense_state(model, load_file(cfg.init[4:]))
        log.info("initialised every factor pair by SVD of %s", cfg.init[4:])
    return check_finite(model_arrays(model), f"the initial model ({cfg.init})")


class Federation:
    """The state of one run: global arrays, strategy, evaluation data and the results folder."""

    def __init__(self, grid: Grid, cfg: RunConfig) -> None:
        self.grid, self.cfg = grid, cfg
        self.shape, self.classes = DATASET_SHAPES[cfg.dataset], NUM_CLASSES[cfg.dataset]
        self.store = RunStore(f"{cfg.results_dir}/{cfg.name}")
        self.method = method = get_method(cfg.strategy)
        self.tiers = list(cfg.tiers)
        self.budgets: dict[int, float] = {}
        self.partitions: dict[int, int] = {}
        self.examples: dict[int, int] = {}
        self.world = load_world(cfg)
        # The strategy's collaborator: the round's specs, the world's decisions, the rows.
        self.planner = RoundPlanner(cfg, self.world)
        strategy_class = WidthFedAvg if method.model_family.cut_shared else RankWiseFedAvg
        self.strategy = strategy_class(
            cfg.clients_per_round, merge_weight=method.merge_weight(cfg),
            label_rows=OUTPUT_ROWS if method.label_rows(cfg) else (), planner=self.planner,
            rng=streams.rng(cfg.seed, "sampling"))
        self.clock = 0.0  # simulated seconds at the end of the last finished round
        self.saved_nodes: dict | None = None  # the checkpointed run's partitions and budgets
        self.start_round = 1
        # Budgets are fractions of the dense (undecomposed) model's cost, for every strategy:
        # a width-sliced baseline's device gets the MACs a rank-wise device of its tier gets,
        # and shrinking never changes what a device affords.
        self.reference_cost = build_model(cfg.model, self.shape, self.classes, "meta",
                                          "none").dense_cost(cfg.cost)
        if cfg.resume and self.store.has_checkpoint():
            self._resume()
            self.initial = self.store.load_initial()
        elif cfg.resume:
            raise ValueError(f"resume=true but {self.store.root} holds no checkpoint to resume "
                             "from: check run-name and results-dir, or drop resume=true")
        elif self.store.has_checkpoint():
            raise ValueError(f"{self.store.root} already holds a run: pass resume=true to continue "
                             "it, or choose another run-name")
        else:
            self.store.clear()  # leftovers of a run killed before its first checkpoint
            self.arrays = self.initial = initial_arrays(cfg)
            self.store.save_initial(self.initial)
        self.store.write_config(cfg.to_dict())
        self.scalars = Scalars(self.store.root / "tensorboard", self.start_round) \
            if cfg.tensorboard else None
        self.eval_x, self.eval_y = self._evaluation_data()
        self.eval_pool: np.ndarray | None = None  # rows of eval_x to evaluate on (None: all)

    def _evaluation_data(self) -> tuple[np.ndarray, np.ndarray]:
        """The test set, or (``eval-split = validation``) the training set, of which the union
        of the clients' validation splits is evaluated once the partitions are known."""
        x_train, y_train, test_x, test_y = load_dataset(self.cfg.dataset)
        return (x_train, y_train) if self.cfg.eval_split == "validation" else (test_x, test_y)

    def _resume(self) -> None:
        # a key the saved run predates had its default then
        changed = resume_changes({**defaults(), **self.store.read_config()}, self.cfg.to_dict())
        if changed:
            raise ValueError(f"resume=true but the config differs from the checkpointed run in "
                             f"{changed} (saved, now); only {sorted(RESUMABLE_CHANGES)} may change")
        last, self.arrays, state = self.store.load_checkpoint()
        self.strategy.load_state_dict(state["strategy"])
        self.clock = float(state.get("clock", 0.0))  # runs from before the simulated clock
        self.saved_nodes = state.get("nodes")
        self.store.truncate_after(last)
        self.start_round = last + 1
        log.info("resuming %s after round %d", self.store.root, last)

    def global_model(self) -> RankedModel:
        """The current global model at its maximum ranks (on the GPU when there is one)."""
        device = "cuda" if torch.cuda.is_available() else "cpu"
        return self.method.model_family.from_arrays(self.cfg.model, self.shape, self.classes,
                                                    self.arrays, device)

    def planning(self, server_round: int) -> Planning:
        """What this run's plans read beside the model and a device's budget."""
        return Planning(tuple(self.tiers), self.cfg.rank_allocation, self.cfg.cost,
                        self.reference_cost, server_round)

    def plan(self, model: RankedModel, budget: float, server_round: int) -> dict[str, int]:
        """The ranks a device of ``budget`` trains and runs under this run's strategy.

        Budgets stay fractions of the original full-rank model's cost: when shrinking makes the
        global model smaller, a device still affords what it did, so it gets more of the model.
        """
        return self.method.plan(model, budget, self.planning(server_round))

    def set_nodes(self, nodes: Mapping[int, Mapping]) -> None:
        """Learn every node's partition and budget (node config, else the device mix)."""
        self.budgets = node_budgets(self.cfg, nodes)
        self.partitions = {n: int(info["partition-id"]) for n, info in nodes.items()}
        self.examples = {n: int(info["train-examples"]) for n, info in nodes.items()}
        num_partitions = int(next(iter(nodes.values()))["num-partitions"])
        self.world.availability.check_clients(num_partitions)
        if self.cfg.eval_split == "validation":
            cfg = self.cfg  # the clients' own partitioning, so the rows they hold out
            self.eval_pool = validation_rows(cfg.dataset, num_partitions, cfg.partitioner,
                                             cfg.alpha, cfg.classes_per_client,
                                             streams.seed_int(cfg.seed, "partition"),
                                             cfg.val_fraction)
        self._check_same_nodes(nodes)
        # Deployment budgets from node configs are tiers too, evaluated and planned for.
        self.tiers = sorted(set(self.tiers) | set(self.budgets.values()))
        taking_part = sum(self.method.takes_part(b) for b in self.budgets.values())
        if not taking_part:
            raise ValueError(f"strategy {self.cfg.strategy!r}: no node takes part with budgets "
                             f"{sorted(set(self.budgets.values()))}")
        if self.cfg.clients_per_round > taking_part:
            raise ValueError(f"clients-per-round = {self.cfg.clients_per_round} but only "
                             f"{taking_part} of {len(nodes)} nodes take part under strategy "
                             f"{self.cfg.strategy!r}: lower it or start more SuperNodes")

    def node_state(self) -> dict:
        """What the checkpoint keeps of the nodes: partition count and each partition's budget."""
        return {"num-partitions": len(self.partitions),
                "budgets": {str(self.partitions[n]): b for n, b in sorted(self.budgets.items())}}

    def _check_same_nodes(self, nodes: Mapping[int, Mapping]) -> None:
        """A resumed run must see the partitions and budgets it was checkpointed with."""
        if self.saved_nodes is None:
            return
        now = self.node_state()
        for key in ("num-partitions", "budgets"):
            if now[key] != self.saved_nodes[key]:
                raise ValueError(f"resume=true but the nodes differ from the checkpointed run's "
                                 f"{key}: saved {self.saved_nodes[key]}, now {now[key]}; resume "
                                 "with the same number of SuperNodes (and node configs)")

    def replan(self, server_round: int) -> tuple[RankedModel, dict[int, ClientSpec]]:
        """Every taking-part node's spec (ranks, slice or FedRolex's window of the round, extra
        config) on the current global model, and that model (it prices the round's local steps)."""
        model = self.global_model()
        ranks = {b: self.plan(model, b, server_round) for b in set(self.budgets.values())}
        shapes = {b: model.slice_shapes(r) for b, r in ranks.items()}
        extra = {b: self.client_config(model, b, r, server_round) for b, r in ranks.items()}
        windows = {b: self.method.windows(model, r, server_round) for b, r in ranks.items()} \
            if self.method.windows is not None else {}
        return model, {
            n: ClientSpec(self.partitions[n], b, ranks[b], shapes[b], extra[b],
                          self.examples.get(n), windows.get(b))
            for n, b in self.budgets.items() if self.method.takes_part(b)}

    def client_config(self, model: RankedModel, budget: float, ranks: Mapping[str, int],
                      server_round: int) -> dict[str, str]:
        """What a device needs beside its slice: FjORD's tier grid; for HGL, the squared norms
        of the components past its ranks (its groups are the global model's groups)."""
        local = self.method.local(self.cfg)
        extra = {}
        if local.sampler == TIER_GRID:
            grid = tier_grid_ranks(self.method, model, budget, self.planning(server_round))
            extra[TIER_GRID] = json.dumps(grid)
        if local.hgl_lambda > 0:
            extra[HGL_BEYOND] = json.dumps(tail_constants(self.arrays, ranks))
        return extra

    def evaluate(self, server_round: int, final: bool = False) -> list[dict]:
        """Evaluate the global model on the test set or, with ``eval-split = validation``, the
        clients' validation splits (on the whole of it for the final round)."""
        pool = np.arange(len(self.eval_y)) if self.eval_pool is None else self.eval_pool
        n = len(pool) if final or self.cfg.eval_samples == 0 else self.cfg.eval_samples
        subset = pool[evaluation_subset(self.cfg.seed, len(pool), n)]
        # Batches of 200 keep the CNN's largest activation (20 MB) under glibc's largest
        # mmap threshold, so fl_maestro.runtime's malloc settings keep it in the heap.
        model = self.global_model()
        loader = make_loader(self.eval_x, self.eval_y, np.sort(subset), batch_size=200,
                             device=next(model.parameters()).device)
        tiers = {b: self.plan(model, b, server_round) for b in self.tiers}
        return evaluation_rows(model, loader, self.cfg.fractions, server_round, tiers,
                               self.cfg.precision)

    def train_round(self, server_round: int, timeline: Timeline | None = None) -> dict:
        """One round of planning, sampling, local training, merging and shrinking.

        The device world picks who is online at the round's simulated start and decides, before
        anyone trains, who drops out, straggles or trains only part of its steps; the round's
        simulated duration moves the clock. The strategy asks the round's ``RoundPlanner`` who
        may train and whom to send, and hands it the replies' rows. Its parts are phases
        ``training:plan`` (every client's ranks, who is online), ``training:configure``
        (sampling, the device world's decisions, slicing and encoding each client's message),
        ``training:clients`` (waiting for the replies: the clients' work
        and the transport) and ``training:merge`` (decoding, checking and merging the replies) of
        ``timeline``.
        """
        start, timeline = time.perf_counter(), timeline or Timeline()
        k = self.cfg.clients_per_round
        planner = self.planner
        with timeline.phase(server_round, "training:plan"):
            model, specs = self.replan(server_round)
            planner.start(server_round, model, self.arrays, specs, self.clock)
        with timeline.phase(server_round, "training:configure"):
            messages = list(self.strategy.configure_train(server_round, to_record(self.arrays),
                                                          ConfigRecord(), self.grid))
        with timeline.phase(server_round, "training:clients"):
            replies = self.grid.send_and_receive(messages, timeout=3600) if messages else []
        with timeline.phase(server_round, "training:merge"):
            merged, metrics = self.strategy.aggregate_train(server_round, replies)
            if merged is not None:
                self.arrays = to_numpy(merged)
        kept = {r["partition-id"] for r in planner.rows if r["outcome"] in MERGED}
        merged_nodes = {f.work.node for f in planner.fates if f.work.partition in kept}
        seconds = self.world.round_seconds(planner.fates, merged_nodes, k)
        begin = planner.begin
        self.clock = begin + seconds
        every = self.cfg.shrink_every
        if every and server_round % every == 0:
            self.shrink(server_round)
        return {"round": server_round, **dict(metrics or {}), **round_totals(planner.rows),
                "online": len(planner.online), "sim-start": begin, "sim-seconds": seconds,
                "sim-time": self.clock,
                "global-params": int(sum(a.size for a in self.arrays.values())),
                "seconds": time.perf_counter() - start}

    def shrink(self, server_round: int) -> None:
        """Progressive shrinking: cut trailing components under the importance threshold."""
        before = self.global_model().max_ranks()
        self.arrays = shrink_arrays(self.arrays, self.cfg.shrink_threshold)
        after = self.global_model().max_ranks()
        cut = {n: f"{before[n]}->{after[n]}" for n in before if after[n] != before[n]}
        log.info("round %d: shrinking cut %s", server_round, cut or "nothing")

    def component_rows(self, server_round: int) -> list[dict]:
        """Coverage of the round's replies and the global model's per-component state."""
        replies = [coverage_from_metrics(m) for m in self.planner.lists]
        return component_rows(server_round, self.arrays, self.initial, replies)

    def checkpoint(self, server_round: int) -> None:
        """Save everything a resumed run needs to continue after ``server_round``."""
        self.store.save_checkpoint(server_round, self.arrays,
                                   {"strategy": self.strategy.state_dict(), "clock": self.clock,
                                    "nodes": self.node_state()})

    def record(self, server_round: int, row: Mapping | None, evaluation: list[dict]) -> None:
        """Append a round's rows to the tables (and the TensorBoard scalars, when on)."""
        self.store.append("evaluation", evaluation)
        if row is not None:
            self.store.append("clients", self.planner.rows)
            self.store.append("rounds", [row])
        if self.scalars is not None:
            self.scalars.add(server_round, row, evaluation)

    def check_replies(self, row: Mapping) -> None:
        """Stop the run when a round got fewer usable replies than ``min-reply-share`` asks of
        the clients it sent to. The device world's own faults do not count: clients it dropped
        before training are not sent, and clients it told to crash are left out of the share."""
        # told to crash by their device profile: simulated faults, not a dying federation
        sent = int(row.get("sent", 0)) - self.planner.injected_crashes
        usable = int(row.get("clients", 0))
        if sent and usable < self.cfg.min_reply_share * sent:
            reasons = Counter(f"{r['outcome']}: {r['reason']}" for r in self.planner.rows
                              if r["outcome"] in FAILED)
            listed = "; ".join(f"{n} x {why}" for why, n in reasons.most_common(5))
            raise RoundFailed(f"round {row['round']}: only {usable} of {sent} clients sent a usable "
                              f"reply (min-reply-share = {self.cfg.min_reply_share}); {listed}")


def run_federation(grid: Grid, cfg: RunConfig) -> pd.DataFrame:
    """Run every round, writing results as it goes; returns the final per-tier table.

    The run folder is locked for the whole run: a second writer (a resume started while this run
    goes on) is refused with a message naming this process.
    """
    with RunLock(f"{cfg.results_dir}/{cfg.name}"):
        return _run_rounds(grid, cfg)


def _run_rounds(grid: Grid, cfg: RunConfig) -> pd.DataFrame:
    """Set up, discover the nodes, then train, evaluate and checkpoint every round."""
    timeline = Timeline()
    with timeline.phase(0, "set-up"):
        discovery = Discovery(grid)  # nodes answer while the server sets up
        fed = Federation(grid, cfg)
    with timeline.phase(0, "discovery"):
        fed.set_nodes(discovery.result())
    if fed.start_round == 1:
        with timeline.phase(0, "evaluation"):
            fed.record(0, None, fed.evaluate(0))
            fed.store.append("components", fed.component_rows(0))
    fed.store.append("timeline", timeline.take())
    started = time.perf_counter()
    for rnd in range(fed.start_round, cfg.num_rounds + 1):
        with timeline.phase(rnd, "training"):
            row = fed.train_round(rnd, timeline)
        try:
            fed.check_replies(row)
        except RoundFailed:  # the failed round's rows stay, for the record; no checkpoint
            fed.record(rnd, row, [])
            raise
        evaluation, final = [], rnd == cfg.num_rounds
        if final or rnd % cfg.eval_every == 0:
            with timeline.phase(rnd, "evaluation"):
                evaluation = fed.evaluate(rnd, final=final)
        with timeline.phase(rnd, "results"):
            fed.record(rnd, row, evaluation)
            fed.store.append("components", fed.component_rows(rnd))
            fed.checkpoint(rnd)
        fed.store.append("timeline", timeline.take())
        _log_progress(fed, rnd, started)
    if fed.scalars is not None:
        fed.scalars.close()
    table = tier_table(fed.store.read("evaluation"), cfg.num_rounds)
    log.info("final global-model accuracy by tier (%s):\n%s", fed.store.root, table.to_string())
    return table


def _log_progress(fed: Federation, rnd: int, started: float) -> None:
    done = rnd - fed.start_round + 1
    left = fed.cfg.num_rounds - rnd
    per_round = (time.perf_counter() - started) / done
    evaluation = fed.store.read("evaluation")
    latest = evaluation[(evaluation["metric"] == "accuracy") & (evaluation["kind"] == "tier")]
    latest = latest[latest["round"] == latest["round"].max()]
    accs = " ".join(f"{b:g}:{a:.3f}" for b, a in zip(latest["level"], latest["value"]))
    log.info("round %d/%d done | tier accuracy (round %s) %s | %.1f s/round | ETA %.0f s", rnd,
             fed.cfg.num_rounds, latest["round"].max(), accs, per_round, per_round * left)


def tier_table(evaluation: pd.DataFrame, server_round: int) -> pd.DataFrame:
    """Per-tier accuracy and cost of the global model at ``server_round``."""
    rows = evaluation[(evaluation["round"] == server_round) & (evaluation["kind"] == "tier")]
    table = rows.pivot_table(index="level", columns="metric", values="value")
    table.index.name = "budget"
    return table[["accuracy", "dense-relative-macs", "params", "eval-examples"]]
