"""Report: builds every plot and report.html from a small synthetic sweep folder (no Flower)."""

from __future__ import annotations

import json
from html.parser import HTMLParser
from pathlib import Path

import matplotlib.image
import numpy as np
import pandas as pd
import pytest

from fl_maestro.results import RunStore
from simulations.page import percent, summary_html, summary_markdown
from simulations.plots import data_limits, plot_tier_accuracy
from simulations.report import build_report, find_runs, group_runs, load_run, main, time_at_rounds
from simulations.summary import accuracy_at_time, summary_frame

METRICS = ("accuracy", "loss", "macs", "params", "relative-macs", "dense-relative-macs",
           "eval-examples")
FINAL_TIER_ACCURACY = {("mix-a", 0): {0.5: 0.75, 1.0: 0.8125},
                       ("mix-a", 1): {0.5: 0.7, 1.0: 0.8375},  # mean over seeds: 0.725, 0.825
                       ("mix-b", 0): {1.0: 0.9125}}
MIXES = {"mix-a": "0.5:0.5,1.0:0.5", "mix-b": "1.0:1.0"}
PROFILES = "default:macs-per-second=1e9,uplink-bytes-per-second=1e5"


def _evaluation(tiers: dict[float, float], rounds: int = 2) -> list[dict]:
    rows = []
    for rnd in range(rounds + 1):
        scale = (rnd + 1) / (rounds + 1)  # accuracy grows to the final values
        levels = [("fraction", f, tiers[max(tiers)] * f) for f in (0.25, 0.5, 1.0)]
        levels += [("tier", b, a) for b, a in tiers.items()]
        for kind, level, accuracy in levels:
            values = {"accuracy": accuracy * scale, "loss": 2.0 - accuracy, "macs": 1e6 * level,
                      "params": 1e4 * level, "relative-macs": level,
                      "dense-relative-macs": 1.2 * level, "eval-examples": 100}
            rows += [{"round": rnd, "kind": kind, "level": level, "metric": m, "value": values[m]}
                     for m in METRICS]
    return rows


def _write_run(root: Path, mix: str, seed: int, tiers: dict[float, float]) -> Path:
    name = f"device-mix={mix}__seed={seed}"
    store = RunStore(root / name)
    store.write_config({"run-name": name, "results-dir": str(root), "seed": seed,
                        "device-mix": MIXES[mix], "dataset": "digits", "num-rounds": 2,
                        "device-profiles": PROFILES, "deadline-policy": "drop",
                        "round-deadline": 2.5})
    store.append("evaluation", _evaluation(tiers))
    budgets = sorted(tiers)
    # partition 2 is a straggler of round 2 that did 1 of its 2 steps by the deadline
    store.append("clients", [{"round": r, "partition-id": i, "budget": budgets[i % len(budgets)],
                              "outcome": "straggler" if (r, i) == (2, 2) else "ok",
                              "num-examples": 50, "train-loss": 1.0, "train-accuracy": 0.5,
                              "train-seconds": 0.1, "train-macs": 1e9 * budgets[i % len(budgets)],
                              "steps": 1 if (r, i) == (2, 2) else 2, "planned-steps": 2,
                              "bytes-down": 1e5 * budgets[i % len(budgets)],
                              "bytes-up": 1e5 * budgets[i % len(budgets)]}
                             for r in (1, 2) for i in range(3)])
    store.append("rounds", [{"round": r, "clients": 3, "dropped": r - 1,
                             "dropped-straggler": r - 1, "sim-seconds": 2.5, "sim-time": 2.5 * r}
                            for r in (1, 2)])
    store.append("components", [
        {"round": r, "layer": "fc", "component": j, "client-steps": (4 - j) * r,
         "clients": 3 - (j > 1) if r else 0, "moved": 0.1 * r * (4 - j), "norm": 1.0,
         "importance": 4.0 - j, "norm-init": 1.0, "importance-init": 2.0}
        for r in (0, 1, 2) for j in range(4)])
    rng = np.random.default_rng(seed)
    store.save_checkpoint(2, {"fc.U": rng.normal(size=(6, 4)).astype(np.float32),
                              "fc.V": rng.normal(size=(4, 5)).astype(np.float32),
                              "fc.bias": np.zeros(6, np.float32)}, {})
    (store.root / "cell.json").write_text(json.dumps({"supernodes": 4}))
    return store.root


