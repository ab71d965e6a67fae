"""TensorBoard scalars of a run (``tensorboard=true``), one step per round, beside its tables.

Every numeric column of the round's ``rounds.csv`` row goes under ``round/<column>`` (training
loss, bytes down and up, dropped clients by reason, simulated time where the run records it), and
every evaluation row under ``<kind>-<level>/<metric>`` (``tier-0.2/accuracy``,
``fraction-1/loss``, ...). Written to ``results/<run>/tensorboard/``; a resumed run purges the
steps after its checkpoint, as it does in the tables. Needs the ``tensorboard`` extra.
"""

from __future__ import annotations

import numbers
from collections.abc import Iterable, Mapping
from pathlib import Path


class Scalars:
    """A TensorBoard event writer for one run's folder."""

    def __init__(self, folder: str | Path, start_round: int) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:  # torch raises this when the tensorboard package is missing
            raise ValueError("run-config key 'tensorboard' = true needs the tensorboard package: "
                             "pip install 'fl-maestro[tensorboard]'") from None
        self.folder = Path(folder)
        # purge_step: TensorBoard drops the previous run's events from this round on (a resume).
        self.writer = SummaryWriter(str(self.folder), purge_step=start_round)

    def add(self, server_round: int, row: Mapping | None, evaluation: Iterable[Mapping]) -> None:
        """Write one round's ``rounds.csv`` row and evaluation rows as scalars at step ``round``."""
        for key, value in (row or {}).items():
            if key != "round" and _is_number(value):
                self.writer.add_scalar(f"round/{key}", float(value), server_round)
        for r in evaluation:
            if _is_number(r["value"]):
                self.writer.add_scalar(f"{r['kind']}-{r['level']:g}/{r['metric']}",
                                       float(r["value"]), server_round)
        self.writer.flush()

    def close(self) -> None:
        """Flush and close the event file."""
        self.writer.close()


def _is_number(value: object) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)
