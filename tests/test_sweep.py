"""Sweep runner: cell ids, validation, skipping and resuming, failures, gathering (no Flower)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from fl_maestro.results import RunStore
from simulations.scenarios import SCENARIOS, Scenario, axis, get_scenario, grouped_axis
from fl_maestro.config import parse_run_config
from simulations.sweep import Cell, apply_sets, build_cells, cell_id, gather, run_sweep, slug
from simulations.until import Until

SMALL = Scenario("small", "two mixes x one grouped axis",
                 overrides={"num-rounds": 2, "clients-per-round": 2}, supernodes=4,
                 axes=(axis("device-mix", ("1.0:1.0", "0.2:0.5,1.0:0.5")),
                       grouped_axis("non-iid", {"iid": {"partitioner": "iid"},
                                                "dir-0.1": {"alpha": 0.1}})))


def fake_run_cell(calls: list, fail: frozenset[str] = frozenset(),
                  crash: frozenset[str] = frozenset(), curve=lambda rnd: 0.1 + 0.2 * rnd):
    """A stand-in for ``flwr run``: writes a synthetic run folder round by round.

    Cells in ``fail`` stop with exit code 1 after checkpointing round 1; cells in ``crash`` raise.
    ``curve(round)`` is the accuracy the run reports.
    """
    def run_cell(cell: Cell, resume: bool) -> int:
        calls.append((cell.cell_id, resume))
        if cell.cell_id in crash:
            raise RuntimeError("boom")
        store = RunStore(Path(cell.run_config["results-dir"]) / cell.run_config["run-name"])
        start = store.checkpoint_round() + 1 if resume else 1
        store.write_config(parse_run_config(cell.run_config).to_dict())
        if start == 1:
            store.append("evaluation", [_eval_row(0, 0.1)])
        for rnd in range(start, cell.num_rounds + 1):
            store.append("evaluation", [_eval_row(rnd, curve(rnd))])
            store.append("clients", [{"round": rnd, "partition-id": 0, "budget": 1.0}])
            store.append("rounds", [{"round": rnd, "clients": 1}])
            store.save_checkpoint(rnd, {"w": np.zeros(2, np.float32)}, {})
            if cell.cell_id in fail:
                return 1
        return 0
    return run_cell


def _eval_row(rnd: int, accuracy: float) -> dict:
    return {"round": rnd, "kind": "tier", "level": 1.0, "metric": "accuracy", "value": accuracy}


def test_cell_ids_are_readable_stable_and_unique(tmp_path: Path) -> None:
    cells = build_cells(SMALL, [0, 1], tmp_path)
    ids = [c.cell_id for c in cells]
    assert ids[:3] == ["device-mix=1.0@1.0__non-iid=iid__seed=0",
                       "device-mix=1.0@1.0__non-iid=iid__seed=1",
                       "device-mix=1.0@1.0__non-iid=dir-0.1__seed=0"]
    assert len(set(ids)) == len(ids) == 8
    assert ids == [c.cell_id for c in build_cells(SMALL, [0, 1], tmp_path)]
    assert cell_id({"device-mix": "0.2:0.5,1.0:0.5"}, 3) == "device-mix=0.2@0.5+1.0@0.5__seed=3"


def test_slug_is_filesystem_safe_and_injective() -> None:
    texts = ["a:b", "a@b", "a/b", "a b", "a\\b", "", "..", "x,y", "x+y"]
    slugs = [slug(t) for t in texts]
    assert len(set(slugs)) == len(texts)
    assert all("/" not in s and " " not in s and "\\" not in s for s in slugs)
    assert slug("a:b") == "a@b" and slug("x,y") == "x+y" and slug("a@b").startswith("a-b~")


def test_cells_carry_the_run_config(tmp_path: Path) -> None:
    cell = build_cells(SMALL, [7], tmp_path)[2]
    assert cell.axes == {"device-mix": "0.2:0.5,1.0:0.5", "non-iid": "iid"}
    assert cell.run_config == {"num-rounds": 2, "clients-per-round": 2,
                               "device-mix": "0.2:0.5,1.0:0.5",
                               "partitioner": "iid", "seed": 7,
                               "results-dir": str(tmp_path.resolve()), "run-name": cell.cell_id}
    assert (cell.supernodes, cell.num_rounds, cell.seed) == (4, 2, 7)


def test_unknown_axis_value_fails_at_start(tmp_path: Path) -> None:
    bad = Scenario("bad", "", axes=(axis("strategy", ("rankwise", "no-such-strategy")),))
    with pytest.raises(ValueError, match="'strategy' has bad value 'no-such-strategy'"):
        build_cells(bad, [0], tmp_path)
    with pytest.raises(ValueError, match="unknown run-config key"):
        build_cells(Scenario("bad", "", overrides={"nope": 1}), [0], tmp_path)
    with pytest.raises(ValueError, match="'clients-per-round' is 10 but only 4 supernodes"):
        build_cells(Scenario("bad", "", supernodes=4), [0], tmp_path)
    with pytest.raises(ValueError, match="'supernodes' has bad value 0"):
        build_cells(Scenario("bad", "", axes=(axis("supernodes", (0,)),)), [0], tmp_path)


def test_every_builtin_scenario_builds_or_names_the_bad_value(tmp_path: Path) -> None:
    for scenario in SCENARIOS.values():
        try:
            assert build_cells(scenario, [0], tmp_path)
        except ValueError as exc:  # baselines not registered in config.STRATEGIES yet
            assert scenario.name == "strategies" and "'strategy' has bad value" in str(exc)
    with pytest.raises(ValueError, match="scenario 'nope' is unknown"):
        get_scenario("nope")


def test_set_pins_axes_and_adds_overrides(tmp_path: Path) -> None:
    pinned = apply_sets(SMALL, {"device-mix": "1.0:1.0", "non-iid": "dir-0.1", "lr": 0.1,
                                "supernodes": 8})
    cells = build_cells(pinned, [0], tmp_path)
    assert [c.cell_id for c in cells] == ["device-mix=1.0@1.0__non-iid=dir-0.1__seed=0"]
    assert cells[0].run_config["lr"] == 0.1 and cells[0].supernodes == 8
    new_value = build_cells(apply_sets(SMALL, {"device-mix": "0.5:1.0"}), [0], tmp_path)
    assert new_value[0].cell_id.startswith("device-mix=0.5@1.0__")
    with pytest.raises(ValueError, match="'alpha' is set by axis 'non-iid'"):
        apply_sets(SMALL, {"alpha": 0.3})
    with pytest.raises(ValueError, match="axis 'non-iid' has no such level"):
        apply_sets(SMALL, {"non-iid": "dir-9"})
    with pytest.raises(ValueError, match="reserved"):
        apply_sets(SMALL, {"seed": 3})


def test_skips_finished_cells_and_retries_only_failed_ones(tmp_path: Path) -> None:
    cells = build_cells(apply_sets(SMALL, {"non-iid": "iid"}), [0, 1], tmp_path)
    ids = [c.cell_id for c in cells]
    calls: list = []
    table = run_sweep(cells, fake_run_cell(calls, fail=frozenset({ids[1]}),
                                           crash=frozenset({ids[2]})), tmp_path)
    assert calls == [(i, False) for i in ids]  # the sweep went on after both failures
    assert list(table["status"]) == ["done", "failed", "failed", "done"]
    saved = pd.read_csv(tmp_path / "cells.csv")
    assert list(saved["error"].fillna("")) == ["", "exit code 1", "RuntimeError: boom", ""]
    assert list(saved["rounds"].fillna(-1)) == [2, 1, -1, 2]

    calls.clear()
    table = run_sweep(cells, fake_run_cell(calls), tmp_path)
    assert calls == [(ids[1], True), (ids[2], False)]  # partial resumed, crashed one restarted
    assert (table["status"] == "done").all()
    assert list(pd.read_csv(tmp_path / "cells.csv")["seconds"].notna()) == [True] * 4
    resumed = RunStore(tmp_path / ids[1]).read("evaluation")
    assert list(resumed["round"]) == [0, 1, 2]

    calls.clear()
    run_sweep(cells, fake_run_cell(calls), tmp_path)
    assert calls == []


def test_exit_zero_without_final_checkpoint_is_a_failure(tmp_path: Path) -> None:
    cells = build_cells(apply_sets(SMALL, {"non-iid": "iid", "device-mix": "1.0:1.0"}), [0],
                        tmp_path)
    table = run_sweep(cells, lambda cell, resume: 0, tmp_path)
    assert [p.name for p in tmp_path.iterdir() if p.is_dir()] == [cells[0].cell_id]
    assert table.loc[0, "status"] == "failed"
    assert "exit code 0 but checkpoint round is None of 2" in table.loc[0, "error"]


def test_new_cell_drops_tables_left_without_checkpoint(tmp_path: Path) -> None:
    cells = build_cells(apply_sets(SMALL, {"non-iid": "iid", "device-mix": "1.0:1.0"}), [0],
                        tmp_path)
    stale = RunStore(tmp_path / cells[0].cell_id)
    stale.append("evaluation", [_eval_row(0, 0.5)])
    run_sweep(cells, fake_run_cell([]), tmp_path)
    assert list(stale.read("evaluation")["round"]) == [0, 1, 2]
    cell_json = json.loads((stale.root / "cell.json").read_text())
    assert cell_json["supernodes"] == 4 and cell_json["axes"]["non-iid"] == "iid"


def test_gather_adds_axis_and_seed_columns(tmp_path: Path) -> None:
    cells = build_cells(SMALL, [0, 1], tmp_path)
    run_sweep(cells, fake_run_cell([], fail=frozenset({cells[0].cell_id})), tmp_path)
    evaluation = pd.read_csv(tmp_path / "evaluation.csv")
    assert list(evaluation.columns[:4]) == ["cell-id", "device-mix", "non-iid", "seed"]
    assert set(evaluation["cell-id"]) == {c.cell_id for c in cells[1:]}  # failed cell left out
    row = evaluation[(evaluation["cell-id"] == cells[3].cell_id) & (evaluation["round"] == 2)]
    assert row[["device-mix", "non-iid", "seed", "value"]].values.tolist() == [
        ["1.0:1.0", "dir-0.1", 1, pytest.approx(0.5)]]
    clients = gather(cells, tmp_path)["clients"]
    assert len(clients) == 7 * 2 and set(clients["seed"]) == {0, 1}
    assert (tmp_path / "clients.csv").exists() and (tmp_path / "rounds.csv").exists()


def test_cells_run_with_other_settings_are_not_reused(tmp_path: Path) -> None:
    scenario = apply_sets(SMALL, {"non-iid": "iid", "device-mix": "1.0:1.0"})
    run_sweep(build_cells(scenario, [0], tmp_path), fake_run_cell([]), tmp_path)
    longer = build_cells(apply_sets(scenario, {"num-rounds": 3, "eval-every": 2}), [0], tmp_path)
    calls: list = []
    run_sweep(longer, fake_run_cell(calls), tmp_path)  # more rounds: resumed, not a conflict
    assert calls == [(longer[0].cell_id, True)]
    other = build_cells(apply_sets(scenario, {"lr": 0.5}), [0], tmp_path)
    with pytest.raises(ValueError, match=r"other settings .*'lr': \(0.05, 0.5\)"):
        run_sweep(other, fake_run_cell([]), tmp_path)


def test_until_converged_runs_on_in_chunks_to_convergence_or_the_cap(tmp_path: Path) -> None:
    scenario = apply_sets(SMALL, {"non-iid": "iid", "device-mix": "1.0:1.0", "num-rounds": 10})
    cells = build_cells(scenario, [0, 1], tmp_path)
    flat, rising = cells[0].cell_id, cells[1].cell_id
    curves = {flat: lambda r: min(0.8, 0.1 * r), rising: lambda r: 0.001 * r}
    calls: list = []

    def run_cell(cell: Cell, resume: bool) -> int:
        return fake_run_cell(calls, curve=curves[cell.cell_id])(cell, resume)

    table = run_sweep(cells, run_cell, tmp_path, Until(cap=30, chunk=10)).set_index("cell-id")
    # flat: at 10 rounds its tail (rounds 9, 10) is too short to judge; at 20 it is flat
    # (0.8 from round 8 on). rising: 0.001 per round stays over the threshold up to the cap.
    assert calls == [(flat, False), (flat, True), (rising, False), (rising, True), (rising, True)]
    assert RunStore(tmp_path / flat).checkpoint_round() == 20
    assert RunStore(tmp_path / rising).checkpoint_round() == 30
    assert table.loc[flat, "converged"] and not table.loc[rising, "converged"]
    assert table.loc[rising, "tail-slope"] == pytest.approx(0.001)
    assert (table["status"] == "done").all()
    calls.clear()
    run_sweep(cells, run_cell, tmp_path, Until(cap=30, chunk=10))
    assert calls == []  # finished cells stay finished
    run_sweep(cells, run_cell, tmp_path, Until(cap=35, chunk=10))  # a higher cap: on to 35
    assert calls == [(rising, True)] and RunStore(tmp_path / rising).checkpoint_round() == 35
    with pytest.raises(ValueError, match="chunk=0"):
        Until(cap=30, chunk=0)
