"""What the comparison costs: core-seconds per round of every method, and the whole sweep projected.

    python -m simulations.bench_comparison [--out results/bench] [--rounds 3]
                                           [--base /work/wt/base --base-label c89f1d9]

For every method of the ``comparison`` scenario (``simulations.scenarios``), the default setup
runs ``--rounds`` rounds in-process (``simulations.inprocess``, one fresh process each, seed 0,
evaluation every round so that every kind of evaluation is timed). CPU seconds are core-seconds
(``time.process_time`` of the run's phases in its ``timeline``; torch's threads add up):

- training: the ``training:clients`` phase (every ClientApp's work: decode, build, validate, train,
  encode), per round;
- evaluation: the server's evaluation on the ``eval-samples`` subset, per evaluation, and the final
  evaluation on the whole test set;
- framework: the server's own work of a round (``training:plan``, ``configure``, ``merge`` and
  ``results``), per round, and the run's start (the process's CPU outside every round: imports,
  data, set-up) once per run.

The projection is the comparison as the issue states it: every method, ``SEEDS`` seeds,
``ROUNDS`` rounds, evaluation every ``EVAL_EVERY`` rounds from round 0 and the final round on the
whole test set. With ``--base`` the same runs are made, interleaved method by method, with the code
of another checkout (``PYTHONPATH`` and working directory there), and the table puts the two side by
side. A run is judged as the launcher judges one: its process must exit 0 and its folder must hold a
checkpoint of its last round; a failed run is recorded as failed, never as a cost.
"""

from __future__ import annotations

import argparse
import logging
import os
import resource
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pandas as pd

from fl_maestro.results import RunStore
from fl_maestro.server_app import setup_logging
from simulations.bench_federation import machine
from simulations.bench_throughput import bench_env, judge_inprocess
from simulations.scenarios import get_scenario

log = logging.getLogger("fl_maestro.bench")

SEEDS, ROUNDS, EVAL_EVERY = 5, 100, 5
FRAMEWORK_PHASES = ("training:plan", "training:configure", "training:merge", "results")
TARGETS = {"projection": 0.6, "rankwise-vs-fedavg-full": 1.0}
HERE = Path(__file__).resolve().parents[1]


def comparison_methods() -> dict[str, dict[str, Any]]:
    """Each method of the ``comparison`` scenario and the run-config keys it sets."""
    (axis,) = get_scenario("comparison").axes
    return {level.label: dict(level.values) for level in axis.levels}


def child_cpu() -> float:
    """CPU seconds (user + system) of every waited-for child process so far."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run_method(code: Path, scratch: Path, name: str, values: Mapping[str, Any], rounds: int,
               nodes: int = 100) -> dict[str, Any]:
    """One in-process run of ``code``'s checkout; its phase costs, or ``failed`` with the reason."""
    command = [sys.executable, "-m", "simulations.inprocess", "--nodes", str(nodes),
               "-c", f"results-dir={scratch}", "-c", f"run-name={name}",
               "-c", f"num-rounds={rounds}", "-c", "eval-every=1"]
    for key, value in values.items():
        command += ["-c", f"{key}={str(value).lower() if isinstance(value, bool) else value}"]
    env = {**bench_env(), "PYTHONPATH": str(code)}
    before = child_cpu()
    done = subprocess.run(command, cwd=code, env=env, stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE, text=True)
    process_cpu = child_cpu() - before
    reason = judge_inprocess(done.returncode, RunStore(scratch / name), rounds)
    if reason:
        log.error("%s: the run FAILED (%s); recorded, not costed\n%s", name, reason,
                  done.stderr[-2000:])
        return {"failed": True, "reason": reason}
    return {"failed": False, "reason": "", **phase_costs(RunStore(scratch / name), process_cpu)}


def phase_costs(store: RunStore, process_cpu: float) -> dict[str, float]:
    """Core-seconds of a finished run: per round, per evaluation, and once per run."""
    timeline = store.read("timeline")
    cpu = timeline.groupby(["round", "phase"])["cpu-seconds"].sum()
    rounds = sorted(r for r in timeline["round"].unique() if r > 0)
    last = rounds[-1]
    top = timeline[~timeline["phase"].str.contains(":")]
    per_round = lambda phases: sum(cpu.get((r, p), 0.0) for r in rounds for p in phases) / len(rounds)
    subset_evals = [cpu.get((r, "evaluation"), 0.0) for r in [0, *rounds[:-1]]]
    return {"training-cpu-per-round": per_round(("training:clients",)),
            "framework-cpu-per-round": per_round(FRAMEWORK_PHASES),
            "evaluation-cpu-per-eval": sum(subset_evals) / len(subset_evals),
            "final-evaluation-cpu": cpu.get((last, "evaluation"), 0.0),
            "start-cpu": process_cpu - float(top["cpu-seconds"].sum()) + cpu.get((0, "set-up"), 0.0),
            "process-cpu": process_cpu}


def projected_cell(costs: Mapping[str, float], rounds: int = ROUNDS,
                   eval_every: int = EVAL_EVERY) -> float:
    """Core-seconds of one cell of the sweep: ``rounds`` rounds, evaluated at rounds 0, k, 2k, ...
    before the last on the subset and at the last on the whole test set, plus one start."""
    evaluations = len(range(0, rounds, eval_every))
    return (costs["start-cpu"] + rounds * (costs["training-cpu-per-round"]
                                           + costs["framework-cpu-per-round"])
            + evaluations * costs["evaluation-cpu-per-eval"] + costs["final-evaluation-cpu"])


