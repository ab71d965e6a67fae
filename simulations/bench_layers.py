"""Benchmark: does a rank-r training step cost about r/R of the full-rank step?

    python -m simulations.bench_layers [--out results/bench] [--repeats 40]

Times one training step (forward, backward, SGD with momentum 0.9) of a
``LowRankLinear(1024, 1024)`` at batch 256 and of the CNN at the Fashion-MNIST shape at batch 128,
at rank fractions 1, 1/2, 1/4 and 1/8, each as a ratio to the full-rank step. ``floor`` is the same
step on a copy truncated to those ranks (no slicing at all): the cost any slicing implementation can
at best reach. Steps at the different fractions are interleaved and the median kept, so load on the
machine hits all alike. When CUDA is available the same runs on the GPU too. Target: the 1024-wide
layer at r = R/4 costs at most 0.30x its full-rank step (reported, not enforced).
"""

from __future__ import annotations

import argparse
import copy
import logging
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pandas as pd
import torch
import torch.nn.functional as F

from fl_maestro.layers import LowRankLinear
from fl_maestro.models import CNN, RankedModel

log = logging.getLogger("fl_maestro.bench")

FRACTIONS = (1.0, 0.5, 0.25, 0.125)
TARGET_FRACTION, TARGET_RATIO = 0.25, 0.30


class SingleLayer(RankedModel):
    """One ``LowRankLinear`` as a RankedModel, so the layer and the CNN share one code path."""

    def __init__(self, width: int = 1024) -> None:
        super().__init__()
        self.input_shape = (width,)
        self.layer = LowRankLinear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)


def _step_fn(model: RankedModel, ranks: dict[str, int], x: torch.Tensor,
             target: torch.Tensor) -> Callable[[], None]:
    """One training step at ``ranks``, as the local training loop takes it."""
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9)
    loss_fn = F.mse_loss if target.is_floating_point() else F.cross_entropy

    def step() -> None:
        model.set_ranks(ranks)
        loss = loss_fn(model(x), target)
        optimizer.zero_grad(set_to_none=True)  # a fresh gradient beats zero-filling the old one
        loss.backward()
        optimizer.step()
    return step


def _timer(device: torch.device) -> Callable[[Callable[[], None]], float]:
    def time_once(fn: Callable[[], None]) -> float:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter() - start
    return time_once


def bench_model(name: str, model: RankedModel, x: torch.Tensor, target: torch.Tensor,
                repeats: int, warmup: int = 5) -> list[dict]:
    """Median step seconds at every fraction (sliced and truncated floor), interleaved."""
    device = x.device
    steps = {}
    for fraction in FRACTIONS:
        ranks = model.ranks_at_fraction(fraction)
        floor = copy.deepcopy(model)
        floor.truncate(ranks)
        steps[fraction] = (ranks, _step_fn(model, ranks, x, target),
                           _step_fn(floor, ranks, x, target))
    time_once = _timer(device)
    for _, sliced, floor in steps.values():
        for _ in range(warmup):
            sliced()
            floor()
    times = {(f, kind): [] for f in FRACTIONS for kind in ("sliced", "floor")}
    for _ in range(repeats):
        for fraction, (_, sliced, floor) in steps.items():
            times[fraction, "sliced"].append(time_once(sliced))
            times[fraction, "floor"].append(time_once(floor))
    full = statistics.median(times[1.0, "sliced"])
    rows = []
    for fraction, (ranks, _, _) in steps.items():
        sliced = statistics.median(times[fraction, "sliced"])
        floor = statistics.median(times[fraction, "floor"])
        rows.append({"device": device.type, "model": name, "fraction": fraction,
                     "ranks": " ".join(f"{n}={r}" for n, r in ranks.items()),
                     "macs-ratio": model.cost(ranks) / model.cost(),
                     "step-ms": 1e3 * sliced, "ratio": sliced / full,
                     "floor-ms": 1e3 * floor, "floor-ratio": floor / full})
        log.info("%s %s fraction %.3f: %.2f ms (%.3fx full), floor %.2f ms", device.type, name,
                 fraction, 1e3 * sliced, sliced / full, 1e3 * floor)
    return rows


def bench_device(device: torch.device, repeats: int) -> list[dict]:
    """Both workloads on one device, from a fixed seed."""
    torch.manual_seed(0)
    g = torch.Generator(device=device).manual_seed(0)
    layer = SingleLayer(1024).to(device)
    x = torch.randn(256, 1024, generator=g, device=device)
    rows = bench_model("linear-1024", layer, x, torch.randn(256, 1024, generator=g, device=device),
                       repeats)
    cnn = CNN((1, 28, 28), 10).to(device)
    images = torch.randn(128, 1, 28, 28, generator=g, device=device)
    labels = torch.randint(0, 10, (128,), generator=g, device=device)
    rows += bench_model("cnn-fmnist", cnn, images, labels, max(repeats // 2, 5))
    return rows


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> str:
    """One line naming the machine and library versions behind the numbers."""
    text = (f"CPU {_cpu_model()} ({os.cpu_count()} cores), {torch.get_num_threads()} torch "
            f"threads, torch {torch.__version__}, python {platform.python_version()}")
    if torch.cuda.is_available():
        text += f", GPU {torch.cuda.get_device_name()}"
    return text + f"; load average {os.getloadavg()[0]:.2f} at the end (other work skews CPU times)"


def verdicts(frame: pd.DataFrame) -> list[str]:
    """One line per device on the target: linear-1024 at R/4 <= 0.30x the full-rank step."""
    lines = []
    for device, rows in frame[(frame.model == "linear-1024")
                              & (frame.fraction == TARGET_FRACTION)].groupby("device"):
        ratio = float(rows["ratio"].iloc[0])
        met = "met" if ratio <= TARGET_RATIO else "NOT met"
        lines.append(f"{device}: linear-1024 at r = R/4 costs {ratio:.3f}x the full-rank step "
                     f"(target <= {TARGET_RATIO:.2f}x): {met}")
    return lines


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and save ``layers.csv`` and ``layers.md`` under --out."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="results/bench")
    parser.add_argument("--repeats", type=int, default=40)
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)),
                        help="torch CPU threads (default: the cores this process may use)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    torch.set_num_threads(args.threads)
    devices = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    rows = [row for device in devices for row in bench_device(device, args.repeats)]
    frame = pd.DataFrame(rows)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    frame.to_csv(out / "layers.csv", index=False)
    table = frame.to_markdown(index=False, floatfmt=".3f")
    summary = "\n".join(f"- {line}" for line in verdicts(frame))
    (out / "layers.md").write_text(
        f"# Low-rank layer step time vs rank\n\n{machine()}\n\n"
        "Median of interleaved repeats; `ratio` = step time / full-rank step time; `floor` = the\n"
        "same step on a copy truncated to those ranks (no slicing).\n\n"
        f"{table}\n\n{summary}\n")
    print(f"{machine()}\n\n{table}\n\n{summary}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
