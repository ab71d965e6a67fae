"""A round's rows and totals, counted in one place (fl_maestro.rounds.round_totals)."""

from __future__ import annotations

from fl_maestro.rounds import round_totals
from fl_maestro.world import DROPPED, MERGED, OUTCOMES
from strategies.plan import FAILED, USABLE


def _row(outcome: str, down: int, up: int = 0, macs: float = 0.0) -> dict:
    return {"outcome": outcome, "bytes-down": down, "bytes-up": up, "train-macs": macs}


def test_round_totals_by_hand() -> None:
    rows = [_row("ok", 10, 7, 100.0), _row("partial", 10, 7, 40.0), _row("straggler", 10),
            _row("dropout", 4), _row("error", 10), _row("invalid", 10, 0, 99.0),
            _row("timeout", 10), _row("diverged", 10)]
    totals = round_totals(rows)
    assert totals == {
        "clients": 2, "sent": 6, "dropped": 6, "dropped-straggler": 1, "dropped-dropout": 1,
        "dropped-error": 1, "dropped-invalid": 1, "dropped-timeout": 1, "dropped-diverged": 1,
        "bytes-down": 74.0, "bytes-up": 14.0, "train-macs": 140.0, "sampled": 8, "partial": 1}
    # rounds.csv's columns keep their order (the per-round table is read by position too)
    assert list(totals)[:3] == ["clients", "sent", "dropped"]
    assert list(totals)[-2:] == ["sampled", "partial"]


def test_the_world_names_every_reply_outcome_the_strategy_knows() -> None:
    assert set(USABLE) <= set(MERGED) and set(FAILED) <= set(DROPPED)
    assert set(OUTCOMES) == set(MERGED) | set(DROPPED) and len(OUTCOMES) == 8
