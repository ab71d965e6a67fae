"""Wall-clock phases of a run (set-up, discovery, training, evaluation, results per round)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager


class Timeline:
    """Wall-clock phases of a run, kept as rows for the ``timeline`` table.

    Start times are Unix times, so they line up with what happens outside the ServerApp (the
    simulation benchmark uses them to tell Flower's start-up and shut-down from the run's own work).
    ``cpu-seconds`` is the CPU time of the process running the ServerApp (all its threads) in the
    phase: on a machine shared with other jobs it tells work from waiting for a core. A phase
    named ``<phase>:<part>`` is a part of the phase ``<phase>`` of the same round.
    """

    def __init__(self) -> None:
        self.rows: list[dict] = []

    @contextmanager
    def phase(self, server_round: int, name: str) -> Iterator[None]:
        """Time the block as phase ``name`` of ``server_round`` (0: before the first round)."""
        start, clock, cpu = time.time(), time.perf_counter(), time.process_time()
        try:
            yield
        finally:
            self.rows.append({"round": server_round, "phase": name, "start": start,
                              "seconds": time.perf_counter() - clock,
                              "cpu-seconds": time.process_time() - cpu})

    def take(self) -> list[dict]:
        """The rows recorded since the last call."""
        rows, self.rows = self.rows, []
        return rows
