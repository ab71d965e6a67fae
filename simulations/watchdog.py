"""Find the processes a run started, and stop them when the command that started them dies.

Every Flower process of a run carries its private ``FLWR_HOME`` in its environment (the SuperLink,
``flwr run``, the simulation process, Ray's workers), so that marker finds them all, also those
that left their process group. A launcher that is SIGKILLed cannot run its ``finally`` blocks, so
it starts this module as a watchdog first:

    python -m simulations.watchdog <FLWR_HOME> [--remove]

The watchdog reads its stdin, a pipe whose only writer is the launcher. The kernel closes that
pipe when the launcher exits for any reason, SIGKILL included; the watchdog then stops every
process under the FLWR_HOME and (``--remove``) deletes the folder. A launcher that ends normally
stops everything itself and then closes the pipe, and the watchdog finds nothing left to do.
Standard library only, so it starts in a few milliseconds.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import signal
import sys
import time
from pathlib import Path

log = logging.getLogger(__name__)


def processes_with_env(name: str, value: str) -> list[int]:
    """PIDs of live processes whose environment has ``name=value`` (Linux /proc).

    This process and its ancestors are never listed, so a caller cannot kill itself.
    """
    marker = b"\0" + f"{name}={value}".encode() + b"\0"
    spared = _ancestors()
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) not in spared:
            try:
                if marker in b"\0" + (entry / "environ").read_bytes():
                    pids.append(int(entry.name))
            except OSError:
                continue
    return pids


def processes_with_home(home: Path) -> list[int]:
    """PIDs of live processes started under this ``FLWR_HOME``."""
    return processes_with_env("FLWR_HOME", str(home))


def _ancestors() -> set[int]:
    """This process and its ancestors, never to be killed."""
    pids, pid = set(), os.getpid()
    while pid > 1 and pid not in pids:
        pids.add(pid)
        try:
            pid = int(Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[1])
        except (OSError, ValueError, IndexError):
            break
    return pids


def signal_home(home: Path, sig: int) -> None:
    """Send ``sig`` to every process under ``home``."""
    for pid in processes_with_home(home):
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


def stop_home(home: Path, grace: float) -> None:
    """SIGTERM every process under ``home``, SIGKILL what outlives ``grace``, wait until gone."""
    signal_home(home, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while processes_with_home(home) and time.monotonic() < deadline:
        time.sleep(0.1)
    signal_home(home, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while processes_with_home(home) and time.monotonic() < deadline:
        time.sleep(0.1)


def main(argv: list[str] | None = None) -> int:
    """Wait for stdin to close, then stop the FLWR_HOME's processes (and remove the folder)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("home", type=Path)
    parser.add_argument("--remove", action="store_true", help="delete FLWR_HOME afterwards")
    parser.add_argument("--grace", type=float, default=2.0)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s watchdog: %(message)s")
    # The launcher's terminal may send SIGINT/SIGTERM to its group; the watchdog outlives both.
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)
    while sys.stdin.buffer.read(4096):
        pass
    left = processes_with_home(args.home)
    if left:
        log.warning("launcher gone: stopping %d processes under %s", len(left), args.home)
        stop_home(args.home, args.grace)
    if args.remove:
        shutil.rmtree(args.home, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