@pytest.fixture
def sweep(tmp_path: Path) -> Path:
    root = tmp_path / "sweep"
    for (mix, seed), tiers in FINAL_TIER_ACCURACY.items():
        _write_run(root, mix, seed, tiers)
    pd.DataFrame({"cell-id": ["x"]}).to_csv(root / "cells.csv", index=False)  # ignored
    return root


def test_runs_are_grouped_by_the_keys_that_vary(sweep: Path) -> None:
    runs = [load_run(p) for p in find_runs([sweep])]
    assert len(runs) == 3
    assert group_runs(runs) == "device-mix"  # seed, run-name and results-dir never group
    assert [r.group for r in runs] == ["0.5:0.5,1.0:0.5", "0.5:0.5,1.0:0.5", "1.0:1.0"]
    with pytest.raises(ValueError, match="neither a run folder"):
        find_runs([sweep.parent / "nothing"])
    unfinished = _write_run(sweep, "mix-b", 5, {1.0: 0.5})
    RunStore(unfinished).save_checkpoint(1, {"w": np.zeros(1)}, {})  # round 1 of 2
    assert unfinished not in find_runs([sweep]) and find_runs([unfinished]) == [unfinished]


T975_1 = 12.7062047  # two-sided 95% t quantile, 1 degree of freedom (printed tables)


def test_report_writes_plots_and_html_with_the_numbers(sweep: Path, tmp_path: Path) -> None:
    out = tmp_path / "report"
    page = build_report([sweep], out).read_text()
    for name in ("accuracy-vs-fraction", "tier-accuracy", "pareto", "accuracy-over-time",
                 "communication", "importance", "coverage", "movement", "full-budget-clients"):
        png, pdf = out / f"{name}.png", out / f"{name}.pdf"
        assert png.stat().st_size > 20_000 and pdf.stat().st_size > 5_000, name
        pixels = matplotlib.image.imread(png)
        assert pixels.shape[0] > 300 and pixels[..., :3].std() > 0.05, name  # not blank
    assert page.count("data:image/png;base64,") == 9
    tiers = _table(page, "Final accuracy per budget tier").set_index(["group", "budget"])
    # accuracy grows as (r + 1) / 3 over rounds 0..2: the mean of the last 5 evaluated rounds
    # of the final fifth of the run (rounds > 1.6: round 2 only) is the last round's
    mix_a = tiers.loc[("0.5:0.5,1.0:0.5", 0.5)]
    # the page shows accuracy in percent (2 decimals); the CSV keeps fractions
    assert mix_a["last round"] == pytest.approx(72.5) and mix_a["n"] == 2
    assert mix_a["mean of last 5"] == pytest.approx(72.5, abs=0.01)
    # seeds 0.75 and 0.70: s = 0.0354, s / sqrt(2) = 0.025
    assert mix_a["last round ±95%"] == pytest.approx(T975_1 * 2.5, abs=0.01)
    assert tiers.loc[("0.5:0.5,1.0:0.5", 1.0), "last round"] == pytest.approx(82.5)
    assert tiers.loc[("1.0:1.0", 1.0), "last round"] == pytest.approx(91.25)
    csv = pd.read_csv(out / "final-tier.csv").set_index(["group", "budget"])
    assert csv.loc[("0.5:0.5,1.0:0.5", 0.5), "last round"] == pytest.approx(0.725)
    assert np.isnan(tiers.loc[("1.0:1.0", 1.0), "last round ±95%"])  # one seed: no interval
    assert tiers["converged"].tolist() == ["0/2", "0/2", "0/1"]  # 3 rounds: not judged
    assert (out / "final-tier.csv").exists() and (out / "coverage.csv").exists()
    runs = _table(page, "Runs")
    assert runs["rounds"].tolist() == [2, 2, 2]
    assert runs["points in tail"].tolist() == [1, 1, 1]


def test_report_pairs_differences_and_marks_what_is_not_separated(sweep: Path,
                                                                   tmp_path: Path) -> None:
    page = build_report([sweep], tmp_path / "report", last_k=1).read_text()
    tiers = _table(page, "Each tier minus").set_index("group")
    # mix-a, tier 1.0 minus 0.5 on the same run: 0.0625 (seed 0), 0.1375 (seed 1)
    row = tiers.loc["0.5:0.5,1.0:0.5"]
    assert row["difference"] == pytest.approx(10) and row["pairs"] == 2
    assert row["95% CI low"] == pytest.approx(10 - T975_1 * 3.75, abs=0.01)
    assert "not separated" in page
    groups = _table(page, "Each group minus 0.5:0.5,1.0:0.5").set_index("group")
    # mix-b has seed 0 only: 0.9125 - 0.8125 at tier 1.0, one pair, no interval
    assert groups.loc["1.0:1.0", "difference"] == pytest.approx(10)
    assert groups.loc["1.0:1.0", "pairs"] == 1
    coverage = _table(page, "Coverage per layer").set_index("group")
    # fc: client-steps (4 - j) * r over rounds 1 and 2: first 12, last 3
    assert coverage.loc["1.0:1.0", "client-steps first"] == 12
    assert coverage.loc["1.0:1.0", "client-steps last"] == 3
    assert coverage.loc["1.0:1.0", "moved last"] == pytest.approx(0.2)


