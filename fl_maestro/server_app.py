"""Flower ServerApp: validate the run config once, then run the federation on Flower's Grid.

Everything a run does lives in ``fl_maestro.federation``; this module only adapts it to Flower.
"""

from __future__ import annotations

import logging

import torch
from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fl_maestro import actor_pool
from fl_maestro.config import parse_run_config
from fl_maestro.federation import run_federation
from fl_maestro.runtime import keep_freed_memory

log = logging.getLogger(__name__)

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Run one federated experiment as the run config describes."""
    setup_logging()
    log.info("server process: %d torch threads; malloc keeps freed memory: %s; dead client "
             "actors replaced: %s", torch.get_num_threads(), keep_freed_memory(),
             actor_pool.install())
    cfg = parse_run_config(context.run_config)  # a bad key or value stops here, before any client
    run_federation(grid, cfg)


def setup_logging() -> None:
    """Show this project's INFO logs in the streamed run log (Flower configures its own)."""
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s: %(message)s", "%H:%M:%S"))
    for name in ("fl_maestro", "strategies", "simulations"):
        logger = logging.getLogger(name)
        if not logger.handlers:
            logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False
