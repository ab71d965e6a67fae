"""Benchmarks of the federation: the nested merge against Flower's FedAvg, and the simulator's overhead.

    python -m simulations.bench_federation [--out results/bench] [--rounds 20] [--skip-overhead]

1. Merge: ``merge_nested`` over 100 replies of the ResNet-18's arrays at mixed ranks (the five
   tiers of the default mix) against Flower's own ``aggregate_arrayrecords`` over 100 full-size
   replies of the same model. Target: ratio <= 1.0.
2. Overhead: the default experiment run through ``flwr run .`` (SuperLink, Ray, 100 SuperNodes)
   against the same federation code driving the same ClientApp in one process
   (``simulations.inprocess``). Target: per round (training, evaluation and results of rounds
   1 and later), Flower's extra seconds at most 5% of the in-process round; the fixed start-up
   and shut-down are reported on their own. The rounds' framework work (planning, encoding,
   decoding, model building, data, transport) is tabulated from the runs' timelines and clients'
   replies. Each path's time is split by the run's own
   ``timeline`` table into what happens before the ServerApp's run starts, each of its phases,
   and what happens after it returns, so one sees where the rest goes.
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import torch
from flwr.app import MetricRecord, RecordDict
from flwr.serverapp.strategy.strategy_utils import aggregate_arrayrecords

from fl_maestro.budgets import parse_mix, ranks_for_budget
from fl_maestro.config import defaults
from fl_maestro.models import build_model, model_arrays
from fl_maestro.results import RunStore
from fl_maestro.runtime import ALLOCATOR_ENV
from fl_maestro.server_app import setup_logging
from simulations.launch import PrivateSuperLink, federation_config, judge
from strategies.merge import merge_nested, prefix_arrays
from strategies.records import to_record

log = logging.getLogger("fl_maestro.bench")

OVERHEAD_TARGET = 0.05  # of the in-process round: Flower's extra seconds per round


def _best_of(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def bench_merge(num_replies: int = 100, repeats: int = 3) -> dict:
    """Seconds of merge_nested at mixed ranks vs Flower's aggregation at full size."""
    model = build_model("resnet18", (3, 32, 32), 10)
    arrays = model_arrays(model)
    tiers = [ranks_for_budget(model, b) for b, _ in parse_mix(defaults()["device-mix"])]
    tier_arrays = [prefix_arrays(arrays, ranks) for ranks in tiers]
    replies = [(tier_arrays[i % len(tiers)], float(100 + i)) for i in range(num_replies)]
    full_record = to_record(arrays)  # one record shared by every reply: aggregation only reads it
    records = [RecordDict({"arrays": full_record,
                           "metrics": MetricRecord({"num-examples": 100 + i})})
               for i in range(num_replies)]
    ours = _best_of(lambda: merge_nested(arrays, replies), repeats)
    flower = _best_of(lambda: aggregate_arrayrecords(records, "num-examples"), repeats)
    received = sum(a.size for reply, _ in replies for a in reply.values())
    return {"bench": "merge", "replies": num_replies, "ours-seconds": ours,
            "flower-fedavg-seconds": flower, "ratio": ours / flower,
            "received-elements": received,
            "full-size-elements": num_replies * sum(a.size for a in arrays.values())}


def _overrides(results_dir: Path, name: str, rounds: int) -> dict:
    return {"results-dir": str(results_dir), "run-name": name, "num-rounds": rounds}


PHASES = ("set-up", "discovery", "training", "evaluation", "results")


def _phases(store: RunStore, started: float, ended: float) -> dict[str, float]:
    """Seconds of each ServerApp phase (summed over rounds), and outside the ServerApp's run."""
    timeline = store.read("timeline")
    seconds = timeline.groupby("phase")["seconds"].sum()
    first, last = timeline["start"].min(), (timeline["start"] + timeline["seconds"]).max()
    rounds = timeline[(timeline["round"] > 0) & timeline["phase"].isin(PHASES)]
    return {"before-run": first - started, **{p: float(seconds.get(p, 0.0)) for p in PHASES},
            "after-run": ended - last,
            "per-round": float(rounds["seconds"].sum()) / max(rounds["round"].nunique(), 1)}


def check_finished(code: int, overrides: dict, status: str | None) -> None:
    """Raise unless the launcher would call the run a success: ``flwr run --stream`` exits 0 when
    the ServerApp fails, so its exit code, Flower's run status and the last checkpoint all count."""
    if judge(code, overrides, status) != 0:
        raise RuntimeError(f"the flwr run did not finish (exit code {code}, Flower's run status "
                           f"{status or 'unknown'}): see its log above")


