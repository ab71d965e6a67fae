"""The run config: every key with its default, type and allowed values, validated once at start.

The fields of ``RunConfig`` are the one declaration of every key (``key(default, allowed,
check)``); ``KEYS`` and ``defaults()`` are read from them, and a test checks
``[tool.flwr.app.config]`` in ``pyproject.toml`` against them. Override any key with
``flwr run . --run-config "key=value ..."``.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from fl_maestro.budgets import ALLOCATIONS, parse_mix
from fl_maestro.data import DATASET_SHAPES, PARTITIONERS
from fl_maestro.models import COST_KINDS, MODELS, RANK_CAPS
from fl_maestro.precision import PRECISIONS
from fl_maestro.methods import MERGE_WEIGHTS, METHODS, TIER_GRID, get_method, method_keys
from fl_maestro.sampling import SAMPLER_NAMES
from fl_maestro.training import OPTIMIZERS
from fl_maestro.world import POLICIES


@dataclass(frozen=True)
class Key:
    """One run-config key: its default, its type and a check of its value."""

    default: Any
    allowed: str
    check: Callable[[Any], bool] = lambda v: True


def key(default: Any, allowed: str, check: Callable[[Any], bool] = lambda v: True) -> Any:
    """A ``RunConfig`` field declaring a run-config key: default, what is allowed, a check."""
    return dataclasses.field(default=default, metadata={"key": Key(default, allowed, check)})


def _int(low: int, high: float = math.inf) -> Callable[[Any], bool]:
    return lambda v: isinstance(v, int) and not isinstance(v, bool) and low <= v <= high


def _number(low: float, high: float, low_open: bool = False) -> Callable[[Any], bool]:
    def check(v: Any) -> bool:
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            return False
        return (low < v if low_open else low <= v) and v <= high
    return check


def _fractions(text: Any) -> bool:
    if not isinstance(text, str):
        return False
    try:
        values = [float(x) for x in str(text).split(",")]
    except ValueError:
        return False
    return bool(values) and all(0 < v <= 1 for v in values)


def _mix(text: Any) -> bool:
    try:
        parse_mix(text)
    except ValueError:
        return False
    return True


def _init(text: Any) -> bool:
    return text == "random" or (isinstance(text, str) and text.startswith("svd:") and len(text) > 4)


def _clip(v: Any) -> bool:
    return v == "method" or _number(0, math.inf)(v)


EVAL_SPLITS = ("test", "validation")


def _deadline(v: Any) -> bool:
    return not isinstance(v, bool) and isinstance(v, (int, float)) and v > 0 and not math.isnan(v)


_is_bool = lambda v: isinstance(v, bool)  # noqa: E731
_is_str = lambda v: isinstance(v, str)  # noqa: E731


@dataclass(frozen=True)
class RunConfig:
    """A validated run config: each field declares one key (its name with '_' for '-').

    This class is the one declaration of the run config: ``KEYS``, ``defaults()`` and the
    validation read it, and a test checks ``[tool.flwr.app.config]`` in pyproject.toml against it.
    """

    run_name: str = key("", "a folder name (empty: derived from the config)",
                        lambda v: _is_str(v) and "/" not in v and v not in (".", ".."))
    results_dir: str = key("results", "a directory path", lambda v: _is_str(v) and v != "")
    resume: bool = key(False, "true or false", _is_bool)
    seed: int = key(0, "an integer >= 0", _int(0))
    dataset: str = key("fashion-mnist", f"one of {tuple(sorted(DATASET_SHAPES))}",
                       lambda v: v in DATASET_SHAPES)
    model: str = key("cnn", f"one of {tuple(sorted(MODELS))}", lambda v: v in MODELS)
    strategy: str = key("rankwise", f"one of {tuple(METHODS)} (fl_maestro.methods)",
                        lambda v: v in METHODS)
    num_rounds: int = key(20, "an integer >= 1", _int(1))
    clients_per_round: int = key(10, "an integer >= 1", _int(1))
    device_mix: str = key("0.2:0.2,0.4:0.2,0.6:0.2,0.8:0.2,1.0:0.2",
                          "'budget:share,...' with budgets in (0, 1] and shares summing to 1", _mix)
    rank_allocation: str = key("uniform", f"one of {ALLOCATIONS}", lambda v: v in ALLOCATIONS)
    cost: str = key("macs", f"one of {COST_KINDS} (budgets are fractions of the dense model's "
                    "cost)", lambda v: v in COST_KINDS)
    rank_cap: str = key("dense", f"one of {RANK_CAPS} (dense: a factorised layer's maximum rank is "
                        "the largest whose factor pair costs no more than its dense layer; none: "
                        "min(out, fan_in))", lambda v: v in RANK_CAPS)
    partitioner: str = key("dirichlet", f"one of {PARTITIONERS}", lambda v: v in PARTITIONERS)
    alpha: float = key(0.5, "a number > 0 (Dirichlet concentration)", _number(0, math.inf, True))
    classes_per_client: int = key(2, "an integer >= 1", _int(1))
    val_fraction: float = key(0.1, "a number in [0, 1)", lambda v: _number(0, 1)(v) and v < 1)
    local_epochs: int = key(1, "an integer >= 1", _int(1))
    batch_size: int = key(32, "an integer >= 1", _int(1))
    lr: float = key(0.05, "a number > 0", _number(0, math.inf, True))
    lr_decay: float = key(1.0, "a number in (0, 1] (round t trains at lr * lr-decay^(t-1))",
                          _number(0, 1, True))
    momentum: float = key(0.9, "a number in [0, 1]", _number(0, 1))
    weight_decay: float = key(1e-4, "a number >= 0", _number(0, math.inf))
    optimizer: str = key("corner", f"one of {OPTIMIZERS} (corner: a step updates only the "
                         "components it trains, momentum included; sgd: torch.optim.SGD)",
                         lambda v: v in OPTIMIZERS)
    precision: str = key("fp32", f"one of {PRECISIONS} (the dtype of the forward passes in "
                         "training and evaluation; bf16 through autocast, parameters stay float32)",
                         lambda v: v in PRECISIONS)
    sampler: str = key("single-layer", f"one of {(*SAMPLER_NAMES, TIER_GRID)} (single-layer: "
                       "Maestro's per-layer draw, a layer's chance proportional to its ranks; "
                       "tier-grid: the tiers' joint configurations at or below the client's "
                       "budget, as FjORD draws)", lambda v: v in SAMPLER_NAMES or v == TIER_GRID)
    distill: bool = key(True, "true or false (Maestro's self-distilling loss; false: plain ordered "
                        "dropout)", _is_bool)
    fjord_kd: bool = key(False, "true or false (FjORD's knowledge distillation from p_max)",
                         _is_bool)
    heterofl_masked_loss: bool = key(True, "true or false (HeteroFL's cross-entropy over the "
                                     "classes in the client's data)", _is_bool)
    heterofl_scaler: bool = key(True, "true or false (HeteroFL's scaler: sliced layers' outputs "
                                "divided by the client's width rate in training)", _is_bool)
    heterofl_merge_weight: str = key("clients", f"one of {MERGE_WEIGHTS} (HeteroFL averages "
                                     "each element over the clients holding it, by count)",
                                     lambda v: v in MERGE_WEIGHTS)
    clip_grad_norm: Any = key("method", "'method' (what the strategy's own code clips at: "
                              f"{ {m.name: m.clip for m in METHODS.values() if m.clip} }, others "
                              "none) or a number >= 0 (the largest "
                              "gradient norm of a local step; 0: no clipping)", _clip)
    divergence_factor: float = key(10.0, "0 or a number > 1 (a client stops as 'diverged' when "
                                   "its loss is non-finite or its last 5 steps' mean loss exceeds "
                                   "this many times its first 5 steps'; 0: only non-finite; at "
                                   "or under 1 a healthy client would trip it)",
                                   lambda v: v == 0 or _number(1, math.inf, low_open=True)(v))
    hgl_lambda: float = key(0.0, "a number >= 0", _number(0, math.inf))
    shrink_every: int = key(0, "an integer >= 0 (rounds between progressive shrinking; 0: off)",
                            _int(0))
    shrink_threshold: float = key(1e-5, "a number >= 0 (importance under which a component is "
                                  "cut)", _number(0, math.inf))
    eval_fractions: str = key("0.1,0.25,0.5,0.75,1.0", "comma-separated numbers in (0, 1]",
                              _fractions)
    eval_every: int = key(1, "an integer >= 1", _int(1))
    eval_split: str = key("test", f"one of {EVAL_SPLITS} (what the server evaluates on; "
                          "validation: the union of the clients' validation splits, carved from "
                          "the training data and never trained on, for tuning)",
                          lambda v: v in EVAL_SPLITS)
    # 1000 (not the whole test set) keeps evaluation under a fifth of a default run's CPU while
    # every round keeps its point on the curve: the same seeded subset every round; the final
    # round is always evaluated on the whole test set.
    eval_samples: int = key(1000, "an integer >= 0 (test examples evaluated in the rounds before "
                            "the last; 0: the whole test set)", _int(0))
    init: str = key("random", "'random' or 'svd:<path to a dense state dict .safetensors>'", _init)
    # The simulated device world (fl_maestro.world); file contents are checked by load_world.
    device_profiles: str = key("", "'' (the documented defaults), a .toml file of per-tier "
                               "tables, or 'tier:key=value,...;...' (tier: a device-mix budget or "
                               "'default'; keys: macs-per-second, downlink-bytes-per-second, "
                               "uplink-bytes-per-second, dropout, crash)", _is_str)
    round_deadline: float = key(math.inf, "a number of simulated seconds > 0 (inf: no deadline)",
                                _deadline)
    deadline_policy: str = key("wait", f"one of {POLICIES} (wait: no deadline, a round lasts as "
                               "long as its slowest client; drop: a client over the deadline is "
                               "discarded; partial: it trains only the steps that fit)",
                               lambda v: v in POLICIES)
    availability: str = key("", "'' (always online), 'diurnal:<period>:<tier>@<from>-<until>,...' "
                            "or a CSV file with columns client,tier,from,until (simulated seconds)",
                            _is_str)
    over_selection: float = key(0.0, "a number in [0, 10]: sample clients-per-round x (1 + this) "
                                "and keep the first clients-per-round to finish (0: off)",
                                _number(0, 10))
    min_reply_share: float = key(0.5, "a number in [0, 1] (a round with fewer usable replies "
                                 "than this share of the clients it sent to stops the run with "
                                 "an error)",
                                 _number(0, 1))
    tensorboard: bool = key(False, "true or false (TensorBoard scalars in "
                            "results/<run>/tensorboard; needs the 'tensorboard' extra)", _is_bool)

    @functools.cached_property
    def mix(self) -> list[tuple[float, float]]:
        """The device mix, parsed once: sorted ``(budget, share)`` pairs."""
        return parse_mix(self.device_mix)

    @property
    def tiers(self) -> list[float]:
        """The device mix's budgets, ascending."""
        return [budget for budget, _ in self.mix]

    @property
    def fractions(self) -> list[float]:
        """The rank fractions the global model is evaluated at."""
        return [float(x) for x in self.eval_fractions.split(",")]

    def lr_at(self, server_round: int) -> float:
        """The local learning rate of round ``server_round`` (1-based): exponential decay."""
        return self.lr * self.lr_decay ** (server_round - 1)

    @property
    def name(self) -> str:
        """The run's folder name under ``results_dir``."""
        return self.run_name or f"{self.dataset}-{self.model}-{self.strategy}-seed{self.seed}"

    def to_dict(self) -> dict[str, Any]:
        """The config as run-config keys and values."""
        return {f.name.replace("_", "-"): getattr(self, f.name) for f in dataclasses.fields(self)}


