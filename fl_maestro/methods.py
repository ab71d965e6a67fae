"""One object per method: its model family, the ranks it gives a device, who takes part, how it
trains locally, how its replies are weighted in the merge, the run-config keys it reads, its paper.

``METHODS`` is the one registry; config validation, the federation, the ClientApp, the report's
labels and the README's method table read it. Adding a method is adding one ``Method`` (and its
tests): say which family it trains, give it a ``plan`` (a device's ranks, which may depend on the
server round) and a ``local`` recipe, and register it with ``register``.

A "rank" is a factorised layer's number of ordered components, or, in the width family, a layer's
channel count; a plan's ranks are both what a device trains and what it runs at deployment, so the
per-tier evaluation uses them too. Budgets are fractions of the dense model's cost everywhere.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from fl_maestro.budgets import ranks_for_budget
from fl_maestro.models import RankedModel, build_model, model_from_arrays
from fl_maestro.rolling import window_indices
from fl_maestro.sampling import Sampler, tier_grid
from fl_maestro.training import Recipe
from fl_maestro.width import build_width_model, width_model_from_arrays

TIER_GRID = "tier-grid"  # FjORD's sampler: its ranks come from the server, one grid per client
HGL_BEYOND = "hgl-beyond"  # per layer, the squared norms of the global components past a client's
# held ranks: the server's constants that make a client's HGL the global penalty restricted to it
MERGE_WEIGHTS = ("clients", "examples")


@dataclass(frozen=True)
class Family:
    """A model family: how its full global model is built, how a received slice becomes a model,
    and whether a slice cuts the shared arrays too (width slices do, ordered factors do not)."""

    name: str
    build: Callable[..., RankedModel]  # (name, input_shape, num_classes, device, rank_cap)
    from_arrays: Callable[..., RankedModel]  # (name, input_shape, num_classes, arrays, device)
    cut_shared: bool


FAMILIES: dict[str, Family] = {
    "factors": Family("factors", lambda name, shape, classes, device=None, rank_cap="dense":
                      build_model(name, shape, classes, device=device, rank_cap=rank_cap),
                      model_from_arrays, cut_shared=False),
    "width": Family("width", lambda name, shape, classes, device=None, rank_cap="dense":
                    build_width_model(name, shape, classes, device=device),
                    width_model_from_arrays, cut_shared=True),
}


@dataclass(frozen=True)
class Planning:
    """What a plan may read beside the model and the device's budget."""

    tiers: tuple[float, ...] = ()  # every budget of the run, ascending
    allocation: str = "uniform"  # rank-allocation: uniform | importance
    cost: str = "macs"
    reference_cost: float | None = None  # what budgets are fractions of (None: the model's dense cost)
    server_round: int = 1  # a plan may move with the rounds (e.g. a rolling window)


@dataclass(frozen=True)
class LocalTraining:
    """How a method trains inside its slice: the sampler, the self-distilling loss, HGL, and
    HeteroFL's label-masked loss and scaler. ``sampler`` TIER_GRID: the server sends the grid."""

    sampler: str
    distill: bool = False
    hgl_lambda: float = 0.0
    masked_loss: bool = False
    scaler: bool = False


def clip_for(cfg: Any) -> float:
    """The gradient-clipping norm a run trains with: ``clip-grad-norm``, or with ``method``
    what the strategy's own code clips at (``Method.clip``; 0: no clipping)."""
    if cfg.clip_grad_norm == "method":
        return get_method(cfg.strategy).clip
    return float(cfg.clip_grad_norm)


def budget_ranks(model: RankedModel, budget: float, p: Planning) -> dict[str, int]:
    """The ranks ``budget`` affords under the run's rank allocation."""
    return ranks_for_budget(model, budget, p.allocation, p.cost, p.reference_cost)


def width_ranks(model: RankedModel, budget: float, p: Planning) -> dict[str, int]:
    """The widest common width fraction ``budget`` affords (width baselines)."""
    return ranks_for_budget(model, budget, "uniform", p.cost, p.reference_cost)


def plain(cfg: Any) -> LocalTraining:
    """Plain SGD on the whole slice: no ordered dropout, no distillation, no HGL."""
    return LocalTraining("none")


def everyone(budget: float) -> bool:
    """Every device takes part."""
    return True


