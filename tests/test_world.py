"""The device world's decisions and clock, by hand; bad device-world settings refused at start."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from fl_maestro.availability import Availability, Window
from fl_maestro.config import parse_run_config
from fl_maestro.world import DeviceWorld, Work, load_world, round_rng

# Tier 0.5: 1 GMAC/s, 1 MB/s down, 0.5 MB/s up. Tier 1.0: 2 GMAC/s, 2 MB/s down, 1 MB/s up.
PROFILES = {"0.5": {"macs-per-second": 1e9, "downlink-bytes-per-second": 1e6,
                    "uplink-bytes-per-second": 5e5},
            "1.0": {"macs-per-second": 2e9, "downlink-bytes-per-second": 2e6,
                    "uplink-bytes-per-second": 1e6}}
# A (tier 0.5): 2e6/1e6 + 4 x 1e9/1e9 + 1e6/5e5 = 2 + 4 + 2 = 8 s
# B (tier 1.0): 2e6/2e6 + 3 x 2e9/2e9 + 1e6/1e6 = 1 + 3 + 1 = 5 s
A = Work(node=11, partition=0, budget=0.5, step_macs=(1e9,) * 4, bytes_down=2_000_000,
         bytes_up=1_000_000)
B = Work(node=12, partition=1, budget=1.0, step_macs=(2e9,) * 3, bytes_down=2_000_000,
         bytes_up=1_000_000)


def world(policy: str = "wait", deadline: float = math.inf, **kwargs) -> DeviceWorld:
    return DeviceWorld(kwargs.pop("profiles", PROFILES), policy, deadline, **kwargs)


def fates(w: DeviceWorld, k: int = 2, seed: int = 0) -> dict[str, tuple]:
    decided = w.decide([A, B], k, np.random.default_rng(seed))
    return {f"{'AB'[f.work.partition]}": (f.outcome, f.steps, pytest.approx(f.seconds))
            for f in decided}


def test_wait_trains_everyone_and_lasts_as_long_as_the_slowest() -> None:
    w = world()
    assert fates(w) == {"A": ("ok", 4, 8), "B": ("ok", 3, 5)}
    decided = w.decide([A, B], 2, np.random.default_rng(0))
    assert w.round_seconds(decided, {11, 12}, 2) == pytest.approx(8)
    assert w.round_seconds(decided, {12}, 2) == pytest.approx(8)  # a lost reply: still waited for


def test_drop_discards_the_client_over_the_deadline() -> None:
    w = world("drop", 6)
    # A gave up at the deadline: 2 s download, then the 4 steps by 6 s, no time to upload
    assert fates(w) == {"A": ("straggler", 4, 8), "B": ("ok", 3, 5)}
    decided = w.decide([A, B], 2, np.random.default_rng(0))
    assert w.round_seconds(decided, {12}, 2) == pytest.approx(6)  # waits until the deadline
    assert not decided[0].trains and decided[1].trains
    assert w.round_seconds(world("drop", 9).decide([A, B], 2, np.random.default_rng(0)),
                           {11, 12}, 2) == pytest.approx(8)  # all in: ends with the last reply


def test_partial_trains_only_the_steps_that_fit() -> None:
    w = world("partial", 6)
    # A: 6 s - 2 s down - 2 s up leaves 2 s: 2 of its 4 steps; it replies after 2 + 2 + 2 s
    assert fates(w) == {"A": ("partial", 2, 6), "B": ("ok", 3, 5)}
    decided = w.decide([A, B], 2, np.random.default_rng(0))
    assert "2 of 4 steps" in decided[0].reason
    assert w.round_seconds(decided, {11, 12}, 2) == pytest.approx(6)
    # 4.5 s leaves 0.5 s for compute: no step fits, so it is a straggler after all
    assert fates(world("partial", 4.5))["A"] == ("straggler", 2, 8)


def test_dropouts_and_crashes_are_drawn_from_the_seeded_generator() -> None:
    profiles = {**PROFILES, "0.5": {**PROFILES["0.5"], "dropout": 0.5},
                "1.0": {**PROFILES["1.0"], "crash": 0.5}}
    w = world(profiles=profiles)
    work = [Work(n, n, 0.5 if n % 2 else 1.0, (1e9,), 10, 10) for n in range(400)]

    def draw(seed: int, rnd: int) -> list[tuple]:
        return [(f.outcome, f.crash) for f in w.decide(work, 400, round_rng(seed, rnd))]

    first = draw(3, 1)
    assert draw(3, 1) == first  # the same seed and round: the same fates
    assert draw(3, 2) != first and draw(4, 1) != first
    odd, even = first[1::2], first[0::2]
    # 200 of each tier, p = 0.5: within 70..130 but with odds of 1 in 10^5
    assert {o for o, _ in even} == {"ok"} and 70 < sum(c for _, c in even) < 130  # 1.0 crashes
    assert 70 < sum(o == "dropout" for o, _ in odd) < 130 and not any(c for _, c in odd)
    always = {**PROFILES, "1.0": {**PROFILES["1.0"], "dropout": 0.999999}}
    w = world("drop", 9, profiles=always)
    decided = w.decide([A, B], 2, np.random.default_rng(0))
    assert [f.outcome for f in decided] == ["ok", "dropout"]
    assert w.round_seconds(decided, {11}, 2) == pytest.approx(9)  # waited for the dead one


def test_over_selection_keeps_the_first_k_to_finish() -> None:
    w = world(over_selection=1.0)
    assert w.sample_size(1) == 2 and w.sample_size(10) == 20
    assert world(over_selection=0.3).sample_size(10) == 13
    decided = w.decide([A, B], 1, np.random.default_rng(0))
    a, b = decided
    assert (b.outcome, a.outcome, a.over_selected) == ("ok", "straggler", True)
    assert a.steps == 3  # by the 5 s close A had downloaded (2 s) and done 3 steps
    assert w.round_seconds(decided, {12}, 1) == pytest.approx(5)  # not A's 8 s
    assert w.round_seconds(decided, set(), 1) == pytest.approx(5)  # B crashed: wait for it


def test_round_start_waits_for_someone_online() -> None:
    trace = Availability(tiers={0.5: (Window(100, 200),), 1.0: (Window(150, 300),)})
    w = world(availability=trace)
    members = {11: (0, 0.5), 12: (1, 1.0)}
    assert w.round_start(members, 0) == (100, [11])  # the clock jumps to the first one online
    assert w.round_start(members, 160) == (160, [11, 12])
    assert w.round_start(members, 250) == (250, [12])
    with pytest.raises(RuntimeError, match="no client is online at or after simulated time 300"):
        w.round_start(members, 300)


@pytest.mark.parametrize("overrides, message", [
    ({"round-deadline": 0, "deadline-policy": "drop"},
     "'round-deadline' has bad value 0.0: allowed a number of simulated seconds > 0"),
    ({"round-deadline": -5.0, "deadline-policy": "drop"}, "'round-deadline' has bad value -5.0"),
    ({"deadline-policy": "hurry"}, "'deadline-policy' has bad value 'hurry': allowed one of "
                                   r"\('wait', 'drop', 'partial'\)"),
    ({"deadline-policy": "drop"}, "'deadline-policy' = 'drop' needs a finite 'round-deadline'"),
    ({"round-deadline": 30}, "'round-deadline' = 30.0 needs 'deadline-policy' drop or partial"),
    ({"over-selection": -0.5}, "'over-selection' has bad value -0.5"),
    ({"device-profiles": "0.2:macs-per-second=0"},
     "'device-profiles' has bad value '0.2:macs-per-second=0': device profile key "
     "'macs-per-second' has bad value 0.0: allowed a finite number > 0"),
    ({"device-profiles": "1.0:macs-per-second=-1e9"}, "'device-profiles'.*bad value -1000000000.0: allowed a finite number > 0"),
    ({"availability": "diurnal:86400:0.3@0-3600"},
     r"'availability' has bad value 'diurnal:86400:0.3@0-3600': tier\(s\) \['0.3'\] are not "
     r"tiers of the device mix: allowed \['0.2', '0.4', '0.6', '0.8', '1'\]"),
])
def test_bad_device_world_settings_name_key_value_and_allowed(overrides: dict,
                                                              message: str) -> None:
    with pytest.raises(ValueError, match=message):
        load_world(parse_run_config(overrides))


def test_bad_files_are_refused_by_the_launcher_before_flower_starts(tmp_path: Path,
                                                                    monkeypatch) -> None:
    from simulations import launch

    def never(*args, **kwargs):
        raise AssertionError("a SuperLink was started for a bad run config")

    monkeypatch.setattr(launch.PrivateSuperLink, "start", never)
    trace = tmp_path / "trace.csv"
    trace.write_text("client,tier,from,until\n,0.7,0,100\n")
    profiles = tmp_path / "devices.toml"
    profiles.write_text('["0.4"]\nmacs-per-second = 0\n')
    for key, value in (("availability", trace), ("device-profiles", profiles),
                       ("round-deadline", "0")):
        with pytest.raises(SystemExit) as stop:
            launch.main(["--supernodes", "4", "-c", f"{key}={value}", "-c",
                         f"results-dir={tmp_path}"])
        assert stop.value.code == 2
    # A file named relative to where the command runs reaches the ServerApp as an absolute path.
    monkeypatch.chdir(tmp_path)
    trace.write_text("client,tier,from,until\n,0.4,0,100\n")
    resolved = launch.with_absolute_results({"availability": "trace.csv"})
    assert resolved["availability"] == str(trace.resolve())
