"""The simulated device world during a run: who is sampled, who fails, whose update counts, and
how long each round lasts on the simulated clock.

Each round (``fl_maestro.federation``):

1. ``round_start``: the round starts at the simulated clock, or later when no client is online
   then (the clock jumps to the next moment one is); only the clients online at that start may be
   sampled, ``sample_size(k)`` of them (``k`` plus the over-selection margin).
2. ``decide``: every sampled client's work is known before it trains (the training MACs of each
   local step, ``training.planned_step_macs``, and the bytes each way), so its simulated time is
   too. With the run's seeded generator a client of a tier with dropout probability d drops out
   (never replies) with probability d, and one with crash probability c is told to raise in its
   ClientApp. Under a ``round-deadline`` a client over it is a straggler: policy ``drop``
   discards it, ``partial`` has it train only the steps that fit (a straggler none of whose steps
   fit is still dropped); ``wait`` has no deadline. With over-selection only the first ``k``
   clients to finish are kept. A client whose fate is known never trains on the host unless its
   update can count: a straggler or a dropout costs no host compute.
3. ``round_seconds``: once the replies are in, the round's simulated duration. A round lasts until
   its last merged reply arrives; when a reply it waits for is missing (dropout, crash, a
   discarded straggler), until the deadline; with no deadline (``wait``), as long as its slowest
   sampled client would take (the server cannot tell dead from slow). With over-selection a round
   that got its ``k`` replies ends with the ``k``-th.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace

import numpy as np

from fl_maestro import streams
from fl_maestro.availability import Availability, parse_availability
from fl_maestro.devices import DEFAULT_TIER, DeviceProfile, check_profiles, parse_profiles, \
    profiles_for

POLICIES = ("wait", "drop", "partial")
# Every sampled client's outcome, a row of clients.csv each: merged (ok, partial), decided before
# training (straggler, dropout), or seen in its reply (error, invalid, timeout, diverged: the
# strategy's failed replies, strategies.plan.FAILED).
MERGED = ("ok", "partial")
BEFORE_TRAINING = ("straggler", "dropout")
OUTCOMES = MERGED + BEFORE_TRAINING + ("error", "invalid", "timeout", "diverged")
DROPPED = tuple(o for o in OUTCOMES if o not in MERGED)  # counted as dropped-<outcome>


def round_rng(seed: int, server_round: int) -> np.random.Generator:
    """The run's seeded generator of a round's dropouts and crashes (the same on every resume)."""
    return streams.rng(seed, "world", server_round)


@dataclass(frozen=True)
class Work:
    """What one sampled client must do this round, known before it trains."""

    node: int
    partition: int
    budget: float
    step_macs: tuple[float, ...]  # training MACs of each planned local step
    bytes_down: int
    bytes_up: int


@dataclass(frozen=True)
class Fate:
    """What the device world decided for one sampled client before it trains."""

    work: Work
    outcome: str  # ok | partial (sent to train) | straggler | dropout (not sent)
    steps: int  # ok, partial: steps to train; straggler: steps done when it was given up
    seconds: float  # simulated seconds from the round's start to its reply (or when it would be)
    reason: str = ""
    crash: bool = False  # told to raise in its ClientApp
    over_selected: bool = False  # sampled past the k replies the round waits for

    @property
    def trains(self) -> bool:
        """Whether the client is sent its work (its update may count)."""
        return self.outcome in MERGED


class DeviceWorld:
    """Profiles, deadline policy, availability and over-selection of one run."""

    def __init__(self, overrides: Mapping[str, Mapping] | None = None, policy: str = "wait",
                 deadline: float = math.inf, availability: Availability | None = None,
                 over_selection: float = 0.0) -> None:
        if policy not in POLICIES:
            raise ValueError(f"deadline policy {policy!r} is not allowed: use one of {POLICIES}")
        if (policy == "wait") != math.isinf(deadline) or not deadline > 0:
            raise ValueError(f"deadline {deadline!r} does not suit policy {policy!r}: 'wait' "
                             "has none (inf), 'drop' and 'partial' need a finite one > 0")
        self.overrides = dict(overrides or {})
        self.policy, self.deadline = policy, float(deadline)
        self.availability = availability or Availability()
        self.over_selection = float(over_selection)
        self._profiles: dict[float, DeviceProfile] = {}

    def profile(self, budget: float) -> DeviceProfile:
        """The profile of tier ``budget`` (defaults and the ``default`` overrides for a tier the
        device mix does not name, e.g. a deployed node's own budget)."""
        if budget not in self._profiles:
            self._profiles.update(profiles_for([budget], {
                k: v for k, v in self.overrides.items()
                if k == DEFAULT_TIER or float(k) == budget}))
        return self._profiles[budget]

    def sample_size(self, k: int) -> int:
        """How many clients a round samples to keep ``k``: k plus the over-selection margin."""
        return math.ceil(k * (1 + self.over_selection) - 1e-9)

    def round_start(self, members: Mapping[int, tuple[int, float]], clock: float
                    ) -> tuple[float, list[int]]:
        """The round's start (>= ``clock``) and the nodes online then; ``members`` maps each node to
        its (partition id, budget)."""
        start = self.availability.next_online(members.values(), clock)
        if math.isinf(start):
            raise RuntimeError(f"availability: no client is online at or after simulated time "
                               f"{clock:g} s; the run cannot go on")
        return start, [n for n, (p, b) in members.items()
                       if self.availability.is_online(p, b, start)]

    def decide(self, work: Sequence[Work], k: int, rng: np.random.Generator) -> list[Fate]:
        """Every sampled client's fate, in the order given (two draws per client from ``rng``)."""
        draws = rng.random((len(work), 2))
        fates = [self._fate(w, drop, crash) for w, (drop, crash) in zip(work, draws)]
        return self._keep_first(fates, k) if self.over_selection else fates

    def _fate(self, work: Work, drop_draw: float, crash_draw: float) -> Fate:
        profile = self.profile(work.budget)
        planned = len(work.step_macs)
        full = profile.seconds(sum(work.step_macs), work.bytes_down, work.bytes_up)
        if drop_draw < profile.dropout:
            return Fate(work, "dropout", 0, full, f"dropout: tier {work.budget:g} drops out "
                        f"with probability {profile.dropout:g}")
        crash = bool(crash_draw < profile.crash)
        if self.policy == "wait" or full <= self.deadline:
            return Fate(work, "ok", planned, full, crash=crash)
        if self.policy == "partial":
            steps = profile.steps_within(work.step_macs, work.bytes_down, work.bytes_up,
                                         self.deadline)
            if steps > 0:
                seconds = profile.seconds(sum(work.step_macs[:steps]), work.bytes_down,
                                          work.bytes_up)
                return Fate(work, "partial", steps, seconds, f"partial: {steps} of {planned} "
                            f"steps fit the {self.deadline:g} s deadline", crash=crash)
        done = profile.steps_within(work.step_macs, work.bytes_down, 0, self.deadline)
        return Fate(work, "straggler", done, full, f"straggler: needs {full:.4g} s, over the "
                    f"{self.deadline:g} s deadline")

    def _keep_first(self, fates: list[Fate], k: int) -> list[Fate]:
        """Over-selection: the first ``k`` clients to finish train; the later ones are cut."""
        finishing = sorted((f for f in fates if f.trains),
                           key=lambda f: (f.seconds, f.work.partition))
        if len(finishing) <= k:
            return fates
        close = finishing[k - 1].seconds
        cut = {id(f) for f in finishing[k:]}
        return [self._cut(f, close, k) if id(f) in cut else f for f in fates]

    def _cut(self, fate: Fate, close: float, k: int) -> Fate:
        work = fate.work
        done = self.profile(work.budget).steps_within(work.step_macs, work.bytes_down, 0, close)
        return replace(fate, outcome="straggler", steps=min(done, fate.steps), crash=False,
                       over_selected=True, reason=f"straggler: over-selection closed the round "
                       f"with the first {k} replies at {close:.4g} s")

    def round_seconds(self, fates: Sequence[Fate], merged: set[int], k: int) -> float:
        """The round's simulated duration, given the nodes whose replies were merged."""
        arrived = sorted(f.seconds for f in fates if f.work.node in merged)
        if self.over_selection and len(arrived) >= k:
            return arrived[k - 1]
        awaited = [f for f in fates if not f.over_selected]
        if self.policy == "wait":
            return max((f.seconds for f in awaited), default=0.0)
        if all(f.work.node in merged for f in awaited):
            return max(arrived, default=0.0)
        return self.deadline


def load_world(cfg) -> DeviceWorld:
    """The device world a run config describes; ValueError naming the key, value and what is
    allowed (files are read here, so call it before anything starts)."""
    tiers = cfg.tiers
    overrides = _checked("device-profiles", cfg.device_profiles,
                         lambda v: _profiles(v, tiers))
    availability = _checked("availability", cfg.availability,
                            lambda v: parse_availability(v, tiers))
    return DeviceWorld(overrides, cfg.deadline_policy, cfg.round_deadline, availability,
                       cfg.over_selection)


def _profiles(text: str, tiers: list[float]) -> dict:
    overrides = parse_profiles(text)
    check_profiles(overrides, tiers)
    return overrides


def _checked(key: str, value: str, load):
    try:
        return load(value)
    except ValueError as err:
        raise ValueError(f"run-config key {key!r} has bad value {value!r}: {err}") from None
