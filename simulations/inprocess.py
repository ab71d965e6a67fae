"""Run the ServerApp's federation against the ClientApp in this one process: no SuperLink, no Ray.

``InProcessGrid`` is a real ``flwr.serverapp.Grid``: every message it is given goes through the
project's ClientApp, one after another, in this process. The federation code runs unchanged, so
this is the plain single-process baseline the simulator's overhead is measured against, and a way
to run the training and merge paths where Ray is not installed (a GPU box, a debugger).

    python -m simulations.inprocess --nodes 10 -c dataset=digits -c num-rounds=3
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from collections.abc import Iterable, Mapping
from typing import Any
from uuid import uuid4

from flwr.app import Context, Error, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.supercore.run import Run
from flwr.serverapp import Grid
from flwr.supercore.task_identity import TaskIdentity

from fl_maestro.client_app import app as client_app
from fl_maestro.config import parse_run_config
from fl_maestro.federation import run_federation
from fl_maestro.runtime import keep_freed_memory
from fl_maestro.server_app import setup_logging
from simulations.launch import parse_overrides

log = logging.getLogger(__name__)


class InProcessGrid(Grid):
    """A Grid whose nodes are ClientApp calls in this process (partition i on node i + 1)."""

    def __init__(self, num_nodes: int, run_config: Mapping[str, Any],
                 app: ClientApp = client_app, node_configs: Mapping[int, Mapping] | None = None
                 ) -> None:
        _set_task_identity()
        self.app = app
        self._run = Run.create_empty(run_id=1)
        self._run.override_config = dict(run_config)
        self.contexts = {}
        for i in range(num_nodes):
            node_config = {"partition-id": i, "num-partitions": num_nodes,
                           **(node_configs or {}).get(i, {})}
            self.contexts[i + 1] = Context(run_id=1, node_id=i + 1, node_config=node_config,
                                           state=RecordDict(), run_config=dict(run_config))
        self._replies: dict[str, Message] = {}

    def set_run(self, run: Run) -> None:
        """Adopt another run's identity."""
        self._run = run

    @property
    def run(self) -> Run:
        """The run this grid serves."""
        return self._run

    def create_message(self, content: RecordDict, message_type: str, dst_node_id: int,
                       group_id: str, ttl: float | None = None) -> Message:
        """A message to one of this grid's nodes."""
        message = Message(content=content, dst_node_id=dst_node_id, message_type=message_type,
                          ttl=ttl, group_id=group_id)
        return message

    def get_node_ids(self) -> Iterable[int]:
        """The ids of every node."""
        return list(self.contexts)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        """Run each message through the ClientApp now; keep the reply until it is pulled."""
        ids = []
        for message in messages:
            # Give the message its id as Flower's grids do (no public setter), so the reply's
            # reply_to_message_id names it.
            message.metadata.__dict__["_message_id"] = message_id = str(uuid4())
            self._replies[message_id] = self._deliver(message)
            ids.append(message_id)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        """Hand over the replies to the given messages."""
        return [self._replies.pop(i) for i in message_ids if i in self._replies]

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None
                         ) -> Iterable[Message]:
        """Deliver every message and return every reply (``timeout`` is moot in-process)."""
        return self.pull_messages(self.push_messages(messages))

    def _deliver(self, message: Message) -> Message:
        context = self.contexts[message.metadata.dst_node_id]
        try:
            return self.app(message, context)
        except Exception as err:  # a client crash is a reply with an error, as in Flower
            log.exception("node %d failed", message.metadata.dst_node_id)
            return Message(Error(code=1, reason=f"{type(err).__name__}: {err}"), reply_to=message)


def _set_task_identity() -> None:
    """Messages built outside a SuperLink still need run, task and node ids."""
    for name in ("_run_id", "_task_id", "_node_id"):
        if getattr(TaskIdentity, name) is None:
            setattr(TaskIdentity, name, 0)


def main(argv: list[str] | None = None) -> int:
    """Command line: one federation in this process."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, default=100)
    parser.add_argument("-c", "--run-config", action="append", default=[])
    args = parser.parse_args(argv)
    setup_logging()
    keep_freed_memory()  # as the ServerApp and ClientApp processes do
    overrides = parse_overrides(args.run_config)
    cfg = parse_run_config(overrides)
    start = time.perf_counter()
    run_federation(InProcessGrid(args.nodes, overrides), cfg)
    log.info("in-process federation took %.1f s", time.perf_counter() - start)
    return 0


if __name__ == "__main__":
    sys.exit(main())
