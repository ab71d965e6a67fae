"""Models built from ordered low-rank layers, with rank control and cost for the whole network.

The first conv, the norms and the classifier stay dense and are shared by every budget; every other
conv and linear layer is a ``LowRankConv2d`` / ``LowRankLinear``. Layers are addressed by their
module name (``"conv2"``, ``"layer3.0.conv1"``), the same prefix their ``.U`` / ``.V`` arrays carry
in the state dict.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from fl_maestro.layers import LowRankConv2d, LowRankLayer, LowRankLinear

COST_KINDS = ("macs", "params")


@dataclass(frozen=True)
class Stage:
    """One step of a model's forward pass and the modules whose active ranks it depends on.

    ``scope`` names modules (``"conv2"``, ``"layer1.0"``): the stage's output depends on its input
    and on the ranks of the ranked layers at or under those names, nothing else. Evaluation at
    several rank levels computes a stage once for all levels that agree on everything up to it.
    """

    run: Callable[[torch.Tensor], torch.Tensor]
    scope: tuple[str, ...]


def run_stages(stages: tuple[Stage, ...], x: torch.Tensor) -> torch.Tensor:
    """Run ``x`` through ``stages`` in order."""
    for stage in stages:
        x = stage.run(x)
    return x


def stage_layers(model: RankedModel, stages: Sequence[Stage]) -> list[tuple[str, ...]]:
    """The ranked layers each stage depends on: those at or under one of its scope's names."""
    ranked = list(model.ranked_layers())
    return [tuple(n for n in ranked if any(s == "" or n == s or n.startswith(s + ".")
                                           for s in stage.scope)) for stage in stages]


def pool_relu(x: torch.Tensor) -> torch.Tensor:
    """``relu(max_pool2d(x, 2))``, which equals ``max_pool2d(relu(x), 2)`` exactly.

    ReLU is monotone, so it commutes with the max; the gradients agree too (both reach the
    window's first maximum, and only where it is positive). Pooling first runs the ReLU and its
    backward on a quarter of the elements.
    """
    return torch.relu(nn.functional.max_pool2d(x, 2))


