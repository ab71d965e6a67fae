"""How the simulation scales with the number of clients: wall time and peak memory.

    python -m simulations.scaling                                   # 100..3000 clients, 3 rounds
    python -m simulations.scaling --configs 20:5,40:5 --rounds 1    # a smoke test

Each configuration ``clients:per-round`` is the default experiment (Fashion-MNIST, CNN, the
default device mix) with that many SuperNodes and clients a round, run through ``flwr run .`` on
a private SuperLink. A monitor thread samples every process under the run's ``FLWR_HOME``
(SuperLink, ServerApp, simulation, Ray and its actors) every 0.5 s from /proc: the sum of their
RSS (shared pages counted once per process), the sum of their PSS (shared pages split: what the
machine really holds) and the largest single RSS. The streamed run log is timed too: when node
discovery ended and when each round ended. Writes ``scaling.csv``, ``scaling.md`` and
``scaling.png`` under ``--out``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from fl_maestro.results import RunStore
from simulations.launch import (CONNECTION, RUN_STARTED, PrivateSuperLink, exit_on_sigterm,
                                federation_config, judge, parse_overrides, processes_with_home,
                                run_status, toml_overrides)

log = logging.getLogger(__name__)

DEFAULT_CONFIGS = "100:10,300:10,1000:10,1000:100,3000:10"
TARGET = {"clients": 1000, "per-round": 100, "peak-gib": 4.0}
MIB = 2**20
SAMPLE_SECONDS = 0.5


def parse_configs(text: str) -> list[tuple[int, int]]:
    """``"100:10,1000:100"`` to ``[(100, 10), (1000, 100)]`` (clients, clients per round)."""
    configs = []
    for item in text.split(","):
        clients, sep, per_round = item.partition(":")
        try:
            pair = (int(clients), int(per_round))
        except ValueError as err:
            raise ValueError(f"config {item!r} is malformed: expected clients:per-round") from err
        if not sep or not 1 <= pair[1] <= pair[0]:
            raise ValueError(f"config {item!r}: need 1 <= per-round <= clients")
        configs.append(pair)
    return configs


def process_memory(pid: int) -> tuple[int, int]:
    """(RSS, PSS) of one process in bytes from /proc; (0, 0) if it is gone or unreadable."""
    try:
        rss = pss = 0
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Rss:"):
                rss = int(line.split()[1]) * 1024
            elif line.startswith("Pss:"):
                pss = int(line.split()[1]) * 1024
        return rss, pss
    except (OSError, ValueError, IndexError):
        return 0, 0


def process_cpu_seconds(pid: int) -> float:
    """User + system CPU seconds a process has used so far (0 if it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return 0.0


def process_name(pid: int) -> str:
    """A short name: the Flower command or Ray process title, not the python interpreter."""
    try:
        args = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return "?"
    args = [a.decode(errors="replace") for a in args if a]
    if not args:
        return "?"
    if Path(args[0]).name.startswith("python") and len(args) > 1:
        args = args[2:] if args[1] in ("-m", "-u") and len(args) > 2 else args[1:]
    name = Path(args[0].split()[0]).name[:40]
    if name in ("setup_worker.py", "default_worker.py"):  # a Ray worker: its title says what
        try:
            return Path(f"/proc/{pid}/comm").read_text().strip()
        except OSError:
            pass
    return name


@dataclass
class MemoryMonitor:
    """Samples memory and CPU of every process under one FLWR_HOME in a background thread."""

    home: Path
    interval: float = SAMPLE_SECONDS
    peak: dict[str, float] = field(default_factory=lambda: {
        "rss-sum": 0, "pss-sum": 0, "rss-max": 0, "processes": 0, "samples": 0})
    breakdown: dict[str, float] = field(default_factory=dict)  # PSS by name at the peak
    cpu: dict[int, tuple[str, float]] = field(default_factory=dict)  # last seen, per pid
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def sample(self) -> None:
        """Take one sample and fold it into the peaks."""
        pids = processes_with_home(self.home)
        names = {pid: self.cpu[pid][0] if pid in self.cpu else process_name(pid) for pid in pids}
        memory = {pid: process_memory(pid) for pid in pids}
        for pid in pids:
            self.cpu[pid] = (names[pid], process_cpu_seconds(pid) or self.cpu.get(pid, ("", 0))[1])
        pss = sum(p for _, p in memory.values())
        if pss > self.peak["pss-sum"]:
            self.peak["pss-sum"] = pss
            self.breakdown = {}
            for pid, (_, p) in memory.items():
                self.breakdown[names[pid]] = self.breakdown.get(names[pid], 0) + p / MIB
        self.peak["rss-sum"] = max(self.peak["rss-sum"], sum(r for r, _ in memory.values()))
        self.peak["rss-max"] = max([self.peak["rss-max"], *(r for r, _ in memory.values())])
        self.peak["processes"] = max(self.peak["processes"], len(pids))
        self.peak["samples"] += 1

    def cpu_seconds(self) -> dict[str, float]:
        """CPU seconds by process name, over every process seen."""
        totals: dict[str, float] = {}
        for name, seconds in self.cpu.values():
            totals[name] = totals.get(name, 0) + seconds
        return totals

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            self.sample()

    def __enter__(self) -> MemoryMonitor:
        self._thread = threading.Thread(target=self._loop, name="memory-monitor", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()


def top(values: dict[str, float], n: int = 6) -> str:
    """``"name=12; other=3"``: the ``n`` largest values, rounded."""
    ranked = sorted(values.items(), key=lambda kv: -kv[1])[:n]
    return "; ".join(f"{name}={value:.0f}" for name, value in ranked)


EVENTS = {"discovered": re.compile(r"discovered (\d+) of \1 nodes"),  # the last chunk
          "round": re.compile(r"round (\d+)/(\d+) done")}


def timed_run(link: PrivateSuperLink, run_config: Mapping[str, Any],
              fed_config: Mapping[str, Any], log_path: Path, timeout: float) -> dict[str, Any]:
    """``flwr run . --stream``, its log saved and timed; returns exit code, event times, and the
    run's status as Flower records it (``flwr run --stream`` exits 0 when the ServerApp fails)."""
    command = ["flwr", "run", str(link.app_dir), CONNECTION, "--stream",
               *toml_overrides(run_config)]
    for key, value in fed_config.items():
        command += ["--federation-config", f"{key}={json.dumps(value)}"]
    times: dict[str, Any] = {"round-ends": [], "run-id": None}
    start = time.perf_counter()
    with open(log_path, "w") as out:
        process = subprocess.Popen(command, cwd=link.app_dir, env=link.env, text=True,
                                   stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                   stdin=subprocess.DEVNULL)
        timer = threading.Timer(timeout, process.kill)
        timer.start()
        try:
            for line in process.stdout:
                out.write(line)
                now = time.perf_counter() - start
                if "discovery-s" not in times and EVENTS["discovered"].search(line):
                    times["discovery-s"] = now
                started = times["run-id"] is None and RUN_STARTED.search(line)
                if started:
                    times["run-id"] = int(started.group(1))
                if EVENTS["round"].search(line):
                    times["round-ends"].append(now)
                    log.info("  %s", line.strip()[:120])
            code = process.wait()
        finally:
            timer.cancel()
            if process.poll() is None:
                process.kill()
                process.wait()
    times.update({"exit-code": code, "run-s": time.perf_counter() - start,
                  "status": run_status(link.env, times["run-id"])})
    return times


def measure(clients: int, per_round: int, rounds: int, scratch: Path,
            extra: Mapping[str, Any] | None = None, timeout: float = 3600) -> dict[str, Any]:
    """One configuration's wall times and peak memory (a row of scaling.csv)."""
    name = f"scale-{clients}-{per_round}"
    run_config = {"num-rounds": rounds, "clients-per-round": per_round,
                  "results-dir": str(scratch / "results"), "run-name": name, **(extra or {})}
    home = scratch / f"flwr-home-{name}"
    log.info("measuring %d clients, %d a round, %d rounds", clients, per_round, rounds)
    start = time.perf_counter()
    with MemoryMonitor(home) as monitor, PrivateSuperLink(home) as link:
        times = timed_run(link, run_config, federation_config(clients), scratch / f"{name}.log",
                          timeout)
    total = time.perf_counter() - start
    # Judged as the launcher judges a run: exit code, Flower's run status and the last checkpoint.
    failed = judge(times["exit-code"], run_config, times["status"]) != 0
    rounds_table = pd.DataFrame({"seconds": []}) if failed else RunStore(
        scratch / "results" / name).read("rounds")
    ends = times["round-ends"]
    return {"clients": clients, "per-round": per_round, "rounds": rounds, "failed": failed,
            "status": times["status"] or "unknown",
            "exit-code": times["exit-code"], "total-s": total, "run-s": times["run-s"],
            "discovery-s": times.get("discovery-s"),
            # Discovery is one query message per node through Flower's engine: its cost per node
            "discovery-ms-per-node": (1000 * times["discovery-s"] / clients
                                      if times.get("discovery-s") else None),
            "first-round-end-s": ends[0] if ends else None,
            "round-s": float(rounds_table["seconds"].mean()) if len(rounds_table) else None,
            "peak-pss-sum-mib": monitor.peak["pss-sum"] / MIB,
            "peak-rss-sum-mib": monitor.peak["rss-sum"] / MIB,
            "peak-rss-max-mib": monitor.peak["rss-max"] / MIB,
            "peak-processes": monitor.peak["processes"], "samples": monitor.peak["samples"],
            "cpu-s": sum(monitor.cpu_seconds().values()),
            "peak-pss-mib-by-process": top(monitor.breakdown),
            "cpu-s-by-process": top(monitor.cpu_seconds())}


def machine() -> str:
    """One line naming the machine behind the numbers."""
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return (f"{platform.machine()}, {os.cpu_count()} cores, {memory:.0f} GiB RAM, "
            f"python {platform.python_version()}")


def target_line(table: pd.DataFrame) -> str:
    """Whether the target configuration stayed within its memory budget."""
    rows = table[(table["clients"] == TARGET["clients"]) & (table["per-round"] == TARGET["per-round"])]
    if rows.empty:
        return (f"Target ({TARGET['clients']} clients, {TARGET['per-round']} a round, "
                f"<= {TARGET['peak-gib']} GiB): not measured.")
    peak = rows["peak-pss-sum-mib"].max() / 1024
    verdict = "met" if peak <= TARGET["peak-gib"] and not rows["failed"].any() else "NOT met"
    return (f"Target ({TARGET['clients']} clients, {TARGET['per-round']} a round, "
            f"<= {TARGET['peak-gib']} GiB peak): {verdict}, peak PSS sum {peak:.2f} GiB.")


def plot(table: pd.DataFrame, path: Path) -> None:
    """Time and memory against the number of clients, one line per clients-per-round."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    done = table[~table["failed"]] if "failed" in table else table  # a failed run is no result
    for per_round, rows in done.sort_values("clients").groupby("per-round"):
        left.plot(rows["clients"], rows["run-s"], "o-", label=f"flwr run, {per_round}/round")
        left.plot(rows["clients"], rows["discovery-s"], "s--", label=f"to discovery, {per_round}/round")
        left.plot(rows["clients"], rows["round-s"], "^:", label=f"per round, {per_round}/round")
        right.plot(rows["clients"], rows["peak-pss-sum-mib"] / 1024, "o-",
                   label=f"PSS sum, {per_round}/round")
        right.plot(rows["clients"], rows["peak-rss-sum-mib"] / 1024, "s--",
                   label=f"RSS sum, {per_round}/round")
    right.axhline(TARGET["peak-gib"], color="grey", lw=0.8, ls="-.", label="4 GiB target")
    for ax, ylabel in ((left, "seconds"), (right, "peak memory (GiB)")):
        ax.set_xscale("log")
        ax.set_xlabel("clients (SuperNodes)")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:  # nothing to label when every run failed
            ax.legend(fontsize=7)
    left.set_title("Wall time")
    right.set_title("Peak memory of all processes under FLWR_HOME")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_report(table: pd.DataFrame, out: Path, rounds: int) -> None:
    """``scaling.csv``, ``scaling.md`` and ``scaling.png`` under ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    table.to_csv(out / "scaling.csv", index=False)
    plot(table, out / "scaling.png")
    numbers = table.drop(columns=["peak-pss-mib-by-process", "cpu-s-by-process"])
    failed = "".join(
        f"- {r['clients']} clients, {r['per-round']} a round: the run FAILED (Flower's run status "
        f"{r['status']}, flwr run exit code {r['exit-code']}); its times and memory are those of a "
        f"failed run, not a result.\n" for _, r in table[table["failed"]].iterrows())
    details = "\n".join(
        f"- {r['clients']} clients, {r['per-round']} a round: peak PSS (MiB) "
        f"{r['peak-pss-mib-by-process']}; CPU seconds {r['cpu-s-by-process']}"
        for _, r in table.iterrows())
    (out / "scaling.md").write_text(
        f"# Scaling with the number of clients\n\n"
        f"Default experiment (Fashion-MNIST, CNN), {rounds} rounds, 1 CPU per client, through "
        f"`flwr run .` on a private SuperLink. {machine()}.\n\n"
        f"Times are seconds since `flwr run` started (discovery-s: node discovery done; "
        f"discovery-ms-per-node: that time over the nodes, each node's query being one ClientApp "
        f"call through Flower's simulation engine, asked 256 at a time) and the "
        f"mean training round (round-s, without evaluation). Memory: peaks over 0.5 s samples of "
        f"every process under the run's FLWR_HOME; PSS sum is what the machine holds, RSS sum "
        f"counts shared pages once per process.\n\n"
        f"{numbers.to_markdown(index=False, floatfmt='.1f')}\n\n{failed}{target_line(table)}\n\n"
        f"Where the memory and CPU went:\n\n{details}\n\n"
        f"![time and memory vs clients](scaling.png)\n")


def main(argv: list[str] | None = None) -> int:
    """Command line: measure every configuration and write the report."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", default=DEFAULT_CONFIGS,
                        help="comma-separated clients:per-round pairs")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path("results/bench"))
    parser.add_argument("--keep", type=Path, default=None,
                        help="keep run folders and logs here (default: a temp dir, removed)")
    parser.add_argument("--timeout", type=float, default=3600, help="seconds per configuration")
    parser.add_argument("-c", "--run-config", action="append", default=[],
                        help="extra key=value run-config override (repeatable)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    exit_on_sigterm()
    scratch = args.keep or Path(tempfile.mkdtemp(prefix="fl-maestro-scaling-"))
    rows = []
    try:
        for clients, per_round in parse_configs(args.configs):
            rows.append(measure(clients, per_round, args.rounds, scratch,
                                parse_overrides(args.run_config), args.timeout))
            log.info("%s", rows[-1])
    finally:
        if rows:
            write_report(pd.DataFrame(rows), args.out, args.rounds)
        if args.keep is None:
            shutil.rmtree(scratch, ignore_errors=True)
    return 0 if not any(r["failed"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
