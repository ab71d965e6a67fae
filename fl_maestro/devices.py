"""Device profiles: how fast each budget tier computes and communicates, and how often it fails.

Every budget tier has a profile: compute speed (training MACs per second), downlink and uplink
bandwidth (bytes per second), a dropout probability (the device never replies) and a crash
probability (its ClientApp raises). A client's simulated time for a round is

    bytes-down / downlink + train-macs / speed + bytes-up / uplink

Defaults (the run config's ``device-profiles`` overrides them per tier):
- speed is proportional to the budget: the 1.0 tier trains at 10 GMAC/s (about 20 GFLOP/s, the
  sustained on-device training throughput of a recent phone CPU), tier b at b x 10 GMAC/s, as a
  budget is the fraction of the full model a device can afford;
- every tier has the same mobile link, 20 Mbit/s down and 5 Mbit/s up (typical LTE medians):
  a device's link does not follow its compute class;
- no dropouts, no crashes.

Overrides come as a TOML file of tables keyed by budget (``["0.2"]``, or ``[default]`` for every
tier) or inline, ``"0.2:macs-per-second=1e9,dropout=0.1;default:uplink-bytes-per-second=1e6"``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

FULL_TIER_MACS_PER_SECOND = 10e9
DOWNLINK_BYTES_PER_SECOND = 20e6 / 8
UPLINK_BYTES_PER_SECOND = 5e6 / 8
DEFAULT_TIER = "default"


@dataclass(frozen=True)
class DeviceProfile:
    """How fast one tier computes and communicates, and how often it drops out or crashes."""

    macs_per_second: float
    downlink_bytes_per_second: float = DOWNLINK_BYTES_PER_SECOND
    uplink_bytes_per_second: float = UPLINK_BYTES_PER_SECOND
    dropout: float = 0.0
    crash: float = 0.0

    def __post_init__(self) -> None:
        for name in ("macs_per_second", "downlink_bytes_per_second", "uplink_bytes_per_second"):
            value = getattr(self, name)
            if not _real(value) or not 0 < value < math.inf:
                raise ValueError(f"device profile key {_key(name)!r} has bad value {value!r}: "
                                 "allowed a finite number > 0")
        for name in ("dropout", "crash"):
            value = getattr(self, name)
            if not _real(value) or not 0 <= value < 1:
                raise ValueError(f"device profile key {name!r} has bad value {value!r}: "
                                 "allowed a probability in [0, 1)")

    def seconds(self, macs: float, bytes_down: float, bytes_up: float) -> float:
        """Simulated seconds to download, train ``macs`` and upload."""
        return (bytes_down / self.downlink_bytes_per_second + macs / self.macs_per_second
                + bytes_up / self.uplink_bytes_per_second)

    def steps_within(self, step_macs: Sequence[float], bytes_down: float, bytes_up: float,
                     seconds: float) -> int:
        """How many of the leading ``step_macs`` fit in ``seconds`` with both transfers."""
        spare = seconds - bytes_down / self.downlink_bytes_per_second \
            - bytes_up / self.uplink_bytes_per_second
        if spare < 0:
            return 0
        done = np.cumsum(np.asarray(step_macs, float)) / self.macs_per_second
        # a hair of slack: a step that ends exactly on the deadline is in time
        return int(np.searchsorted(done, spare * (1 + 1e-12), side="right"))


def _real(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _key(field_name: str) -> str:
    return field_name.replace("_", "-")


PROFILE_KEYS = tuple(_key(f.name) for f in fields(DeviceProfile))


def default_profile(budget: float) -> DeviceProfile:
    """The documented default profile of tier ``budget``."""
    return DeviceProfile(macs_per_second=budget * FULL_TIER_MACS_PER_SECOND)


def make_profile(budget: float, values: Mapping[str, Any]) -> DeviceProfile:
    """Tier ``budget``'s default profile with ``values`` (profile keys) replaced."""
    unknown = sorted(set(values) - set(PROFILE_KEYS))
    if unknown:
        raise ValueError(f"device profile of tier {budget:g}: unknown key(s) {unknown}: allowed "
                         f"{list(PROFILE_KEYS)}")
    return replace(default_profile(budget), **{k.replace("-", "_"): v for k, v in values.items()})


