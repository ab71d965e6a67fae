"""The report's HTML page: the answer on the first screen, the details folded below it.

The first screen holds a compact table of groups (methods) x budget tiers in percent (mean, 95%
half-width, n, and each group's paired difference from the baseline, marked when separated),
what converged, and the first two plots side by side. Every other table and plot follows under a
heading, each folded in a ``<details>`` element. Accuracy a person reads is in percent; the CSV
files beside the page keep fractions.
"""

from __future__ import annotations

import base64
import html
import math
from collections.abc import Sequence
from pathlib import Path

import pandas as pd

# Columns of the report's tables that hold an accuracy (a fraction in the CSV, percent on the
# page): matched by their start, since their names carry k ("mean of last 5").
PERCENT_PREFIXES = ("mean of last", "last ", "last round", "difference", "95% CI",
                    "full-rank accuracy", "accuracy at time")

STYLE = """
body{font-family:sans-serif;max-width:1380px;margin:auto;padding:0 10px;font-size:14px}
h1{font-size:22px;margin:10px 0 4px}h2{font-size:17px;margin:18px 0 6px}
p.lead{margin:2px 0 6px;color:#333;font-size:12px}
img{max-width:100%}
.first{display:flex;gap:8px;align-items:flex-start}.first figure{margin:0;flex:1}
table{border-collapse:collapse;font-size:13px}td,th{border:1px solid #ccc;padding:2px 6px;
text-align:right}
table.summary td{white-space:nowrap}table.summary .diff{display:block;font-size:11px;color:#555}
table.summary .sep{color:#000;font-weight:bold}
details{margin:4px 0}summary{cursor:pointer;font-weight:bold;padding:3px 0}
"""


def percent(table: pd.DataFrame) -> pd.DataFrame:
    """The table with its accuracy columns (``PERCENT_PREFIXES``) multiplied by 100."""
    numbers = {c: pd.to_numeric(table[c], errors="coerce") for c in table
               if str(c).startswith(PERCENT_PREFIXES)}  # object columns after a concat, too
    return table.assign(**{c: v * 100 for c, v in numbers.items()
                           if v.notna().sum() == table[c].notna().sum()})


def _pm(mean: float, half: float, signed: bool = False) -> str:
    """``80.7 ± 1.2`` in percent points from fractions (no ± when the half-width is NaN)."""
    text = f"{mean * 100:+.1f}" if signed else f"{mean * 100:.1f}"
    return text if math.isnan(half) else f"{text} ± {half * 100:.1f}"


def _summary_rows(summary: pd.DataFrame) -> tuple[list[float], list[tuple]]:
    """The levels, and per group (name, seeds, [(value, difference, separated) or None per
    level], converged) as text, from ``summary.summary_frame``."""
    levels = sorted(summary["level"].unique())
    rows = []
    for group, mine in summary.groupby("group", sort=False):
        cells = mine.set_index("level")
        texts = []
        for level in levels:
            if level not in cells.index:
                texts.append(None)
                continue
            row = cells.loc[level]
            diff = None if math.isnan(row["difference"]) else \
                _pm(row["difference"], row["difference ±95%"], signed=True)
            texts.append((_pm(row["mean"], row["ci-half"]), diff, bool(row["separated"])
                          if diff else False))
        n = mine["n"]
        seeds = f"{n.min()}" if n.min() == n.max() else f"{n.min()}-{n.max()}"
        rows.append((str(group), seeds, texts, str(mine["converged"].iloc[0])))
    return levels, rows


def _legend(summary: pd.DataFrame, baseline: str | None) -> str:
    attrs = summary.attrs
    k_min, k_max = attrs.get("k-min", attrs.get("k", 1)), attrs.get("k-max", attrs.get("k", 1))
    used = f"{k_min}" if k_min == k_max else f"{k_min}-{k_max}"
    span = (f" (rounds {attrs['first-round']}-{attrs['last-round']})"
            if "first-round" in attrs else "")
    legend = (f"Accuracy in percent: mean of each run's last {used} evaluated round(s) within its "
              f"final fifth of rounds{span}, at most {attrs.get('k', 1)}, then mean ± 95% "
              "t-interval over the n seeds.")
    if baseline is not None:
        legend += (f" Δ: paired difference from {baseline} on the same seeds, in points; * and "
                   "bold: separated (its 95% interval excludes 0).")
    return legend


def _level_name(summary: pd.DataFrame) -> str:
    return "budget" if summary.attrs.get("kind", "tier") == "tier" else "rank fraction"