class RankedModel(nn.Module):
    """Base class: a network whose ranked layers can be run at any rank prefix."""

    input_shape: tuple[int, ...]

    def ranked_layers(self) -> dict[str, nn.Module]:
        """The layers that run at a rank, by module name (here: the low-rank layers)."""
        return self.low_rank_layers()

    def low_rank_layers(self) -> dict[str, LowRankLayer]:
        """The decomposed layers (ordered factors ``U``, ``V``) by module name, in definition order."""
        return {n: m for n, m in self.named_modules() if isinstance(m, LowRankLayer)}

    def max_ranks(self) -> dict[str, int]:
        """Each layer's maximum rank (the number of components it holds)."""
        return {n: m.max_rank for n, m in self.ranked_layers().items()}

    def ranks(self) -> dict[str, int]:
        """Each layer's active rank."""
        return {n: m.rank for n, m in self.ranked_layers().items()}

    def _named(self, ranks: Mapping[str, int]) -> list[tuple[nn.Module, int]]:
        """(layer, rank) pairs for a ``{layer_name: rank}`` dict; unknown names are a ValueError."""
        layers = self.ranked_layers()
        unknown = sorted(set(ranks) - set(layers))
        if unknown:
            raise ValueError(f"unknown ranked layer {unknown[0]!r}; layers are {sorted(layers)}")
        return [(layers[name], rank) for name, rank in ranks.items()]

    def stages(self) -> tuple[Stage, ...]:
        """The forward pass as a chain of stages (default: one stage, depending on every layer)."""
        return (Stage(self.forward, ("",)),)

    def set_ranks(self, ranks: Mapping[str, int]) -> None:
        """Set the active rank of the named layers; layers not named keep theirs."""
        for layer, rank in self._named(ranks):
            layer.set_rank(rank)

    def reset_ranks(self) -> None:
        """Run every layer at its maximum rank."""
        self.set_ranks(self.max_ranks())

    def truncate(self, ranks: Mapping[str, int]) -> None:
        """Keep only the first ``ranks[name]`` components of the named layers (new maximum ranks)."""
        for layer, rank in self._named(ranks):
            layer.truncate(rank)

    def slice_shapes(self, ranks: Mapping[str, int] | None = None) -> dict[str, tuple[int, ...]]:
        """State-dict shapes of the slice at ``ranks``: ``U`` cut on axis 1, ``V`` on 0, rest whole."""
        ranks = {**self.max_ranks(), **(ranks or {})}
        shapes = {k: tuple(v.shape) for k, v in self.state_dict().items()}
        for name, r in ranks.items():
            shapes[f"{name}.U"] = (shapes[f"{name}.U"][0], r)
            shapes[f"{name}.V"] = (r, *shapes[f"{name}.V"][1:])
        return shapes

    def ranks_at_fraction(self, fraction: float) -> dict[str, int]:
        """Ranks ``ceil(fraction * max_rank)`` (at least 1) for a fraction in (0, 1]."""
        if not 0 < fraction <= 1:
            raise ValueError(f"rank fraction {fraction!r} is out of range: allowed (0, 1]")
        return {n: max(1, math.ceil(fraction * r - 1e-9)) for n, r in self.max_ranks().items()}

    def cost(self, ranks: Mapping[str, int] | None = None, kind: str = "macs") -> int:
        """Cost per sample at ``ranks`` (default: maximum ranks) counting every conv and linear.

        ``macs`` counts multiply-accumulates of convs and linears (norms, pooling and activations
        are negligible and left out); ``params`` counts the parameters a client holds at those ranks.
        """
        ranks = self.max_ranks() if ranks is None else {**self.max_ranks(), **ranks}
        total = 0
        for name, module in self._costed_modules().items():
            if isinstance(module, LowRankLayer):
                total += _low_rank_cost(module, ranks[name], kind, self._positions()[name])
            else:
                total += _dense_cost(module, kind, self._positions()[name])
        return total + (self._other_params() if kind == "params" else 0)

    def dense_cost(self, kind: str = "macs") -> int:
        """Cost per sample of the same network with every layer left undecomposed."""
        total = 0
        for name, module in self._costed_modules().items():
            positions = self._positions()[name]
            if isinstance(module, LowRankLayer):
                total += module.dense_macs(positions) if kind == "macs" else module.dense_params()
            else:
                total += _dense_cost(module, kind, positions)
        return total + (self._other_params() if kind == "params" else 0)

    def _costed_modules(self) -> dict[str, nn.Module]:
        kinds = (LowRankLayer, nn.Conv2d, nn.Linear)
        return {n: m for n, m in self.named_modules() if isinstance(m, kinds)}

    def _other_params(self) -> int:
        """Parameters outside convs and linears (norms), shared at every rank."""
        costed = {id(p) for m in self._costed_modules().values() for p in m.parameters()}
        return sum(p.numel() for p in self.parameters() if id(p) not in costed)

    def _positions(self) -> dict[str, int]:
        """Output positions (H*W, 1 for linears) of every costed module, traced once."""
        if getattr(self, "_positions_cache", None) is None:
            self._positions_cache = _trace_positions(self, self._costed_modules())
        return self._positions_cache


@contextmanager
def at_ranks(model: RankedModel, ranks: Mapping[str, int]) -> Iterator[RankedModel]:
    """Temporarily run ``model`` at ``ranks``, restoring the previous active ranks afterwards."""
    previous = model.ranks()
    model.set_ranks(ranks)
    try:
        yield model
    finally:
        model.set_ranks(previous)


def _low_rank_cost(layer: LowRankLayer, rank: int, kind: str, positions: int) -> int:
    if kind == "macs":
        return layer.macs(rank, positions)
    if kind == "params":
        return layer.params(rank)
    raise ValueError(f"cost kind {kind!r} is not allowed: use one of {COST_KINDS}")


