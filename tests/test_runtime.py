"""Process-wide allocator settings: applied in-process, and handed to the processes launchers start."""

from __future__ import annotations

import platform
from pathlib import Path

import pytest

from fl_maestro.runtime import ALLOCATOR_ENV, keep_freed_memory
from simulations.launch import flower_env


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc",
                    reason="mallopt is glibc's")
def test_keep_freed_memory_applies_on_glibc_and_is_idempotent() -> None:
    assert keep_freed_memory() is True
    assert keep_freed_memory() is True


def test_flower_processes_start_with_the_allocator_settings(tmp_path: Path) -> None:
    env = flower_env(tmp_path)
    assert {k: env[k] for k in ALLOCATOR_ENV} == ALLOCATOR_ENV
    assert env["MALLOC_ARENA_MAX"] == "1" and int(env["MALLOC_TRIM_THRESHOLD_"]) >= 1 << 20