class _Cells(HTMLParser):
    """Rows of <th>/<td> text of an HTML table (pandas.read_html needs lxml, not installed)."""

    def __init__(self) -> None:
        super().__init__()
        self.rows: list[list[str]] = []
        self.cell: list[str] | None = None

    def handle_starttag(self, tag: str, attrs) -> None:
        if tag == "tr":
            self.rows.append([])
        elif tag in ("td", "th"):
            self.cell = []

    def handle_endtag(self, tag: str) -> None:
        if tag in ("td", "th") and self.cell is not None:
            self.rows[-1].append("".join(self.cell).strip())
            self.cell = None

    def handle_data(self, data: str) -> None:
        if self.cell is not None:
            self.cell.append(data)


def _table(page: str, caption: str) -> pd.DataFrame:
    """The first table after the folded heading that starts with ``caption``, numbers parsed."""
    start = page.index(f"<summary>{caption}")
    parser = _Cells()
    parser.feed(page[start:page.index("</table>", start)])
    frame = pd.DataFrame(parser.rows[1:], columns=parser.rows[0])
    numbers = {c: pd.to_numeric(frame[c], errors="coerce") for c in frame}
    return frame.assign(**{c: v for c, v in numbers.items()
                           if c not in ("group", "run") and v.notna().any()})


def test_simulated_time_outcomes_profiles_and_cli(sweep: Path, tmp_path: Path) -> None:
    assert main([str(sweep), "--out", str(tmp_path / "cli")]) == 0
    page = (tmp_path / "cli" / "report.html").read_text()
    runs = _table(page, "Runs")
    assert runs["simulated seconds"].tolist() == pytest.approx([5, 5, 5])  # the runs' own clock
    assert runs["dropped-straggler"].tolist() == [1, 1, 1]
    outcomes = _table(page, "What became of the sampled clients").set_index(["group", "budget"])
    # mix-a: partition 2 is tier 0.5 (of 0.5, 1.0): 4 rows of tier 0.5 over 2 seeds, 2 stragglers
    row = outcomes.loc[("0.5:0.5,1.0:0.5", 0.5)]
    assert (row["sampled"], row["straggler"], row["ok"]) == (8, 0.25, 0.75)
    assert row["steps done / planned"] == pytest.approx(14 / 16)
    profiles = _table(page, "Device profiles")
    assert profiles["GMAC/s"].tolist() == [1, 1]
    assert profiles["uplink Mbit/s"].tolist() == [0.8, 0.8]
    assert "drop at 2.5 s" in page


def test_time_at_rounds_reads_the_runs_clock() -> None:
    rounds = pd.DataFrame({"round": [1, 2, 3], "sim-time": [2.0, 5.0, 9.0]})
    assert time_at_rounds(rounds, [0, 1, 3, 4]).tolist() == [0, 2, 9, 9]
    assert np.isnan(time_at_rounds(pd.DataFrame({"round": [1]}), [1])).all()  # an older run


def test_first_screen_is_the_summary_in_percent_with_paired_differences(sweep: Path,
                                                                         tmp_path: Path) -> None:
    page = build_report([sweep], tmp_path / "report", last_k=1).read_text()
    start = page.index("<table class='summary'>")
    # the answer comes first: summary table, then the first plots, then the folded details
    assert start < page.index("<img") < page.index("<details>")
    assert "<details>" not in page[:start]
    parser = _Cells()
    parser.feed(page[start:page.index("</table>", start)])
    head, *rows = parser.rows
    assert head == ["group", "n", "budget 0.5", "budget 1", "converged"]
    rows = {r[0]: r[1:] for r in rows}
    # mix-a tier 0.5: seeds 0.75, 0.70 -> 72.5 +- t(1) * 2.5 points; tier 1.0: 0.8125, 0.8375
    assert rows["0.5:0.5,1.0:0.5"] == ["2", "72.5 ± 31.8", "82.5 ± 15.9", "0/2"]
    # mix-b (seed 0 only) minus mix-a's seed 0 at tier 1.0: one pair, +10 points, no interval
    assert rows["1.0:1.0"] == ["1", "-", "91.2Δ +10.0", "0/1"]
    assert "separated (its 95% interval excludes 0)" in page
    summary = pd.read_csv(tmp_path / "report" / "summary.csv").set_index(["group", "level"])
    assert summary.loc[("1.0:1.0", 1.0), "difference"] == pytest.approx(0.1)
    assert not summary.loc[("1.0:1.0", 1.0), "separated"]  # one pair: no interval, no verdict


