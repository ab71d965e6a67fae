"""Checks a run command makes before it starts Flower: seconds, not the 16-23 s Flower takes to
reach the ServerApp, and each with a message that names what is wrong.

The ServerApp checks the same things again (a ``flwr run`` on a SuperLink of one's own gets no
preflight); these only make the common mistakes fail fast.
"""

from __future__ import annotations

import logging
import os
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from fl_maestro import streams
from fl_maestro.budgets import assign_budgets
from fl_maestro.config import RunConfig, parse_run_config
from fl_maestro.data import load_dataset, partition_indices
from fl_maestro.federation import resume_changes
from fl_maestro.methods import get_method
from fl_maestro.results import RunLock, RunStore

log = logging.getLogger(__name__)


class PreflightError(ValueError):
    """A run that would fail once Flower has started: refused before it starts."""


def preflight(run_config: Mapping[str, Any], supernodes: int | None = None) -> None:
    """Raise PreflightError if the run cannot work; ``supernodes``: the simulation's node count
    (None: budgets come from node configs, as in a deployment, so node checks are skipped)."""
    cfg = parse_run_config(run_config)
    folder = Path(cfg.results_dir) / cfg.name
    _check_writable(folder)
    lock = RunLock(folder)
    if not lock.is_free():
        raise PreflightError(f"{folder} is being written by another run: held by "
                             f"{lock.holder()}; wait for it or stop it")
    saved_nodes = _check_folder(cfg, folder)
    if cfg.init.startswith("svd:") and not Path(cfg.init[4:]).is_file():
        raise PreflightError(f"run-config key 'init' = {cfg.init!r}: file {cfg.init[4:]!r} "
                             "does not exist")
    try:
        load_dataset(cfg.dataset)  # decodes into the shared cache, which the run then maps
    except (OSError, ValueError) as err:
        raise PreflightError(f"dataset {cfg.dataset!r} cannot be loaded: {err}") from None
    if supernodes is not None:
        _check_nodes(cfg, supernodes, saved_nodes)
        _check_partitions(cfg, supernodes)


def _check_writable(folder: Path) -> None:
    """The run folder can be made and written (a probe file, so root on a read-only mount too)."""
    probe = folder / f".probe-{uuid.uuid4().hex}"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe.write_text("")
        probe.unlink()
    except OSError as err:
        raise PreflightError(f"results folder {folder} is not writable ({err.strerror}): "
                             "choose another results-dir") from None


def _check_folder(cfg: RunConfig, folder: Path) -> dict | None:
    """A resume needs a readable checkpoint of the same config; a fresh run needs no old run.
    Returns the checkpointed nodes (partition count, budgets) of a run to resume."""
    store = RunStore(folder)
    if not cfg.resume:
        if store.has_checkpoint():
            raise PreflightError(f"{folder} already holds a run: pass resume=true to continue "
                                 "it, or choose another run-name")
        return None
    if not store.has_checkpoint():
        raise PreflightError(f"resume=true but {folder} holds no checkpoint to resume from: "
                             "give the run-name of the run to continue (with make run: "
                             "RUN_NAME=<its folder name>), or drop resume=true")
    try:
        changed = resume_changes(store.read_config(), cfg.to_dict())
        _, _, state = store.load_checkpoint()
    except (OSError, ValueError) as err:
        raise PreflightError(str(err)) from None
    if changed:
        raise PreflightError(f"resume=true but the config differs from the checkpointed run in "
                             f"{changed} (saved, now)")
    return state.get("nodes")


def _check_nodes(cfg: RunConfig, supernodes: int, saved_nodes: Mapping | None) -> None:
    """Enough nodes take part for ``clients-per-round``, and as many as the checkpointed run's."""
    if supernodes < 1:
        raise PreflightError(f"--supernodes = {supernodes}: allowed an integer >= 1")
    if saved_nodes is not None and saved_nodes.get("num-partitions") != supernodes:
        raise PreflightError(f"resume=true with {supernodes} SuperNodes, but the checkpointed run "
                             f"had {saved_nodes.get('num-partitions')}: resume with as many")
    budgets = assign_budgets(cfg.mix, supernodes, streams.rng(cfg.seed, "budgets"))
    taking_part = sum(get_method(cfg.strategy).takes_part(float(b)) for b in budgets)
    if taking_part == 0:
        raise PreflightError(f"strategy {cfg.strategy!r}: none of the {supernodes} nodes takes "
                             f"part with budgets {sorted(set(budgets.tolist()))} (device-mix "
                             f"{cfg.device_mix!r})")
    if cfg.clients_per_round > taking_part:
        raise PreflightError(f"clients-per-round = {cfg.clients_per_round} but only "
                             f"{taking_part} of {supernodes} nodes take part under strategy "
                             f"{cfg.strategy!r}: lower it or pass more --supernodes")


def _check_partitions(cfg: RunConfig, supernodes: int) -> None:
    """Every client gets at least one training example: the partitioning every ClientApp would
    make (and fail at, minutes later) is made here once, and refused naming its keys."""
    _, y_train, _, _ = load_dataset(cfg.dataset)
    keys = (f"partitioner = {cfg.partitioner!r}, alpha = {cfg.alpha}, --supernodes = "
            f"{supernodes} ({len(y_train)} training examples of {cfg.dataset!r})")
    if supernodes > len(y_train):
        raise PreflightError(f"{keys}: more clients than training examples; lower --supernodes")
    if cfg.partitioner == "iid":  # equal shards: one example each whenever clients <= examples
        return
    seed = streams.seed_int(cfg.seed, "partition")  # the clients' own partitioning (~2 s)
    try:
        parts = partition_indices(y_train, supernodes, cfg.partitioner, cfg.alpha,
                                  cfg.classes_per_client, seed)
    except ValueError as err:
        raise PreflightError(f"{keys}: the partitioning cannot give every client an example "
                             f"({err}); raise alpha or lower --supernodes") from None
    empty = [i for i, p in enumerate(parts) if len(p) == 0]
    if empty:
        raise PreflightError(f"{keys}: {len(empty)} clients get no training example (partitions "
                             f"{empty[:5]}...); raise alpha or lower --supernodes")


def absolute_paths(run_config: Mapping[str, Any], base: Path) -> dict[str, Any]:
    """The overrides with a relative ``init=svd:<path>`` made absolute against ``base``: the
    ServerApp runs in another folder than the command."""
    init = run_config.get("init")
    if isinstance(init, str) and init.startswith("svd:") and not os.path.isabs(init[4:]):
        return {**run_config, "init": f"svd:{base / init[4:]}"}
    return dict(run_config)
