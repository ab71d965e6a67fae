"""Flower's Deployment Engine on loopback: a real SuperLink, SuperNodes, budgets from node config.

The slow tests run digits/CNN on ``simulations.deploy.Deployment``: two rounds on three insecure
SuperNodes, checking that every client row carries the budget its SuperNode was started with; and
one round over TLS with SuperNode authentication, where a node with an unregistered key is refused.
Neither may leave a process behind.
"""

from __future__ import annotations

import shutil

import pytest

from fl_maestro.results import RunStore
from simulations.deploy import Deployment, make_node_key, node_config, parse_budgets
from simulations.launch import free_port, processes_with_home

BUDGETS = [0.25, 0.5, 1.0]  # 0.5 is not a tier of the device mix: node config must win
ROUNDS = 2


def test_node_config_names_partition_and_budget():
    assert node_config(3, 10, 0.4) == "partition-id=3 num-partitions=10 budget=0.4"
    assert node_config(0, 2, None) == "partition-id=0 num-partitions=2"


def test_parse_budgets_cycles_and_validates():
    assert parse_budgets("0.25,1", 3) == [0.25, 1.0, 0.25]
    assert parse_budgets("", 2) == [None, None]
    with pytest.raises(ValueError, match="not in"):
        parse_budgets("0.5,1.5", 2)
    with pytest.raises(ValueError, match="malformed"):
        parse_budgets("half", 1)


def test_more_nodes_than_partitions_is_refused():
    with pytest.raises(ValueError, match="num-partitions"):
        Deployment([1.0, 1.0], num_partitions=1, flwr_home="/nonexistent")


@pytest.fixture(scope="module")
def deployed_run(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("deploy")
    home, results = root / "flwr-home", root / "results"
    run_config = {"dataset": "digits", "model": "cnn", "num-rounds": ROUNDS,
                  "clients-per-round": len(BUDGETS), "device-mix": "0.25:0.5,1.0:0.5",
                  "partitioner": "iid", "results-dir": str(results), "run-name": "deployed",
                  "eval-samples": 0, "eval-fractions": "0.25,1.0"}
    with Deployment(BUDGETS, flwr_home=home) as deployment:
        code = deployment.run(run_config, timeout=600)
    return {"code": code, "store": RunStore(results / "deployed"), "home": home}


@pytest.mark.slow
def test_deployed_run_uses_node_config_budgets(deployed_run):
    assert deployed_run["code"] == 0
    clients = deployed_run["store"].read("clients")
    assert len(clients) == ROUNDS * len(BUDGETS)
    by_partition = clients.groupby("partition-id")["budget"].unique()
    assert {p: list(b) for p, b in by_partition.items()} == {
        i: [b] for i, b in enumerate(BUDGETS)}
    down = clients.groupby("budget")["bytes-down"].max()
    assert down[0.25] < down[0.5] < down[1.0]  # each node got only its own prefix
    assert deployed_run["store"].load_checkpoint()[0] == ROUNDS


@pytest.mark.slow
def test_deployment_leaves_no_process(deployed_run):
    assert processes_with_home(deployed_run["home"]) == []


@pytest.mark.slow
@pytest.mark.skipif(not (shutil.which("openssl") and shutil.which("ssh-keygen")),
                    reason="needs openssl and ssh-keygen")
def test_tls_and_supernode_auth_admit_registered_nodes_only(tmp_path):
    home = tmp_path / "flwr-home"
    run_config = {"dataset": "digits", "num-rounds": 1, "clients-per-round": 2,
                  "partitioner": "iid", "results-dir": str(tmp_path / "results"),
                  "run-name": "tls", "eval-samples": 100, "eval-fractions": "1.0"}
    with Deployment([0.25, 1.0], flwr_home=home, tls=True, node_auth=True) as deployment:
        intruder = make_node_key(home / "keys" / "intruder")  # never registered
        deployment._spawn("intruder", [
            "flower-supernode", "--root-certificates", str(home / "certs" / "ca.crt"),
            "--superlink", f"127.0.0.1:{deployment.port}", "--host", "127.0.0.1",
            "--port", str(free_port()), "--auth-supernode-private-key", str(intruder),
            "--node-config", "partition-id=0 num-partitions=2"])
        assert deployment.processes[-1].wait(timeout=120) != 0
        assert deployment.online_nodes() == 2
        assert deployment.run(run_config, timeout=600) == 0
    clients = RunStore(tmp_path / "results" / "tls").read("clients")
    assert sorted(clients["budget"]) == [0.25, 1.0]
    assert processes_with_home(home) == []
