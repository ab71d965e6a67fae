"""When each device is online, in simulated seconds: availability traces and diurnal patterns.

A round samples only the clients online at its simulated start. The run config's ``availability``:

- ``""``: every client is always online;
- ``"diurnal:<period>:<tier>@<from>-<until>,..."``: each named tier is online during
  ``[from, until)`` of every period (``from > until`` wraps around the period's end); tiers not
  named are always online, e.g. ``"diurnal:86400:0.2@28800-79200"`` (tier 0.2 online 8:00-22:00);
- the path of a CSV file with columns ``client``, ``tier``, ``from``, ``until``: each row is a
  window ``[from, until)`` in which one client (its partition id, ``tier`` left empty) or every
  client of a tier (``client`` left empty) is online. A client with rows of its own follows them,
  else its tier's rows; a client with neither is always online.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from fl_maestro.devices import tier_budget

TRACE_COLUMNS = ("client", "tier", "from", "until")


@dataclass(frozen=True)
class Window:
    """Online during ``[start, end)``; with a finite ``period``, during that phase of every period."""

    start: float
    end: float
    period: float = math.inf

    def covers(self, t: float) -> bool:
        """Whether the window holds simulated time ``t``."""
        if math.isinf(self.period):
            return self.start <= t < self.end
        phase = t % self.period
        if self.start <= self.end:
            return self.start <= phase < self.end
        return phase >= self.start or phase < self.end  # wraps past the period's end

    def next_start(self, t: float) -> float:
        """The earliest time >= ``t`` the window holds (inf if never)."""
        if self.covers(t):
            return t
        if math.isinf(self.period):
            return self.start if self.start > t else math.inf
        at = t - t % self.period + self.start
        return at if at >= t else at + self.period


@dataclass(frozen=True)
class Availability:
    """Online windows of single clients (by partition id) and of whole tiers (by budget)."""

    clients: Mapping[int, tuple[Window, ...]] = field(default_factory=dict)
    tiers: Mapping[float, tuple[Window, ...]] = field(default_factory=dict)

    def _windows(self, partition: int, tier: float) -> tuple[Window, ...] | None:
        return self.clients.get(partition, self.tiers.get(tier))

    def is_online(self, partition: int, tier: float, t: float) -> bool:
        """Whether the client of ``partition`` (a device of ``tier``) is online at ``t``."""
        windows = self._windows(partition, tier)
        return windows is None or any(w.covers(t) for w in windows)

    def next_online(self, members: Iterable[tuple[int, float]], t: float) -> float:
        """The earliest time >= ``t`` at which one of ``(partition, tier)`` is online (inf: never)."""
        best = math.inf
        for partition, tier in members:
            windows = self._windows(partition, tier)
            if windows is None:
                return t
            best = min([best, *(w.next_start(t) for w in windows)])
        return best

    def check_clients(self, num_partitions: int) -> None:
        """ValueError if the trace names a client (partition id) the federation does not have."""
        unknown = sorted(c for c in self.clients if not 0 <= c < num_partitions)
        if unknown:
            raise ValueError(f"run-config key 'availability' names client(s) {unknown[:5]} but "
                             f"the federation has partitions 0..{num_partitions - 1}: allowed "
                             "partition ids in that range")


def parse_availability(text: str, tiers: Iterable[float]) -> Availability:
    """The availability a run-config value describes; ValueError naming what is wrong."""
    text = text.strip()
    tiers = sorted(float(t) for t in tiers)
    if not text:
        return Availability()
    if text.startswith("diurnal:"):
        found = _parse_diurnal(text)
    else:
        found = _read_trace(Path(text))
    unknown = sorted(set(found.tiers) - set(tiers))
    if unknown:
        raise ValueError(f"tier(s) {[f'{t:g}' for t in unknown]} are not tiers of the device "
                         f"mix: allowed {[f'{t:g}' for t in tiers]}")
    return found


def _parse_diurnal(text: str) -> Availability:
    parts = text.split(":", 2)
    if len(parts) != 3:
        raise ValueError("expected 'diurnal:<period>:<tier>@<from>-<until>,...'")
    period = _seconds(parts[1], "period")
    if not period > 0:
        raise ValueError(f"period {parts[1]!r} must be > 0 seconds")
    windows: dict[float, list[Window]] = {}
    for item in filter(None, (i.strip() for i in parts[2].split(","))):
        tier, sep, span = item.partition("@")
        start, dash, end = span.partition("-")
        if not sep or not dash:
            raise ValueError(f"{item!r} is not '<tier>@<from>-<until>'")
        start, end = _seconds(start, "from"), _seconds(end, "until")
        if not 0 <= start <= period or not 0 <= end <= period or start == end:
            raise ValueError(f"{item!r}: from and until must differ and lie in [0, {period:g}]")
        windows.setdefault(tier_budget(tier.strip()), []).append(Window(start, end, period))
    if not windows:
        raise ValueError("a diurnal pattern names no tier")
    return Availability(tiers={t: tuple(w) for t, w in windows.items()})


def _seconds(text: str, what: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"{what} {text!r} is not a number of seconds") from None
    if not math.isfinite(value):
        raise ValueError(f"{what} {text!r} is not a finite number of seconds")
    return value


def _read_trace(path: Path) -> Availability:
    if not path.is_file():
        raise ValueError(f"file {str(path)!r} does not exist (expected '', 'diurnal:...' or a CSV "
                         f"file with columns {list(TRACE_COLUMNS)})")
    frame = pd.read_csv(path, dtype=str, keep_default_na=False)
    if list(frame.columns) != list(TRACE_COLUMNS):
        raise ValueError(f"{str(path)!r} has columns {list(frame.columns)}: expected "
                         f"{list(TRACE_COLUMNS)}")
    clients: dict[int, list[Window]] = {}
    tiers: dict[float, list[Window]] = {}
    for line, row in enumerate(frame.itertuples(index=False), start=2):
        client, tier, start, end = (str(v).strip() for v in row)
        where = f"{str(path)!r} line {line}"
        if bool(client) == bool(tier):
            raise ValueError(f"{where}: give exactly one of client and tier")
        start, end = _seconds(start, f"{where}: from"), _seconds(end, f"{where}: until")
        if not 0 <= start < end:
            raise ValueError(f"{where}: need 0 <= from < until, got {start:g} and {end:g}")
        if client:
            if not client.isdigit():
                raise ValueError(f"{where}: client {client!r} is not a partition id (an integer "
                                 ">= 0)")
            clients.setdefault(int(client), []).append(Window(start, end))
        else:
            tiers.setdefault(tier_budget(tier), []).append(Window(start, end))
    return Availability({c: tuple(w) for c, w in clients.items()},
                        {t: tuple(w) for t, w in tiers.items()})
