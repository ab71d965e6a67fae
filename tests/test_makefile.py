"""The Makefile's overridable parts: which torch `make venv` installs, and how a run resumes."""

from __future__ import annotations

import shutil
import subprocess

import pytest

from simulations.launch import APP_DIR

pytestmark = pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")


def _dry_run(*args: str) -> str:
    """The commands `make` would run (-n), as if every target were out of date (-B)."""
    return subprocess.run(["make", "-n", "-B", *args], cwd=APP_DIR, capture_output=True,
                          text=True, check=True).stdout


def test_torch_comes_from_the_default_index_unless_told() -> None:
    default = next(line for line in _dry_run("venv").splitlines() if "torch" in line)
    assert '"torch==2.13.0"' in default and "--index-url" not in default
    chosen = _dry_run("venv", "TORCH_INDEX=https://download.pytorch.org/whl/cpu",
                      "TORCH_SPEC=torch==2.13.0+cpu")
    line = next(line for line in chosen.splitlines() if "torch" in line)
    assert '--index-url https://download.pytorch.org/whl/cpu "torch==2.13.0+cpu"' in line


def test_make_run_takes_the_run_name_to_resume() -> None:
    out = _dry_run("run", "RUN_NAME=default-20260101-000000", "RUN_CONFIG=resume=true")
    assert "-c run-name=default-20260101-000000" in out and "-c resume=true" in out


def test_make_bench_runs_the_comparison_cost_beside_a_base_checkout_when_told() -> None:
    out = " ".join(_dry_run("bench").split())
    assert "-m simulations.bench_comparison --out results/bench ||" in out
    assert "--threads" not in out
    told = " ".join(_dry_run("bench", "BENCH_BASE=/tmp/base", "BENCH_THREADS=1").split())
    assert "-m simulations.bench_comparison --out results/bench --base /tmp/base" in told
    assert "-m simulations.bench_throughput --out results/bench --threads 1" in told


def test_make_test_installs_chromium_for_the_browser_test_before_pytest() -> None:
    out = _dry_run("test")
    assert "command -v chromium" in out and "apt-get install -y -qq chromium" in out
    assert out.index("install -y -qq chromium") < out.index("-m pytest")
