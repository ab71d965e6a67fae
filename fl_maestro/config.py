"""The run config: every key with its default, type and allowed values, validated once at start.

Defaults live here and are mirrored in ``[tool.flwr.app.config]`` of ``pyproject.toml`` (a test keeps
the two equal). Override any key with ``flwr run . --run-config "key=value ..."``.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from fl_maestro.budgets import ALLOCATIONS, parse_mix
from fl_maestro.data import DATASET_SHAPES, PARTITIONERS
from fl_maestro.models import COST_KINDS, MODELS, RANK_CAPS
from fl_maestro.precision import PRECISIONS
from fl_maestro.training import OPTIMIZERS
from fl_maestro.sampling import SAMPLERS

from fl_maestro.plans import RANK_STRATEGIES, STRATEGIES
from fl_maestro.world import POLICIES


@dataclass(frozen=True)
class Key:
    """One run-config key: its default, its type and a check of its value."""

    default: Any
    allowed: str
    check: Callable[[Any], bool] = lambda v: True


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


def _deadline(v: Any) -> bool:
    return not isinstance(v, bool) and isinstance(v, (int, float)) and v > 0 and not math.isnan(v)


_is_bool = lambda v: isinstance(v, bool)  # noqa: E731
_is_str = lambda v: isinstance(v, str)  # noqa: E731

KEYS: dict[str, Key] = {
    "run-name": Key("", "a folder name (empty: derived from the config)",
                    lambda v: _is_str(v) and "/" not in v and v not in (".", "..")),
    "results-dir": Key("results", "a directory path", lambda v: _is_str(v) and v != ""),
    "resume": Key(False, "true or false", _is_bool),
    "seed": Key(0, "an integer >= 0", _int(0)),
    "dataset": Key("fashion-mnist", f"one of {tuple(sorted(DATASET_SHAPES))}",
                   lambda v: v in DATASET_SHAPES),
    "model": Key("cnn", f"one of {tuple(sorted(MODELS))}", lambda v: v in MODELS),
    "strategy": Key("rankwise", f"one of {STRATEGIES}", lambda v: v in STRATEGIES),
    "num-rounds": Key(20, "an integer >= 1", _int(1)),
    "clients-per-round": Key(10, "an integer >= 1", _int(1)),
    "device-mix": Key("0.2:0.2,0.4:0.2,0.6:0.2,0.8:0.2,1.0:0.2",
                      "'budget:share,...' with budgets in (0, 1] and shares summing to 1", _mix),
    "rank-allocation": Key("uniform", f"one of {ALLOCATIONS}", lambda v: v in ALLOCATIONS),
    "cost": Key("macs", f"one of {COST_KINDS} (budgets are fractions of the dense model's cost)",
                lambda v: v in COST_KINDS),
    "rank-cap": Key("dense", f"one of {RANK_CAPS} (dense: a factorised layer's maximum rank is "
                    "the largest whose factor pair costs no more than its dense layer; none: "
                    "min(out, fan_in))", lambda v: v in RANK_CAPS),
    "partitioner": Key("dirichlet", f"one of {PARTITIONERS}", lambda v: v in PARTITIONERS),
    "alpha": Key(0.5, "a number > 0 (Dirichlet concentration)", _number(0, math.inf, True)),
    "classes-per-client": Key(2, "an integer >= 1", _int(1)),
    "val-fraction": Key(0.1, "a number in [0, 1)", lambda v: _number(0, 1)(v) and v < 1),
    "local-epochs": Key(1, "an integer >= 1", _int(1)),
    "batch-size": Key(32, "an integer >= 1", _int(1)),
    "lr": Key(0.05, "a number > 0", _number(0, math.inf, True)),
    "lr-decay": Key(1.0, "a number in (0, 1] (round t trains at lr * lr-decay^(t-1))",
                    _number(0, 1, True)),
    "momentum": Key(0.9, "a number in [0, 1]", _number(0, 1)),
    "weight-decay": Key(1e-4, "a number >= 0", _number(0, math.inf)),
    "optimizer": Key("corner", f"one of {OPTIMIZERS} (corner: a step updates only the "
                     "components it trains, momentum included; sgd: torch.optim.SGD)",
                     lambda v: v in OPTIMIZERS),
    "precision": Key("fp32", f"one of {PRECISIONS} (the dtype of the forward passes in training "
                     "and evaluation; bf16 through autocast, parameters stay float32)",
                     lambda v: v in PRECISIONS),
    "sampler": Key("single-layer", f"one of {tuple(sorted(SAMPLERS))} (single-layer: Maestro's "
                   "per-layer draw, a layer's chance proportional to its ranks)",
                   lambda v: v in SAMPLERS),
    "distill": Key(True, "true or false (Maestro's self-distilling loss; false: plain ordered "
                   "dropout)", _is_bool),
    "fjord-kd": Key(False, "true or false (FjORD's knowledge distillation from p_max)", _is_bool),
    "heterofl-masked-loss": Key(True, "true or false (HeteroFL's cross-entropy over the classes "
                                "in the client's data)", _is_bool),
    "heterofl-scaler": Key(True, "true or false (HeteroFL's scaler: sliced layers' outputs "
                           "divided by the client's width rate in training)", _is_bool),
    "heterofl-merge-weight": Key("clients", "one of ('clients', 'examples') (HeteroFL averages "
                                 "each element over the clients holding it, by count)",
                                 lambda v: v in ("clients", "examples")),
    "hgl-lambda": Key(0.0, "a number >= 0", _number(0, math.inf)),
    "shrink-every": Key(0, "an integer >= 0 (rounds between progressive shrinking; 0: off)",
                        _int(0)),
    "shrink-threshold": Key(1e-5, "a number >= 0 (importance under which a component is cut)",
                            _number(0, math.inf)),
    "eval-fractions": Key("0.1,0.25,0.5,0.75,1.0", "comma-separated numbers in (0, 1]", _fractions),
    "eval-every": Key(1, "an integer >= 1", _int(1)),
    "eval-samples": Key(2000, "an integer >= 0 (0: the whole test set)", _int(0)),
    "init": Key("random", "'random' or 'svd:<path to a dense state dict .safetensors>'", _init),
    # The simulated device world (fl_maestro.world); file contents are checked by load_world.
    "device-profiles": Key("", "'' (the documented defaults), a .toml file of per-tier tables, "
                           "or 'tier:key=value,...;...' (tier: a device-mix budget or 'default'; "
                           "keys: macs-per-second, downlink-bytes-per-second, "
                           "uplink-bytes-per-second, dropout, crash)", _is_str),
    "round-deadline": Key(math.inf, "a number of simulated seconds > 0 (inf: no deadline)",
                          _deadline),
    "deadline-policy": Key("wait", f"one of {POLICIES} (wait: no deadline, a round lasts as long "
                           "as its slowest client; drop: a client over the deadline is "
                           "discarded; partial: it trains only the steps that fit)",
                           lambda v: v in POLICIES),
    "availability": Key("", "'' (always online), 'diurnal:<period>:<tier>@<from>-<until>,...' or "
                        "a CSV file with columns client,tier,from,until (simulated seconds)",
                        _is_str),
    "over-selection": Key(0.0, "a number in [0, 10]: sample clients-per-round x (1 + this) and "
                          "keep the first clients-per-round to finish (0: off)", _number(0, 10)),
    "min-reply-share": Key(0.5, "a number in [0, 1] (a round with fewer usable replies than this "
                           "share of the clients it sampled stops the run with an error)",
                           _number(0, 1)),
    "tensorboard": Key(False, "true or false (TensorBoard scalars in results/<run>/tensorboard; "
                       "needs the 'tensorboard' extra)", _is_bool),
}


@dataclass(frozen=True)
class RunConfig:
    """A validated run config; field names are the keys with '-' turned into '_'."""

    run_name: str
    results_dir: str
    resume: bool
    seed: int
    dataset: str
    model: str
    strategy: str
    num_rounds: int
    clients_per_round: int
    device_mix: str
    rank_allocation: str
    cost: str
    rank_cap: str
    partitioner: str
    alpha: float
    classes_per_client: int
    val_fraction: float
    local_epochs: int
    batch_size: int
    lr: float
    lr_decay: float
    momentum: float
    weight_decay: float
    optimizer: str
    precision: str
    sampler: str
    distill: bool
    fjord_kd: bool
    heterofl_masked_loss: bool
    heterofl_scaler: bool
    heterofl_merge_weight: str
    hgl_lambda: float
    shrink_every: int
    shrink_threshold: float
    eval_fractions: str
    eval_every: int
    eval_samples: int
    init: str
    device_profiles: str
    round_deadline: float
    deadline_policy: str
    availability: str
    over_selection: float
    min_reply_share: float
    tensorboard: bool

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


def parse_run_config(raw: Mapping[str, Any]) -> RunConfig:
    """Validate a Flower run config (defaults filled in) and return it typed.

    Raises ValueError naming the key, its value and what is allowed for an unknown key or bad value.
    """
    unknown = sorted(set(raw) - set(KEYS))
    if unknown:
        raise ValueError(f"unknown run-config key(s) {unknown}; known keys are {sorted(KEYS)}")
    values = {}
    for name, key in KEYS.items():
        value = raw.get(name, key.default)
        if isinstance(key.default, float) and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if name == "eval-fractions" and isinstance(value, (int, float)) \
                and not isinstance(value, bool):
            value = str(value)  # `eval-fractions=1.0` on the command line arrives as a number
        if not key.check(value):
            raise ValueError(f"run-config key {name!r} has bad value {value!r}: allowed "
                             f"{key.allowed}{_why(name, value)}")
        values[name.replace("-", "_")] = value
    cfg = RunConfig(**values)
    _check_combination(cfg)
    return cfg


# Keys only some strategies read, and which. Under any other strategy a value other than the
# default is refused: the strategy would ignore it. (Flower fills every key in from pyproject, so
# a key at its default cannot be told from one the user left out; the default is always accepted.)
_BUDGETED = tuple(s for s in STRATEGIES if s != "fedavg-full")
STRATEGY_KEYS: dict[str, tuple[str, ...]] = {
    "sampler": ("rankwise",),
    "distill": ("rankwise",),
    "hgl-lambda": ("rankwise",),
    "shrink-every": ("rankwise",),
    "shrink-threshold": ("rankwise",),
    "rank-allocation": ("rankwise", "fedavg-smallest", "fedavg-exclusive"),
    "init": RANK_STRATEGIES,
    "rank-cap": RANK_STRATEGIES,
    "cost": _BUDGETED,
    "fjord-kd": ("fjord",),
    "heterofl-masked-loss": ("heterofl",),
    "heterofl-scaler": ("heterofl",),
    "heterofl-merge-weight": ("heterofl",),
}


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
    for key, strategies in STRATEGY_KEYS.items():
        value = getattr(cfg, key.replace("-", "_"))
        if cfg.strategy not in strategies and value != KEYS[key].default:
            raise ValueError(f"run-config key {key!r} = {value!r} is ignored by strategy "
                             f"{cfg.strategy!r}: allowed only under strategy {list(strategies)}; "
                             f"leave it at {KEYS[key].default!r}")


def defaults() -> dict[str, Any]:
    """Every key's default value."""
    return {name: key.default for name, key in KEYS.items()}