@dataclass(frozen=True)
class Method:
    """One federated method: everything the run needs to know of it, in one place."""

    name: str
    family: str  # a key of FAMILIES
    summary: str  # one line, for the report and the README's method table
    paper: str  # the paper (and code) it follows
    plan: Callable[[RankedModel, float, Planning], dict[str, int]]
    local: Callable[[Any], LocalTraining] = plain  # from the run config
    takes_part: Callable[[float], bool] = everyone
    merge_weight: Callable[[Any], str] = lambda cfg: "examples"  # "examples" | "clients"
    label_rows: Callable[[Any], bool] = lambda cfg: False  # merge only the classes a reply has
    keys: tuple[str, ...] = ()  # run-config keys only methods listing them read
    budgeted: bool = True  # whether its plan reads the device's budget (else `cost` is unused)
    # (model, ranks, server round) -> per array, the global indices a device holds on every
    # axis (FedRolex's rolling window); None: the leading corner of its ranks.
    windows: Callable[[RankedModel, Mapping[str, int], int], dict] | None = None
    clip: float = 0.0  # the gradient norm its own code clips every step at (0: none)
    models: tuple[str, ...] | None = None  # the models it can train (None: every model)

    def __post_init__(self) -> None:
        if self.family not in FAMILIES:
            raise ValueError(f"method {self.name!r}: family {self.family!r} is not allowed: use "
                             f"one of {tuple(FAMILIES)}")

    @property
    def model_family(self) -> Family:
        """The family of models this method trains."""
        return FAMILIES[self.family]


def _rankwise_local(cfg: Any) -> LocalTraining:
    """Maestro's loss; sampler ``tier-grid`` draws the sampled pass from the tiers' joint
    configurations at or below the client's budget, as FjORD draws (the server sends the grid)."""
    return LocalTraining(cfg.sampler, cfg.distill, cfg.hgl_lambda)


def _heterofl_local(cfg: Any) -> LocalTraining:
    return LocalTraining("none", masked_loss=cfg.heterofl_masked_loss, scaler=cfg.heterofl_scaler)


METHODS: dict[str, Method] = {}


def register(method: Method) -> Method:
    """Add ``method`` to the registry (its name must be new); returns it."""
    if method.name in METHODS:
        raise ValueError(f"method {method.name!r} is already registered")
    METHODS[method.name] = method
    return method


def get_method(name: str) -> Method:
    """The registered method called ``name``; ValueError naming the allowed ones."""
    if name not in METHODS:
        raise ValueError(f"strategy {name!r} is not allowed: use one of {tuple(METHODS)}")
    return METHODS[name]


_FACTOR_KEYS = ("init", "rank-cap")
register(Method(
    "rankwise", "factors", "Maestro: ordered factors, each device trains the rank prefix its "
    "budget affords, self-distilling loss, per-layer sampler, optional HGL and shrinking",
    "Maestro (Horváth et al., ICML 2024)", budget_ranks, _rankwise_local,
    keys=("sampler", "distill", "hgl-lambda", "shrink-every", "shrink-threshold",
          "rank-allocation", *_FACTOR_KEYS)))
register(Method(
    "fedavg-full", "width", "FedAvg as published: every device trains the dense, undecomposed "
    "model whatever its budget (an unreachable upper bound)",
    "FedAvg (McMahan et al., AISTATS 2017)", lambda model, budget, p: model.max_ranks(),
    budgeted=False))
register(Method(
    "fedavg-full-factors", "factors", "FedAvg on the factorised model at its maximum ranks, "
    "every device whatever its budget (the rank-wise family's upper bound)",
    "FedAvg (McMahan et al., AISTATS 2017) on Maestro's decomposition",
    lambda model, budget, p: model.max_ranks(), keys=_FACTOR_KEYS, budgeted=False))
register(Method(
    "fedavg-smallest", "factors", "FedAvg, every device trains the smallest tier's model",
    "FedAvg (McMahan et al., AISTATS 2017)",
    lambda model, budget, p: budget_ranks(model, min(p.tiers), p),
    keys=("rank-allocation", *_FACTOR_KEYS)))
register(Method(
    "fedavg-exclusive", "factors", "FedAvg, only the devices that afford the full model train",
    "FedAvg (McMahan et al., AISTATS 2017)", budget_ranks, takes_part=lambda budget: budget >= 1.0,
    keys=("rank-allocation", *_FACTOR_KEYS)))
