"""Width-sliced models for the FjORD and HeteroFL baselines, behind the rank interface of models.

A width layer holds an ordinary dense ``weight`` / ``bias``. Its *rank* is the number of output
channels it runs (a leading slice, ``max_rank`` = the channels it holds), and its input width is
read from the input itself: it computes with ``weight[:rank, :x.shape[1]]``. So a model at ranks
``r`` is exactly the leading-corner sub-network that a client built at widths ``r`` holds, no layer
keeps state from another, and every array is cut as a leading corner, which is all the nested merge
(``strategies.merge``) needs. The classifier keeps its full output and only slices its input.

``training.train``, ``evaluate``, ``budgets.ranks_for_budget(...,
"uniform")``, ``merge_nested`` and ``corner_arrays`` work on these models unchanged. A layer's cost
depends on the active width of the layer before it, so costs and slice shapes come from a forward
traced on the ``meta`` device at the asked ranks.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from fl_maestro.layers import LowRankLayer, check_rank, leading
from fl_maestro.models import (CNN, COST_KINDS, MLP, LeNet, RankedModel, ResNet18, at_ranks,
                               lenet_flat_features)
from fl_maestro.width_layers import (WIDTH_MODELS_SUPPORT, NotFactorised, Shape, WidthConv2d,
                                     WidthGroupNorm, WidthLayer, WidthLinear)

__all__ = ["NotFactorised", "WidthConv2d", "WidthGroupNorm", "WidthLayer", "WidthLinear",
           "WidthModel", "WidthMLP", "WidthCNN", "WidthLeNet", "WidthResNet18", "WIDTH_MODELS",
           "build_width_model", "set_scaler", "width_model_from_arrays"]

_SLICED = (WidthLayer, WidthGroupNorm)


class WidthModel(RankedModel):
    """A network of width layers: ranks are output widths, costs follow the active widths."""

    def ranked_layers(self) -> dict[str, WidthLayer]:
        """The width-sliceable layers by module name (the classifier's output is not among them)."""
        return {n: m for n, m in self.named_modules()
                if isinstance(m, WidthLayer) and m.sliceable_out}

    def normalised_layers(self) -> set[str]:
        """The sliced layers whose output goes straight into a normalisation layer (none here:
        the MLP, CNN and LeNet have no norm layers)."""
        return set()

    def low_rank_layers(self) -> dict[str, LowRankLayer]:
        """None: width layers are dense, so factor-only features are refused by name."""
        raise NotFactorised(f"{type(self).__name__} has no low-rank layers: {WIDTH_MODELS_SUPPORT}")

    def truncate(self, ranks: Mapping[str, int]) -> None:
        """Not supported: build the narrower model with ``widths`` (``build_width_model``)."""
        raise ValueError("width models are not truncated in place; build them at the wanted "
                         "widths with build_width_model(..., widths=...)")

    def slice_shapes(self, ranks: Mapping[str, int] | None = None) -> dict[str, Shape]:
        """State-dict shapes of the sub-network at ``ranks`` (default: maximum ranks)."""
        shapes = {k: tuple(v.shape) for k, v in self.state_dict().items()}
        modules = dict(self.named_modules())
        for name, (in_width, out_width, _) in self._trace(ranks).items():
            for param, shape in modules[name].slice_shapes(out_width, in_width).items():
                shapes[f"{name}.{param}"] = shape
        return shapes

    def cost(self, ranks: Mapping[str, int] | None = None, kind: str = "macs") -> int:
        """MACs of every conv and linear, or parameters held, per sample at ``ranks``."""
        if kind == "params":
            params = dict(self.named_parameters())
            return sum(math.prod(s) for n, s in self.slice_shapes(ranks).items() if n in params)
        if kind != "macs":
            raise ValueError(f"cost kind {kind!r} is not allowed: use one of {COST_KINDS}")
        modules = dict(self.named_modules())
        return sum(modules[n].macs(out_width, positions, in_width)
                   for n, (in_width, out_width, positions) in self._trace(ranks).items()
                   if isinstance(modules[n], WidthLayer))

    def dense_cost(self, kind: str = "macs") -> int:
        """Cost at full width: width models are dense, so this is ``cost()`` at maximum ranks."""
        return self.cost(None, kind)

    def _trace(self, ranks: Mapping[str, int] | None) -> dict[str, tuple[int, int, int]]:
        """(in width, out width, output positions) of every sliced module, cached per ranks."""
        ranks = {**self.max_ranks(), **(ranks or {})}
        # Keyed by architecture, not instance: clients build a fresh model every round.
        held = tuple((n, tuple(p.shape)) for n, p in self.named_parameters())
        key = (type(self), self.input_shape, held, tuple(sorted(ranks.items())))
        if key not in _TRACES:
            if len(_TRACES) >= 4096:  # bounded: OD samplers visit many rank tuples over a run
                _TRACES.clear()
            _TRACES[key] = _trace_widths(self, ranks)
        return _TRACES[key]


_TRACES: dict[tuple, dict[str, tuple[int, int, int]]] = {}


@torch.no_grad()
def _trace_widths(model: WidthModel, ranks: Mapping[str, int]) -> dict[str, tuple[int, int, int]]:
    """Run one meta sample at ``ranks`` and record what each sliced module actually saw."""
    seen: dict[str, tuple[int, int, int]] = {}

    def hook(name: str):
        def record(_module, inputs, output):
            axis = 1 if output.dim() == 4 else -1
            positions = math.prod(output.shape[2:]) if output.dim() == 4 else 1
            seen[name] = (inputs[0].shape[axis], output.shape[axis], positions)
        return record

    # Meta copies of the values: shapes flow through the real forward, no arithmetic is done.
    values = {k: v.to("meta") for k, v in [*model.named_parameters(), *model.named_buffers()]}
    handles = [m.register_forward_hook(hook(n)) for n, m in model.named_modules()
               if isinstance(m, _SLICED)]
    try:
        with at_ranks(model, ranks):
            functional_call(model, values, (torch.zeros(1, *model.input_shape, device="meta"),))
    finally:
        for h in handles:
            h.remove()
    return seen


def _resolve_widths(full: Mapping[str, int], widths: Mapping[str, int] | None) -> dict[str, int]:
    """Each layer's held width: ``widths[name]`` if given (1..full), else the full width."""
    widths = dict(widths or {})
    unknown = sorted(set(widths) - set(full))
    if unknown:
        raise ValueError(f"widths name unknown layers {unknown}; layers are {sorted(full)}")
    return {n: check_rank(widths.get(n, f), f, f"width of {n!r}") for n, f in full.items()}


class WidthMLP(WidthModel):
    """Flatten -> width-sliced hidden layers with ReLU -> classifier (full output, sliced input)."""

    def __init__(self, input_shape: tuple[int, ...] = (1, 28, 28), num_classes: int = 10,
                 hidden: tuple[int, ...] = (256, 128),
                 widths: Mapping[str, int] | None = None) -> None:
        super().__init__()
        self.input_shape = tuple(input_shape)
        held = _resolve_widths({f"hidden.{i}": h for i, h in enumerate(hidden)}, widths)
        sizes = [math.prod(input_shape), *held.values()]
        self.hidden = nn.ModuleList(WidthLinear(a, b) for a, b in zip(sizes, sizes[1:]))
        self.classifier = WidthLinear(sizes[-1], num_classes, sliceable_out=False)

    stages, forward = MLP.stages, MLP.forward  # the same network as models.MLP, layer for layer


class WidthCNN(WidthModel):
    """``models.CNN`` with every conv and linear width-sliced (the classifier on its input only).

    The flatten before ``fc`` is channel-major, so the first ``c`` channels are the first
    ``c * H * W`` features: a leading corner of ``fc.weight``'s input axis.
    """

    def __init__(self, input_shape: tuple[int, ...] = (1, 28, 28), num_classes: int = 10,
                 channels: tuple[int, int] = (32, 64), hidden: int = 128,
                 widths: Mapping[str, int] | None = None) -> None:
        super().__init__()
        self.input_shape = tuple(input_shape)
        c, h, w = input_shape
        held = _resolve_widths({"conv1": channels[0], "conv2": channels[1], "fc": hidden}, widths)
        self.conv1 = WidthConv2d(c, held["conv1"], 3, padding=1)
        self.conv2 = WidthConv2d(held["conv1"], held["conv2"], 3, padding=1)
        self.fc = WidthLinear(held["conv2"] * (h // 4) * (w // 4), held["fc"])
        self.classifier = WidthLinear(held["fc"], num_classes, sliceable_out=False)

    stages, forward = CNN.stages, CNN.forward  # the same network as models.CNN, layer for layer


class WidthLeNet(WidthModel):
    """``models.LeNet`` with every conv and linear width-sliced (the classifier on its input only)."""

    def __init__(self, input_shape: tuple[int, ...] = (1, 28, 28), num_classes: int = 10,
                 widths: Mapping[str, int] | None = None) -> None:
        super().__init__()
        self.input_shape = tuple(input_shape)
        full = {"conv1": 6, "conv2": 16, "fc1": 120, "fc2": 84}
        held = _resolve_widths(full, widths)
        pixels = lenet_flat_features(input_shape) // 16  # channel-major flatten, as in WidthCNN
        self.conv1 = WidthConv2d(input_shape[0], held["conv1"], 5)
        self.conv2 = WidthConv2d(held["conv1"], held["conv2"], 5)
        self.fc1 = WidthLinear(held["conv2"] * pixels, held["fc1"])
        self.fc2 = WidthLinear(held["fc1"], held["fc2"])
        self.classifier = WidthLinear(held["fc2"], num_classes, sliceable_out=False)

    stages, forward = LeNet.stages, LeNet.forward  # the same network as models.LeNet, layer for layer


def _group_size(channels: int) -> int:
    """Channels per group of ``models._norm`` at the global width (2 for 64, ..., 16 for 512)."""
    return channels // min(32, channels // 2)


def _add_residual(out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``out + x`` on ``out``'s channels: ``x`` cut or zero-padded when the two widths differ."""
    c = out.shape[1]
    if x.shape[1] >= c:
        return out + x[:, :c]
    return out + F.pad(x, (0, 0, 0, 0, 0, c - x.shape[1]))  # pads the channel axis only


class WidthBlock(nn.Module):
    """ResNet basic block of width-sliced convs; the block's output width is ``conv2``'s."""

    def __init__(self, in_width: int, out_channels: int, stride: int, held: Mapping[str, int],
                 prefix: str) -> None:
        super().__init__()
        g = _group_size(out_channels)
        w1, w2 = held[f"{prefix}.conv1"], held[f"{prefix}.conv2"]
        self.conv1 = WidthConv2d(in_width, w1, 3, stride, 1, bias=False)
        self.norm1 = WidthGroupNorm(w1, g)
        self.conv2 = WidthConv2d(w1, w2, 3, 1, 1, bias=False)
        self.norm2 = WidthGroupNorm(w2, g)
        self.shortcut = nn.Identity()
        if f"{prefix}.shortcut.0" in held:
            ws = held[f"{prefix}.shortcut.0"]
            self.shortcut = nn.Sequential(WidthConv2d(in_width, ws, 1, stride, bias=False),
                                          WidthGroupNorm(ws, g))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.norm1(self.conv1(x)))
        # Widths of the two paths differ only under per-layer samplers; uniform widths match.
        return torch.relu(_add_residual(self.norm2(self.conv2(out)), self.shortcut(x)))


_STAGES = ((64, 1), (128, 2), (256, 2), (512, 2))


def _resnet_full_widths() -> dict[str, int]:
    """Full output width of every sliceable conv of ResNet-18, by module name."""
    full, in_channels = {"conv1": 64}, 64
    for stage, (width, stride) in enumerate(_STAGES, start=1):
        for block in range(2):
            prefix = f"layer{stage}.{block}"
            full[f"{prefix}.conv1"] = full[f"{prefix}.conv2"] = width
            if block == 0 and (stride != 1 or in_channels != width):
                full[f"{prefix}.shortcut.0"] = width
            in_channels = width
    return full


class WidthResNet18(WidthModel):
    """``models.ResNet18`` with every conv width-sliced (stem included) and sliceable GroupNorms."""

    def __init__(self, input_shape: tuple[int, ...] = (3, 32, 32), num_classes: int = 10,
                 widths: Mapping[str, int] | None = None) -> None:
        super().__init__()
        self.input_shape = tuple(input_shape)
        held = _resolve_widths(_resnet_full_widths(), widths)
        self.conv1 = WidthConv2d(input_shape[0], held["conv1"], 3, 1, 1, bias=False)
        self.norm1 = WidthGroupNorm(held["conv1"], _group_size(64))
        stages, in_width = [], held["conv1"]
        for stage, (width, stride) in enumerate(_STAGES, start=1):
            blocks = []
            for block in range(2):
                prefix = f"layer{stage}.{block}"
                block_stride = stride if block == 0 else 1
                blocks.append(WidthBlock(in_width, width, block_stride, held, prefix))
                in_width = held[f"{prefix}.conv2"]
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.classifier = WidthLinear(in_width, num_classes, sliceable_out=False)

    def normalised_layers(self) -> set[str]:
        """Every conv: each is followed by its GroupNorm (stem, blocks and shortcuts)."""
        return set(self.ranked_layers())

    stages, forward = ResNet18.stages, ResNet18.forward  # the same network as models.ResNet18


WIDTH_MODELS = {"mlp": WidthMLP, "cnn": WidthCNN, "lenet": WidthLeNet, "resnet18": WidthResNet18}


def build_width_model(name: str, input_shape: tuple[int, ...], num_classes: int,
                      widths: Mapping[str, int] | None = None,
                      device: torch.device | str | None = None) -> WidthModel:
    """Build a registered width model holding ``widths`` (default: full); ``"meta"`` skips init."""
    if name not in WIDTH_MODELS:
        raise ValueError(f"model {name!r} is not allowed: use one of {sorted(WIDTH_MODELS)}")
    with torch.device(device or "cpu"):
        return WIDTH_MODELS[name](input_shape=tuple(input_shape), num_classes=num_classes,
                                  widths=widths)


def set_scaler(model: WidthModel, global_widths: Mapping[str, int]) -> list[str]:
    """HeteroFL's scaler where its paper places it: in training, a sliced layer whose output goes
    into a normalisation layer divides that output by its rate (the width it holds over the
    global width, ``global_widths``); returns the layers scaled.

    HeteroFL always has conv -> scaler -> norm: the norm removes the scale again, so the scaler
    only evens out the sub-model's statistics in training. A layer with no norm after it gets no
    scaler: there the division by the rate would not be undone, the next layer's scaler would
    multiply it (a rate-0.44 conv1 and 0.42 conv2 and fc give a tier-0.2 client's classifier
    inputs 1 / (0.44 * 0.42 * 0.42) = 12.8 times their evaluation size, not 1 / 0.42), and the
    model would be trained on activations it never sees at evaluation, where the scaler is off.
    So the MLP, CNN and LeNet train unscaled; ResNet-18's convs (all before a GroupNorm) scale.
    """
    scaled = sorted(model.normalised_layers())
    for name in scaled:
        layer = model.ranked_layers()[name]
        layer.train_scale = layer.max_rank / global_widths[name]
    return scaled


def width_model_from_arrays(name: str, input_shape: tuple[int, ...], num_classes: int,
                            arrays: Mapping[str, np.ndarray], device: str = "cpu") -> WidthModel:
    """Build the width model holding exactly the widths of ``arrays`` (a state dict), loaded."""
    layers = build_width_model(name, input_shape, num_classes, device="meta").ranked_layers()
    widths = {n: int(np.shape(arrays[f"{n}.weight"])[0]) for n in layers}
    model = build_width_model(name, input_shape, num_classes, widths, device="meta")
    model.to_empty(device=device)
    model.load_state_dict({k: torch.as_tensor(np.asarray(v)) for k, v in arrays.items()})
    model.reset_ranks()
    return model
