"""Tail ablation: tails reset to init or zeroed, on a small synthetic run folder (digits)."""

from __future__ import annotations

import numpy as np
import pytest

from fl_maestro.config import parse_run_config
from fl_maestro.models import build_model, model_arrays
from fl_maestro.results import RunStore
from simulations.tails import tail_ablation, with_tails


def test_with_tails_resets_or_zeroes_only_past_the_prefix() -> None:
    arrays = {"l.U": np.ones((3, 4)), "l.V": np.ones((4, 2)), "b": np.ones(3)}
    initial = {"l.U": np.full((3, 4), 5.0), "l.V": np.full((4, 2), 7.0), "b": np.zeros(3)}
    reset = with_tails(arrays, initial, {"l": 1}, ["l"], "init")
    assert (reset["l.U"][:, :1] == 1).all() and (reset["l.U"][:, 1:] == 5).all()
    assert (reset["l.V"][:1] == 1).all() and (reset["l.V"][1:] == 7).all()
    assert (reset["b"] == 1).all() and (arrays["l.U"] == 1).all()  # shared kept, input untouched
    zeroed = with_tails(arrays, initial, {"l": 3}, ["l"], "zero")
    assert (zeroed["l.U"][:, 3:] == 0).all() and (zeroed["l.U"][:, :3] == 1).all()
    with pytest.raises(ValueError, match="initial.safetensors"):
        with_tails(arrays, None, {"l": 1}, ["l"], "init")
    with pytest.raises(ValueError, match="how='x'"):
        with_tails(arrays, initial, {"l": 1}, ["l"], "x")


def test_tail_ablation_of_a_run(tmp_path) -> None:
    store = RunStore(tmp_path / "run")
    store.write_config(parse_run_config({"dataset": "digits", "seed": 0}).to_dict())
    initial = model_arrays(build_model("cnn", (1, 8, 8), 10))
    trained = {k: v + np.float32(0.05) * np.random.default_rng(1).standard_normal(v.shape)
               .astype(np.float32) for k, v in initial.items()}
    store.save_initial(initial)
    store.save_checkpoint(3, trained, {})
    table = tail_ablation(store.root, 0.25).set_index(["model", "tail of"])["accuracy"]
    assert len(table) == 6  # as trained, prefix, conv2, fc, all reset, all zeroed
    # zeroing every tail is the prefix model
    assert table[("full rank, tail zeroed", "all")] == pytest.approx(
        table[("prefix at fraction 0.25", "all")], abs=2 / 1797)
    store.save_checkpoint(4, initial, {})  # nothing trained: resetting the tails changes nothing
    same = tail_ablation(store.root, 0.25).set_index(["model", "tail of"])["accuracy"]
    assert same[("full rank, tail reset to init", "all")] == same[("full rank, as trained", "-")]
