"""Per-component diagnostics of the global model: coverage, movement from init, importance.

A component is one rank index of one low-rank layer (column ``U[:, j]`` with row ``V[j]``; for the
width baselines, one channel of a width-sliced layer). Every round the server records, for each
component: how many client-steps trained it (``client-steps``: summed over the round's replies,
each counting the local steps whose loss reached it), how many of the round's clients held it,
how far it has moved from its initial value (relative to its initial norm), its own norm
``||U[:, j]|| * ||V[j]||`` and Maestro's tail importance ``||V[j:]|| * ||U[:, j:]||``, with the
last two also at initialisation. These are the measurements behind the question "why is the full
model not better than its prefix": a tail that few client-steps reach stays near its random
initial value, yet every forward at full rank adds it in.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from fl_maestro.shrinking import importance_from_arrays

COVERAGE_PREFIX = "coverage."  # metric name of a reply's per-component step counts: coverage.<layer>


class StepCounter:
    """Counts, per layer, the local steps that trained each component (a prefix per step)."""

    def __init__(self, max_ranks: Mapping[str, int]) -> None:
        self.counts = {name: np.zeros(r, np.int64) for name, r in max_ranks.items()}

    def add(self, trained: Mapping[str, int]) -> None:
        """One step that trained the first ``trained[name]`` components of every layer."""
        for name, rank in trained.items():
            self.counts[name][:rank] += 1



def coverage_metrics(counts: Mapping[str, np.ndarray]) -> dict[str, list[int]]:
    """Step counts as metric values ``coverage.<layer>``: lists of ints (Flower's MetricRecord)."""
    return {COVERAGE_PREFIX + name: np.asarray(c).tolist() for name, c in counts.items()}


def coverage_from_metrics(metrics: Mapping[str, object]) -> dict[str, np.ndarray]:
    """A reply's per-layer step counts from its metrics (empty if it sent none)."""
    return {key[len(COVERAGE_PREFIX):]: np.asarray(value, np.int64)
            for key, value in metrics.items()
            if key.startswith(COVERAGE_PREFIX) and isinstance(value, (list, tuple))}


def sum_coverage(replies: Sequence[Mapping[str, np.ndarray]]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Per layer, (client-steps, clients holding it) per component, summed over the replies."""
    total: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for reply in replies:
        for name, counts in reply.items():
            steps, holders = total.get(name, (np.zeros(0, np.int64), np.zeros(0, np.int64)))
            size = max(len(steps), len(counts))
            steps, holders = np.pad(steps, (0, size - len(steps))), np.pad(holders, (0, size - len(holders)))
            steps[:len(counts)] += counts
            holders[:len(counts)] += 1
            total[name] = (steps, holders)
    return total


def _factor_layers(arrays: Mapping[str, np.ndarray]) -> list[str]:
    return sorted(n[:-2] for n in arrays if n.endswith(".U") and n[:-1] + "V" in arrays)


def _norms(u: np.ndarray, v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-component norms of ``U``'s columns and ``V``'s rows (float64)."""
    return (np.sqrt(np.square(u, dtype=np.float64).sum(0)),
            np.sqrt(np.square(v.reshape(v.shape[0], -1), dtype=np.float64).sum(1)))


def movement(arrays: Mapping[str, np.ndarray], initial: Mapping[str, np.ndarray], layer: str
             ) -> np.ndarray:
    """Per component of ``layer``: ``||(U_j, V_j) - (U0_j, V0_j)|| / ||(U0_j, V0_j)||``.

    Compared over the components both hold (a shrunk model holds fewer)."""
    u, v = arrays[f"{layer}.U"], arrays[f"{layer}.V"]
    u0, v0 = initial[f"{layer}.U"], initial[f"{layer}.V"]
    r = min(u.shape[1], u0.shape[1])
    du, dv = _norms(u[:, :r] - u0[:, :r], v[:r] - v0[:r])
    nu, nv = _norms(u0[:, :r], v0[:r])
    return np.sqrt(du ** 2 + dv ** 2) / np.maximum(np.sqrt(nu ** 2 + nv ** 2), 1e-30)


def component_rows(server_round: int, arrays: Mapping[str, np.ndarray],
                   initial: Mapping[str, np.ndarray] | None,
                   replies: Sequence[Mapping[str, np.ndarray]]) -> list[dict]:
    """Tidy rows, one per (layer, component): the round's coverage and the model's state.

    Columns: round, layer, component (0-based rank index), client-steps, clients, and for
    factorised layers moved, norm, importance, and (with ``initial``) norm-init, importance-init.
    """
    coverage = sum_coverage(replies)
    rows: list[dict] = []
    layers = sorted(set(_factor_layers(arrays)) | set(coverage))
    for layer in layers:
        state = _state(arrays, initial, layer) if f"{layer}.U" in arrays else {}
        steps, holders = coverage.get(layer, (np.zeros(0, np.int64),) * 2)
        size = max([len(steps), *(len(v) for v in state.values())])
        for j in range(size):
            rows.append({"round": server_round, "layer": layer, "component": j,
                         "client-steps": int(steps[j]) if j < len(steps) else 0,
                         "clients": int(holders[j]) if j < len(holders) else 0,
                         **{k: float(v[j]) if j < len(v) else np.nan for k, v in state.items()}})
    return rows


def _state(arrays: Mapping[str, np.ndarray], initial: Mapping[str, np.ndarray] | None,
           layer: str) -> dict[str, np.ndarray]:
    u, v = arrays[f"{layer}.U"], arrays[f"{layer}.V"]
    nu, nv = _norms(u, v)
    state = {"norm": nu * nv, "importance": importance_from_arrays(u, v)}
    if initial is not None and f"{layer}.U" in initial:
        u0, v0 = initial[f"{layer}.U"], initial[f"{layer}.V"]
        nu0, nv0 = _norms(u0, v0)
        state.update({"moved": movement(arrays, initial, layer), "norm-init": nu0 * nv0,
                      "importance-init": importance_from_arrays(u0, v0)})
    return state
