"""The throughput benchmark's plumbing: what it counts and what the plain loop does (no timings)."""

from __future__ import annotations

import torch

from fl_maestro.config import parse_run_config
from fl_maestro.federation import run_federation
from fl_maestro.results import RunStore
from simulations.bench_throughput import DenseCNN, _take, run_counts
from simulations.inprocess import InProcessGrid
from fl_maestro.models import CNN


def test_run_counts_every_training_and_evaluation_example(tmp_path) -> None:
    overrides = {"dataset": "digits", "num-rounds": 2, "clients-per-round": 3, "local-epochs": 2,
                 "partitioner": "iid", "device-mix": "0.25:0.5,1.0:0.5", "eval-samples": 100,
                 "eval-fractions": "0.5,1.0", "results-dir": str(tmp_path), "run-name": "run"}
    run_federation(InProcessGrid(4, overrides), parse_run_config(overrides))
    store = RunStore(tmp_path / "run")
    counts = run_counts(store)
    clients = store.read("clients")
    assert counts["clients"] == 6 and counts["train-examples"] == 2 * clients["num-examples"].sum()
    # levels: fractions 0.5, 1.0 and tiers 0.25, 1.0; rounds 0 and 1 on 100 images, the final on all
    assert counts["eval-examples"] == 4 * (100 + 100 + 360)
    assert counts["training-cpu-seconds"] > 0 and counts["evaluation-seconds"] > 0
    assert counts["client-train-seconds"] == clients["train-seconds"].sum() > 0


def test_take_stops_at_the_asked_number_of_examples_across_passes() -> None:
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(
        torch.zeros(10, 1), torch.arange(10)), batch_size=4)
    sizes = [len(y) for _, y in _take(loader, 23)]
    assert sizes == [4, 4, 2, 4, 4, 2, 3]


def test_the_plain_cnn_has_the_default_models_layer_sizes() -> None:
    dense = DenseCNN()
    ours = CNN((1, 28, 28))
    assert sum(p.numel() for p in dense.parameters()) == ours.dense_cost("params")
    assert dense(torch.zeros(2, 1, 28, 28)).shape == (2, 10)


def test_summary_names_failed_runs_and_judges_the_others() -> None:
    import pandas as pd

    from simulations.bench_throughput import summary
    timed = {"device": "cpu", "precision": "fp32", "failed": False, "training-seconds": 2.0,
             "evaluation-seconds": 1.0, "plain-training-seconds": 6.0,
             "plain-evaluation-seconds": 4.0, "training-ratio": 1 / 3, "evaluation-ratio": 0.25,
             "training-cpu-ratio": 0.4, "client-training-ratio": 0.2,
             "ratio": 0.3, "cpu-ratio": 0.3, "clients-per-second": 5.0}
    frame = pd.DataFrame([{**timed, "repeat": 0},
                          {"repeat": 0, "precision": "bf16", "device": "cpu", "failed": True}])
    text = summary(frame)
    assert "cpu fp32: (training + evaluation) / plain loop = 0.300" in text and ": met." in text
    assert "cpu bf16, repeat 0: the run FAILED" in text
    assert "training = 0.333 wall, 0.400 CPU" in text and "alone 0.200" in text
    assert "target <= 0.6 (on the training phase): met." in text
    slow = pd.DataFrame([{**timed, "repeat": 0, "training-ratio": 0.61}])
    assert "(on the training phase): NOT met." in summary(slow)
