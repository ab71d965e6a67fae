"""What the components past a prefix add: a run's final model with its tails reset or removed.

    python -m simulations.tails results/default-20260101-120000 --fraction 0.2

The tail of a layer is every component past the prefix a budget (or rank fraction) keeps. The
final global model is evaluated at full rank as trained, with every layer's tail (or one layer's)
reset to its initial value (``initial.safetensors``), and with it zeroed (which is the prefix
model itself). If resetting the tails to their random initial values changes nothing, training has
not yet taught them anything: the full model can only match its prefix, and the noise its random
tails add can put it below.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from fl_maestro.config import parse_run_config
from fl_maestro.data import DATASET_SHAPES, NUM_CLASSES, load_dataset, make_loader
from fl_maestro.models import model_from_arrays
from fl_maestro.results import RunStore
from fl_maestro.training import evaluate

log = logging.getLogger(__name__)
Arrays = Mapping[str, np.ndarray]


def with_tails(arrays: Arrays, initial: Arrays | None, prefix: Mapping[str, int],
               layers: Sequence[str], how: str) -> dict[str, np.ndarray]:
    """``arrays`` with the components past ``prefix[layer]`` of ``layers`` reset ("init") to
    ``initial`` or zeroed ("zero": their ``U`` columns, so they add nothing)."""
    if how not in ("init", "zero"):
        raise ValueError(f"how={how!r} is not allowed: use 'init' or 'zero'")
    if how == "init" and initial is None:
        raise ValueError("resetting tails to init needs the run's initial.safetensors")
    out = {k: np.array(v, copy=True) for k, v in arrays.items()}
    for layer in layers:
        r = prefix[layer]
        if how == "zero":
            out[f"{layer}.U"][:, r:] = 0
            continue
        out[f"{layer}.U"][:, r:] = initial[f"{layer}.U"][:, r:out[f"{layer}.U"].shape[1]]
        out[f"{layer}.V"][r:] = initial[f"{layer}.V"][r:out[f"{layer}.V"].shape[0]]
    return out


def tail_ablation(run_dir: str | Path, fraction: float, samples: int = 0) -> pd.DataFrame:
    """Accuracy of the run's final model at full rank: as trained, each layer's tail past
    ``fraction`` reset to init, all tails reset, all tails zeroed; and the prefix itself."""
    store = RunStore(run_dir)
    cfg = parse_run_config(store.read_config())
    rnd, arrays, _ = store.load_checkpoint()
    initial = store.load_initial()
    shape, classes = DATASET_SHAPES[cfg.dataset], NUM_CLASSES[cfg.dataset]
    _, _, test_x, test_y = load_dataset(cfg.dataset)
    chosen = np.random.default_rng(cfg.seed).permutation(len(test_y))
    loader = make_loader(test_x, test_y, np.sort(chosen[:samples or len(test_y)]), batch_size=200)
    model = model_from_arrays(cfg.model, shape, classes, arrays)
    prefix, layers = model.ranks_at_fraction(fraction), list(model.max_ranks())

    def accuracy(values: Arrays, ranks: Mapping[str, int] | None = None) -> float:
        return evaluate(model_from_arrays(cfg.model, shape, classes, values), loader,
                        ranks)["accuracy"]

    rows = [("full rank, as trained", "-", accuracy(arrays)),
            (f"prefix at fraction {fraction:g}", "all", accuracy(arrays, prefix))]
    if initial is not None:
        rows += [("full rank, tail reset to init", layer,
                  accuracy(with_tails(arrays, initial, prefix, [layer], "init")))
                 for layer in layers]
        rows.append(("full rank, tail reset to init", "all",
                     accuracy(with_tails(arrays, initial, prefix, layers, "init"))))
    rows.append(("full rank, tail zeroed", "all",
                 accuracy(with_tails(arrays, initial, prefix, layers, "zero"))))
    return pd.DataFrame(rows, columns=["model", "tail of", "accuracy"]).assign(
        round=rnd, **{"test examples": loader.num_examples})


def main(argv: list[str] | None = None) -> int:
    """Command line: the tail ablation of one run, printed as a table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", help="a run folder (with a checkpoint)")
    parser.add_argument("--fraction", type=float, default=0.2,
                        help="the prefix kept, as a rank fraction (default 0.2)")
    parser.add_argument("--samples", type=int, default=0, help="test examples (0: all)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    try:
        table = tail_ablation(args.run, args.fraction, args.samples)
    except (ValueError, FileNotFoundError) as exc:
        parser.error(str(exc))
    print(table.to_string(index=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