def summary_html(summary: pd.DataFrame, baseline: str | None) -> str:
    """The first table: one row per group, one column per level, percent with 95% half-widths;
    under each non-baseline value its paired difference from ``baseline`` (bold: separated)."""
    levels, rows = _summary_rows(summary)
    head = "".join(f"<th>{_level_name(summary)} {float(v):g}</th>" for v in levels)
    body = []
    for group, seeds, texts, converged in rows:
        tds = []
        for cell in texts:
            if cell is None:
                tds.append("<td>-</td>")
                continue
            value, diff, sep = cell
            if diff is not None:
                label = "separated" if sep else "not separated"
                value += (f"<span class='diff{' sep' if sep else ''}' title='{label}'>"
                          f"Δ {diff}{' *' if sep else ''}</span>")
            tds.append(f"<td>{value}</td>")
        body.append(f"<tr><th style='text-align:left'>{html.escape(group)}</th>"
                    f"<td>{seeds}</td>{''.join(tds)}<td>{converged}</td></tr>")
    return (f"<table class='summary'><tr><th>group</th><th>n</th>{head}<th>converged</th></tr>"
            f"{''.join(body)}</table><p class='lead'>{html.escape(_legend(summary, baseline))}"
            "</p>")


def summary_markdown(summary: pd.DataFrame, baseline: str | None) -> str:
    """The first table as Markdown (for a README): the same cells, the difference after a
    semicolon, separated ones starred."""
    levels, rows = _summary_rows(summary)
    lines = ["| group | n | " + " | ".join(f"{_level_name(summary)} {float(v):g}"
                                           for v in levels) + " | converged |",
             "| --- " * (len(levels) + 3) + "|"]
    for group, seeds, texts, converged in rows:
        cells = ["-" if c is None else c[0] + (f"; Δ {c[1]}{' *' if c[2] else ''}" if c[1]
                                               else "") for c in texts]
        lines.append(f"| {group} | {seeds} | " + " | ".join(cells) + f" | {converged} |")
    return "\n".join(lines) + "\n\n" + _legend(summary, baseline) + "\n"


def _table_html(table: pd.DataFrame) -> str:
    """A table as HTML: accuracy in percent (2 decimals), other numbers with 4 decimals."""
    shown = percent(table)
    formatters = {c: (lambda v: "-" if pd.isna(v) else f"{v:.2f}") for c in shown
                  if c in table and not shown[c].equals(table[c])}
    return shown.to_html(index=False, float_format=lambda v: f"{v:.4f}", na_rep="-",
                         formatters=formatters)


def _image_html(caption: str, png: Path) -> str:
    data = base64.b64encode(png.read_bytes()).decode()
    return f'<img alt="{html.escape(caption)}" src="data:image/png;base64,{data}">'


def write_html(out: Path, title: str, lead: str, first: Sequence[str | tuple[str, Path]],
               folded: Sequence[tuple[str, Sequence[tuple[str, pd.DataFrame | Path | str]]]]
               ) -> Path:
    """One self-contained page: ``title``, ``lead``, the first screen (HTML snippets, then
    (caption, PNG) pairs side by side), then each heading of ``folded`` with its (caption, table,
    PNG or text) items folded; empty tables are left out. Text paragraphs are split on blank
    lines."""
    parts = [f"<h1>{html.escape(title)}</h1>", f"<p class='lead'>{html.escape(lead)}</p>"]
    parts += [item for item in first if isinstance(item, str)]
    figures = [item for item in first if not isinstance(item, str)]
    parts.append("<div class='first'>" + "".join(
        f"<figure>{_image_html(caption, png)}</figure>" for caption, png in figures) + "</div>")
    for heading, items in folded:
        items = [(c, i) for c, i in items if not (isinstance(i, pd.DataFrame) and i.empty)]
        if not items:
            continue
        parts.append(f"<h2>{html.escape(heading)}</h2>")
        for caption, item in items:
            if isinstance(item, str):
                body = "".join(f"<p>{html.escape(p)}</p>" for p in item.split("\n\n"))
            elif isinstance(item, pd.DataFrame):
                body = _table_html(item)
            else:
                body = _image_html(caption, item)
            parts.append(f"<details><summary>{html.escape(caption)}</summary>{body}</details>")
    page = (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}"
            f"</title><style>{STYLE}</style></head><body>{''.join(parts)}</body></html>")
    (out / "report.html").write_text(page)
    return out / "report.html"