def bench(codes: Mapping[str, Path], rounds: int, methods: Mapping[str, Mapping[str, Any]]
          ) -> pd.DataFrame:
    """One row per code and method, runs interleaved method by method."""
    scratch = Path(tempfile.mkdtemp(prefix="fl-maestro-comparison-"))
    rows = []
    try:
        for method, values in methods.items():
            for label, code in codes.items():
                row = {"code": label, "method": method,
                       **run_method(code, scratch, f"{label}-{method}", values, rounds)}
                if not row["failed"]:
                    row["projected-cell-cpu"] = projected_cell(row)
                    log.info("%s %s: training %.2f, evaluation %.2f, framework %.3f core-s a "
                             "round; cell projected %.0f core-s", label, method,
                             row["training-cpu-per-round"], row["evaluation-cpu-per-eval"],
                             row["framework-cpu-per-round"], row["projected-cell-cpu"])
                rows.append(row)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return pd.DataFrame(rows)


def summary(frame: pd.DataFrame, rounds: int) -> str:
    """Markdown: the per-method table, the projection per code, and the targets' verdicts."""
    lines = []
    for _, row in frame[frame["failed"]].iterrows():
        lines.append(f"- {row['code']} {row['method']}: the run FAILED ({row['reason']}); not costed.")
    ok = frame[~frame["failed"]]
    columns = ["code", "method", "training-cpu-per-round", "framework-cpu-per-round",
               "evaluation-cpu-per-eval", "final-evaluation-cpu", "start-cpu", "projected-cell-cpu"]
    lines += ["", ok[columns].to_markdown(index=False, floatfmt=".3f"), ""]
    totals = {}
    for code, rows in ok.groupby("code", sort=False):
        complete = len(rows) == frame["method"].nunique()
        totals[code] = SEEDS * rows["projected-cell-cpu"].sum() if complete else None
        text = (f"{totals[code] / 3600:.2f} core-hours ({totals[code] / 60:.0f} core-minutes)"
                if complete else "not projected: a method's run failed")
        lines.append(f"- {code}: the comparison ({frame['method'].nunique()} methods x {SEEDS} seeds"
                     f" x {ROUNDS} rounds, evaluation every {EVAL_EVERY}) projects to {text}.")
    lines += verdicts(ok, totals)
    lines.append(f"\nMeasured on {rounds} rounds per run, seed 0, in-process, default setup.")
    return "\n".join(lines)


def verdicts(ok: pd.DataFrame, totals: Mapping[str, float | None]) -> list[str]:
    """The issue's targets: rank-wise round vs fedavg-full round, and this code vs the base."""
    lines = []
    codes = list(totals)
    for code in codes:
        rows = ok[ok["code"] == code].set_index("method")
        if {"rankwise", "fedavg-full"} <= set(rows.index):
            ratio = (rows.loc["rankwise", "training-cpu-per-round"]
                     / rows.loc["fedavg-full", "training-cpu-per-round"])
            met = "met" if ratio <= TARGETS["rankwise-vs-fedavg-full"] else "NOT met"
            lines.append(f"- {code}: a rank-wise round's training CPU is {ratio:.2f}x a fedavg-full "
                         f"round's (target <= {TARGETS['rankwise-vs-fedavg-full']}: {met}).")
    if len(codes) == 2 and all(totals[c] for c in codes):
        ratio = totals[codes[0]] / totals[codes[1]]
        met = "met" if ratio <= TARGETS["projection"] else "NOT met"
        lines.append(f"- projection, {codes[0]} / {codes[1]}: {ratio:.2f}x "
                     f"(target <= {TARGETS['projection']}: {met}).")
    return lines


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; save ``comparison.csv`` and ``comparison.md`` under --out."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="results/bench")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--base", type=Path, default=None,
                        help="another checkout to measure side by side (e.g. /work/wt/base)")
    parser.add_argument("--base-label", default="base")
    parser.add_argument("--methods", default="", help="comma-separated subset of the methods")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads per run (the comparison sweeps ran one per process)")
    args = parser.parse_args(argv)
    setup_logging()
    os.environ["BENCH_THREADS"] = str(args.threads)
    methods = comparison_methods()
    if args.methods:
        unknown = sorted(set(args.methods.split(",")) - set(methods))
        if unknown:
            parser.error(f"--methods names {unknown}: allowed {sorted(methods)}")
        methods = {m: methods[m] for m in args.methods.split(",")}
    codes = {"this": HERE, **({args.base_label: args.base.resolve()} if args.base else {})}
    frame = bench(codes, args.rounds, methods)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    frame.to_csv(out / "comparison.csv", index=False)
    text = summary(frame, args.rounds)
    (out / "comparison.md").write_text(f"# What the comparison costs\n\n{machine()}; every run with "
                                       f"{args.threads} torch thread(s)\n\n{text}\n")
    print(text)
    # The numbers are saved either way; the exit code judges this checkout only (a base
    # checkout fails on the methods it predates, and those are listed, not costed).
    return exit_code(frame)


def exit_code(frame: pd.DataFrame) -> int:
    """1 if a run of this checkout failed, else 0 (a base checkout's failures are listed)."""
    return 1 if frame.loc[frame["code"] == "this", "failed"].any() else 0


if __name__ == "__main__":
    sys.exit(main())
