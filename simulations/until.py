"""Sweeps that run each cell until it converged: ``Until`` says how far to run a cell next.

A cell runs to its own num-rounds first; then, while its accuracy has not converged
(``simulations.stats.convergence``) and it is under the cap, it is resumed with ``chunk`` more
rounds. num-rounds is a key a resumed run may change, so the finished rounds stay valid.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

from fl_maestro.results import RunStore
from simulations.cells import Cell
from simulations.stats import SLOPE_THRESHOLD, Convergence, accuracy_curve, convergence


@dataclass(frozen=True)
class Until:
    """Run each cell on past its rounds, ``chunk`` more at a time (resuming it), until its
    accuracy has converged (``stats.convergence``) or it reached ``cap`` rounds."""

    cap: int
    chunk: int
    threshold: float = SLOPE_THRESHOLD

    def __post_init__(self) -> None:
        for name in ("cap", "chunk"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"until-converged {name}={value!r}: allowed an integer >= 1")

    def verdict(self, run_dir: Path) -> Convergence:
        """The convergence verdict of the run in ``run_dir`` as it stands."""
        curve = accuracy_curve(RunStore(run_dir).read("evaluation"))
        return convergence(curve.index, curve.to_numpy(), threshold=self.threshold)

    def target(self, cell: Cell, rounds: int | None, run_dir: Path) -> int | None:
        """The num-rounds to run ``cell`` to next, None once it is finished."""
        if rounds is None or rounds < cell.num_rounds:
            return cell.num_rounds
        if rounds >= self.cap or self.verdict(run_dir).converged:
            return None
        return min(rounds + self.chunk, self.cap)


def with_rounds(cell: Cell, num_rounds: int) -> Cell:
    """The cell run to ``num_rounds`` rounds."""
    return replace(cell, num_rounds=num_rounds,
                   run_config={**cell.run_config, "num-rounds": num_rounds})
