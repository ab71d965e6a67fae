"""Run the federation on Flower's Deployment Engine: a real SuperLink and N SuperNodes on loopback.

Unlike ``simulations.launch`` (one SuperLink with ``--simulation``, clients as Ray actors), every
client here is a ``flower-supernode`` process that connects to the SuperLink's Fleet API and runs
the ClientApp in a subprocess, exactly as a device would. Each SuperNode gets its identity and its
budget from its node config (``partition-id``, ``num-partitions``, ``budget``), which the ServerApp
reads through its node-discovery query. Everything runs under one private ``FLWR_HOME`` on free
ports and is killed by PID when the run ends, fails or is interrupted.

    python -m simulations.deploy --nodes 4 --budgets 0.25,0.25,1.0,1.0 -c num-rounds=2 -c dataset=digits
    python -m simulations.deploy --nodes 2 --tls --node-auth -c num-rounds=1   # TLS, registered keys
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from simulations.launch import (APP_DIR, CONNECTION, Managed, flower_env, free_port, judge,
                                run_status, stage_app, start_command, stop_processes,
                                stream_flwr_run, toml_overrides, wait_for_port)

log = logging.getLogger(__name__)


def node_config(partition_id: int, num_partitions: int, budget: float | None) -> str:
    """The ``--node-config`` string of one SuperNode (budget left out when None)."""
    items = [f"partition-id={partition_id}", f"num-partitions={num_partitions}"]
    if budget is not None:
        items.append(f"budget={float(budget)!r}")
    return " ".join(items)


def parse_budgets(text: str, nodes: int) -> list[float | None]:
    """``"0.25,1.0"`` to one budget per node (cycled); empty text: no budget (device mix decides)."""
    if not text:
        return [None] * nodes
    try:
        values = [float(b) for b in text.split(",")]
    except ValueError as err:
        raise ValueError(f"--budgets={text!r} is malformed: expected numbers like 0.25,1.0") from err
    bad = [b for b in values if not 0 < b <= 1]
    if bad:
        raise ValueError(f"--budgets={text!r}: {bad} not in (0, 1]")
    return [values[i % len(values)] for i in range(nodes)]


def connection_toml(port: int, certificates: Path | None) -> str:
    """``$FLWR_HOME/config.toml`` whose default connection is this deployment's SuperLink."""
    security = (f'root-certificates = "{certificates / "ca.crt"}"\n' if certificates
                else "insecure = true\n")
    return (f'[superlink]\ndefault = "{CONNECTION}"\n\n[superlink.{CONNECTION}]\n'
            f'address = "127.0.0.1:{port}"\n{security}')


def superlink_security_args(certificates: Path | None, node_auth: bool) -> list[str]:
    """``flower-superlink`` flags: ``--insecure``, or TLS from ``certificates`` (+ node auth)."""
    if certificates is None:
        return ["--insecure"]
    args = ["--ssl-ca-certfile", str(certificates / "ca.crt"),
            "--ssl-certfile", str(certificates / "server.pem"),
            "--ssl-keyfile", str(certificates / "server.key")]
    return args + (["--enable-supernode-auth"] if node_auth else [])


def make_certificates(folder: Path, hosts: Sequence[str] = ("127.0.0.1", "localhost"),
                      days: int = 365) -> Path:
    """A self-signed CA (``ca.crt``) and a server certificate for ``hosts`` (``server.pem/.key``)."""
    folder.mkdir(parents=True, exist_ok=True)
    san = ",".join(f"IP:{h}" if h.replace(".", "").isdigit() or ":" in h else f"DNS:{h}"
                   for h in hosts)
    (folder / "san.ext").write_text(f"subjectAltName={san}\n")
    for command in (
        f"req -x509 -newkey rsa:2048 -nodes -keyout ca.key -out ca.crt -days {days} "
        "-subj /CN=fl-maestro-ca",
        f"req -newkey rsa:2048 -nodes -keyout server.key -out server.csr -subj /CN={hosts[0]}",
        f"x509 -req -in server.csr -CA ca.crt -CAkey ca.key -CAcreateserial -out server.pem "
        f"-days {days} -sha256 -extfile san.ext",
    ):
        subprocess.run(["openssl", *command.split()], cwd=folder, check=True, capture_output=True)
    return folder


