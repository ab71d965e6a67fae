"""Benchmark: does a rank-r training step cost about r/R of the full-rank step?

    python -m simulations.bench_layers [--out results/bench] [--repeats 40]

Times one training step (forward, backward, SGD with momentum 0.9) of a
``LowRankLinear(1024, 1024)`` at batch 256 and of the CNN at the Fashion-MNIST shape at batch 128,
at rank fractions 1, 1/2, 1/4 and 1/8, each as a ratio to the full-rank step. The step is the one
``fl_maestro.training.train`` takes: the model viewed at the step's ranks (``corner_view``) and
``CornerSGD``. Beside it, ``torch-sgd`` is the textbook step (slice the factors in the forward,
``torch.optim.SGD`` over whole parameters) and ``floor`` the product's step on a copy truncated to
those ranks (nothing sliced at all). Steps at the different fractions are interleaved and the median
kept, so load on the machine hits all alike. When CUDA is available the same runs on the GPU too.
Target: the 1024-wide layer at r = R/4 costs at most 0.30x its full-rank step (reported, not
enforced).
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
from fl_maestro.runtime import keep_freed_memory
from fl_maestro.training import make_step

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


def _step_fn(model: RankedModel, ranks: dict[str, int], x: torch.Tensor, target: torch.Tensor,
             optimizer: str = "corner") -> Callable[[], None]:
    """One training step at ``ranks``, exactly as ``fl_maestro.training.train`` takes it."""
    step = make_step(model, optimizer, lr=1e-4, momentum=0.9, weight_decay=0.0, max_ranks=ranks)
    loss_fn = F.mse_loss if target.is_floating_point() else F.cross_entropy

    def loss():
        model.set_ranks(ranks)
        return loss_fn(model(x), target), None
    return lambda: step(ranks, loss)


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
    """Median step seconds at every fraction (ours, textbook, truncated floor), interleaved."""
    device = x.device
    steps = {}
    for fraction in FRACTIONS:
        ranks = model.ranks_at_fraction(fraction)
        floor, textbook = copy.deepcopy(model), copy.deepcopy(model)
        floor.truncate(ranks)
        steps[fraction] = (ranks, {"step": _step_fn(model, ranks, x, target),
                                   "torch-sgd": _step_fn(textbook, ranks, x, target, "sgd"),
                                   "floor": _step_fn(floor, ranks, x, target)})
    time_once = _timer(device)
    for _, fns in steps.values():
        for fn in fns.values():
            for _ in range(warmup):
                fn()
    times = {(f, kind): [] for f in FRACTIONS for kind in ("step", "torch-sgd", "floor")}
    for _ in range(repeats):
        for fraction, (_, fns) in steps.items():
            for kind, fn in fns.items():
                times[fraction, kind].append(time_once(fn))
    full = {kind: statistics.median(times[1.0, kind]) for kind in ("step", "torch-sgd")}
    rows = []
    for fraction, (ranks, _) in steps.items():
        ms = {kind: statistics.median(times[fraction, kind]) for kind in ("step", "torch-sgd", "floor")}
        rows.append({"device": device.type, "threads": torch.get_num_threads() if device.type == "cpu"
                     else None, "model": name, "fraction": fraction,
                     "ranks": " ".join(f"{n}={r}" for n, r in ranks.items()),
                     "macs-ratio": model.cost(ranks) / model.cost(),
                     "step-ms": 1e3 * ms["step"], "ratio": ms["step"] / full["step"],
                     "torch-sgd-ms": 1e3 * ms["torch-sgd"],
                     "torch-sgd-ratio": ms["torch-sgd"] / full["torch-sgd"],
                     "floor-ms": 1e3 * ms["floor"], "floor-ratio": ms["floor"] / full["step"]})
        log.info("%s %s fraction %.3f: %.2f ms (%.3fx full), torch-sgd %.2f ms, floor %.2f ms",
                 device.type, name, fraction, 1e3 * ms["step"], ms["step"] / full["step"],
                 1e3 * ms["torch-sgd"], 1e3 * ms["floor"])
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
    text = (f"CPU {_cpu_model()} ({os.cpu_count()} cores), torch {torch.__version__}, "
            f"python {platform.python_version()}")
    if torch.cuda.is_available():
        text += f", GPU {torch.cuda.get_device_name()}"
    return text + f"; load average {os.getloadavg()[0]:.2f} at the end (other work skews CPU times)"


def verdicts(frame: pd.DataFrame) -> list[str]:
    """One line per device and thread count on the target: linear-1024 at R/4 <= 0.30x."""
    lines = []
    target = frame[(frame.model == "linear-1024") & (frame.fraction == TARGET_FRACTION)]
    for _, row in target.iterrows():
        where = row.device if row.device != "cpu" else f"cpu, {int(row.threads)} thread(s)"
        met = "met" if row.ratio <= TARGET_RATIO else "NOT met"
        lines.append(f"{where}: linear-1024 at r = R/4 costs {row.ratio:.3f}x the full-rank step "
                     f"(target <= {TARGET_RATIO:.2f}x): {met}; the textbook step "
                     f"{row['torch-sgd-ratio']:.3f}x, a layer built at R/4 {row['floor-ratio']:.3f}x")
    return lines


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and save ``layers.csv`` and ``layers.md`` under --out."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="results/bench")
    parser.add_argument("--repeats", type=int, default=40)
    parser.add_argument("--threads", default=f"1,{len(os.sched_getaffinity(0))}",
                        help="comma-separated torch CPU thread counts to run at (default: 1, a "
                             "simulated client's share with client-resources-num-cpus=1, and all "
                             "the cores this process may use)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    keep_freed_memory()  # as every ServerApp and ClientApp process does
    rows = []
    for threads in sorted({int(t) for t in args.threads.split(",")}):
        torch.set_num_threads(threads)
        rows += bench_device(torch.device("cpu"), args.repeats)
    if torch.cuda.is_available():
        rows += bench_device(torch.device("cuda"), args.repeats)
    frame = pd.DataFrame(rows)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    frame.to_csv(out / "layers.csv", index=False)
    table = frame.to_markdown(index=False, floatfmt=".3f")
    summary = "\n".join(f"- {line}" for line in verdicts(frame))
    (out / "layers.md").write_text(
        f"# Low-rank layer step time vs rank\n\n{machine()}\n\n"
        "Median of interleaved repeats. `step`: the training loop's step (the model viewed at the\n"
        "step's ranks, `CornerSGD`); `ratio` = step time / full-rank step time. `torch-sgd`: the\n"
        "textbook step (sliced forward, `torch.optim.SGD` over whole parameters), its ratio to its\n"
        "own full-rank step. `floor`: our step on a copy truncated to those ranks (no slicing).\n\n"
        f"{table}\n\n{summary}\n")
    print(f"{machine()}\n\n{table}\n\n{summary}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
