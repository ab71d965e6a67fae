"""Device profiles and availability: hand-computed times, affordable steps, traces, clear errors."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from fl_maestro.availability import Availability, Window, parse_availability
from fl_maestro.devices import (DeviceProfile, check_profiles, parse_profiles, profiles_for,
                                profiles_frame)

# 1 GMAC/s, 1 MB/s down, 0.5 MB/s up
SLOW = DeviceProfile(1e9, 1e6, 5e5)


def test_client_seconds_by_hand() -> None:
    # 2e6 / 1e6 + 3e9 / 1e9 + 1e6 / 5e5 = 2 + 3 + 2
    assert SLOW.seconds(3e9, 2e6, 1e6) == pytest.approx(7)


def test_steps_within_counts_the_steps_that_fit_with_both_transfers() -> None:
    steps = [1e9, 2e9, 1e9, 1e9]  # done after 1, 3, 4, 5 s of compute; transfers take 4 s
    assert SLOW.steps_within(steps, 2e6, 1e6, 3.9) == 0  # not even the transfers fit
    assert SLOW.steps_within(steps, 2e6, 1e6, 4.0) == 0
    assert SLOW.steps_within(steps, 2e6, 1e6, 5.0) == 1  # a step ending on the deadline is in
    assert SLOW.steps_within(steps, 2e6, 1e6, 7.5) == 2
    assert SLOW.steps_within(steps, 2e6, 1e6, 9.0) == 4
    assert SLOW.steps_within(steps, 2e6, 0, 3.5) == 1  # steps done before an upload


def test_default_profiles_follow_the_budget() -> None:
    profiles = profiles_for([1.0, 0.2])
    assert profiles[1.0] == DeviceProfile(10e9, 2.5e6, 6.25e5, 0.0, 0.0)
    assert profiles[0.2].macs_per_second == pytest.approx(2e9)
    custom = profiles_for([0.2, 1.0], {"default": {"uplink-bytes-per-second": 1e6},
                                       "0.2": {"dropout": 0.1}})
    assert custom[0.2] == DeviceProfile(2e9, 2.5e6, 1e6, 0.1)
    assert custom[1.0] == DeviceProfile(10e9, 2.5e6, 1e6, 0.0)
    assert list(profiles_frame(custom)["uplink Mbit/s"]) == pytest.approx([8, 8])


def test_inline_and_toml_profiles_agree(tmp_path: Path) -> None:
    inline = parse_profiles("0.5:macs-per-second=1e9, dropout=0.25; default:crash=0.1")
    path = tmp_path / "devices.toml"
    path.write_text('[default]\ncrash = 0.1\n\n["0.5"]\nmacs-per-second = 1e9\ndropout = 0.25\n')
    assert parse_profiles(str(path)) == inline
    profiles = check_profiles(inline, [0.5, 1.0])
    assert profiles[0.5] == DeviceProfile(1e9, 2.5e6, 6.25e5, 0.25, 0.1)
    assert profiles[1.0].crash == 0.1 and profiles[1.0].dropout == 0
    assert parse_profiles("") == {}


@pytest.mark.parametrize("text, message", [
    ("0.5:speed=1", r"unknown key\(s\) \['speed'\]"),
    ("0.5:macs-per-second=0", "'macs-per-second' has bad value 0.0: allowed a finite number > 0"),
    ("0.5:macs-per-second=-2e9", "'macs-per-second' has bad value -2000000000.0"),
    ("1.0:uplink-bytes-per-second=0", "'uplink-bytes-per-second' has bad value 0.0"),
    ("default:dropout=1.5", "'dropout' has bad value 1.5: allowed a probability in"),
    ("0.3:dropout=0.1", r"tier '0.3' is not a tier of the device mix: allowed \['0.5', '1'\]"),
    ("fast:dropout=0.1", "tier 'fast' is not a budget"),
    ("0.5:dropout", "'dropout' is not 'key=number'"),
    ("0.5", "is not 'tier:key=value,...'"),
    ("missing.toml", "file 'missing.toml' does not exist"),
])
def test_bad_profiles_say_what_is_wrong(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        check_profiles(parse_profiles(text), [0.5, 1.0])


def test_windows_one_off_and_periodic() -> None:
    once = Window(10, 20)
    assert [once.covers(t) for t in (9.9, 10, 19.9, 20)] == [False, True, True, False]
    assert once.next_start(0) == 10 and once.next_start(15) == 15 and once.next_start(20) == math.inf
    night = Window(20, 4, period=24)  # wraps: online 20:00-04:00
    assert [night.covers(t) for t in (21, 2, 4, 12, 44, 52)] == [True, True, False, False, True,
                                                                  False]
    assert night.next_start(5) == 20 and night.next_start(30) == 44


def test_trace_prefers_a_clients_own_rows_then_its_tier(tmp_path: Path) -> None:
    path = tmp_path / "trace.csv"
    path.write_text("client,tier,from,until\n3,,0,50\n,0.5,100,200\n,0.5,300,400\n")
    trace = parse_availability(str(path), [0.5, 1.0])
    assert trace.is_online(3, 0.5, 10) and not trace.is_online(3, 0.5, 150)  # its own rows
    assert not trace.is_online(4, 0.5, 10) and trace.is_online(4, 0.5, 150)  # its tier's rows
    assert trace.is_online(5, 1.0, 10)  # a tier without rows is always online
    assert trace.next_online([(4, 0.5)], 250) == 300
    assert trace.next_online([(3, 0.5)], 60) == math.inf  # its own window has passed
    assert trace.next_online([(4, 0.5), (5, 1.0)], 250) == 250
    with pytest.raises(ValueError, match=r"client\(s\) \[3\].*partitions 0..2"):
        trace.check_clients(3)


def test_diurnal_pattern() -> None:
    trace = parse_availability("diurnal:100:0.5@80-20,1.0@0-50", [0.5, 1.0])
    assert trace.is_online(0, 0.5, 190) and not trace.is_online(0, 0.5, 150)
    assert trace.is_online(0, 1.0, 140) and not trace.is_online(0, 1.0, 170)
    assert parse_availability("", [0.5]) == Availability()


@pytest.mark.parametrize("text, message", [
    ("diurnal:100:0.3@0-50", r"tier\(s\) \['0.3'\] are not tiers of the device mix: allowed "
                             r"\['0.5', '1'\]"),
    ("diurnal:0:0.5@0-50", "period '0' must be > 0"),
    ("diurnal:100:0.5@0-150", "must differ and lie in"),
    ("diurnal:100:0.5", "is not '<tier>@<from>-<until>'"),
    ("nowhere.csv", "file 'nowhere.csv' does not exist"),
])
def test_bad_availability_says_what_is_wrong(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_availability(text, [0.5, 1.0])


def test_bad_trace_files(tmp_path: Path) -> None:
    path = tmp_path / "trace.csv"
    for body, message in [("client,tier,from,until\n,0.3,0,10\n", r"tier\(s\) \['0.3'\]"),
                          ("client,tier,from,until\n1,0.5,0,10\n", "exactly one of client"),
                          ("client,tier,from,until\n1,,10,5\n", "need 0 <= from < until"),
                          ("client,tier,from,until\nx,,0,5\n", "client 'x' is not a partition"),
                          ("who,from,until\n1,0,5\n", "expected \\['client', 'tier'")]:
        path.write_text(body)
        with pytest.raises(ValueError, match=message):
            parse_availability(str(path), [0.5, 1.0])