def bench_overhead(rounds: int, supernodes: int = 100) -> tuple[list[dict], list[dict]]:
    """The default experiment through Flower and in one process: wall time and where it went.

    Returns one row per phase (plus ``wall`` and ``per-round``) with both paths' seconds and their
    difference, and the rounds' framework work (``framework_rows``). Both run as fresh processes
    started from here (``simulations.launch``'s SuperLink and ``flwr run``; ``python -m
    simulations.inprocess``), with the same allocator settings. ``before-run`` is everything
    before the federation starts (both: Python and the imports; Flower also the SuperLink, ``flwr
    run``, the simulation process and Ray), ``after-run`` everything after it returns until the
    command is done (Flower: the run's shut-down, stopping the SuperLink). ``per-round`` is the
    mean of a round's training, evaluation and results phases (rounds 1 and later).
    """
    scratch = Path(tempfile.mkdtemp(prefix="fl-maestro-bench-"))
    try:
        start = time.time()
        overrides = _overrides(scratch, "flower", rounds)
        with PrivateSuperLink() as link:
            code = link.run(overrides, federation_config(supernodes))
        ended = time.time()
        check_finished(code, overrides, link.status)
        flower = {"wall": ended - start, **_phases(RunStore(scratch / "flower"), start, ended)}
        # The plain loop is a command of its own too, so both sides pay a fresh process's imports.
        command = [sys.executable, "-m", "simulations.inprocess", "--nodes", str(supernodes),
                   *(arg for k, v in _overrides(scratch, "inprocess", rounds).items()
                     for arg in ("-c", f"{k}={v}"))]
        start = time.time()
        subprocess.run(command, check=True, env={**os.environ, **ALLOCATOR_ENV})
        plain = {"wall": time.time() - start, **_phases(RunStore(scratch / "inprocess"), start, time.time())}
        framework = [{"path": path, **framework_rows(RunStore(scratch / name))}
                     for path, name in (("flwr run", "flower"), ("in-process", "inprocess"))]
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return [{"bench": "overhead", "rounds": rounds, "supernodes": supernodes, "phase": phase,
             "flower-seconds": flower[phase], "inprocess-seconds": plain[phase],
             "difference-seconds": flower[phase] - plain[phase],
             "ratio": flower[phase] / plain[phase] if plain[phase] > 0 else float("nan")}
            for phase in ("wall", "before-run", *PHASES, "after-run", "per-round")], framework


CLIENT_PARTS = ("decode", "build", "data", "validate", "train", "encode")
ROUND_PARTS = ("plan", "configure", "clients", "merge")


def framework_rows(store: RunStore) -> dict[str, float]:
    """Mean seconds per round of each part of training: the server's parts from the timeline,
    the clients' from their replies (summed over a round's clients); ``transport`` is the wait
    for replies that no client accounts for."""
    timeline = store.read("timeline")
    rounds = timeline.loc[timeline["round"] > 0, "round"].nunique()
    server = {part: float(timeline.loc[timeline["phase"] == f"training:{part}", "seconds"].sum())
              / rounds for part in ROUND_PARTS}
    clients = store.read("clients")
    client = {f"client-{part}": float(clients[f"{part}-seconds"].sum()) / rounds
              for part in CLIENT_PARTS}
    return {**server, **client,
            "transport": server["clients"] - sum(client.values())}
def machine() -> str:
    """One line naming the machine and library versions behind the numbers."""
    return (f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} torch "
            f"threads, torch {torch.__version__}, python {platform.python_version()}")


def main(argv: list[str] | None = None) -> int:
    """Run the benchmarks and save ``federation.csv`` and ``federation.md`` under --out."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="results/bench")
    parser.add_argument("--rounds", type=int, default=defaults()["num-rounds"],
                        help="rounds of the overhead run (default: the default experiment's)")
    parser.add_argument("--skip-overhead", action="store_true")
    args = parser.parse_args(argv)
    setup_logging()
    merge = bench_merge()
    log.info("merge: %s", merge)
    overhead, framework = ([], []) if args.skip_overhead else bench_overhead(args.rounds)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    pd.DataFrame([merge, *overhead]).to_csv(out / "federation.csv", index=False)
    parts = [pd.DataFrame([merge]).to_markdown(index=False, floatfmt=".3f")]
    if overhead:
        pd.DataFrame(framework).to_csv(out / "framework.csv", index=False)
        parts.append(pd.DataFrame(overhead).drop(columns="bench").to_markdown(index=False, floatfmt=".2f"))
        parts.append("Framework work per round (seconds, mean over rounds; client parts summed "
                     "over a round's clients):\n\n"
                     + pd.DataFrame(framework).to_markdown(index=False, floatfmt=".3f"))
        per_round = overhead[-1]
        share = per_round["difference-seconds"] / per_round["inprocess-seconds"]
        fixed = {r["phase"]: r["difference-seconds"] for r in overhead}
        met = "met" if share <= OVERHEAD_TARGET else "NOT met"
        parts.append(f"- Per round, `flwr run` takes {per_round['difference-seconds']:+.3f} s "
                     f"more than the in-process run's {per_round['inprocess-seconds']:.3f} s: "
                     f"{share:+.1%} (target <= {OVERHEAD_TARGET:.0%}): {met}. Start-up "
                     f"(before-run, set-up, discovery) adds "
                     f"{fixed['before-run'] + fixed['set-up'] + fixed['discovery']:+.1f} s, "
                     f"shut-down (after-run) {fixed['after-run']:+.1f} s, once per run.")
    text = "\n\n".join(parts)
    (out / "federation.md").write_text(f"# Federation benchmarks\n\n{machine()}\n\n{text}\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
