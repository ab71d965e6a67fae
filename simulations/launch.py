"""Run ``flwr run .`` on a private SuperLink that this process starts and always stops.

``flwr run .`` on its own reuses whatever SuperLink answers on Flower's fixed local ports, and that
SuperLink's Ray actors import the app from the folder it was started in. So every run here gets its
own ``FLWR_HOME``, its own free ports and its own SuperLink process group, which is killed when the
run ends, fails or is interrupted.

    python -m simulations.launch --supernodes 100 -c num-rounds=20 -c model=cnn
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from fl_maestro.config import parse_run_config
from fl_maestro.federation import tier_table
from fl_maestro.results import RunStore
from fl_maestro.runtime import ALLOCATOR_ENV
from fl_maestro.world import load_world
from simulations.preflight import absolute_paths, preflight
from simulations.watchdog import processes_with_env, processes_with_home  # noqa: F401

log = logging.getLogger(__name__)

APP_DIR = Path(__file__).resolve().parent.parent
CONNECTION = "fl-maestro"
RUN_STARTED = re.compile(r"Successfully started run (\d+)")
COMPLETED = "finished:completed"


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for_port(port: int, process: subprocess.Popen, timeout: float = 60) -> None:
    """Block until something listens on 127.0.0.1:``port``; fail if ``process`` dies first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{process.args[0]} exited with code {process.returncode} at start")
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    raise TimeoutError(f"{process.args[0]} did not open port {port} within {timeout:.0f} s")


def flower_env(home: Path, extra_env: Mapping[str, str] | None = None) -> dict[str, str]:
    """Environment for Flower processes: private FLWR_HOME, no runtime installs, venv tools first."""
    env = {**os.environ, "FLWR_HOME": str(home),
           "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1", "FLWR_DISABLE_UPDATE_CHECK": "1",
           "PYTHONUNBUFFERED": "1",
           # Keep Ray hiding GPUs from actors given num_gpus=0 (a future default would not).
           "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "1",
           # From process start, so the ServerApp's thread gets them too (fl_maestro.runtime).
           **ALLOCATOR_ENV, **(extra_env or {})}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    return env


def exit_on_sigterm() -> None:
    """Turn SIGTERM into SystemExit, so ``finally`` blocks stop every process we started."""
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))


class Managed:
    """Context-manager plumbing for things that ``start()`` processes and must ``stop()`` them."""

    def start(self) -> None:
        raise NotImplementedError

    def stop(self) -> None:
        raise NotImplementedError

    def __enter__(self):
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


# What a Flower app build needs from this repository; everything else (above all the .venv, with
# tens of thousands of files) stays out of the folder `flwr run` is pointed at.
APP_FILES = ("pyproject.toml", "README.md", "fl_maestro", "strategies")


