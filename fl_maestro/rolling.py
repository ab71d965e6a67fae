"""FedRolex's rolling sub-model: which channels of each layer a client trains in a round.

Alam et al. (NeurIPS 2022), read in ``resnet_server.py`` (``split_model``): for a hidden layer of
``K`` output channels, round ``t`` (counted from 0 on the server) takes ``arange(K)`` rolled by
``t mod K`` (``torch.roll``: entries move towards higher positions, so the list starts at
``K - t mod K``) and a client keeps the first ``ceil(K * rate)`` entries, wrapping around the end.
Every client of the same width gets the same window in a round; the window moves by one channel
per round, so within ``K`` rounds every channel is trained by every width. A layer's input indices
are the previous layer's output indices; the classifier keeps all its outputs.

Here rounds are the federation's 1-based ``server_round``, so round 1 rolls by 0 (the leading
channels, HeteroFL's slice) as the reference code's first round does. The width a client keeps of
each layer is its plan's rank (``methods.width_ranks``), the same widths HeteroFL gives it.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from fl_maestro.width import WidthLayer, WidthModel

Window = tuple[np.ndarray, ...]


def rolling_window(size: int, width: int, server_round: int) -> np.ndarray:
    """The ``width`` channel indices (of ``size``) a client trains in ``server_round`` (1-based)."""
    if not 1 <= width <= size:
        raise ValueError(f"width={width!r} is not allowed for a layer of {size} channels: "
                         f"allowed 1..{size}")
    if server_round < 1:
        raise ValueError(f"server_round={server_round!r}: allowed an integer >= 1")
    return np.roll(np.arange(size), (server_round - 1) % size)[:width]


def _expand(channels: np.ndarray, per_channel: int) -> np.ndarray:
    """Feature indices of a channel-major flatten: channel c holds ``c*m .. c*m + m - 1``."""
    return (channels[:, None] * per_channel + np.arange(per_channel)).ravel()


def window_indices(model: WidthModel, widths: Mapping[str, int],
                   server_round: int) -> dict[str, Window]:
    """Per array of ``model``'s state dict, the global indices on every axis that a client of
    ``widths`` (layer -> channels kept) holds in ``server_round``.

    Only chain models (every width layer feeds the next, as in the MLP, CNN and LeNet) are
    supported: a model with normalisation or residual paths (ResNet-18) is refused by name.
    """
    arrays = dict(model.state_dict())
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, WidthLayer)]
    covered = {f"{n}.{p}" for n, m in layers for p, _ in m.named_parameters(recurse=False)}
    if set(arrays) != covered:
        raise ValueError(f"FedRolex's rolling window supports chain models only; "
                         f"{type(model).__name__} has other arrays "
                         f"{sorted(set(arrays) - covered)[:4]}")
    out: dict[str, Window] = {}
    previous: tuple[np.ndarray, int] | None = None  # the last layer's window and channel count
    for name, layer in layers:
        weight = arrays[f"{name}.weight"]
        size, fan_in = weight.shape[0], weight.shape[1]
        rows = rolling_window(size, widths[name], server_round) if layer.sliceable_out \
            else np.arange(size)
        if previous is None:
            cols = np.arange(fan_in)
        else:
            channels, prev_size = previous
            if fan_in % prev_size:
                raise ValueError(f"layer {name!r}: {fan_in} inputs are no whole multiple of "
                                 f"the previous layer's {prev_size} channels")
            cols = _expand(channels, fan_in // prev_size)
        out[f"{name}.weight"] = (rows, cols, *(np.arange(k) for k in weight.shape[2:]))
        if layer.bias is not None:
            out[f"{name}.bias"] = (rows,)
        previous = (rows, size)
    return out
