"""The report as a reader sees it: rendered by headless Chromium at 1400 px, the summary table
and the first plot are on the first screen (geometry read from the rendered page, not the HTML).

Needs Debian's ``chromium`` (``make test`` installs it when missing and run as root); without it
the test is skipped and says why.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from simulations.report import build_report

TINY = Path(__file__).resolve().parents[1] / "results" / "reference" / "tiny" / "sweep"
WIDTH, HEIGHT = 1400, 900  # a laptop's browser window; the fold is the window's height
FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--hide-scrollbars")

# Runs in the page once it has loaded: where the first screen's parts ended up, in CSS pixels.
GEOMETRY = """<script>
window.addEventListener('load', () => {
  const box = e => { const r = e.getBoundingClientRect();
                     return {top: r.top, bottom: r.bottom, left: r.left, right: r.right}; };
  const img = document.querySelector('img');
  const out = {fold: window.innerHeight, width: window.innerWidth,
               summary: box(document.querySelector('table.summary')), plot: box(img),
               plotDecoded: img.naturalWidth > 0,
               openDetails: document.querySelectorAll('details[open]').length,
               details: document.querySelectorAll('details').length};
  const pre = document.createElement('pre'); pre.id = 'geometry';
  pre.textContent = JSON.stringify(out); document.body.appendChild(pre);
});
</script>"""


def _chromium() -> str:
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        pytest.skip("no chromium on PATH: `make test` installs Debian's chromium with apt-get "
                    "when run as root; otherwise install it to run this test")
    return path


def rendered_geometry(page: Path, profile: Path) -> dict:
    """Render ``page`` in headless Chromium at WIDTH x HEIGHT and return GEOMETRY's measures."""
    probe = page.with_name("probe.html")
    probe.write_text(page.read_text().replace("</body>", GEOMETRY + "</body>"))
    result = subprocess.run(
        [_chromium(), *FLAGS, f"--user-data-dir={profile}", f"--window-size={WIDTH},{HEIGHT}",
         "--virtual-time-budget=5000", "--dump-dom", probe.as_uri()],
        capture_output=True, text=True, timeout=120)
    found = re.search(r'<pre id="geometry">(.*?)</pre>', result.stdout)
    assert found, f"no geometry in the rendered page; chromium said: {result.stderr[-2000:]}"
    return json.loads(found.group(1).replace("&quot;", '"'))


def eight_methods(tmp_path: Path) -> Path:
    """The tiny reference's runs twice over, as eight methods: the reference comparison's size."""
    sweep = tmp_path / "sweep"
    for run in sorted(p for p in TINY.iterdir() if (p / "config.json").exists()):
        for suffix in ("", "-b"):
            copy = sweep / (run.name + suffix)
            shutil.copytree(run, copy, ignore=shutil.ignore_patterns("*.safetensors", "lock*"))
            cell = json.loads((copy / "cell.json").read_text())
            cell["axes"]["method"] += suffix
            (copy / "cell.json").write_text(json.dumps(cell))
    return sweep


@pytest.mark.skipif(not (TINY / "cells.csv").exists(), reason="no committed tiny reference")
def test_summary_and_first_plot_are_above_the_fold(tmp_path: Path) -> None:
    page = build_report([eight_methods(tmp_path)], tmp_path / "report")
    geometry = rendered_geometry(page, tmp_path / "profile")
    fold = geometry["fold"]
    assert geometry["width"] == WIDTH and 0 < fold <= HEIGHT
    summary, plot = geometry["summary"], geometry["plot"]
    assert 0 <= summary["top"] < summary["bottom"] <= fold  # the whole table
    assert geometry["plotDecoded"] and plot["bottom"] - plot["top"] > 250  # a real, legible plot
    assert summary["bottom"] <= plot["top"] and plot["bottom"] <= fold  # below it, all of it
    assert geometry["details"] >= 5 and geometry["openDetails"] == 0  # the rest is folded


@pytest.mark.skipif(not (TINY / "cells.csv").exists(), reason="no committed tiny reference")
def test_the_fold_check_sees_a_plot_pushed_down_by_a_long_table(tmp_path: Path) -> None:
    # the layout the report had: a long per-group table before the first plot
    page = build_report([TINY], tmp_path / "report")
    text = page.read_text()
    rows = "".join(f"<tr><td>group {i}</td><td>{i}</td></tr>" for i in range(40))
    at = text.index("<div class='first'>")
    page.write_text(f"{text[:at]}<table>{rows}</table>{text[at:]}")
    geometry = rendered_geometry(page, tmp_path / "profile")
    assert geometry["plot"]["top"] > geometry["fold"]