def stage_app(app_dir: Path, dest: Path) -> Path:
    """Copy the app's own files from ``app_dir`` into ``dest`` and return ``dest``.

    ``flwr run <folder>`` walks every file under the folder (resolving each one) before it filters
    what goes into the app bundle: with the project's .venv inside, that walk alone took 1.8 s of
    every run here. A staged folder holds only what the bundle needs.
    """
    missing = [name for name in APP_FILES if not (app_dir / name).exists()]
    if missing:
        raise FileNotFoundError(f"{app_dir} is not this project's app folder: it lacks {missing}")
    if dest.exists():
        shutil.rmtree(dest)
    dest.mkdir(parents=True)
    for name in APP_FILES:
        source = app_dir / name
        if source.is_dir():
            shutil.copytree(source, dest / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy2(source, dest / name)
    return dest


def toml_overrides(values: Mapping[str, Any]) -> list[str]:
    """``--run-config`` arguments for a dict of values (TOML literals, one key per argument)."""
    args = []
    for key, value in values.items():
        literal = json.dumps(value)
        if isinstance(value, float) and not math.isfinite(value):
            literal = str(value)  # TOML spells them inf, -inf and nan (JSON: Infinity, NaN)
        args += ["--run-config", f"{key}={literal}"]
    return args


class Watchdog:
    """``simulations.watchdog`` for one FLWR_HOME: stops its processes if this process dies.

    It holds the read end of a pipe only this process writes to; the kernel closes the pipe when
    this process exits, even by SIGKILL, and the watchdog then stops every process under the
    FLWR_HOME (and removes a temporary one). ``close()`` is the orderly end.
    """

    def __init__(self, home: Path, remove: bool) -> None:
        env = {k: v for k, v in os.environ.items() if k != "FLWR_HOME"}  # not one of its targets
        self.process = subprocess.Popen(
            [sys.executable, "-m", "simulations.watchdog", str(home), *(["--remove"] * remove)],
            cwd=APP_DIR, env=env, stdin=subprocess.PIPE, start_new_session=True)

    def close(self) -> None:
        """Close the pipe; the watchdog sees what is left under the home (nothing) and exits."""
        self.process.stdin.close()
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


class PrivateSuperLink(Managed):
    """A simulation SuperLink of our own: private FLWR_HOME, free ports, killed on exit (also
    when this process is killed: a watchdog stops what it started)."""

    def __init__(self, flwr_home: str | Path | None = None, app_dir: Path = APP_DIR) -> None:
        self._tmp = None if flwr_home else tempfile.mkdtemp(prefix="fl-maestro-flwr-")
        self.home = Path(flwr_home or self._tmp)
        self.app_dir = app_dir
        self.process: subprocess.Popen | None = None
        self.watchdog: Watchdog | None = None
        self.env = flower_env(self.home)
        self.run_id: int | None = None  # Flower's id of the last run, and its final status
        self.status: str | None = None

    def start(self) -> None:
        """Start the SuperLink and point this FLWR_HOME's default connection at it."""
        self.home.mkdir(parents=True, exist_ok=True)
        self.watchdog = Watchdog(self.home, remove=self._tmp is not None)
        port = free_port()  # Flower 1.41 serves its Runtime, Control and Fleet APIs on one port
        command = ["flower-superlink", "--insecure", "--simulation", "--isolation", "subprocess",
                   "--host", "127.0.0.1", "--port", str(port), "--database", str(self.home / "state.db"),
                   "--log-file", str(self.home / "superlink.log"),
                   "--disable-runtime-dependency-installation"]
        (self.home / "config.toml").write_text(
            f'[superlink]\ndefault = "{CONNECTION}"\n\n[superlink.{CONNECTION}]\n'
            f'address = "127.0.0.1:{port}"\ninsecure = true\n')
        self.process = subprocess.Popen(command, cwd=self.app_dir, env=self.env,
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                        start_new_session=True)
        log.info("started flower-superlink (pid %d, port %d, FLWR_HOME %s)",
                 self.process.pid, port, self.home)
        wait_for_port(port, self.process)

    def run(self, run_config: Mapping[str, Any], federation_config: Mapping[str, Any],
            timeout: float | None = None, log_path: str | Path | None = None) -> int:
        """``flwr run . --stream`` with the given overrides; returns its exit code.

        The streamed log goes to stdout and, with ``log_path``, to that file too. Flower 1.41's
        ``flwr run --stream`` exits 0 even when the ServerApp raises, so callers should judge a
        run by its results (see ``run_finished``), not by this code alone.
        """
        staged = stage_app(self.app_dir, self.home / "app")
        command = ["flwr", "run", str(staged), CONNECTION, "--stream", *toml_overrides(run_config)]
        for key, value in federation_config.items():
            command += ["--federation-config", f"{key}={json.dumps(value)}"]
        code, self.run_id = stream_flwr_run(command, self.app_dir, self.env, timeout, log_path)
        self.status = run_status(self.env, self.run_id)
        return code

    def stop(self, grace: float | None = None) -> None:
        """Stop the SuperLink and everything started under its FLWR_HOME (simulation, Ray).

        ``grace``: seconds between SIGTERM and SIGKILL. By default 10, but none for a SuperLink
        on a temporary FLWR_HOME: that home is deleted with everything in it, so an orderly
        shutdown keeps nothing and costs about 1.4 s a run.
        """
        grace = (0 if self._tmp else 10) if grace is None else grace
        if self.process is not None:
            stop_processes([self.process], self.home, grace)
            log.info("stopped flower-superlink (pid %d)", self.process.pid)
            self.process = None
        if self._tmp:
            shutil.rmtree(self._tmp, ignore_errors=True)
        if self.watchdog is not None:
            self.watchdog.close()
            self.watchdog = None

    def kill(self) -> None:
        """Kill at once, as a crash would."""
        self.stop(grace=0)


def stream_flwr_run(command: list[str], cwd: Path, env: Mapping[str, str],
                    timeout: float | None = None, log_path: str | Path | None = None
                    ) -> tuple[int, int | None]:
    """Run a ``flwr run ... --stream`` command, echoing its output (and appending it to
    ``log_path``); returns its exit code (124 on timeout) and the run id Flower printed."""
    log.info("running: %s", " ".join(command))
    process = subprocess.Popen(command, cwd=cwd, env=env, text=True, stdin=subprocess.DEVNULL,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    expired = threading.Event()
    timer = threading.Timer(timeout, lambda: (expired.set(), process.kill())) if timeout else None
    if timer:
        timer.start()
    run_id = None
    try:
        with open(log_path, "a") if log_path else contextlib.nullcontext() as sink:
            for line in process.stdout:
                sys.stdout.write(line)
                if sink:
                    sink.write(line)
                found = run_id is None and RUN_STARTED.search(line)
                if found:
                    run_id = int(found.group(1))
        code = process.wait()
    finally:
        if timer:
            timer.cancel()
    if expired.is_set():
        log.error("flwr run exceeded %.0f s", timeout)
        return 124, run_id
    return code, run_id


def run_status(env: Mapping[str, str], run_id: int | None) -> str | None:
    """Flower's status of run ``run_id`` on this FLWR_HOME's SuperLink (``finished:completed``,
    ``finished:failed``, ...), from ``flwr ls --format json``; None if it cannot be told."""
    if run_id is None:
        return None
    command = ["flwr", "ls", CONNECTION, "--run-id", str(run_id), "--format", "json"]
    try:
        out = subprocess.run(command, env=env, capture_output=True, text=True, timeout=60,
                             stdin=subprocess.DEVNULL).stdout
        runs = json.loads(out[out.index("{"):])["runs"]
        return next(str(r["status"]) for r in runs if int(r["run-id"]) == run_id)
    except (subprocess.SubprocessError, ValueError, KeyError, StopIteration) as err:
        log.warning("could not read the status of run %s from Flower: %s", run_id, err)
        return None


def stop_processes(processes: Sequence[subprocess.Popen], home: Path, grace: float = 10) -> None:
    """SIGTERM every process group and every process under ``home``; SIGKILL what outlives ``grace``.

    Each process was started in a session of its own; the FLWR_HOME marker finds the ones that
    left it (the simulation runtime, Ray's workers).
    """
    _signal(processes, home, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and (
            any(p.poll() is None for p in processes) or processes_with_home(home)):
        time.sleep(0.1)
    _signal(processes, home, signal.SIGKILL)
    for process in processes:
        process.wait()
    _wait_gone(home)


def _signal(processes: Sequence[subprocess.Popen], home: Path, sig: int) -> None:
    for process in processes:
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            pass
    for pid in processes_with_home(home):
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


def _wait_gone(home: Path, wait: float = 10) -> None:
    """Wait until no process under this FLWR_HOME is left (zombies count as gone)."""
    deadline = time.monotonic() + wait
    while processes_with_home(home) and time.monotonic() < deadline:
        time.sleep(0.1)


def federation_config(supernodes: int, cpus_per_client: float = 1, gpus_per_client: float = 0
                      ) -> dict[str, Any]:
    """Simulation settings for ``--federation-config``: SuperNodes and per-client resources."""
    return {"num-supernodes": supernodes, "client-resources-num-cpus": cpus_per_client,
            "client-resources-num-gpus": gpus_per_client}


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """``key=value`` strings to a dict, values read as JSON/TOML literals when they parse."""
    values = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep:
            raise ValueError(f"override {item!r} is malformed: expected key=value")
        try:
            values[key] = json.loads(raw)
        except json.JSONDecodeError:
            values[key] = float(raw) if raw in ("inf", "+inf") else raw  # TOML's infinity
    return values


def with_absolute_results(run_config: Mapping[str, Any], app_dir: Path = APP_DIR) -> dict:
    """The overrides with ``results-dir`` made absolute: the ServerApp resolves a relative one
    against the SuperLink's folder (the app folder), not against where this command runs. Device
    profile and availability files are made absolute against where this command runs, and the
    device world is checked (``load_world`` reads them), so a bad one stops before Flower starts."""
    results = Path(parse_run_config(run_config).results_dir)
    out = {**run_config, "results-dir": str(results if results.is_absolute() else app_dir / results)}
    for key in FILE_KEYS:
        value = out.get(key, "")
        if isinstance(value, str) and _names_file(value):
            out[key] = str(Path(value).resolve())
    load_world(parse_run_config(out))
    return out


# Run-config keys whose value may name a file (else it is inline text or empty).
FILE_KEYS = ("device-profiles", "availability")


def _names_file(value: str) -> bool:
    return value.endswith((".toml", ".csv")) and not value.startswith("diurnal:")


def run_store(run_config: Mapping[str, Any]) -> RunStore:
    """The results folder of the run these (absolute-results) overrides describe."""
    cfg = parse_run_config(run_config)
    return RunStore(Path(cfg.results_dir) / cfg.name)


def run_finished(run_config: Mapping[str, Any]) -> bool:
    """Whether the run these overrides describe checkpointed its last round."""
    cfg = parse_run_config(run_config)
    path = Path(cfg.results_dir) / cfg.name
    return path.exists() and run_store(run_config).checkpoint_round() == cfg.num_rounds


def start_command(parser: argparse.ArgumentParser, items: list[str],
                  supernodes: int | None = None) -> dict[str, Any]:
    """Shared start of the run commands: log to stderr, validate the overrides and everything
    else a run needs before anything starts (``simulations.preflight``; ``parser.error`` names what
    is wrong), and make SIGTERM run the clean-up. ``supernodes``: the simulation's node count."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    try:
        overrides = with_absolute_results(absolute_paths(parse_overrides(items), Path.cwd()))
        preflight(overrides, supernodes)
    except ValueError as err:
        parser.error(str(err))
    exit_on_sigterm()  # a SIGTERM still stops every process the command started
    return overrides


def judge(code: int, run_config: Mapping[str, Any], status: str | None) -> int:
    """The command's exit code: 0 only if ``flwr run`` succeeded, Flower says *this* run completed
    (a refused or failed run leaves an older run's finished folder behind: that is no success),
    and the run folder has all its rounds."""
    if code != 0 or status != COMPLETED or not run_finished(run_config):
        log.error("the run did not finish (flwr run exit code %d, Flower's run status %s): see "
                  "the ServerApp log above", code, status or "unknown")
        return code or 1
    return 0


def main(argv: list[str] | None = None) -> int:
    """Command line: one simulation on a private SuperLink, then its per-tier table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--supernodes", type=int, default=100)
    parser.add_argument("--cpus-per-client", type=int, default=1)
    parser.add_argument("--gpus-per-client", type=float, default=0,
                        help="GPU share per client (e.g. 0.25); clients train on CUDA when > 0")
    parser.add_argument("-c", "--run-config", action="append", default=[],
                        help="key=value run-config override (repeatable)")
    parser.add_argument("--timeout", type=float, default=None)
    args = parser.parse_args(argv)
    overrides = start_command(parser, args.run_config, args.supernodes)
    with PrivateSuperLink() as link:
        code = link.run(overrides, federation_config(args.supernodes, args.cpus_per_client,
                                                     args.gpus_per_client), args.timeout)
    verdict = judge(code, overrides, link.status)
    if verdict == 0:
        print(final_table(overrides))
    return verdict


def final_table(run_config: Mapping[str, Any]) -> str:
    """The finished run's per-tier accuracy and cost as text."""
    cfg = parse_run_config(run_config)
    store = run_store(run_config)
    table = tier_table(store.read("evaluation"), cfg.num_rounds)
    return (f"\nGlobal model after {cfg.num_rounds} rounds ({store.root}), per budget tier:\n"
            f"{table.to_string(float_format=lambda v: f'{v:.4g}')}")


if __name__ == "__main__":
    sys.exit(main())