def test_a_separated_difference_is_marked_bold() -> None:
    finals = pd.DataFrame({"run": ["a0", "a1", "a2", "b0", "b1", "b2"],
                           "group": ["a"] * 3 + ["b"] * 3, "seed": [0, 1, 2] * 2,
                           "kind": "tier", "level": 1.0,
                           "accuracy": [0.80, 0.81, 0.82, 0.85, 0.87, 0.86]})
    converged = pd.DataFrame({"run": finals["run"], "converged": [True] * 5 + [False]})
    summary = summary_frame(finals, converged, "a")
    row = summary.set_index("group").loc["b"]
    # differences 0.05, 0.06, 0.04: mean 0.05, s = 0.01, t(2) = 4.3027 -> half 0.0248
    assert row["difference"] == pytest.approx(0.05)
    assert row["difference ±95%"] == pytest.approx(4.302653 * 0.01 / np.sqrt(3), abs=1e-6)
    assert row["separated"] and row["converged"] == "2/3"
    html = summary_html(summary, "a")
    assert "<span class='diff sep' title='separated'>Δ +5.0 ± 2.5 *</span>" in html
    assert "81.0 ± 2.5" in html  # group a: 0.80..0.82, same spread
    markdown = summary_markdown(summary, "a").splitlines()
    assert markdown[:4] == ["| group | n | budget 1 | converged |", "| --- | --- | --- | --- |",
                            "| a | 3 | 81.0 ± 2.5 | 3/3 |",
                            "| b | 3 | 86.0 ± 2.5; Δ +5.0 ± 2.5 * | 2/3 |"]


def test_accuracy_axes_are_scaled_to_the_data() -> None:
    stats = pd.DataFrame({"mean": [0.80, 0.82], "ci-half": [0.01, np.nan]})
    # data span 0.79..0.82 padded by 15% of 0.03 on each side
    assert data_limits(stats) == pytest.approx((0.7855, 0.8245))
    assert data_limits(pd.DataFrame({"mean": [0.5], "ci-half": [np.nan]})) == \
        pytest.approx((0.487, 0.513))  # at least 2 points wide
    finals = pd.DataFrame({"run": ["a0", "b0"], "group": ["a", "b"], "seed": 0, "kind": "tier",
                           "level": 1.0, "accuracy": [0.80, 0.82]})
    fig = plot_tier_accuracy(finals, "method", {"a": "red", "b": "blue"})
    assert fig.axes[0].get_ylim() == pytest.approx((0.797, 0.823))  # not 0..1
    assert percent(pd.DataFrame({"last round": [0.5], "moved last": [0.2], "n": [2]})) \
        .iloc[0].tolist() == [50, 0.2, 2]


def test_a_single_runs_report_starts_with_its_tiers(sweep: Path, tmp_path: Path) -> None:
    run = sweep / "device-mix=mix-a__seed=1"
    page = build_report([run], tmp_path / "one", last_k=1).read_text()
    start = page.index("<table class='summary'>")
    assert start < page.index("<img") < page.index("<details>")
    parser = _Cells()
    parser.feed(page[start:page.index("</table>", start)])
    # seed 1 of mix-a: tier 0.5 at 0.70, tier 1.0 at 0.8375; one run: no interval, no Δ
    assert parser.rows == [["group", "n", "budget 0.5", "budget 1", "converged"],
                           ["device-mix=mix-a__seed=1", "1", "70.0", "83.8", "0/1"]]
    assert "Δ" not in page[start:page.index("<img")]


