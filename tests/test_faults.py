"""A run never lies: dead federations stop, bad checkpoints and changed federations are refused,
one writer per run folder. Driven in one process (``InProcessGrid``) with real ClientApps."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Message
from flwr.clientapp import ClientApp
from safetensors.numpy import save_file

from fl_maestro.client_app import describe, train_prefix
from fl_maestro.config import parse_run_config
from fl_maestro.federation import RoundFailed, run_federation
from fl_maestro.models import build_model, dense_state
from fl_maestro.results import RunLock, RunLocked, RunStore
from simulations.inprocess import InProcessGrid


def _overrides(tmp_path: Path, **extra) -> dict:
    return {"dataset": "digits", "model": "mlp", "num-rounds": 2, "clients-per-round": 4,
            "partitioner": "iid", "device-mix": "0.25:0.5,1.0:0.5", "results-dir": str(tmp_path),
            "run-name": "run", "eval-samples": 50, "eval-fractions": "1.0", **extra}


def _run(overrides: dict, nodes: int = 4, app: ClientApp | None = None):
    grid = InProcessGrid(nodes, overrides) if app is None else InProcessGrid(nodes, overrides, app)
    return run_federation(grid, parse_run_config(overrides))


def _failing_app(failing: set[int]) -> ClientApp:
    """The project's ClientApp, except that the given partitions raise in training."""
    app = ClientApp()
    app.query()(describe)

    @app.train()
    def train(msg: Message, context) -> Message:
        if int(context.node_config["partition-id"]) in failing:
            raise RuntimeError(f"device {context.node_config['partition-id']} ran out of memory")
        return train_prefix(msg, context)

    return app


def test_a_dead_federation_stops_with_the_round_and_the_reasons(tmp_path: Path) -> None:
    overrides = _overrides(tmp_path)
    with pytest.raises(RoundFailed, match=r"round 1: only 1 of 4 clients.*ran out of memory"):
        _run(overrides, app=_failing_app({0, 1, 2}))
    store = RunStore(tmp_path / "run")
    clients, rounds = store.read("clients"), store.read("rounds")
    assert sorted(clients["outcome"]) == ["error", "error", "error", "ok"]
    assert clients.loc[clients["outcome"] == "error", "reason"].str.contains("out of memory").all()
    assert rounds.loc[0, "dropped-error"] == 3 and rounds.loc[0, "clients"] == 1
    assert rounds.loc[0, "bytes-down"] == clients["bytes-down"].sum()  # failed clients' bytes too
    assert not store.has_checkpoint()  # the failed round is not checkpointed


def test_a_round_above_the_minimum_share_goes_on(tmp_path: Path) -> None:
    _run(_overrides(tmp_path, **{"min-reply-share": 0.5}), app=_failing_app({0, 1}))
    rounds = RunStore(tmp_path / "run").read("rounds")
    assert list(rounds["dropped-error"]) == [2, 2] and list(rounds["clients"]) == [2, 2]


def test_a_non_finite_checkpoint_is_refused_on_resume(tmp_path: Path) -> None:
    overrides = _overrides(tmp_path, **{"num-rounds": 1})
    _run(overrides)
    store = RunStore(tmp_path / "run")
    state = json.loads((store.root / "checkpoint.json").read_text())
    _, arrays, _ = store.load_checkpoint()
    name = sorted(arrays)[0]
    arrays[name] = np.full_like(arrays[name], np.nan)
    save_file(arrays, str(store.root / state["arrays"]))
    resumed = {**overrides, "resume": True, "num-rounds": 2}
    with pytest.raises(ValueError, match=rf"non-finite values .*{name}"):
        _run(resumed)


def test_a_non_finite_initial_model_is_refused(tmp_path: Path) -> None:
    dense = dense_state(build_model("mlp", (1, 8, 8), 10))
    bias = next(k for k in dense if k.endswith("bias"))
    dense[bias] = np.full_like(dense[bias], np.nan)
    path = tmp_path / "dense.safetensors"
    save_file(dense, str(path))
    with pytest.raises(ValueError, match=rf"initial model .*non-finite .*{bias}"):
        _run(_overrides(tmp_path, init=f"svd:{path}"))


def test_resume_without_a_checkpoint_is_refused_naming_the_folder(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=rf"{tmp_path / 'run'} holds no checkpoint"):
        _run(_overrides(tmp_path, resume=True))


def test_resume_with_another_number_of_nodes_is_refused(tmp_path: Path) -> None:
    overrides = _overrides(tmp_path, **{"num-rounds": 1})
    _run(overrides, nodes=4)
    with pytest.raises(ValueError, match="num-partitions: saved 4, now 5"):
        _run({**overrides, "resume": True, "num-rounds": 2}, nodes=5)


def test_more_clients_per_round_than_nodes_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="clients-per-round = 5 but only 4 of 4 nodes"):
        _run(_overrides(tmp_path, **{"clients-per-round": 5}))


def test_a_corrupt_checkpoint_json_names_the_file(tmp_path: Path) -> None:
    store = RunStore(tmp_path / "run")
    (store.root / "checkpoint.json").write_text('{"round": 3, "arr')
    with pytest.raises(ValueError, match=rf"checkpoint {store.root / 'checkpoint.json'} is corrupt"):
        store.load_checkpoint()
    (store.root / "checkpoint.json").write_text('{"round": 3, "arrays": "checkpoint-3.safetensors"}')
    (store.root / "checkpoint-3.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{")
    with pytest.raises(ValueError, match=r"checkpoint arrays .*checkpoint-3.safetensors cannot"):
        store.load_checkpoint()


HOLDER = """
import sys, time
from fl_maestro.results import RunLock
with RunLock(sys.argv[1]):
    print("held", flush=True)
    time.sleep(600)
"""


def test_a_second_writer_is_refused_naming_the_holder(tmp_path: Path) -> None:
    """A real process holds the run folder; the lock dies with it, even by SIGKILL."""
    folder = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(folder)], cwd=Path.cwd(),
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(RunLocked, match=rf"held by pid {holder.pid} on "):
            with RunLock(folder):
                pass
        with pytest.raises(RunLocked, match=rf"pid {holder.pid}"):
            _run(_overrides(tmp_path, resume=True))
    finally:
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait()
    deadline = time.monotonic() + 10
    while not RunLock(folder).is_free() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert RunLock(folder).is_free()


def test_tensorboard_scalars_read_back(tmp_path: Path) -> None:
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    _run(_overrides(tmp_path, tensorboard=True))
    events = EventAccumulator(str(tmp_path / "run" / "tensorboard"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"tier-0.25/accuracy", "tier-1/accuracy", "tier-1/loss", "round/bytes-down",
            "round/bytes-up", "round/train-loss", "round/dropped-error"} <= tags
    accuracy = events.Scalars("tier-1/accuracy")
    assert [e.step for e in accuracy] == [0, 1, 2]
    evaluation = RunStore(tmp_path / "run").read("evaluation")
    final = evaluation[(evaluation["round"] == 2) & (evaluation["kind"] == "tier")
                       & (evaluation["level"] == 1.0) & (evaluation["metric"] == "accuracy")]
    assert accuracy[-1].value == pytest.approx(final["value"].item())
    down = events.Scalars("round/bytes-down")
    assert [e.value for e in down] == list(RunStore(tmp_path / "run").read("rounds")["bytes-down"])