# Every key by its run-config name, in declaration order: derived from RunConfig's fields.
KEYS: dict[str, Key] = {f.name.replace("_", "-"): f.metadata["key"]
                        for f in dataclasses.fields(RunConfig)}


def parse_run_config(raw: Mapping[str, Any]) -> RunConfig:
    """Validate a Flower run config (defaults filled in) and return it typed.

    Raises ValueError naming the key, its value and what is allowed for an unknown key or bad value.
    """
    unknown = sorted(set(raw) - set(KEYS))
    if unknown:
        raise ValueError(f"unknown run-config key(s) {unknown}; known keys are {sorted(KEYS)}")
    values = {}
    for name, spec in KEYS.items():
        value = raw.get(name, spec.default)
        if isinstance(spec.default, float) and isinstance(value, int) \
                and not isinstance(value, bool):
            value = float(value)
        if name == "eval-fractions" and isinstance(value, (int, float)) \
                and not isinstance(value, bool):
            value = str(value)  # `eval-fractions=1.0` on the command line arrives as a number
        if not spec.check(value):
            raise ValueError(f"run-config key {name!r} has bad value {value!r}: allowed "
                             f"{spec.allowed}{_why(name, value)}")
        values[name.replace("-", "_")] = value
    cfg = RunConfig(**values)
    _check_combination(cfg)
    return cfg


