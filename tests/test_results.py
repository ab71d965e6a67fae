"""RunStore: tidy tables, the saved config and the atomic, resumable checkpoint."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import fl_maestro.results as results
from fl_maestro.config import parse_run_config
from fl_maestro.results import TABLES, RunStore


def _arrays(offset: float = 0.0) -> dict[str, np.ndarray]:
    return {
        "fc.U": (np.arange(12, dtype=np.float32).reshape(4, 3) + offset) / 7,
        "fc.V": np.linspace(-1, 1, 15, dtype=np.float32).reshape(3, 5) + offset,
        "bn.num_batches_tracked": np.array(41 + int(offset), dtype=np.int64),
        "steps": np.array([1, 2**40, -3], dtype=np.int64),
    }


def _assert_same(got: dict, expected: dict) -> None:
    assert set(got) == set(expected)
    for name, a in expected.items():
        assert got[name].dtype == a.dtype, name
        assert got[name].shape == a.shape, name
        assert got[name].tobytes() == a.tobytes(), name


# --------------------------------------------------------------------------- tables


def test_append_read_round_trip(tmp_path: Path) -> None:
    store = RunStore(tmp_path / "run")
    assert store.read("rounds").empty
    store.append("rounds", [{"round": 1, "train-loss": 2.5, "dropped": 0}])
    store.append("rounds", [{"dropped": 1, "round": 2, "train-loss": 1.25},
                            {"train-loss": 1.0, "round": 3, "dropped": 0}])
    store.append("rounds", [])
    frame = store.read("rounds")
    assert list(frame.columns) == ["round", "train-loss", "dropped"]
    assert frame["round"].tolist() == [1, 2, 3]
    assert frame["train-loss"].tolist() == [2.5, 1.25, 1.0]
    assert frame["dropped"].tolist() == [0, 1, 0]
    text = (tmp_path / "run" / "rounds.csv").read_text()
    assert text.count("round,train-loss,dropped") == 1, "header written once"
    assert len(text.strip().splitlines()) == 4


def test_tables_are_separate(tmp_path: Path) -> None:
    store = RunStore(tmp_path)
    store.append("clients", [{"round": 1, "partition-id": 3, "budget": 0.2}])
    store.append("evaluation", [{"round": 0, "kind": "tier", "level": 0.2, "metric": "accuracy",
                                 "value": 0.5}])
    assert store.read("clients")["partition-id"].tolist() == [3]
    assert list(store.read("evaluation").columns) == ["round", "kind", "level", "metric", "value"]
    assert store.read("rounds").empty


def test_unknown_table(tmp_path: Path) -> None:
    store = RunStore(tmp_path)
    with pytest.raises(ValueError, match="metrics"):
        store.append("metrics", [{"round": 1}])
    assert not list(tmp_path.glob("*.csv"))


def test_truncate_after(tmp_path: Path) -> None:
    store = RunStore(tmp_path)
    for rnd in range(0, 5):
        store.append("evaluation", [{"round": rnd, "kind": "fraction", "level": f, "metric": "acc",
                                     "value": rnd + f} for f in (0.5, 1.0)])
        if rnd:
            store.append("clients", [{"round": rnd, "partition-id": p} for p in range(3)])
            store.append("rounds", [{"round": rnd, "dropped": 0}])
    store.truncate_after(2)
    assert sorted(set(store.read("evaluation")["round"])) == [0, 1, 2]
    assert len(store.read("evaluation")) == 6
    assert store.read("clients")["round"].tolist() == [1, 1, 1, 2, 2, 2]
    assert store.read("rounds")["round"].tolist() == [1, 2]
    assert list(store.read("evaluation").columns) == ["round", "kind", "level", "metric", "value"]
    store.append("rounds", [{"dropped": 2, "round": 3}])  # a resumed run appends after the cut
    assert store.read("rounds")["round"].tolist() == [1, 2, 3]
    assert store.read("rounds")["dropped"].tolist() == [0, 0, 2]


def test_truncate_after_without_tables(tmp_path: Path) -> None:
    store = RunStore(tmp_path)
    store.append("rounds", [{"round": 1}])
    store.truncate_after(0)  # evaluation.csv and clients.csv do not exist yet
    assert store.read("rounds").empty
    assert {p.name for p in tmp_path.iterdir()} <= {f"{t}.csv" for t in TABLES}


# --------------------------------------------------------------------------- config


def test_write_read_config(tmp_path: Path) -> None:
    store = RunStore(tmp_path / "nested" / "run")
    cfg = parse_run_config({"seed": 3, "lr": 1, "distill": True, "run-name": "r"})
    store.write_config(cfg.to_dict())
    raw = store.read_config()
    assert raw == cfg.to_dict()
    assert parse_run_config(raw) == cfg
    store.write_config({**cfg.to_dict(), "seed": 4})  # overwritten, not appended
    assert store.read_config()["seed"] == 4
    assert not list((tmp_path / "nested" / "run").glob("*.tmp"))


# --------------------------------------------------------------------------- checkpoint


def test_checkpoint_round_trip(tmp_path: Path) -> None:
    store = RunStore(tmp_path)
    assert not store.has_checkpoint()
    arrays = _arrays()
    arrays["fc.V"] = np.asfortranarray(arrays["fc.V"])  # non C-contiguous input is fine
    state = {"strategy": {"rng": {"state": 2**100 + 7, "inc": 3}, "dropped_total": 2},
             "note": "x"}
    store.save_checkpoint(5, arrays, state)
    assert store.has_checkpoint()
    rnd, loaded, loaded_state = store.load_checkpoint()
    assert rnd == 5
    _assert_same(loaded, _arrays())
    assert loaded_state == state


def test_second_checkpoint_replaces_first(tmp_path: Path) -> None:
    store = RunStore(tmp_path)
    store.save_checkpoint(1, _arrays(), {"strategy": {"n": 1}})
    store.save_checkpoint(2, _arrays(1.0), {"strategy": {"n": 2}})
    assert [p.name for p in tmp_path.glob("checkpoint-*.safetensors")] == \
        ["checkpoint-2.safetensors"]
    assert not list(tmp_path.glob("*.tmp"))
    rnd, loaded, state = store.load_checkpoint()
    assert rnd == 2 and state == {"strategy": {"n": 2}}
    _assert_same(loaded, _arrays(1.0))


def test_crash_during_save_keeps_previous_checkpoint(tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    store = RunStore(tmp_path)
    store.save_checkpoint(1, _arrays(), {"strategy": {"n": 1}})

    real_save = results.save_file

    def crash(tensors: dict, path: str) -> None:
        real_save(dict(list(tensors.items())[:1]), path)  # half the file is on disk...
        raise OSError("disk full")  # ...when the process dies

    monkeypatch.setattr(results, "save_file", crash)
    with pytest.raises(OSError):
        store.save_checkpoint(2, _arrays(1.0), {"strategy": {"n": 2}})
    monkeypatch.undo()

    reopened = RunStore(tmp_path)
    assert reopened.has_checkpoint()
    rnd, loaded, state = reopened.load_checkpoint()
    assert rnd == 1 and state == {"strategy": {"n": 1}}
    _assert_same(loaded, _arrays())
    assert not (tmp_path / "checkpoint-2.safetensors").exists()

    reopened.save_checkpoint(2, _arrays(1.0), {"strategy": {"n": 2}})  # the retry succeeds
    rnd, loaded, _ = reopened.load_checkpoint()
    assert rnd == 2
    _assert_same(loaded, _arrays(1.0))


def test_append_with_new_columns_keeps_every_column(tmp_path) -> None:
    store = RunStore(tmp_path)
    store.append("rounds", [{"round": 1, "dropped": 3}])  # a round with no usable reply
    store.append("rounds", [{"round": 2, "dropped": 0, "train-loss": 0.5}])
    frame = store.read("rounds")
    assert list(frame["round"]) == [1, 2] and frame["train-loss"].iloc[1] == 0.5


def test_clear_removes_a_dead_runs_leftovers(tmp_path) -> None:
    store = RunStore(tmp_path)
    store.append("evaluation", [{"round": 0, "kind": "tier", "level": 1.0, "metric": "accuracy",
                                 "value": 0.1}])
    store.save_checkpoint(1, {"a": np.zeros(2, np.float32)}, {})
    store.clear()
    assert store.read("evaluation").empty and not store.has_checkpoint()
    assert not list(tmp_path.glob("checkpoint-*"))
