"""The launcher with real processes: a SIGKILL of the launcher alone stops everything it started,
a second writer is refused naming the holder, and a refused run is judged a failure."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from fl_maestro.config import parse_run_config
from fl_maestro.results import RunLock, RunStore
from simulations.launch import (APP_DIR, COMPLETED, PrivateSuperLink, federation_config, judge,
                                processes_with_home)

pytestmark = pytest.mark.slow


def _config(results: Path, name: str, rounds: int) -> list[str]:
    return ["-c", "dataset=digits", "-c", "model=mlp", "-c", f"num-rounds={rounds}",
            "-c", "clients-per-round=2", "-c", "partitioner=iid", "-c", "eval-samples=50",
            "-c", "eval-fractions=1.0", "-c", f"results-dir={results}", "-c", f"run-name={name}"]


def _launch(*args: str, stderr=subprocess.PIPE) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "simulations.launch", "--supernodes", "3",
                             *args], cwd=APP_DIR, stdout=subprocess.DEVNULL, stderr=stderr,
                            text=True)


def _wait(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


def test_sigkill_of_the_launcher_alone_stops_the_run(tmp_path: Path) -> None:
    results, log_path = tmp_path / "results", tmp_path / "launcher.log"
    store = RunStore(results / "run")
    with open(log_path, "w") as log_file:
        launcher = _launch(*_config(results, "run", 200), stderr=log_file)
        try:
            _wait(lambda: not store.read("rounds").empty, 300, "the first round")
            home = Path(re.search(r"FLWR_HOME (\S+)\)", log_path.read_text()).group(1))
            assert processes_with_home(home)
            holder = json.loads((store.root / "lock.json").read_text())["pid"]
            # A resume started meanwhile is refused at once, naming the process that writes.
            second = _launch(*_config(results, "run", 200), "-c", "resume=true")
            _, err = second.communicate(timeout=120)
            assert second.returncode != 0
            assert f"held by pid {holder} on" in err
            os.kill(launcher.pid, signal.SIGKILL)  # the launcher alone, not its process group
            launcher.wait()
        finally:
            if launcher.poll() is None:
                launcher.kill()
    _wait(lambda: not processes_with_home(home), 60, "the run's processes to stop")
    _wait(lambda: not home.exists(), 30, "the temporary FLWR_HOME to go")
    _wait(lambda: RunLock(store.root).is_free(), 30, "the run folder's lock")
    rounds = store.read("rounds")["round"]
    time.sleep(2)  # nothing writes any more
    assert store.read("rounds")["round"].equals(rounds) and rounds.is_unique


def test_a_refused_run_is_a_failure_even_beside_a_finished_folder(tmp_path: Path) -> None:
    """The ServerApp refuses a reused run name without resume; the folder's old checkpoint
    says "finished", Flower says this run failed, and the verdict follows Flower."""
    overrides = {"dataset": "digits", "model": "mlp", "num-rounds": 2, "clients-per-round": 2,
                 "results-dir": str(tmp_path), "run-name": "old"}
    store = RunStore(tmp_path / "old")
    store.write_config(parse_run_config(overrides).to_dict())
    store.save_checkpoint(2, {"w": np.zeros(2, np.float32)}, {"strategy": {}})
    with PrivateSuperLink() as link:
        code = link.run(overrides, federation_config(3), timeout=300)
        assert link.status is not None and link.status != COMPLETED
    assert judge(code, overrides, link.status) != 0
    assert judge(0, overrides, COMPLETED) == 0  # the folder alone would have said success
