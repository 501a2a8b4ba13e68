"""HTML for Jupyter: the `_repr_html_` of saelab's notebook objects (a run, metrics, a latent's examples).

Plain strings of escaped HTML with inline styles, so they render the same in Jupyter, VS Code and exported HTML,
offline. Figures are Plotly, made by the objects themselves.
"""

from __future__ import annotations

import html
import math
from typing import Iterable, Sequence


def _fmt(v) -> str:
    if isinstance(v, bool) or v is None:
        return "—" if v is None else str(v)
    if isinstance(v, int):
        return f"{v:,}"
    if isinstance(v, float):
        if math.isnan(v):
            return "n/a"
        return f"{v:,.4g}" if abs(v) < 1e5 else f"{v:,.0f}"
    return html.escape(str(v))


def table_html(rows: Iterable[tuple[str, object]] | dict, title: str = "") -> str:
    """A two-column table of (name, value) rows."""
    rows = rows.items() if isinstance(rows, dict) else rows
    body = "".join(f"<tr><td style='text-align:left;padding:1px 10px 1px 0'>{html.escape(str(k))}</td>"
                   f"<td style='text-align:right;font-family:monospace'>{_fmt(v)}</td></tr>" for k, v in rows)
    head = f"<div style='font-weight:600;margin:4px 0'>{html.escape(title)}</div>" if title else ""
    return f"<div>{head}<table style='border-collapse:collapse;font-size:13px'>{body}</table></div>"


def grid_html(columns: Sequence[str], rows: Iterable[Sequence[object]], title: str = "") -> str:
    """A table with a header row."""
    th = "".join(f"<th style='padding:1px 8px;text-align:right'>{html.escape(str(c))}</th>" for c in columns)
    body = "".join("<tr>" + "".join(f"<td style='padding:1px 8px;text-align:right;font-family:monospace'>"
                                    f"{_fmt(v)}</td>" for v in r) + "</tr>" for r in rows)
    head = f"<div style='font-weight:600;margin:4px 0'>{html.escape(title)}</div>" if title else ""
    return f"<div>{head}<table style='border-collapse:collapse;font-size:13px'><tr>{th}</tr>{body}</table></div>"


def tokens_html(texts: Sequence[str], acts: Sequence[float], scale: float, peak: int | None = None) -> str:
    """One context as highlighted tokens: orange in proportion to act / scale, the value on hover, the peak
    token underlined. Newlines show as ↵."""
    out = []
    for i, (t, a) in enumerate(zip(texts, acts)):
        a = float(a)
        alpha = 0.0 if scale <= 0 or a == 0 else min(1.0, abs(a) / scale)
        colour = "255,140,0" if a >= 0 else "30,120,255"
        style = f"background:rgba({colour},{alpha:.2f});white-space:pre"
        if i == peak:
            style += ";border-bottom:2px solid #c00"
        shown = html.escape(t.replace("\n", "↵"))
        out.append(f"<span title='{a:.3f}' style='{style}'>{shown}</span>")
    return "<div style='font-family:monospace;font-size:12px;line-height:1.7;margin:2px 0'>" + "".join(out) + \
        "</div>"
