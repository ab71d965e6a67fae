"""Device-time model: hand-computed client and round times, deadlines, dropouts, profiles."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from simulations.devices import (DeviceProfile, load_profiles, profiles_for, simulate,
                                 time_at_rounds)

# Tier 0.5: 1 GMAC/s, 1 MB/s down, 0.5 MB/s up.  Tier 1.0: 2 GMAC/s, 2 MB/s down, 1 MB/s up.
PROFILES = {"0.5": {"macs-per-second": 1e9, "downlink-bytes-per-second": 1e6,
                    "uplink-bytes-per-second": 5e5},
            "1.0": {"macs-per-second": 2e9, "downlink-bytes-per-second": 2e6,
                    "uplink-bytes-per-second": 1e6}}


def _clients() -> pd.DataFrame:
    # round 1: A (0.5): 3e9/1e9 + 2e6/1e6 + 1e6/5e5 = 3 + 2 + 2 = 7 s
    #          B (1.0): 4e9/2e9 + 4e6/2e6 + 2e6/1e6 = 2 + 2 + 2 = 6 s   -> round 7 s
    # round 2: A (0.5): 1e9/1e9 + 1e6/1e6 + 5e5/5e5 = 1 + 1 + 1 = 3 s
    #          B (1.0): 16e9/2e9 + 2e6/2e6 + 1e6/1e6 = 8 + 1 + 1 = 10 s -> round 10 s, total 17 s
    return pd.DataFrame({"round": [1, 1, 2, 2], "partition-id": [0, 1, 0, 1],
                         "budget": [0.5, 1.0, 0.5, 1.0],
                         "train-macs": [3e9, 4e9, 1e9, 16e9],
                         "bytes-down": [2e6, 4e6, 1e6, 2e6], "bytes-up": [1e6, 2e6, 5e5, 1e6]})


def test_client_and_round_times_by_hand() -> None:
    clients, rounds = simulate(_clients(), PROFILES)
    assert clients["compute-seconds"].tolist() == pytest.approx([3, 2, 1, 8])
    assert clients["download-seconds"].tolist() == pytest.approx([2, 2, 1, 1])
    assert clients["upload-seconds"].tolist() == pytest.approx([2, 2, 1, 1])
    assert clients["sim-seconds"].tolist() == pytest.approx([7, 6, 3, 10])
    assert not clients["straggler"].any()
    assert rounds["sim-seconds"].tolist() == pytest.approx([7, 10])
    assert rounds["cumulative-sim-seconds"].tolist() == pytest.approx([7, 17])
    assert time_at_rounds(rounds, [0, 1, 2]).tolist() == pytest.approx([0, 7, 17])


def test_deadline_marks_exactly_the_clients_over_it() -> None:
    clients, rounds = simulate(_clients(), PROFILES, deadline=6.5)
    assert clients["straggler"].tolist() == [True, False, False, True]  # 7 s and 10 s
    assert rounds["stragglers"].tolist() == [1, 1]
    assert rounds["sim-seconds"].tolist() == pytest.approx([6.5, 6.5])
    clients, rounds = simulate(_clients(), PROFILES, deadline=8)
    assert clients["straggler"].tolist() == [False, False, False, True]  # only the 10 s one
    assert rounds["sim-seconds"].tolist() == pytest.approx([7, 8])
    clients, rounds = simulate(_clients(), PROFILES, deadline=7)  # exactly on time is in time
    assert clients["straggler"].tolist() == [False, False, False, True]
    assert rounds["sim-seconds"].tolist() == pytest.approx([7, 7])
    with pytest.raises(ValueError, match="deadline has bad value -1"):
        simulate(_clients(), PROFILES, deadline=-1)


def test_dropout_is_seeded_and_waits_for_the_deadline() -> None:
    profiles = {**PROFILES, "1.0": {**PROFILES["1.0"], "dropout": 0.5}}
    first, _ = simulate(_clients(), profiles, rng=np.random.default_rng(3))
    again, _ = simulate(_clients(), profiles, rng=np.random.default_rng(3))
    assert first["dropped-out"].tolist() == again["dropped-out"].tolist()
    assert not first.loc[first["budget"] == 0.5, "dropped-out"].any()  # tier 0.5 never drops
    always = {**PROFILES, "1.0": {**PROFILES["1.0"], "dropout": 0.999999}}
    clients, rounds = simulate(_clients(), always, rng=np.random.default_rng(0))
    assert clients["dropped-out"].tolist() == [False, True, False, True]
    assert rounds["sim-seconds"].tolist() == pytest.approx([7, 3])  # no deadline: last reply
    assert not clients["straggler"].any()  # a dropped client is not also a straggler
    _, rounds = simulate(_clients(), always, deadline=9, rng=np.random.default_rng(0))
    assert rounds["sim-seconds"].tolist() == pytest.approx([9, 9])  # waits for the dead one
    assert rounds["dropped-out"].tolist() == [1, 1]
    with pytest.raises(ValueError, match="pass a seeded numpy Generator"):
        simulate(_clients(), profiles)


def test_default_profiles_follow_the_budget() -> None:
    profiles = profiles_for([1.0, 0.2])
    assert profiles[1.0] == DeviceProfile(10e9, 2.5e6, 6.25e5, 0.0)
    assert profiles[0.2].macs_per_second == pytest.approx(2e9)
    custom = profiles_for([0.2, 1.0], {"default": {"uplink-bytes-per-second": 1e6},
                                       "0.2": {"dropout": 0.1}})
    assert custom[0.2] == DeviceProfile(2e9, 2.5e6, 1e6, 0.1)
    assert custom[1.0] == DeviceProfile(10e9, 2.5e6, 1e6, 0.0)


def test_profiles_from_toml_and_clear_errors(tmp_path: Path) -> None:
    path = tmp_path / "devices.toml"
    path.write_text('[default]\ndropout = 0.05\n\n["0.5"]\nmacs-per-second = 1e9\n')
    overrides = load_profiles(path)
    assert profiles_for([0.5], overrides)[0.5] == DeviceProfile(1e9, 2.5e6, 6.25e5, 0.05)
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['speed'\]"):
        load_profiles({"0.5": {"speed": 1}})
    with pytest.raises(ValueError, match="tier 'fast' is not a budget"):
        load_profiles({"fast": {}})
    with pytest.raises(ValueError, match="'dropout' has bad value 1.5"):
        load_profiles({"default": {"dropout": 1.5}})
    with pytest.raises(ValueError, match="'uplink-bytes-per-second' has bad value 0"):
        load_profiles({"1.0": {"uplink-bytes-per-second": 0}})
    with pytest.raises(ValueError, match=r"no device profile for budget\(s\) \[0.3\]"):
        from simulations.devices import client_times
        client_times(_clients().assign(budget=0.3), profiles_for([0.5]))
