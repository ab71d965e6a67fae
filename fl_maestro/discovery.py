"""Who is there: every connected node's partition, partition count and optional budget."""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping

from flwr.app import Message, MessageType, RecordDict
from flwr.serverapp import Grid

log = logging.getLogger(__name__)


class Discovery:
    """Ask every connected node for its partition id, partition count and optional budget.

    The first queries go out when the object is made, so nodes (in a simulation: Ray actors
    loading the ClientApp) answer while the server sets up; ``result()`` collects them. Queries go
    out ``chunk`` at a time: Flower's simulation dispatch rescans every message in flight for every
    node, so thousands at once cost quadratic time.
    """

    def __init__(self, grid: Grid, chunk: int = 256) -> None:
        self.grid, self.chunk = grid, chunk
        self.node_ids = sorted(grid.get_node_ids())
        self._pending = self._ask(self.node_ids[:chunk])

    def _ask(self, node_ids: list[int]) -> set[str]:
        messages = [Message(content=RecordDict(), message_type=MessageType.QUERY, dst_node_id=n)
                    for n in node_ids]
        return set(self.grid.push_messages(messages)) if messages else set()

    def result(self, timeout: float = 600, poll: float = 0.05) -> dict[int, Mapping]:
        """Every node's description. Each chunk gets ``timeout`` seconds; nodes silent that long
        are left out (logged), as Flower's ``send_and_receive`` would leave them."""
        nodes: dict[int, Mapping] = {}
        for first in range(self.chunk, len(self.node_ids) + self.chunk, self.chunk):
            deadline = time.monotonic() + timeout
            while self._pending and time.monotonic() < deadline:
                for reply in self.grid.pull_messages(self._pending):
                    self._pending.discard(reply.metadata.reply_to_message_id)
                    if reply.has_error():
                        raise RuntimeError(f"node {reply.metadata.src_node_id} failed to describe "
                                           f"itself: {reply.error.reason}")
                    nodes[reply.metadata.src_node_id] = dict(reply.content["node"])
                if self._pending:
                    time.sleep(poll)
            if self._pending:
                log.warning("%d nodes did not answer within %g s; going on without them",
                            len(self._pending), timeout)
            log.info("discovered %d of %d nodes", len(nodes), len(self.node_ids))
            self._pending = self._ask(self.node_ids[first:first + self.chunk])
        return nodes
