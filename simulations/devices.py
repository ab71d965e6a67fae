"""Device time, simulated after the fact from a run's ``clients.csv``.

Every budget tier has a profile: compute speed (training MACs per second), downlink and uplink
bandwidth (bytes per second) and a dropout probability. A client's simulated time is

    train-macs / speed + bytes-down / downlink + bytes-up / uplink

and a synchronous round lasts as long as its slowest client. With a deadline, clients over it are
marked as stragglers and the round lasts the deadline. Dropped-out clients never reply: with a
deadline the server waits for them until the deadline (it cannot tell dead from slow), without one
the round ends with the last client that does reply.

This is a post-hoc model: the run already merged every reply, so a straggler or a dropped-out
client here is only *reported* (the time axis and who would have been dropped); its update is still
in the model. Modelling the accuracy cost of stragglers needs the deadline applied by the strategy
during the run.

Default assumptions (override per tier with a dict or a TOML file, see ``load_profiles``):
- speed is proportional to the budget: the 1.0 tier trains at 10 GMAC/s (about 20 GFLOP/s, the
  sustained on-device training throughput of a recent phone CPU), tier b at b x 10 GMAC/s, as a
  budget is the fraction of the full model a device can afford;
- every tier has the same mobile link, 20 Mbit/s down and 5 Mbit/s up (typical LTE medians):
  a device's link does not follow its compute class;
- no dropout.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

FULL_TIER_MACS_PER_SECOND = 10e9
DOWNLINK_BYTES_PER_SECOND = 20e6 / 8
UPLINK_BYTES_PER_SECOND = 5e6 / 8


@dataclass(frozen=True)
class DeviceProfile:
    """How fast one tier computes and communicates, and how often it drops out."""

    macs_per_second: float
    downlink_bytes_per_second: float = DOWNLINK_BYTES_PER_SECOND
    uplink_bytes_per_second: float = UPLINK_BYTES_PER_SECOND
    dropout: float = 0.0

    def __post_init__(self) -> None:
        for name in ("macs_per_second", "downlink_bytes_per_second", "uplink_bytes_per_second"):
            value = getattr(self, name)
            if not _real(value) or not 0 < value < math.inf:
                raise ValueError(f"device profile {_key(name)!r} has bad value {value!r}: "
                                 "allowed a finite number > 0")
        if not _real(self.dropout) or not 0 <= self.dropout < 1:
            raise ValueError(f"device profile 'dropout' has bad value {self.dropout!r}: "
                             "allowed a number in [0, 1)")


def _real(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _key(field_name: str) -> str:
    return field_name.replace("_", "-")


PROFILE_KEYS = tuple(_key(f.name) for f in fields(DeviceProfile))


def default_profile(budget: float) -> DeviceProfile:
    """The documented default profile of tier ``budget``."""
    return DeviceProfile(macs_per_second=budget * FULL_TIER_MACS_PER_SECOND)


def load_profiles(source: str | Path | Mapping[str, Any] | None) -> dict[str, dict[str, Any]]:
    """Per-tier overrides from a TOML file or a dict, checked: ``{"0.2": {"dropout": 0.1}, ...}``.

    Tables are keyed by budget; a ``default`` table applies to every tier (as is: a speed given
    there is every tier's speed). Keys left out keep the documented defaults.
    """
    if source is None:
        return {}
    if isinstance(source, (str, Path)):
        import tomllib  # Python >= 3.11

        source = tomllib.loads(Path(source).read_text())
    overrides = {str(name): dict(values) for name, values in source.items()}
    for name in overrides:
        if name != "default":
            profiles_for([_budget(name)], overrides)  # raises on a bad key or value
    profiles_for([1.0], overrides)
    return overrides


def _budget(name: str) -> float:
    try:
        budget = float(name)
    except ValueError:
        budget = math.nan
    if not 0 < budget <= 1:
        raise ValueError(f"device profiles: tier {name!r} is not a budget: allowed a number in "
                         "(0, 1] or 'default'")
    return budget


def make_profile(budget: float, values: Mapping[str, Any]) -> DeviceProfile:
    """Tier ``budget``'s default profile with ``values`` (profile keys) replaced."""
    unknown = sorted(set(values) - set(PROFILE_KEYS))
    if unknown:
        raise ValueError(f"device profile of tier {budget:g}: unknown key(s) {unknown}: allowed "
                         f"{list(PROFILE_KEYS)}")
    return replace(default_profile(budget), **{k.replace("-", "_"): v for k, v in values.items()})


def profiles_for(budgets: Iterable[float], overrides: Mapping[str, Mapping[str, Any]] | None = None
                 ) -> dict[float, DeviceProfile]:
    """A profile for every budget: defaults, then the ``default`` overrides, then the tier's own."""
    overrides = overrides or {}
    tiers = {_budget(name): values for name, values in overrides.items() if name != "default"}
    common = overrides.get("default", {})
    return {b: make_profile(b, {**common, **tiers.get(b, {})})
            for b in sorted({float(b) for b in budgets})}


def profiles_frame(profiles: Mapping[float, DeviceProfile]) -> pd.DataFrame:
    """Profiles as a table in readable units: GMAC/s, Mbit/s and dropout probability."""
    return pd.DataFrame([{"budget": b, "GMAC/s": p.macs_per_second / 1e9,
                          "downlink Mbit/s": p.downlink_bytes_per_second * 8 / 1e6,
                          "uplink Mbit/s": p.uplink_bytes_per_second * 8 / 1e6,
                          "dropout": p.dropout} for b, p in sorted(profiles.items())])


def client_times(clients: pd.DataFrame, profiles: Mapping[float, DeviceProfile]) -> pd.DataFrame:
    """The clients table with compute-, download-, upload- and sim-seconds columns added."""
    missing = sorted(set(clients["budget"].astype(float)) - set(profiles))
    if missing:
        raise ValueError(f"no device profile for budget(s) {missing}: known {sorted(profiles)}")
    tier = clients["budget"].astype(float)
    speed = tier.map(lambda b: profiles[b].macs_per_second)
    down = tier.map(lambda b: profiles[b].downlink_bytes_per_second)
    up = tier.map(lambda b: profiles[b].uplink_bytes_per_second)
    out = clients.copy()
    out["compute-seconds"] = clients["train-macs"] / speed
    out["download-seconds"] = clients["bytes-down"] / down
    out["upload-seconds"] = clients["bytes-up"] / up
    out["sim-seconds"] = out["compute-seconds"] + out["download-seconds"] + out["upload-seconds"]
    return out


def mark_dropouts(clients: pd.DataFrame, profiles: Mapping[float, DeviceProfile],
                  rng: np.random.Generator) -> pd.DataFrame:
    """Adds a ``dropped-out`` column: each row drops with its tier's probability (one draw each)."""
    chance = clients["budget"].astype(float).map(lambda b: profiles[b].dropout).to_numpy()
    return clients.assign(**{"dropped-out": rng.random(len(clients)) < chance})


def mark_stragglers(clients: pd.DataFrame, deadline: float | None) -> pd.DataFrame:
    """Adds a ``straggler`` column: a replying client whose sim-seconds exceed the deadline."""
    if deadline is not None and (not _real(deadline) or not deadline > 0):
        raise ValueError(f"deadline has bad value {deadline!r}: allowed a number of seconds > 0")
    over = clients["sim-seconds"] > (deadline if deadline is not None else math.inf)
    dropped = clients["dropped-out"] if "dropped-out" in clients else False
    return clients.assign(straggler=over & ~dropped)


def round_times(clients: pd.DataFrame, deadline: float | None = None) -> pd.DataFrame:
    """Per round: clients, dropped-out, stragglers, sim-seconds and cumulative-sim-seconds."""
    rows = []
    for rnd, group in clients.groupby("round", sort=True):
        dropped = group["dropped-out"] if "dropped-out" in group else pd.Series(False, group.index)
        replied = group.loc[~dropped, "sim-seconds"]
        slowest = replied.max() if len(replied) else 0.0
        waits = deadline is not None and (slowest > deadline or dropped.any())
        rows.append({"round": int(rnd), "clients": len(group), "dropped-out": int(dropped.sum()),
                     "stragglers": int((replied > deadline).sum()) if deadline else 0,
                     "sim-seconds": float(deadline if waits else slowest)})
    frame = pd.DataFrame(rows, columns=["round", "clients", "dropped-out", "stragglers",
                                        "sim-seconds"])
    frame["cumulative-sim-seconds"] = frame["sim-seconds"].cumsum()
    return frame


def simulate(clients: pd.DataFrame, overrides: Mapping[str, Mapping[str, Any]] | None = None,
             deadline: float | None = None, rng: np.random.Generator | None = None
             ) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Clients table with times and flags, and the per-round table, for one run's clients.csv.

    ``overrides`` are per-tier profile values (``load_profiles``); ``rng`` draws dropouts (required
    when any tier has a dropout probability).
    """
    profiles = profiles_for(clients["budget"], overrides)
    timed = client_times(clients, profiles)
    if any(p.dropout > 0 for p in profiles.values()):
        if rng is None:
            raise ValueError("a tier has dropout > 0: pass a seeded numpy Generator as rng")
        timed = mark_dropouts(timed, profiles, rng)
    timed = mark_stragglers(timed, deadline)
    return timed, round_times(timed, deadline)


def time_at_rounds(rounds: pd.DataFrame, at: Iterable[int]) -> np.ndarray:
    """Cumulative simulated seconds after each round in ``at`` (0 for round 0 and earlier)."""
    cumulative = rounds.set_index("round")["cumulative-sim-seconds"]
    cumulative = pd.concat([pd.Series({0: 0.0}), cumulative[cumulative.index > 0]]).sort_index()
    # rounds with no client rows (all failed) add no time: carry the previous total forward
    positions = cumulative.index.searchsorted(np.asarray(list(at)), side="right") - 1
    return cumulative.to_numpy()[np.clip(positions, 0, None)]
