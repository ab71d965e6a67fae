"""Run the simulation on a Ray cluster of our own: a head node and worker nodes, attached via RAY_ADDRESS.

Flower's RayBackend calls ``ray.init(**init_args)`` with no address, and ``ray.init`` then reads the
``RAY_ADDRESS`` environment variable: so a SuperLink started with ``RAY_ADDRESS=<head>`` makes its
simulation attach to that cluster instead of starting a private Ray. Attaching forbids ``num_cpus``
and ``num_gpus`` in ``ray.init`` (ValueError), so ``init-args-num-cpus``/``init-args-num-gpus`` must
stay unset in the federation config; the cluster's nodes declare their resources at ``ray start``.

Here every node runs on loopback with its own free ports, one private ``--temp-dir`` (so no other
``ray.init()`` on this machine finds the cluster) and an environment marker by which all its
processes are found and killed. ``ray stop`` is never used: it kills every Ray process of the
machine, other people's included.

    python -m simulations.ray_cluster --workers 1 --cpus-per-node 1 -c dataset=digits -c num-rounds=2
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from simulations.launch import (Managed, PrivateSuperLink, federation_config, free_port, judge,
                                processes_with_env, start_command, wait_for_port)

log = logging.getLogger(__name__)

MARKER = "FL_MAESTRO_RAY_CLUSTER"  # environment variable every process of one cluster carries
OBJECT_STORE_BYTES = 200 * 2**20  # per node; messages here are small, and /dev/shm is shared

NODES_SCRIPT = """
import json, ray
ray.init(logging_level="ERROR", log_to_driver=False)
nodes = [n for n in ray.nodes() if n["Alive"]]
resources = ray.cluster_resources()
ray.shutdown()
print(json.dumps({"nodes": [{"id": n["NodeID"], "ip": n["NodeManagerAddress"],
                             "cpus": n["Resources"].get("CPU", 0)} for n in nodes],
                  "cpus": resources.get("CPU", 0)}))
"""

ACTORS_SCRIPT = """
import json, ray
from ray._private.state import actors
ray.init(logging_level="ERROR", log_to_driver=False)
table = actors()
ray.shutdown()
print(json.dumps([{"class": a["ActorClassName"], "node": a["Address"]["NodeID"],
                   "state": a["State"]} for a in table.values()]))