# Keys only some strategies read, and which (each method declares its own: Method.keys). Under
# any other strategy a value other than the default is refused: the strategy would ignore it.
# (Flower fills every key in from pyproject, so a key at its default cannot be told from one the
# user left out; the default is always accepted.)
STRATEGY_KEYS: dict[str, tuple[str, ...]] = method_keys()


def _why(name: str, value: Any) -> str:
    """What exactly is wrong with a bad device mix (its parser says: "shares sum to 0.9")."""
    if name != "device-mix":
        return ""
    try:
        parse_mix(value)
    except ValueError as err:
        return f" ({err})"
    return ""


def _check_combination(cfg: RunConfig) -> None:
    """Refuse settings that each pass alone but make no sense together."""
    if cfg.deadline_policy == "wait" and math.isfinite(cfg.round_deadline):
        raise ValueError(f"run-config key 'round-deadline' = {cfg.round_deadline!r} needs "
                         "'deadline-policy' drop or partial: policy 'wait' has no deadline "
                         "(leave round-deadline at inf)")
    if cfg.deadline_policy != "wait" and math.isinf(cfg.round_deadline):
        raise ValueError(f"run-config key 'deadline-policy' = {cfg.deadline_policy!r} needs a "
                         "finite 'round-deadline' (simulated seconds > 0)")
    models = get_method(cfg.strategy).models
    if models is not None and cfg.model not in models:
        raise ValueError(f"run-config key 'model' = {cfg.model!r} is not supported by strategy "
                         f"{cfg.strategy!r}: allowed {list(models)}")
    for key, strategies in method_keys().items():  # methods registered since import too
        value = getattr(cfg, key.replace("-", "_"))
        if cfg.strategy not in strategies and value != KEYS[key].default:
            raise ValueError(f"run-config key {key!r} = {value!r} is ignored by strategy "
                             f"{cfg.strategy!r}: allowed only under strategy {list(strategies)}; "
                             f"leave it at {KEYS[key].default!r}")


def defaults() -> dict[str, Any]:
    """Every key's default value."""
    return {name: spec.default for name, spec in KEYS.items()}
