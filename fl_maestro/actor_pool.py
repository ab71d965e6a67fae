"""Replace a dead Ray actor in Flower's simulation pool, so one hard-crashed client is one failure.

A ClientApp that dies hard (``os._exit``, a segfault, the OOM killer) takes its Ray actor with it.
Flower's Ray backend (flwr 1.41 and 1.42, ``BasicActorPool``) puts that dead actor back into its
pool, and being always idle it gets most later messages: measured here, 8 of 10 replies failed
in every later round. There is no public hook for this, so ``install()`` wraps the one pool method
that sees the failure: when fetching a result raises Ray's ``RayActorError`` (the actor is gone,
as opposed to an exception raised inside a living ClientApp), the pool gets a fresh actor in the
dead one's place and the message still fails (the client's reply is a Flower error). This uses
Flower's private classes, so ``pyproject.toml`` pins flwr to the versions tested with it.

The ServerApp calls ``install()``: in a simulation it runs in the process that owns the pool.
"""

from __future__ import annotations

import functools
import logging

log = logging.getLogger(__name__)


def install() -> bool:
    """Make Flower's Ray actor pool replace dead actors; False where there is no such pool."""
    try:
        import ray
        from flwr.simulation.ray_transport.ray_actor import BasicActorPool
    except ImportError:
        return False
    fetch = BasicActorPool.fetch_result_and_return_actor_to_pool
    if getattr(fetch, "replaces_dead_actors", False):
        return True

    @functools.wraps(fetch)
    def fetch_or_replace(self, future):
        try:
            return fetch(self, future)
        except ray.exceptions.RayActorError:
            # Flower's caller returns the actor of this future to the pool: make it a live one.
            if future in self._future_to_actor:
                self._future_to_actor[future] = self.create_actor_fn()
                log.warning("a client actor died; replaced it with a fresh one")
            raise

    fetch_or_replace.replaces_dead_actors = True
    BasicActorPool.fetch_result_and_return_actor_to_pool = fetch_or_replace
    return True
