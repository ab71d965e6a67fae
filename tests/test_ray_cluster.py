"""A simulation attached to a Ray cluster of our own (a head and a worker node), then torn down.

The slow test starts ``simulations.ray_cluster.RayCluster`` with one CPU per node, runs digits/CNN
for two rounds through ``flwr run .`` on a private SuperLink whose environment holds RAY_ADDRESS,
and asks Ray's GCS, before stopping the cluster, which nodes were alive and where the ClientApp
actors lived: one CPU per node and one CPU per client means one actor on each node.
"""

from __future__ import annotations

import os
import subprocess
import time

import pytest

from fl_maestro.results import RunStore
from simulations.launch import processes_with_home
from simulations.ray_cluster import MARKER, RayCluster, processes_with_marker, run_on_cluster

ROUNDS = 2


def test_processes_are_found_by_their_marker(tmp_path):
    sleeper = subprocess.Popen(["sleep", "60"], env={**os.environ, MARKER: str(tmp_path)})
    try:
        # Until the child has exec'd, /proc shows the parent's environment: on a loaded machine
        # that can take a moment, so look again for up to 10 s before judging.
        deadline = time.monotonic() + 10
        while processes_with_marker(str(tmp_path)) != [sleeper.pid] and time.monotonic() < deadline:
            time.sleep(0.05)
        assert processes_with_marker(str(tmp_path)) == [sleeper.pid]
        assert processes_with_marker(str(tmp_path / "other")) == []
    finally:
        sleeper.kill()
        sleeper.wait()


@pytest.fixture(scope="module")
def cluster_run(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("ray-cluster")
    run_config = {"dataset": "digits", "model": "cnn", "num-rounds": ROUNDS,
                  "clients-per-round": 2, "device-mix": "0.25:0.5,1.0:0.5",
                  "partitioner": "iid", "results-dir": str(root / "results"),
                  "run-name": "cluster", "eval-samples": 0, "eval-fractions": "0.25,1.0"}
    with RayCluster(workers=1, cpus_per_node=1) as cluster:
        code, status = run_on_cluster(cluster, run_config, supernodes=4,
                                      flwr_home=root / "flwr-home", timeout=600)
        nodes, actors = cluster.nodes(), cluster.actors()
    return {"code": code, "status": status, "nodes": nodes, "actors": actors, "marker": str(cluster.temp_dir),
            "store": RunStore(root / "results" / "cluster"), "home": root / "flwr-home"}


@pytest.mark.slow
def test_simulation_runs_on_both_nodes_of_the_cluster(cluster_run):
    assert cluster_run["code"] == 0
    assert len(cluster_run["nodes"]["nodes"]) == 2
    assert cluster_run["nodes"]["cpus"] == 2
    node_ids = {n["id"] for n in cluster_run["nodes"]["nodes"]}
    client_actors = [a for a in cluster_run["actors"] if a["class"] == "ClientAppActor"]
    assert {a["node"] for a in client_actors} == node_ids
    store = cluster_run["store"]
    assert store.load_checkpoint()[0] == ROUNDS
    assert len(store.read("clients")) == ROUNDS * 2


@pytest.mark.slow
def test_cluster_and_superlink_leave_no_process(cluster_run):
    assert processes_with_marker(cluster_run["marker"]) == []
    assert processes_with_home(cluster_run["home"]) == []
