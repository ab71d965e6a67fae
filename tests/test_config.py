"""The run config: defaults, the pyproject mirror, and clear messages for every bad value."""

from __future__ import annotations

import dataclasses
import tomllib
from pathlib import Path

import pytest

from fl_maestro.config import KEYS, RunConfig, defaults, parse_run_config

PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"


def _pyproject_config() -> dict:
    with PYPROJECT.open("rb") as f:
        return tomllib.load(f)["tool"]["flwr"]["app"]["config"]


def test_defaults_parse() -> None:
    cfg = parse_run_config({})
    assert isinstance(cfg, RunConfig)
    assert cfg == parse_run_config(defaults())
    assert cfg.seed == 0 and cfg.resume is False and cfg.strategy == "rankwise"
    assert cfg.fractions == [0.1, 0.25, 0.5, 0.75, 1.0]


def test_keys_are_read_from_the_run_config_fields() -> None:
    """RunConfig is the one declaration: KEYS follow its fields, and its defaults are valid."""
    fields = dataclasses.fields(RunConfig)
    assert list(KEYS) == [f.name.replace("_", "-") for f in fields]
    assert [KEYS[f.name.replace("_", "-")].default for f in fields] == [f.default for f in fields]
    assert RunConfig() == parse_run_config({})


def test_pyproject_mirrors_keys() -> None:
    table = _pyproject_config()
    assert list(table) == list(KEYS), "same keys in the same order"
    for name, key in KEYS.items():
        value = table[name]
        assert value == key.default, f"{name}: pyproject {value!r} != default {key.default!r}"
        assert type(value) is type(key.default), f"{name}: {type(value)} vs {type(key.default)}"


def test_pyproject_table_parses() -> None:
    assert parse_run_config(_pyproject_config()) == parse_run_config({})


def test_unknown_key_is_named() -> None:
    with pytest.raises(ValueError, match="num-round"):
        parse_run_config({"num-round": 3})
    with pytest.raises(ValueError, match="learning_rate"):
        parse_run_config({"seed": 1, "learning_rate": 0.1})


BAD_VALUES = [
    ("seed", -1),
    ("seed", 1.5),
    ("seed", True),
    ("num-rounds", 0),
    ("clients-per-round", 0),
    ("lr", 0),
    ("lr", -0.1),
    ("lr", "x"),
    ("lr", float("inf")),
    ("lr", float("nan")),
    ("alpha", 0),
    ("momentum", 1.5),
    ("weight-decay", -1e-3),
    ("hgl-lambda", -1.0),
    ("dataset", "mnist"),
    ("model", "vgg"),
    ("strategy", "fedprox"),
    ("sampler", "foo"),
    ("rank-allocation", "greedy"),
    ("cost", "flops"),
    ("partitioner", "shards"),
    ("device-mix", "0.2:0.5"),
    ("device-mix", "abc"),
    ("device-mix", "0.2:0.5,0.2:0.5"),
    ("device-mix", "1.5:1.0"),
    ("device-mix", ""),
    ("eval-fractions", "0,1"),
    ("eval-fractions", "0.5,1.2"),
    ("eval-fractions", "a,b"),
    ("eval-fractions", ""),
    ("val-fraction", 1.0),
    ("val-fraction", -0.1),
    ("resume", "yes"),
    ("resume", 1),
    ("distill", 1),
    ("init", "svd:"),
    ("init", "pretrained"),
    ("run-name", "a/b"),
    ("run-name", ".."),
    ("results-dir", ""),
    ("eval-every", 0),
    ("eval-samples", -1),
    ("batch-size", 0),
    ("local-epochs", 2.0),
]


@pytest.mark.parametrize(("key", "value"), BAD_VALUES, ids=[f"{k}={v!r}" for k, v in BAD_VALUES])
def test_bad_value_message(key: str, value: object) -> None:
    with pytest.raises(ValueError) as info:
        parse_run_config({key: value})
    message = str(info.value)
    assert repr(key) in message
    shown = float(value) if isinstance(KEYS[key].default, float) and type(value) is int else value
    assert repr(shown) in message, message
    assert KEYS[key].allowed in message


def test_allowed_values_listed_for_choices() -> None:
    with pytest.raises(ValueError) as info:
        parse_run_config({"model": "vgg"})
    assert all(name in str(info.value) for name in ("mlp", "cnn", "resnet18"))
    with pytest.raises(ValueError) as info:
        parse_run_config({"sampler": "foo"})
    assert all(name in str(info.value) for name in ("single-layer", "uniform", "independent"))


def test_int_accepted_for_float_keys() -> None:
    cfg = parse_run_config({"lr": 1, "alpha": 2, "momentum": 0, "hgl-lambda": 0})
    assert cfg.lr == 1.0 and type(cfg.lr) is float
    assert cfg.alpha == 2.0 and type(cfg.alpha) is float
    assert type(cfg.momentum) is float and type(cfg.hgl_lambda) is float


def test_good_overrides() -> None:
    cfg = parse_run_config({"seed": 7, "device-mix": "0.5:0.5,1.0:0.5", "eval-fractions": "1",
                            "init": "svd:dense.safetensors", "distill": True, "val-fraction": 0})
    assert cfg.seed == 7 and cfg.device_mix == "0.5:0.5,1.0:0.5"
    assert cfg.fractions == [1.0] and cfg.init == "svd:dense.safetensors" and cfg.distill
    assert cfg.val_fraction == 0.0


def test_name_derivation() -> None:
    assert parse_run_config({}).name == "fashion-mnist-cnn-rankwise-seed0"
    assert parse_run_config({"dataset": "digits", "model": "mlp", "seed": 3}).name == \
        "digits-mlp-rankwise-seed3"
    assert parse_run_config({"run-name": "mine", "seed": 3}).name == "mine"


def test_to_dict_round_trip() -> None:
    cfg = parse_run_config({"seed": 5, "lr": 1, "model": "mlp", "distill": True,
                            "run-name": "x", "eval-fractions": "0.5,1.0"})
    raw = cfg.to_dict()
    assert list(raw) == list(KEYS)
    assert parse_run_config(raw) == cfg
    assert parse_run_config(parse_run_config({}).to_dict()) == parse_run_config({})


def test_eval_fractions_given_as_a_number_is_read_as_one_fraction() -> None:
    # `--run-config eval-fractions=1.0` reaches the app as a float, not a string.
    assert parse_run_config({"eval-fractions": 1.0}).fractions == [1.0]
    assert parse_run_config({"eval-fractions": 1}).fractions == [1.0]


def test_lr_decays_exponentially_by_round() -> None:
    cfg = parse_run_config({"lr": 0.1, "lr-decay": 0.5})
    assert [cfg.lr_at(t) for t in (1, 2, 3)] == pytest.approx([0.1, 0.05, 0.025])
    assert parse_run_config({}).lr_at(50) == parse_run_config({}).lr  # default: no decay
    with pytest.raises(ValueError, match="'lr-decay' has bad value 0"):
        parse_run_config({"lr-decay": 0})
def test_device_mix_message_says_what_is_wrong() -> None:
    with pytest.raises(ValueError, match=r"'device-mix'.*shares sum to 0\.9, must sum to 1"):
        parse_run_config({"device-mix": "0.2:0.5,1.0:0.4"})