"""


def processes_with_marker(value: str) -> list[int]:
    """PIDs of live processes started with ``MARKER=value`` in their environment, never ours."""
    return processes_with_env(MARKER, value)


class RayCluster(Managed):
    """A loopback Ray cluster (one head, ``workers`` worker nodes) that is always torn down."""

    def __init__(self, workers: int = 1, cpus_per_node: int = 1, gpus_per_node: float = 0,
                 object_store_bytes: int = OBJECT_STORE_BYTES) -> None:
        self.workers, self.cpus, self.gpus = workers, cpus_per_node, gpus_per_node
        self.object_store_bytes = object_store_bytes
        # Short path: Ray's Unix sockets live under it and may not exceed 107 characters.
        self.temp_dir = Path(tempfile.mkdtemp(prefix="ray-", dir="/tmp"))
        self.port: int | None = None
        self.processes: list[subprocess.Popen] = []
        self.env = {**os.environ, MARKER: str(self.temp_dir), "RAY_USAGE_STATS_ENABLED": "0",
                    "PYTHONUNBUFFERED": "1"}
        self.env.pop("RAY_ADDRESS", None)
        self.env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{self.env.get('PATH', '')}"

    @property
    def address(self) -> str:
        """The head's GCS address, what ``RAY_ADDRESS`` and ``ray start --address`` take."""
        return f"127.0.0.1:{self.port}"

    def start(self, timeout: float = 120) -> None:
        """Start the head, then the workers, and wait until every node has joined."""
        self.port = free_port()
        self._spawn("head", ["--head", "--port", str(self.port), "--include-dashboard", "false",
                             "--dashboard-port", str(free_port()),  # its minimal head still runs
                             "--ray-client-server-port", str(free_port())])
        wait_for_port(self.port, self.processes[0], timeout)
        for i in range(self.workers):
            self._spawn(f"worker-{i}", ["--address", self.address])
        self.wait_for_nodes(1 + self.workers, timeout)

    def _spawn(self, name: str, role_args: list[str]) -> None:
        """``ray start --block`` for one node, in its own session, its output in a log file."""
        command = ["ray", "start", "--block", *role_args,
                   "--num-cpus", str(self.cpus), "--num-gpus", str(self.gpus),
                   "--object-store-memory", str(self.object_store_bytes),
                   "--temp-dir", str(self.temp_dir), "--disable-usage-stats",
                   "--dashboard-agent-listen-port", str(free_port()),
                   "--dashboard-agent-grpc-port", str(free_port()),
                   "--runtime-env-agent-port", str(free_port()),
                   "--metrics-export-port", str(free_port())]
        with open(self.temp_dir / f"{name}.log", "ab") as out:
            process = subprocess.Popen(command, env=self.env, stdout=out, stderr=subprocess.STDOUT,
                                       stdin=subprocess.DEVNULL, start_new_session=True)
        self.processes.append(process)
        log.info("started ray %s node (pid %d, temp dir %s)", name, process.pid, self.temp_dir)

    def _query(self, script: str) -> Any:
        """Run a short driver script attached to this cluster; returns its JSON output."""
        env = {**self.env, "RAY_ADDRESS": self.address}
        result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True,
                                text=True, stdin=subprocess.DEVNULL, timeout=120)
        if result.returncode != 0:
            raise RuntimeError(f"ray query failed: {result.stderr[-2000:]}")
        return json.loads(result.stdout.strip().splitlines()[-1])

    def nodes(self) -> dict:
        """The alive nodes (id, ip, CPUs) and the cluster's total CPUs, as Ray's GCS reports them."""
        return self._query(NODES_SCRIPT)

    def actors(self) -> list[dict]:
        """Every actor the GCS remembers (class, node id, state), dead ones included."""
        return self._query(ACTORS_SCRIPT)

    def wait_for_nodes(self, count: int, timeout: float = 120) -> None:
        """Block until ``count`` nodes are alive in the cluster."""
        deadline = time.monotonic() + timeout
        alive = 0
        while time.monotonic() < deadline:
            dead = [i for i, p in enumerate(self.processes) if p.poll() is not None]
            if dead:
                name = "head" if dead[0] == 0 else f"worker-{dead[0] - 1}"
                tail = (self.temp_dir / f"{name}.log").read_text(errors="replace")[-3000:]
                raise RuntimeError(f"ray start of the {name} node exited:\n{tail}")
            try:
                alive = len(self.nodes()["nodes"])
            except (RuntimeError, json.JSONDecodeError, IndexError) as err:
                log.debug("cluster not ready: %s", err)
            if alive >= count:
                log.info("Ray cluster at %s has %d nodes", self.address, alive)
                return
            time.sleep(1)
        raise TimeoutError(f"only {alive} of {count} Ray nodes alive after {timeout:.0f} s")

    def stop(self, grace: float = 5) -> None:
        """Kill every process of this cluster by PID, then drop its temp dir.

        ``ray start --block`` shuts its node down on SIGINT (it ignores SIGTERM); whatever still
        lives after ``grace`` seconds, a worker raylet waiting for a gone GCS for instance, is
        SIGKILLed, as ``ray stop --force`` would do.
        """
        marker = str(self.temp_dir)
        for process in self.processes[::-1]:
            _kill(process.pid, signal.SIGINT)
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline and processes_with_marker(marker):
            time.sleep(0.2)
        for process in self.processes:
            _kill(process.pid, signal.SIGKILL, group=True)
        for pid in processes_with_marker(marker):
            _kill(pid, signal.SIGKILL)
        for process in self.processes:
            process.wait()
        if self.processes:
            log.info("stopped the Ray cluster at %s", self.address)
        self.processes = []
        shutil.rmtree(self.temp_dir, ignore_errors=True)


def _kill(pid: int, sig: int, group: bool = False) -> None:
    """Signal one process (or its process group), ignoring it if it is already gone."""
    try:
        os.killpg(pid, sig) if group else os.kill(pid, sig)
    except ProcessLookupError:
        pass


def run_on_cluster(cluster: RayCluster, run_config: Mapping[str, Any], supernodes: int,
                   cpus_per_client: int = 1, gpus_per_client: float = 0,
                   flwr_home: str | Path | None = None, timeout: float | None = None
                   ) -> tuple[int, str | None]:
    """One ``flwr run .`` on a private SuperLink whose simulation attaches to ``cluster``; its
    exit code and Flower's final status of the run."""
    link = PrivateSuperLink(flwr_home)
    link.env["RAY_ADDRESS"] = cluster.address  # ray.init() in the simulation attaches to it
    with link:
        code = link.run(run_config, federation_config(supernodes, cpus_per_client,
                                                      gpus_per_client), timeout)
        return code, link.status


def main(argv: list[str] | None = None) -> int:
    """Command line: start a loopback Ray cluster, run one simulation on it, tear it down."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=1, help="worker nodes besides the head")
    parser.add_argument("--cpus-per-node", type=int, default=1)
    parser.add_argument("--supernodes", type=int, default=10)
    parser.add_argument("-c", "--run-config", action="append", default=[],
                        help="key=value run-config override (repeatable)")
    parser.add_argument("--timeout", type=float, default=None)
    args = parser.parse_args(argv)
    overrides = start_command(parser, args.run_config, args.supernodes)
    with RayCluster(args.workers, args.cpus_per_node) as cluster:
        code, status = run_on_cluster(cluster, overrides, args.supernodes, timeout=args.timeout)
        used = {a["node"] for a in cluster.actors() if a["class"] == "ClientAppActor"}
        log.info("client actors ran on %d of %d nodes", len(used), 1 + args.workers)
    return judge(code, overrides, status)


if __name__ == "__main__":
    sys.exit(main())