def _dense_cost(module: nn.Module, kind: str, positions: int) -> int:
    weight = module.weight
    if kind == "macs":
        return weight.numel() * positions
    if kind == "params":
        return sum(p.numel() for p in module.parameters())
    raise ValueError(f"cost kind {kind!r} is not allowed: use one of {COST_KINDS}")


@torch.no_grad()
def _trace_positions(model: RankedModel, modules: Mapping[str, nn.Module]) -> dict[str, int]:
    """Run one sample through ``model`` and record each module's output positions."""
    positions: dict[str, int] = {}

    def hook(name: str):
        def record(_module, _inputs, output):
            positions[name] = math.prod(output.shape[2:]) if output.dim() == 4 else 1
        return record

    handles = [m.register_forward_hook(hook(n)) for n, m in modules.items()]
    was_training = model.training
    try:
        model.eval()
        device = next(model.parameters()).device
        model(torch.zeros(1, *model.input_shape, device=device))
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    return positions


class MLP(RankedModel):
    """Flatten -> low-rank hidden layers with ReLU -> dense classifier."""

    def __init__(self, input_shape: tuple[int, ...] = (1, 28, 28), num_classes: int = 10,
                 hidden: tuple[int, ...] = (256, 128)) -> None:
        super().__init__()
        self.input_shape = tuple(input_shape)
        widths = [math.prod(input_shape), *hidden]
        self.hidden = nn.ModuleList(LowRankLinear(a, b) for a, b in zip(widths, widths[1:]))
        self.classifier = nn.Linear(widths[-1], num_classes)

    def stages(self) -> tuple[Stage, ...]:
        """Each hidden layer (the first one flattening the input), then the classifier."""
        def hidden(i: int) -> Stage:
            layer = self.hidden[i]
            return Stage(lambda x: torch.relu(layer(x.flatten(1))), (f"hidden.{i}",))
        return (*(hidden(i) for i in range(len(self.hidden))),
                Stage(self.classifier, ("classifier",)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return run_stages(self.stages(), x)


class CNN(RankedModel):
    """A small CNN for 28x28 (or 8x8) images: dense conv1, low-rank conv2 and fc, dense classifier."""

    def __init__(self, input_shape: tuple[int, ...] = (1, 28, 28), num_classes: int = 10,
                 channels: tuple[int, int] = (32, 64), hidden: int = 128) -> None:
        super().__init__()
        self.input_shape = tuple(input_shape)
        c, h, w = input_shape
        self.conv1 = nn.Conv2d(c, channels[0], 3, padding=1)
        self.conv2 = LowRankConv2d(channels[0], channels[1], 3, padding=1)
        self.fc = LowRankLinear(channels[1] * (h // 4) * (w // 4), hidden)
        self.classifier = nn.Linear(hidden, num_classes)

    def stages(self) -> tuple[Stage, ...]:
        """conv1 block, conv2 block, then fc and the classifier."""
        return (Stage(lambda x: pool_relu(self.conv1(x)), ("conv1",)),
                Stage(lambda x: pool_relu(self.conv2(x)), ("conv2",)),
                Stage(lambda x: self.classifier(torch.relu(self.fc(x.flatten(1)))),
                      ("fc", "classifier")))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return run_stages(self.stages(), x)


def lenet_flat_features(input_shape: tuple[int, ...]) -> int:
    """Features after LeNet's two 5x5 convs (no padding) and 2x2 max-pools: 16 * 4 * 4 at 28x28."""
    _, h, w = input_shape
    h2, w2 = ((h - 4) // 2 - 4) // 2, ((w - 4) // 2 - 4) // 2
    if h2 < 1 or w2 < 1:
        raise ValueError(f"LeNet needs inputs of at least 16x16 pixels, got {tuple(input_shape)}")
    return 16 * h2 * w2


class LeNet(RankedModel):
    """LeNet-5 as Maestro runs it on MNIST (NIID-Bench's "simple CNN"): conv 6@5x5, max-pool 2,
    conv 16@5x5, max-pool 2, fc 120, fc 84, classifier; no padding (28 -> 24 -> 12 -> 8 -> 4).

    Factorised as the other models: dense first conv and classifier, the rest low-rank.
    """

    def __init__(self, input_shape: tuple[int, ...] = (1, 28, 28), num_classes: int = 10) -> None:
        super().__init__()
        self.input_shape = tuple(input_shape)
        self.conv1 = nn.Conv2d(input_shape[0], 6, 5)
        self.conv2 = LowRankConv2d(6, 16, 5)
        self.fc1 = LowRankLinear(lenet_flat_features(input_shape), 120)
        self.fc2 = LowRankLinear(120, 84)
        self.classifier = nn.Linear(84, num_classes)

    def stages(self) -> tuple[Stage, ...]:
        """conv1 block, conv2 block, fc1, then fc2 and the classifier."""
        pool = nn.functional.max_pool2d
        return (Stage(lambda x: pool(torch.relu(self.conv1(x)), 2), ("conv1",)),
                Stage(lambda x: pool(torch.relu(self.conv2(x)), 2), ("conv2",)),
                Stage(lambda x: torch.relu(self.fc1(x.flatten(1))), ("fc1",)),
                Stage(lambda x: self.classifier(torch.relu(self.fc2(x))), ("fc2", "classifier")))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return run_stages(self.stages(), x)


def _norm(channels: int) -> nn.GroupNorm:
    """GroupNorm: batch-independent, so clients at different ranks and data share it safely."""
    return nn.GroupNorm(min(32, channels // 2), channels)


class BasicBlock(nn.Module):
    """ResNet basic block with low-rank 3x3 convs and, when the shape changes, a low-rank 1x1 shortcut."""

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        self.conv1 = LowRankConv2d(in_channels, out_channels, 3, stride, 1, bias=False)
        self.norm1 = _norm(out_channels)
        self.conv2 = LowRankConv2d(out_channels, out_channels, 3, 1, 1, bias=False)
        self.norm2 = _norm(out_channels)
        self.shortcut = nn.Identity()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(
                LowRankConv2d(in_channels, out_channels, 1, stride, bias=False), _norm(out_channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.norm1(self.conv1(x)))
        return torch.relu(self.norm2(self.conv2(out)) + self.shortcut(x))


class ResNet18(RankedModel):
    """CIFAR-style ResNet-18 (3x3 stem, no max-pool) with every conv after the stem low-rank."""

    def __init__(self, input_shape: tuple[int, ...] = (3, 32, 32), num_classes: int = 10) -> None:
        super().__init__()
        self.input_shape = tuple(input_shape)
        self.conv1 = nn.Conv2d(input_shape[0], 64, 3, 1, 1, bias=False)
        self.norm1 = _norm(64)
        stages, in_channels = [], 64
        for width, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
            stages.append(nn.Sequential(BasicBlock(in_channels, width, stride),
                                        BasicBlock(width, width, 1)))
            in_channels = width
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.classifier = nn.Linear(512, num_classes)

    def stages(self) -> tuple[Stage, ...]:
        return resnet_stages(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return run_stages(self.stages(), x)


def resnet_stages(model: nn.Module) -> tuple[Stage, ...]:
    """A ResNet-18's stem, each of its eight blocks, and its pooled classifier, as stages."""
    blocks = [Stage(block, (f"layer{i}.{j}",))
              for i, layer in enumerate((model.layer1, model.layer2, model.layer3, model.layer4), 1)
              for j, block in enumerate(layer)]
    return (Stage(lambda x: torch.relu(model.norm1(model.conv1(x))), ("conv1", "norm1")), *blocks,
            Stage(lambda x: model.classifier(
                torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1)), ("classifier",)))


MODELS = {"mlp": MLP, "cnn": CNN, "lenet": LeNet, "resnet18": ResNet18}
# How a factorised layer's maximum rank is bounded. A full-rank pair always costs more than the
# dense layer it replaces (min(a, b) * (a + b) > a * b), so keeping such layers dense would keep
# every layer dense: the choice is to cap the rank ("dense") or not ("none", Maestro's code).
RANK_CAPS = ("dense", "none")


def dense_cost_ranks(model: RankedModel) -> dict[str, int]:
    """Each layer's largest rank whose factor pair costs no more than its dense layer.

    ``r * (fan_in + out) <= out * fan_in``, the same bound for MACs and parameters (at least 1).
    """
    return {n: max(1, min(m.max_rank, m.dense_macs() // (m.fan_in + m.out_features)))
            for n, m in model.low_rank_layers().items()}


def build_model(name: str, input_shape: tuple[int, ...], num_classes: int,
                device: torch.device | str | None = None, rank_cap: str = "dense") -> RankedModel:
    """Build a registered model at its maximum ranks; ``device="meta"`` skips initialisation.

    ``rank_cap="dense"`` caps every factorised layer at ``dense_cost_ranks`` (its best rank-R
    approximation of the initial dense draw), so the full model never costs more than the dense
    one; ``"none"`` keeps the full rank ``min(out, fan_in)``.
    """
    if name not in MODELS:
        raise ValueError(f"model {name!r} is not allowed: use one of {sorted(MODELS)}")
    if rank_cap not in RANK_CAPS:
        raise ValueError(f"rank cap {rank_cap!r} is not allowed: use one of {RANK_CAPS}")
    with torch.device(device or "cpu"):
        model = MODELS[name](input_shape=tuple(input_shape), num_classes=num_classes)
    if rank_cap == "dense":
        model.truncate(dense_cost_ranks(model))
    return model


def model_from_arrays(name: str, input_shape: tuple[int, ...], num_classes: int,
                      arrays: Mapping[str, np.ndarray], device: str = "cpu") -> RankedModel:
    """Build a model holding exactly the ranks of ``arrays`` (a state dict) and load them."""
    model = build_model(name, input_shape, num_classes, device="meta")
    model.truncate({layer: int(arrays[f"{layer}.V"].shape[0]) for layer in model.low_rank_layers()})
    model.to_empty(device=device)
    model.load_state_dict({k: torch.as_tensor(np.asarray(v)) for k, v in arrays.items()})
    model.reset_ranks()
    return model


def model_arrays(model: nn.Module) -> dict[str, np.ndarray]:
    """The model's state dict as numpy arrays (copies, C-contiguous)."""
    return {k: np.ascontiguousarray(v.detach().cpu().numpy()) for k, v in model.state_dict().items()}


@torch.no_grad()
def load_dense_state(model: RankedModel, state: Mapping[str, np.ndarray | torch.Tensor]) -> None:
    """Load a dense model's state dict: every low-rank layer from its dense weight by SVD.

    ``state`` holds ``<layer>.weight`` (and ``<layer>.bias``) for the decomposed layers and the
    model's own names for everything else, as saved from the same architecture undecomposed.
    """
    state = {k: torch.as_tensor(np.asarray(v)) for k, v in state.items()}
    own = model.state_dict()
    layers = model.low_rank_layers()
    expected = {k for k in own if k.rsplit(".", 1)[0] not in layers}
    expected |= {f"{n}.weight" for n in layers} | {f"{n}.bias" for n, m in layers.items()
                                                   if m.bias is not None}
    if set(state) != expected:
        raise ValueError(f"dense state dict does not match the model: missing "
                         f"{sorted(expected - set(state))}, unexpected {sorted(set(state) - expected)}")
    for name, layer in layers.items():
        layer.set_dense_weight(state[f"{name}.weight"])
        if layer.bias is not None:
            layer.bias.copy_(state[f"{name}.bias"])
    for key in own:
        if key in state:
            own[key].copy_(state[key])


def dense_state(model: RankedModel) -> dict[str, np.ndarray]:
    """The model as a dense state dict: each low-rank layer's ``U @ V`` as ``<layer>.weight``."""
    layers = model.low_rank_layers()
    state = {}
    for key, value in model_arrays(model).items():
        layer, _, leaf = key.rpartition(".")
        if layer in layers and leaf in ("U", "V"):
            if leaf == "U":
                weight = layers[layer].composed_weight(layers[layer].max_rank)
                state[f"{layer}.weight"] = weight.detach().cpu().numpy()
            continue
        state[key] = value
    return state
