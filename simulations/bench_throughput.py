"""Throughput: the default experiment's training and evaluation against the plain PyTorch loop.

    python -m simulations.bench_throughput [--out results/bench] [--rounds 3] [--repeats 2]
                                           [--precisions fp32,bf16]

Each repeat runs, as fresh processes one after another: for every precision, the default
experiment through ``simulations.inprocess`` for ``--rounds`` rounds, then the plain loop over the
same numbers of examples. The run's own ``timeline`` gives its training and evaluation seconds
(wall and CPU), its tables give the examples: every client's training examples times the local
epochs, and every evaluated level's test images. The plain loop is what a user would otherwise
write: a dense CNN with the same layer sizes (conv 1->32, conv 32->64, both 3x3 with a 2x2
max-pool, fc 3136->128, classifier 128->10), float32, NCHW, ``torch.optim.SGD(lr=0.05,
momentum=0.9)`` over shuffled ``DataLoader`` batches of 32, then evaluation in batches of 200
under ``no_grad``. Target: (training + evaluation seconds) / (the loop's) <= 0.35.

Both run on the GPU when there is one (the loop moves each batch to it, as a user would), else on
the CPU, with the same allocator settings and torch's default thread count. Clients per second
(clients trained / training seconds) is reported per precision and device.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from fl_maestro.data import load_dataset
from fl_maestro.results import RunStore
from fl_maestro.runtime import ALLOCATOR_ENV
from fl_maestro.server_app import setup_logging
from simulations.bench_federation import machine

log = logging.getLogger("fl_maestro.bench")

TARGET = 0.35
TRAINING_TARGET = 0.60  # the run's training phase against the loop's training, same examples


class DenseCNN(nn.Module):
    """The textbook CNN with the default model's layer sizes (every layer dense)."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2))
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(64 * 7 * 7, 128), nn.ReLU(),
                                  nn.Linear(128, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _take(loader: DataLoader, examples: int):
    """Batches of ``loader``, pass after pass, until ``examples`` rows were handed out."""
    seen = 0
    while seen < examples:
        for x, y in loader:
            x, y = x[:examples - seen], y[:examples - seen]
            seen += len(y)
            yield x, y
            if seen >= examples:
                return


def plain_loop(train_examples: int, eval_examples: int, device: str, seed: int = 0) -> dict:
    """Seconds (wall and CPU) the textbook loop takes to train on and evaluate that many examples."""
    device = torch.device(device)
    torch.manual_seed(seed)
    x, y, xt, yt = (torch.from_numpy(np.array(a)) for a in load_dataset("fashion-mnist"))
    model = DenseCNN().to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    train_loader = DataLoader(TensorDataset(x, y), batch_size=32, shuffle=True,
                              generator=torch.Generator().manual_seed(seed))
    times = {}
    wall, cpu = time.perf_counter(), time.process_time()
    model.train()
    for xb, yb in _take(train_loader, train_examples):
        xb, yb = xb.to(device), yb.to(device)
        loss = nn.functional.cross_entropy(model(xb), yb)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    _sync(device)
    times["training"] = (time.perf_counter() - wall, time.process_time() - cpu)
    wall, cpu = time.perf_counter(), time.process_time()
    model.eval()
    correct = 0
    with torch.no_grad():
        for xb, yb in _take(DataLoader(TensorDataset(xt, yt), batch_size=200), eval_examples):
            correct += (model(xb.to(device)).argmax(1) == yb.to(device)).sum().item()
    _sync(device)
    times["evaluation"] = (time.perf_counter() - wall, time.process_time() - cpu)
    return {f"{phase}-{kind}": value[i] for phase, value in times.items()
            for i, kind in enumerate(("seconds", "cpu-seconds"))}


def run_counts(store: RunStore) -> dict:
    """What a finished run did: clients, training and evaluation examples, and its phase times."""
    config = store.read_config()
    clients = store.read("clients")
    evaluation = store.read("evaluation")
    timeline = store.read("timeline")
    top = timeline[~timeline["phase"].str.contains(":")]
    counts = {"clients": len(clients),
              "client-train-seconds": float(clients["train-seconds"].sum()),
              "train-examples": int(clients["num-examples"].sum()) * int(config["local-epochs"]),
              "eval-examples": int(evaluation.loc[evaluation["metric"] == "eval-examples",
                                                  "value"].sum())}
    for phase in ("training", "evaluation"):
        rows = top[top["phase"] == phase]
        counts[f"{phase}-seconds"] = float(rows["seconds"].sum())
        counts[f"{phase}-cpu-seconds"] = float(rows["cpu-seconds"].sum())
    return counts


def bench_env(threads: int | None = None) -> dict[str, str]:
    """The environment of a measured child: the allocator settings, and ``--threads`` when given
    (``BENCH_THREADS``; on a machine shared with other work, one thread per process keeps OpenMP
    threads from spin-waiting for a busy core, which inflates CPU seconds and wall time alike)."""
    env = {**os.environ, **ALLOCATOR_ENV}
    threads = threads or os.environ.get("BENCH_THREADS")
    if threads:
        env["OMP_NUM_THREADS"] = env["BENCH_THREADS"] = str(threads)
    return env


def judge_inprocess(returncode: int, store: RunStore, rounds: int) -> str:
    """Why an in-process run failed (``""`` if it did not): the launcher's rule without Flower's
    run status, which has no SuperLink here: exit code 0 and a checkpoint of the last round."""
    if returncode != 0:
        return f"exit code {returncode}"
    if not store.root.exists() or store.checkpoint_round() != rounds:
        return f"no checkpoint of round {rounds}"
    return ""


def simulate(scratch: Path, name: str, rounds: int, precision: str, nodes: int = 100) -> dict:
    """Run the default experiment in one fresh process; return ``run_counts`` of it."""
    command = [sys.executable, "-m", "simulations.inprocess", "--nodes", str(nodes),
               "-c", f"results-dir={scratch}", "-c", f"run-name={name}",
               "-c", f"num-rounds={rounds}", "-c", f"precision={precision}"]
    done = subprocess.run(command, env=bench_env(), stdout=subprocess.DEVNULL)
    reason = judge_inprocess(done.returncode, RunStore(scratch / name), rounds)
    if reason:
        raise RuntimeError(reason)
    return run_counts(RunStore(scratch / name))


def plain(train_examples: int, eval_examples: int, device: str) -> dict:
    """``plain_loop`` in a fresh process, as the simulation runs (same imports, same allocator)."""
    command = [sys.executable, "-m", "simulations.bench_throughput", "--plain-loop",
               str(train_examples), str(eval_examples), "--device", device]
    out = subprocess.run(command, check=True, env=bench_env(),
                         capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def bench(rounds: int, repeats: int, precisions: list[str], device: str) -> pd.DataFrame:
    """One row per repeat and precision: the run's and the plain loop's seconds, and the ratios."""
    scratch = Path(tempfile.mkdtemp(prefix="fl-maestro-throughput-"))
    rows = []
    try:
        for repeat in range(repeats):
            for precision in precisions:
                try:
                    run = simulate(scratch, f"{precision}-{repeat}", rounds, precision)
                except RuntimeError as err:  # e.g. a run stopped by its checks
                    log.error("repeat %d, %s: the run failed (%s); recorded, not timed",
                              repeat, precision, err)
                    rows.append({"repeat": repeat, "precision": precision, "device": device,
                                 "failed": True})
                    continue
                loop = plain(run["train-examples"], run["eval-examples"], device)
                rows.append(_row(repeat, precision, device, run, loop))
                log.info("repeat %d, %s: ratio %.3f (CPU seconds: %.3f)", repeat, precision,
                         rows[-1]["ratio"], rows[-1]["cpu-ratio"])
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return pd.DataFrame(rows)


def _row(repeat: int, precision: str, device: str, run: dict, loop: dict) -> dict:
    ours = run["training-seconds"] + run["evaluation-seconds"]
    theirs = loop["training-seconds"] + loop["evaluation-seconds"]
    ours_cpu = run["training-cpu-seconds"] + run["evaluation-cpu-seconds"]
    theirs_cpu = loop["training-cpu-seconds"] + loop["evaluation-cpu-seconds"]
    return {"repeat": repeat, "precision": precision, "device": device, "failed": False, **run,
            **{f"plain-{k}": v for k, v in loop.items()},
            "training-ratio": run["training-seconds"] / loop["training-seconds"],
            "training-cpu-ratio": run["training-cpu-seconds"] / loop["training-cpu-seconds"],
            "client-training-ratio": run["client-train-seconds"] / loop["training-seconds"],
            "evaluation-ratio": run["evaluation-seconds"] / loop["evaluation-seconds"],
            "ratio": ours / theirs, "cpu-ratio": ours_cpu / theirs_cpu,
            "clients-per-second": run["clients"] / run["training-seconds"]}


def summary(frame: pd.DataFrame) -> str:
    """A markdown table: the median over repeats per precision, and the verdict."""
    columns = ["training-seconds", "evaluation-seconds", "plain-training-seconds",
               "plain-evaluation-seconds", "training-ratio", "training-cpu-ratio",
               "client-training-ratio", "evaluation-ratio", "ratio", "cpu-ratio",
               "clients-per-second"]
    failed = frame[frame["failed"]]
    frame = frame[~frame["failed"]]
    table = frame.groupby(["device", "precision"])[columns].median().reset_index()
    spread = frame.groupby(["device", "precision"])["ratio"].agg(["min", "max"]).reset_index()
    lines = [table.to_markdown(index=False, floatfmt=".3f"), ""]
    lines += [f"- {r['device']} {r['precision']}, repeat {r['repeat']}: the run FAILED (see the "
              "log); not timed." for _, r in failed.iterrows()]
    for (_, row), (_, rng) in zip(table.iterrows(), spread.iterrows()):
        met = "met" if row["ratio"] <= TARGET else "NOT met"
        lines.append(f"- {row['device']} {row['precision']}: (training + evaluation) / plain loop "
                     f"= {row['ratio']:.3f} (median of {int((frame['precision'] == row['precision']).sum())};"
                     f" {rng['min']:.3f}-{rng['max']:.3f}); target <= {TARGET}: {met}.")
        met = "met" if row["training-ratio"] <= TRAINING_TARGET else "NOT met"
        lines.append(f"- {row['device']} {row['precision']}: training / plain loop's training = "
                     f"{row['training-ratio']:.3f} wall, {row['training-cpu-ratio']:.3f} CPU (the "
                     f"run's training phase: every ClientApp's whole work); the clients' own "
                     f"training loops alone {row['client-training-ratio']:.3f}; target <= "
                     f"{TRAINING_TARGET} (on the training phase): {met}.")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and save ``throughput.csv`` and ``throughput.md`` under --out."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="results/bench")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--precisions", default="fp32,bf16")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads of every measured process (default: torch's own)")
    parser.add_argument("--plain-loop", nargs=2, type=int, metavar=("TRAIN", "EVAL"),
                        help="only run the plain loop over that many examples; print JSON")
    args = parser.parse_args(argv)
    if args.plain_loop:
        print(json.dumps(plain_loop(*args.plain_loop, args.device)))
        return 0
    setup_logging()
    if args.threads:
        os.environ["BENCH_THREADS"] = str(args.threads)
    frame = bench(args.rounds, args.repeats, args.precisions.split(","), args.device)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    frame.to_csv(out / "throughput.csv", index=False)
    text = summary(frame)
    threads = f"; every measured process with {args.threads} torch thread(s)" if args.threads else ""
    (out / "throughput.md").write_text(f"# Throughput benchmark\n\n{machine()}{threads}\n\n{text}\n")
    print(text)
    return 1 if frame["failed"].any() else 0  # the numbers are saved either way


if __name__ == "__main__":
    sys.exit(main())
