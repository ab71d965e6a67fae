"""The scaling measurement's own arithmetic: config parsing, process sampling, the target verdict."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pandas as pd
import pytest

from simulations.scaling import (MemoryMonitor, measure, parse_configs, process_memory,
                                 target_line, write_report)


def test_parse_configs() -> None:
    assert parse_configs("100:10,1000:100") == [(100, 10), (1000, 100)]
    for bad in ("100", "a:b", "10:20", "10:0"):
        with pytest.raises(ValueError, match="config"):
            parse_configs(bad)


def test_process_memory_reads_this_process() -> None:
    rss, pss = process_memory(os.getpid())
    assert rss > 10 * 2**20 and 0 < pss <= rss
    assert process_memory(2**22 + 12345) == (0, 0)  # no such process


def test_monitor_sees_only_processes_under_its_home(tmp_path) -> None:
    env = {**os.environ, "FLWR_HOME": str(tmp_path)}
    child = subprocess.Popen([sys.executable, "-c", "import time; x = bytearray(50 << 20); "
                              "time.sleep(30)"], env=env)
    try:
        monitor = MemoryMonitor(tmp_path)
        deadline = time.monotonic() + 20
        while monitor.peak["rss-sum"] < 50 * 2**20 and time.monotonic() < deadline:
            monitor.sample()
            time.sleep(0.1)
        assert monitor.peak["processes"] == 1
        assert monitor.peak["rss-sum"] >= 50 * 2**20
    finally:
        child.kill()
        child.wait()


def test_target_verdict() -> None:
    row = {"clients": 1000, "per-round": 100, "exit-code": 0, "failed": False}
    assert "met, peak" in target_line(pd.DataFrame([{**row, "peak-pss-sum-mib": 3000}]))
    assert "NOT met" in target_line(pd.DataFrame([{**row, "peak-pss-sum-mib": 5000}]))
    # flwr run --stream exits 0 when the ServerApp fails: a failed run never meets the target
    assert "NOT met" in target_line(pd.DataFrame([{**row, "failed": True, "peak-pss-sum-mib": 3000}]))
    assert "not measured" in target_line(pd.DataFrame([{**row, "clients": 100,
                                                         "peak-pss-sum-mib": 1}]))


def test_a_run_whose_serverapp_fails_is_recorded_as_failed_though_flwr_exits_0(tmp_path) -> None:
    """A forced failure through the real ``flwr run``: at lr 1e9 every reply is NaN, the server
    refuses them all and min-reply-share stops the run; ``flwr run --stream`` still exits 0."""
    extra = {"dataset": "digits", "lr": 1e9, "eval-samples": 0, "device-mix": "1.0:1.0"}
    row = measure(4, 3, 2, tmp_path, extra, timeout=600)
    assert row["exit-code"] == 0 and row["status"] != "finished:completed"
    assert row["failed"] and row["round-s"] is None
    table = pd.DataFrame([row])
    write_report(table, tmp_path / "out", 2)
    assert "the run FAILED" in (tmp_path / "out" / "scaling.md").read_text()
