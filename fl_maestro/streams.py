"""Independent random streams, one per purpose, all derived from the run's one seed.

``default_rng(seed)`` called in several places hands each of them the *same* raw bits: the budget
shuffle, the client sampler and the evaluation subset would be drawn from one stream, so changing
one draw silently correlates with the others. Here every stream is a child of
``SeedSequence(seed)`` named by its purpose (plus optional integer keys such as a round and a
partition id): the same (seed, name, keys) always gives the same stream, different names give
independent ones.

    rng(cfg.seed, "sampling")                       # the strategy's client sampler
    rng(cfg.seed, "training", server_round, pid)    # one client's ordered-dropout draws
    seed_int(cfg.seed, "partition")                 # an int for libraries that want one

Names in use: budgets, sampling, evaluation, partition, shuffle, training, init, world. A new purpose
takes a new name; reusing a name couples the two draws again.
"""

from __future__ import annotations

import hashlib
import numbers

import numpy as np


def _name_key(name: str) -> int:
    """A stable 64-bit integer for ``name`` (Python's ``hash`` changes from process to process)."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"stream name {name!r} is not allowed: use a non-empty string")
    return int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "little")


def seed_sequence(seed: int, name: str, *keys: int) -> np.random.SeedSequence:
    """The SeedSequence of stream ``name`` (and ``keys``) of run seed ``seed``."""
    for value in (seed, *keys):
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 0:
            raise ValueError(f"seed and stream keys must be integers >= 0, got {value!r}")
    return np.random.SeedSequence(int(seed), spawn_key=(_name_key(name), *map(int, keys)))


def rng(seed: int, name: str, *keys: int) -> np.random.Generator:
    """A numpy Generator on stream ``name`` (and ``keys``) of run seed ``seed``."""
    return np.random.default_rng(seed_sequence(seed, name, *keys))


def seed_int(seed: int, name: str, *keys: int) -> int:
    """A 63-bit integer seed of stream ``name``, for torch or libraries that take an int."""
    state = seed_sequence(seed, name, *keys).generate_state(2, np.uint32)
    return int((int(state[1]) << 32 | int(state[0])) >> 1)
