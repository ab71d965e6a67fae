"""A ClientApp that hard-crashes (``os._exit``) through the real ``flwr run`` on Ray: its round
records one error, and every later round gets every reply (the dead actor was replaced)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from fl_maestro.results import RunStore
from simulations.launch import APP_DIR, PrivateSuperLink, federation_config, stage_app

pytestmark = pytest.mark.slow

CRASHING_CLIENT = '''
"""The project's ClientApp, except that partition 0 kills its own process in round 1."""
import os

from flwr.clientapp import ClientApp

from fl_maestro.client_app import describe, train_prefix

app = ClientApp()
app.query()(describe)


@app.train()
def train(msg, context):
    if int(context.node_config["partition-id"]) == 0 and int(msg.content["config"]["server-round"]) == 1:
        os._exit(1)  # no exception, no reply: the process (a Ray actor) is gone
    return train_prefix(msg, context)
'''


def _crashing_app(folder: Path) -> Path:
    """A copy of the app whose pyproject names the crashing ClientApp."""
    stage_app(APP_DIR, folder)
    (folder / "fl_maestro" / "crashing_client.py").write_text(CRASHING_CLIENT)
    pyproject = folder / "pyproject.toml"
    text, count = re.subn(r'clientapp = "[^"]*"', 'clientapp = "fl_maestro.crashing_client:app"',
                          pyproject.read_text())
    assert count == 1
    pyproject.write_text(text)
    return folder


def test_a_hard_crashed_client_is_one_error_and_later_rounds_are_whole(tmp_path: Path) -> None:
    app = _crashing_app(tmp_path / "app")
    overrides = {"dataset": "digits", "model": "mlp", "num-rounds": 3, "clients-per-round": 4,
                 "partitioner": "iid", "eval-samples": 50, "eval-fractions": "1.0",
                 "results-dir": str(tmp_path / "results"), "run-name": "crash"}
    with PrivateSuperLink(app_dir=app) as link:
        code = link.run(overrides, federation_config(4), timeout=600)
    assert code == 0 and link.status == "finished:completed"
    store = RunStore(tmp_path / "results" / "crash")
    clients, rounds = store.read("clients"), store.read("rounds")
    first = clients[clients["round"] == 1]
    assert list(first.loc[first["outcome"] != "ok", "partition-id"]) == [0]
    assert first.loc[first["partition-id"] == 0, "outcome"].item() == "error"
    assert list(rounds["dropped-error"]) == [1, 0, 0]
    assert (clients.loc[clients["round"] > 1, "outcome"] == "ok").all()