def test_a_group_without_a_tier_draws_no_point_there() -> None:
    """Groups with different device mixes: the missing tier is absent, not a 'nan%' marker."""
    from simulations.plots import plot_tier_accuracy
    rows = [{"run": f"{g}-{s}", "kind": "tier", "level": level, "group": g, "seed": s,
             "accuracy": acc + 0.01 * s, "last": acc}
            for g, levels in {"a": {0.5: 0.80, 1.0: 0.82}, "b": {1.0: 0.81}}.items()
            for level, acc in levels.items() for s in (0, 1)]
    fig = plot_tier_accuracy(pd.DataFrame(rows), "", {"a": "C0", "b": "C1"})
    texts = [t.get_text() for t in fig.axes[0].texts]
    assert not any("nan" in t for t in texts), texts
    drawn = sum(len(line.get_xdata()) for line in fig.axes[0].lines if line.get_marker() == "o")
    assert drawn == 3  # a at two tiers, b at one


def test_the_report_names_each_groups_method_from_the_registry(tmp_path) -> None:
    """The 'Method' section lists each group's strategy with the registry's family, summary and
    paper and the runs' optimiser settings."""
    from fl_maestro.methods import get_method
    from simulations.report import methods_table
    from simulations.runs import Run
    runs = [Run(f"r{i}", tmp_path, {"strategy": s, "lr": lr, "momentum": 0.9}, i, {}, group=s)
            for i, (s, lr) in enumerate([("fjord", 0.1), ("fjord", 0.1), ("fedrolex", 0.2)])]
    table = methods_table(runs).set_index("group")
    assert table.loc["fjord", "runs"] == 2 and table.loc["fjord", "lr"] == "0.1"
    assert table.loc["fedrolex", "summary"] == get_method("fedrolex").summary
    assert table.loc["fedrolex", "paper"].startswith("FedRolex (Alam et al.")
    assert table.loc["fjord", "family"] == "width"


def test_accuracy_at_equal_simulated_time_by_hand() -> None:
    """Clocks a0: rounds 5, 10 at 50, 100 s (accuracy 0.5, 0.7); a1: at 60, 120 s (0.4, 0.6);
    b0: round 10 at 80 s (0.9). The shortest run's clock is 80 s: a0 and a1 give their round-5
    values (mean 0.45, n 2), b0 0.9. At 100 s a0 gives its round 10 (0.7) and a1 still its round
    5 (0.4). Seconds per round: a (10 + 12) / 2 = 11, b 8."""
    rows = [("b", "b0", 0, 10, 80, 0.9),  # b first: the table keeps the runs' group order
            ("a", "a0", 0, 5, 50, 0.5), ("a", "a0", 0, 10, 100, 0.7),
            ("a", "a1", 1, 5, 60, 0.4), ("a", "a1", 1, 10, 120, 0.6)]
    wide = pd.DataFrame(rows, columns=["group", "run", "seed", "round", "sim-seconds", "accuracy"]
                        ).assign(kind="tier", level=1.0)
    table = accuracy_at_time(wide).set_index("group")
    assert table.attrs["at"] == 80 and table.index.tolist() == ["b", "a"]
    assert table.loc["a", "accuracy at time"] == pytest.approx(0.45)
    assert table.loc["a", "n"] == 2 and table.loc["b", "n"] == 1
    assert table.loc["b", "accuracy at time"] == pytest.approx(0.9)
    assert table["simulated s per round"].to_dict() == {"a": pytest.approx(11), "b": 8}
    later = accuracy_at_time(wide, at=100).set_index("group")
    assert later.loc["a", "accuracy at time"] == pytest.approx((0.7 + 0.4) / 2)
    assert accuracy_at_time(wide.drop(columns="sim-seconds")).empty


def test_a_sweeps_unfinished_cells_are_named_on_the_first_screen(tmp_path: Path) -> None:
    from simulations.report import unfinished_cells
    pd.DataFrame({"cell-id": ["m=a__seed=0", "m=a__seed=1", "m=b__seed=0"],
                  "status": ["done", "failed", "pending"], "rounds": [40, 3, None],
                  "error": [None, "exit code 1", None]}).to_csv(tmp_path / "cells.csv",
                                                                 index=False)
    assert unfinished_cells([tmp_path]) == ["m=a__seed=1: failed, round 3 (exit code 1)",
                                            "m=b__seed=0: pending"]
    assert unfinished_cells([tmp_path / "elsewhere"]) == []


def test_eleven_groups_get_eleven_colours() -> None:
    """The comparison has 11 methods: tab10 would give the 11th the 1st's colour."""
    from types import SimpleNamespace
    from simulations.plots import group_colors
    runs = [SimpleNamespace(group=f"g{i}") for i in range(11)]
    assert len(set(group_colors(runs).values())) == 11
    assert len(set(group_colors(runs[:3]).values())) == 3