register(Method(
    "fjord", "width", "FjORD: ordered dropout over channel width, one tier of the discrete grid "
    "per step, optional self-distillation", "FjORD (Horváth et al., NeurIPS 2021)", width_ranks,
    lambda cfg: LocalTraining(TIER_GRID, cfg.fjord_kd), keys=("fjord-kd",)))
_HETEROFL_KEYS = ("heterofl-masked-loss", "heterofl-scaler", "heterofl-merge-weight")
register(Method(
    "heterofl", "width", "HeteroFL: a static width per device, masked loss, scaler before a norm "
    "layer, gradients clipped to norm 1, count-weighted merge", "HeteroFL (Diao et al., ICLR "
    "2021)", width_ranks, _heterofl_local, merge_weight=lambda cfg: cfg.heterofl_merge_weight,
    label_rows=lambda cfg: cfg.heterofl_masked_loss, keys=_HETEROFL_KEYS, clip=1.0))
register(Method(
    "fedrolex", "width", "FedRolex: a rolling window of each layer's channels, advancing one "
    "channel per round, HeteroFL's recipe (built on its code); tiers deploy the leading window",
    "FedRolex (Alam et al., NeurIPS 2022)", width_ranks, _heterofl_local,
    merge_weight=lambda cfg: cfg.heterofl_merge_weight,
    label_rows=lambda cfg: cfg.heterofl_masked_loss, keys=_HETEROFL_KEYS,
    windows=window_indices, clip=1.0, models=("mlp", "cnn", "lenet")))


def method_keys() -> dict[str, tuple[str, ...]]:
    """Each method-specific run-config key and the methods that read it (``cost``: every
    budgeted method)."""
    keys: dict[str, list[str]] = {}
    for method in METHODS.values():
        for key in method.keys + (("cost",) if method.budgeted else ()):
            keys.setdefault(key, []).append(method.name)
    return {key: tuple(names) for key, names in keys.items()}


def tier_grid_ranks(method: Method, model: RankedModel, budget: float,
                    p: Planning) -> list[dict[str, int]]:
    """FjORD's grid for a device of ``budget``: the ranks of every tier ``<= budget``, ascending."""
    return [method.plan(model, t, p) for t in sorted(set(p.tiers)) if t <= budget]


def client_sampler(local: LocalTraining, sent: Mapping[str, Any]) -> str | Sampler:
    """The sampler a client trains with: the method's, or FjORD's grid as the server sent it."""
    if local.sampler == TIER_GRID:
        return tier_grid(json.loads(str(sent[TIER_GRID])))
    return local.sampler


def recipe(cfg: Any, server_round: int, sent: Mapping[str, Any],
           classes: Iterable[int] | None = None) -> Recipe:
    """The one training recipe of a client in ``server_round``, from its method, the run config
    and what the server sent it (FjORD's grid, HGL's constants, a step cap); ``classes``: the
    classes of its own data, for a masked loss."""
    local = get_method(cfg.strategy).local(cfg)
    beyond = json.loads(str(sent[HGL_BEYOND])) if local.hgl_lambda > 0 else None
    return Recipe(sampler=client_sampler(local, sent), distill=local.distill,
                  hgl_lambda=local.hgl_lambda, hgl_beyond=beyond,
                  classes=tuple(classes) if local.masked_loss and classes is not None else None,
                  epochs=cfg.local_epochs, lr=cfg.lr_at(server_round), momentum=cfg.momentum,
                  weight_decay=cfg.weight_decay, optimizer=cfg.optimizer,
                  precision=cfg.precision,
                  max_steps=int(sent["steps"]) if "steps" in sent else None,
                  clip_grad_norm=clip_for(cfg), divergence_factor=cfg.divergence_factor)



def methods_table() -> str:
    """The README's method table, from the registry (a test keeps the README in step)."""
    rows = ["| strategy | model family | summary | paper | its own run-config keys |",
            "| --- | --- | --- | --- | --- |"]
    for m in METHODS.values():
        keys = ", ".join(f"`{k}`" for k in m.keys) or "none"
        rows.append(f"| `{m.name}` | {m.family} | {m.summary} | {m.paper} | {keys} |")
    return "\n".join(rows)