Overrides = Mapping[str, Mapping[str, Any]]


def profiles_for(budgets: Iterable[float], overrides: Overrides | None = None
                 ) -> dict[float, DeviceProfile]:
    """A profile for every budget: defaults, then the ``default`` overrides, then the tier's own."""
    overrides = overrides or {}
    tiers = {tier_budget(name): values for name, values in overrides.items()
             if name != DEFAULT_TIER}
    common = overrides.get(DEFAULT_TIER, {})
    return {b: make_profile(b, {**common, **tiers.get(b, {})})
            for b in sorted({float(b) for b in budgets})}


def tier_budget(name: Any) -> float:
    """A tier name (``"0.2"``) as its budget; ValueError when it is not a number in (0, 1]."""
    try:
        budget = float(name)
    except (TypeError, ValueError):
        budget = math.nan
    if not 0 < budget <= 1:
        raise ValueError(f"tier {name!r} is not a budget: allowed a number in (0, 1]")
    return budget


def parse_profiles(text: str) -> dict[str, dict[str, Any]]:
    """Per-tier overrides from a run-config value: empty, a ``.toml`` file or the inline form."""
    text = text.strip()
    if not text:
        return {}
    if text.endswith(".toml"):
        import tomllib  # Python >= 3.11

        path = Path(text)
        if not path.is_file():
            raise ValueError(f"file {text!r} does not exist")
        try:
            table = tomllib.loads(path.read_text())
        except tomllib.TOMLDecodeError as err:
            raise ValueError(f"file {text!r} is not valid TOML: {err}") from None
        if not all(isinstance(v, dict) for v in table.values()):
            raise ValueError(f"file {text!r}: every entry must be a table named by a tier")
        return {str(name): dict(values) for name, values in table.items()}
    return _parse_inline(text)


def _parse_inline(text: str) -> dict[str, dict[str, Any]]:
    """``tier:key=value,...;tier:...`` as nested dicts of numbers."""
    overrides: dict[str, dict[str, Any]] = {}
    for part in filter(None, (p.strip() for p in text.split(";"))):
        tier, sep, items = part.partition(":")
        if not sep or not items.strip():
            raise ValueError(f"{part!r} is not 'tier:key=value,...'")
        values = overrides.setdefault(tier.strip(), {})
        for item in items.split(","):
            key, sep, raw = item.partition("=")
            try:
                if not sep:
                    raise ValueError
                values[key.strip()] = float(raw)
            except ValueError:
                raise ValueError(f"{item.strip()!r} is not 'key=number'") from None
    return overrides


def check_profiles(overrides: Overrides, tiers: Iterable[float]) -> dict[float, DeviceProfile]:
    """Every tier's profile; ValueError for a tier not in ``tiers`` or a bad key or value."""
    tiers = sorted(set(float(t) for t in tiers))
    for name in overrides:
        if name != DEFAULT_TIER and tier_budget(name) not in tiers:
            raise ValueError(f"tier {name!r} is not a tier of the device mix: allowed "
                             f"{[f'{t:g}' for t in tiers]} or {DEFAULT_TIER!r}")
    return profiles_for(tiers, overrides)


def profiles_frame(profiles: Mapping[float, DeviceProfile]) -> pd.DataFrame:
    """Profiles as a table in readable units: GMAC/s, Mbit/s and probabilities."""
    return pd.DataFrame([{"budget": b, "GMAC/s": p.macs_per_second / 1e9,
                          "downlink Mbit/s": p.downlink_bytes_per_second * 8 / 1e6,
                          "uplink Mbit/s": p.uplink_bytes_per_second * 8 / 1e6,
                          "dropout": p.dropout, "crash": p.crash}
                         for b, p in sorted(profiles.items())])
