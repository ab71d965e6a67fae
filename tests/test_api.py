"""The Python API: docs/python-api.md's example runs as written, and its numbers are the runs'."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from fl_maestro.results import RunStore
from simulations.api import Results, load, run_experiment

DOC = Path(__file__).resolve().parents[1] / "docs" / "python-api.md"


def _example() -> str:
    blocks = re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.S)
    assert len(blocks) == 1, "docs/python-api.md should hold one python example"
    return blocks[0]


def test_the_documented_example_runs_and_returns_the_runs_numbers(tmp_path, monkeypatch,
                                                                   capsys) -> None:
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(compile(_example(), str(DOC), "exec"), scope)  # noqa: S102 - our own documentation
    result, again, page = scope["result"], scope["again"], scope["page"]
    assert isinstance(result, Results) and len(result.runs) == 2
    assert Path(page).exists() and "<table class='summary'>" in Path(page).read_text()
    # the summary's mean at each tier is the mean over seeds of each run's last-k accuracy,
    # computed here from the runs' own evaluation.csv: the evaluated rounds within the run's
    # final fifth (3 rounds: those after round 2.4, so round 3 alone)
    expected = {}
    for seed in (0, 1):
        ev = RunStore(tmp_path / "results" / f"digits-demo-seed{seed}").read("evaluation")
        acc = ev[(ev["kind"] == "tier") & (ev["metric"] == "accuracy") & (ev["round"] > 2.4)]
        for level, rows in acc.groupby("level"):
            expected.setdefault(level, []).append(rows["value"].mean())
    summary = result.summary.set_index("level")
    assert sorted(summary.index) == [0.25, 1.0]
    for level, values in expected.items():
        assert summary.loc[level, "mean"] == pytest.approx(np.mean(values))
        assert summary.loc[level, "n"] == 2
        half = 12.7062047 * np.std(values, ddof=1) / np.sqrt(2)  # t(0.975, 1 dof)
        assert summary.loc[level, "ci-half"] == pytest.approx(half)
    pd.testing.assert_frame_equal(again.summary, result.summary)  # load == what run returned
    clients = result.table("clients")
    assert set(clients["seed"]) == {0, 1} and {"run", "group", "budget"} <= set(clients)
    assert "mean" in capsys.readouterr().out  # the example prints its tables


def test_bad_inputs_are_refused_with_what_is_allowed(tmp_path) -> None:
    with pytest.raises(ValueError, match="nodes=0"):
        run_experiment({"dataset": "digits"}, nodes=0, results_dir=tmp_path)
    with pytest.raises(ValueError, match="strategy"):
        run_experiment({"strategy": "nope"}, nodes=2, results_dir=tmp_path)
    assert not any(tmp_path.iterdir())  # refused before anything ran
    with pytest.raises(ValueError, match="at least one"):
        load()
