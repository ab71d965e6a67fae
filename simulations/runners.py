"""How a sweep runs one cell: through ``flwr run`` (``FlowerCells``) or in one process
(``InProcessCells``, ``simulations.inprocess`` as a subprocess: the same ServerApp and ClientApp
code without the SuperLink, Ray and their per-run start-up).

Both are ``RunCell`` callables, ``(cell, resume) -> exit code``.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

from simulations.cells import Cell
from simulations.launch import PrivateSuperLink, federation_config

log = logging.getLogger(__name__)


class FlowerCells:
    """``run_cell`` over Flower: one private SuperLink for the sweep, restarted after a failure.

    Starting a SuperLink costs seconds and every cell is its own ``flwr run`` with its own
    federation config, so consecutive cells share one. A failed or timed-out cell may leave its run
    alive inside the SuperLink, so the next cell gets a fresh one.
    """

    def __init__(self, cpus_per_client: int = 1, timeout: float | None = None) -> None:
        self.cpus_per_client, self.timeout = cpus_per_client, timeout
        self.link = None

    def __enter__(self) -> FlowerCells:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __call__(self, cell: Cell, resume: bool) -> int:
        """Run one cell as ``flwr run``; its exit code."""
        if self.link is None:
            link = PrivateSuperLink()
            try:
                link.start()
            except BaseException:
                link.stop()
                raise
            self.link = link
        code = self.link.run({**cell.run_config, "resume": resume},
                             federation_config(cell.supernodes, self.cpus_per_client), self.timeout)
        if code != 0:
            self.close()
        return code

    def close(self) -> None:
        """Stop the SuperLink, if one runs."""
        if self.link is not None:
            self.link.stop()
            self.link = None


class InProcessCells:
    """``run_cell`` as ``python -m simulations.inprocess`` in a subprocess of its own per cell.

    The subprocess's log goes to ``<cell folder>/run.log``. ``threads`` caps torch's intra-op
    threads (on a shared machine more threads spin-wait more than they compute).
    """

    def __init__(self, threads: int = 1, timeout: float | None = None) -> None:
        self.threads, self.timeout = threads, timeout

    def __enter__(self) -> InProcessCells:
        return self

    def __exit__(self, *exc) -> None:
        pass

    def command(self, cell: Cell, resume: bool) -> list[str]:
        """The command line that runs ``cell``."""
        command = [sys.executable, "-m", "simulations.inprocess", "--nodes", str(cell.supernodes)]
        for key, value in {**cell.run_config, "resume": resume}.items():
            command += ["-c", f"{key}={json.dumps(value)}"]
        return command

    def __call__(self, cell: Cell, resume: bool) -> int:
        """Run one cell; its exit code (124 when it ran past the timeout)."""
        folder = Path(cell.run_config["results-dir"]) / cell.cell_id
        folder.mkdir(parents=True, exist_ok=True)
        threads = str(self.threads)
        env = {**os.environ, "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads}
        with open(folder / "run.log", "a") as sink:
            process = subprocess.Popen(self.command(cell, resume), stdout=sink,
                                       stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                       env=env)
            try:
                return process.wait(timeout=self.timeout)
            except subprocess.TimeoutExpired:
                log.error("cell %s ran past %.0f s: stopped", cell.cell_id, self.timeout)
                return 124
            finally:
                if process.poll() is None:
                    process.kill()
                    process.wait()