def make_node_key(path: Path) -> Path:
    """An ECDSA P-384 key pair in OpenSSH format (``path``, ``path.pub``) for SuperNode auth."""
    if path.exists():  # a reused FLWR_HOME keeps its nodes' keys
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run(["ssh-keygen", "-q", "-t", "ecdsa", "-b", "384", "-N", "", "-C", path.name,
                    "-f", str(path)], check=True, capture_output=True, stdin=subprocess.DEVNULL)
    return path


class Deployment(Managed):
    """A SuperLink (Deployment Engine) and N SuperNodes of our own: private FLWR_HOME, free ports."""

    def __init__(self, budgets: Sequence[float | None], num_partitions: int | None = None,
                 flwr_home: str | Path | None = None, app_dir: Path = APP_DIR,
                 extra_env: Mapping[str, str] | None = None, certificates: Path | None = None,
                 node_auth: bool = False, tls: bool = False) -> None:
        self._tmp = None if flwr_home else tempfile.mkdtemp(prefix="fl-maestro-deploy-")
        self.home = Path(flwr_home or self._tmp)
        self.app_dir = app_dir
        self.budgets = list(budgets)
        self.num_partitions = num_partitions or len(self.budgets)
        if len(self.budgets) > self.num_partitions:
            raise ValueError(f"{len(self.budgets)} nodes need num-partitions >= "
                             f"{len(self.budgets)}, got {self.num_partitions}")
        if tls and certificates is None:
            certificates = make_certificates(self.home / "certs")
        if node_auth and certificates is None:
            raise ValueError("SuperNode authentication needs TLS: pass certificates or tls=True")
        self.certificates = Path(certificates) if certificates else None
        self.node_auth = node_auth
        self.port: int | None = None
        self.processes: list[subprocess.Popen] = []
        self.env = flower_env(self.home, extra_env)
        self.status: str | None = None  # Flower's final status of the last run

    def start(self, timeout: float = 120) -> None:
        """Start the SuperLink, then every SuperNode, and wait until all of them are online."""
        self.home.mkdir(parents=True, exist_ok=True)
        self.port = free_port()  # Flower 1.41 serves Fleet, Control and Runtime APIs on one port
        (self.home / "config.toml").write_text(connection_toml(self.port, self.certificates))
        self._spawn("superlink", [
            "flower-superlink", *superlink_security_args(self.certificates, self.node_auth),
            "--isolation", "subprocess", "--host", "127.0.0.1", "--port", str(self.port),
            "--database", str(self.home / "state.db"),
            "--disable-runtime-dependency-installation"])
        wait_for_port(self.port, self.processes[0])
        for partition_id, budget in enumerate(self.budgets):
            self._spawn(f"supernode-{partition_id}", [
                "flower-supernode", *self._supernode_security_args(partition_id),
                "--superlink", f"127.0.0.1:{self.port}", "--isolation", "subprocess",
                "--host", "127.0.0.1", "--port", str(free_port()),
                "--node-config", node_config(partition_id, self.num_partitions, budget)])
        self.wait_for_nodes(len(self.budgets), timeout)

    def _supernode_security_args(self, partition_id: int) -> list[str]:
        """TLS (and, with node auth, a freshly registered key pair) for one SuperNode."""
        if self.certificates is None:
            return ["--insecure"]
        args = ["--root-certificates", str(self.certificates / "ca.crt")]
        if self.node_auth:
            key = make_node_key(self.home / "keys" / f"supernode-{partition_id}")
            self.register(key)
            args += ["--auth-supernode-private-key", str(key)]
        return args

    def register(self, key: Path) -> None:
        """Register a SuperNode's public key (``key.pub``) with the SuperLink (idempotent)."""
        try:
            self.flwr_cli("supernode", "register", f"{key}.pub", CONNECTION)
        except RuntimeError as err:
            if "already in use" not in str(err):  # registered by an earlier run in this home
                raise

    def flwr_cli(self, *args: str) -> str:
        """Run one ``flwr`` CLI command against this deployment; returns its stdout."""
        result = subprocess.run(["flwr", *args], cwd=self.app_dir, env=self.env, text=True,
                                capture_output=True, stdin=subprocess.DEVNULL, timeout=60)
        if result.returncode != 0:
            raise RuntimeError(f"flwr {' '.join(args)} failed: {result.stdout}{result.stderr}")
        return result.stdout

    def _spawn(self, name: str, command: list[str]) -> None:
        """Start one Flower process in its own session, its output in ``$FLWR_HOME/<name>.log``."""
        with open(self.home / f"{name}.log", "ab") as out:
            process = subprocess.Popen(command, cwd=self.app_dir, env=self.env, stdout=out,
                                       stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                       start_new_session=True)
        self.processes.append(process)
        log.info("started %s (pid %d)", name, process.pid)

    def online_nodes(self) -> int:
        """How many SuperNodes the SuperLink lists as online right now."""
        try:
            nodes = json.loads(self.flwr_cli("supernode", "ls", CONNECTION, "--format", "json"))
            nodes = nodes["nodes"]
        except (RuntimeError, json.JSONDecodeError, KeyError) as err:
            log.debug("flwr supernode ls: %s", err)
            return 0
        return sum(node.get("status") == "online" for node in nodes)

    def wait_for_nodes(self, count: int, timeout: float = 120) -> None:
        """Block until ``count`` SuperNodes are online (the ServerApp discovers nodes once)."""
        deadline = time.monotonic() + timeout
        online = 0
        while time.monotonic() < deadline:
            dead = [p.args[0] for p in self.processes if p.poll() is not None]
            if dead:
                raise RuntimeError(f"{dead} exited at start; see the logs in {self.home}")
            online = self.online_nodes()
            if online >= count:
                log.info("%d SuperNodes online", online)
                return
            time.sleep(1)
        raise TimeoutError(f"only {online} of {count} SuperNodes online after {timeout:.0f} s")

    def run(self, run_config: Mapping[str, Any], timeout: float | None = None) -> int:
        """``flwr run . --stream`` with the given run-config overrides; returns its exit code."""
        staged = stage_app(self.app_dir, self.home / "app")  # see stage_app: no .venv walk
        command = ["flwr", "run", str(staged), CONNECTION, "--stream", *toml_overrides(run_config)]
        code, run_id = stream_flwr_run(command, self.app_dir, self.env, timeout)
        self.status = run_status(self.env, run_id)
        return code

    def stop(self, grace: float = 10) -> None:
        """Stop every SuperNode, the SuperLink and everything started under this FLWR_HOME."""
        if self.processes:
            stop_processes(self.processes[::-1], self.home, grace)
            log.info("stopped the SuperLink and %d SuperNodes", len(self.processes) - 1)
            self.processes = []
        if self._tmp:
            shutil.rmtree(self._tmp, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    """Command line: one run on a loopback deployment of a SuperLink and N SuperNodes."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, default=4, help="number of SuperNodes")
    parser.add_argument("--budgets", default="",
                        help="comma-separated budgets, one per node (cycled); "
                             "empty: the run's device-mix assigns them")
    parser.add_argument("--num-partitions", type=int, default=None,
                        help="partitions of the dataset (default: one per node)")
    parser.add_argument("-c", "--run-config", action="append", default=[],
                        help="key=value run-config override (repeatable)")
    parser.add_argument("--flwr-home", default=None, help="FLWR_HOME (default: a temp dir)")
    parser.add_argument("--tls", action="store_true",
                        help="TLS with a self-signed CA made under FLWR_HOME/certs")
    parser.add_argument("--certificates", type=Path, default=None,
                        help="TLS from this folder's ca.crt, server.pem and server.key")
    parser.add_argument("--node-auth", action="store_true",
                        help="SuperNode authentication: a registered key pair per node (needs TLS)")
    parser.add_argument("--timeout", type=float, default=None)
    args = parser.parse_args(argv)
    overrides = start_command(parser, args.run_config)
    budgets = parse_budgets(args.budgets, args.nodes)
    deployment = Deployment(budgets, args.num_partitions, args.flwr_home,
                            certificates=args.certificates, node_auth=args.node_auth,
                            tls=args.tls)
    with deployment:
        code = deployment.run(overrides, args.timeout)
    return judge(code, overrides, deployment.status)


if __name__ == "__main__":
    sys.exit(main())
