"""Rendering helpers shared by the pages: highlighted tokens (HTML spans) and the Plotly figures.

Token colours follow Neuronpedia: emerald background with opacity 0.05 + 0.95·log10(1 + 9·|a|/max), so faint
activations stay visible; negative values (signed codes) in red; inactive tokens uncoloured. Each active token is
a `<span class="xp-act" title=...>` whose tooltip gives the token, its value and its position; st.html keeps inline
styles and titles and runs no JavaScript, so this is fast, offline and testable.
"""

from __future__ import annotations

import html
import math

import numpy as np
import plotly.graph_objects as go

POS_RGB = (52, 211, 153)  # Neuronpedia's emerald
NEG_RGB = (248, 113, 113)
PLOT_CONFIG = {"displayModeBar": False}
CONTEXT_WIDTHS = {"5": 5, "16": 16, "full": None}  # tokens each side of the peak (Neuronpedia: 5 / 16 / 200)

CSS = """<style>
.xp-ex{font-family:ui-monospace,SFMono-Regular,Menlo,monospace;font-size:13px;line-height:1.9;white-space:pre-wrap;
 word-break:break-all;margin:2px 0 6px 0;padding:2px 6px;border-left:3px solid #e5e7eb}
.xp-ex .xp-meta{color:#9ca3af;font-size:11px;margin-right:6px}
.xp-act{border-radius:3px;padding:1px 0}
.xp-peak{outline:1.5px solid #047857}
.xp-sel{outline:2px solid #2563eb}
.xp-logits{border-collapse:collapse;font-size:13px;width:100%}
.xp-logits td{padding:1px 6px;border-bottom:1px solid #f3f4f6}
.xp-logits td.xp-tok{font-family:ui-monospace,SFMono-Regular,Menlo,monospace;white-space:pre}
.xp-logits td.xp-val{text-align:right;font-variant-numeric:tabular-nums}
</style>"""


def opacity(ratio: float) -> float:
    """Neuronpedia's log-scaled opacity for |a| / max in [0, 1]."""
    r = min(max(float(ratio), 0.0), 1.0)
    return 0.05 + 0.95 * math.log10(1 + 9 * r)


def token_span(text: str, value: float, vmax: float, title: str = "", extra_class: str = "") -> str:
    """One token: a coloured span with a tooltip when active (value != 0), plain escaped text otherwise."""
    t = html.escape(text)
    if value == 0 or not math.isfinite(value) or vmax <= 0:
        if extra_class:
            return f'<span class="{extra_class}" title="{html.escape(title)}">{t}</span>'
        return t
    rgb = POS_RGB if value > 0 else NEG_RGB
    a = opacity(abs(value) / vmax)
    cls = "xp-act" + (f" {extra_class}" if extra_class else "")
    return (f'<span class="{cls}" style="background:rgba({rgb[0]},{rgb[1]},{rgb[2]},{a:.3f})" '
            f'title="{html.escape(title)}">{t}</span>')


def example_html(texts: list[str], acts: np.ndarray, pos: int, start: int, stop: int, vmax: float,
                 meta: str = "") -> str:
    """One example's window [start, stop) as highlighted tokens; the peak token outlined."""
    parts = [f'<span class="xp-meta">{html.escape(meta)}</span>'] if meta else []
    if start > 0:
        parts.append("…")
    for p in range(start, stop):
        v = float(acts[p])
        parts.append(token_span(texts[p], v, vmax, f"{texts[p]!r} · {v:.4g} · position {p}",
                                "xp-peak" if p == pos and v != 0 else ""))
    if stop < len(texts):
        parts.append("…")
    return f'<div class="xp-ex">{"".join(parts)}</div>'


def examples_html(bundle, examples, half_width: int | None, scale: str, global_max: float) -> str:
    """A list of examples; `scale` "global" colours against the latent's max, "example" against each row's peak."""
    out = [CSS]
    for ex in examples:
        s, e = ex.window(half_width)
        texts = bundle.token_text(ex.tokens[s:e])
        full = [""] * s + texts + [""] * (len(ex.tokens) - e)
        vmax = abs(ex.act) if scale == "example" else global_max
        out.append(example_html(full, ex.acts, ex.pos, s, e, vmax or 1.0, f"row {ex.row} · {ex.act:.3g}"))
    return "".join(out)


# ================================================================================================ figures
def logits_html(effects, rgb: tuple[int, int, int]) -> str:
    """Top ± logit effects as a small HTML table (Neuronpedia's lists): each token (repr, so spaces and newlines
    show) on a background whose opacity grows with |effect|. Plain HTML rather than st.dataframe: ten rows do not
    need the data-grid chunk, whose download and start-up delay the page's first chart."""
    vmax = max((abs(t.value) for t in effects), default=0.0) or 1.0
    rows = "".join(f'<tr><td class="xp-tok"><span style="background:rgba({rgb[0]},{rgb[1]},{rgb[2]},'
                   f'{opacity(abs(t.value) / vmax):.2f})">{html.escape(repr(t.text))}</span></td>'
                   f'<td class="xp-val">{t.value:+.4f}</td></tr>' for t in effects)
    return f'{CSS}<table class="xp-logits">{rows}</table>'


def _bars(counts, edges, colors, name: str, hover_x: str) -> go.Bar:
    edges = np.asarray(edges, dtype=np.float64)
    centres = (edges[:-1] + edges[1:]) / 2
    text = [f"{hover_x} {a:.4g} – {b:.4g}" for a, b in zip(edges[:-1], edges[1:])]
    return go.Bar(x=centres, y=np.asarray(counts).tolist(), width=np.diff(edges), marker_color=colors, name=name,
                  hovertext=text, hovertemplate="%{hovertext}<br>%{y:,} " + name + "<extra></extra>")


def _layout(title: str, height: int, **extra) -> dict:
    """A figure layout as one dict (update_layout call by call costs ~10× more than building it at once)."""
    return {"title": {"text": title}, "height": height, "margin": {"l": 10, "r": 10, "t": 40, "b": 10}, "bargap": 0,
            "showlegend": False, **extra}


def _vline(x: float, color: str, dash: str = "solid") -> dict:
    return {"type": "line", "x0": x, "x1": x, "xref": "x", "y0": 0, "y1": 1, "yref": "paper",
            "line": {"color": color, "width": 2, "dash": dash}}


def activation_histogram(lat, log_y: bool = False, marker: float | None = None) -> go.Figure:
    """The latent's active values (Neuronpedia's "activations density" plot); a marker for a tested value. Bins
    below zero (signed codes) are red, as their tokens are."""
    layout = _layout(f"Activations · density {100 * lat.stats.density:.3f} %", 260,
                     yaxis={"type": "log" if log_y else "linear"},
                     shapes=[_vline(marker, "#16a34a")] if marker is not None else [])
    edges = np.asarray(lat.hist_edges, dtype=np.float64)
    colors = [f"rgb{NEG_RGB if c < 0 else POS_RGB}".replace(" ", "") for c in (edges[:-1] + edges[1:]) / 2]
    return go.Figure([_bars(lat.hist_counts, edges, colors, "tokens", "activation")], layout)


def logit_histogram(lat) -> go.Figure:
    """Logit effects of the decoder direction over the vocabulary: negative bins red, positive green."""
    edges = np.asarray(lat.logit_hist_edges, dtype=np.float64)
    centres = (edges[:-1] + edges[1:]) / 2
    colors = ["rgb(248,113,113)" if c < 0 else "rgb(52,211,153)" for c in centres]
    return go.Figure([_bars(lat.logit_hist_counts, edges, colors, "vocabulary tokens", "logit effect")],
                     _layout("Logit effects", 260))


def density_histogram(table, dense_threshold: float) -> go.Figure:
    """log10 density of the live latents; dead and dense counts in the title."""
    live = table["density"][~table["dead"]].to_numpy(dtype=np.float64)
    n_dead, n_dense = int(table["dead"].sum()), int(table["dense"].sum())
    fig = go.Figure()
    if len(live):
        counts, edges = np.histogram(np.log10(live), bins=min(60, max(5, len(live) // 4)))
        colors = ["rgb(251,146,60)" if b > math.log10(dense_threshold) else "rgb(52,211,153)" for b in edges[1:]]
        fig.add_trace(_bars(counts, edges, colors, "latents", "log10 density"))
    fig.update_layout(_layout(f"Log10 density of live latents · {n_dead:,} dead · {n_dense:,} dense", 300,
                              xaxis={"title": {"text": "log10(share of tokens where active)"}},
                              shapes=[_vline(math.log10(dense_threshold), "#ea580c", "dot")] if len(live) else []))
    return fig


MAP_POINTS = 200_000  # above this the decoder map shows a random subsample (WebGL stays responsive)


def decoder_map(xy: np.ndarray, color: np.ndarray, color_name: str, seed: int = 0) -> go.Figure:
    """The decoder map as WebGL points; customdata = latent id (a click opens the latent)."""
    ids = np.arange(len(xy))
    if len(ids) > MAP_POINTS:
        ids = np.sort(np.random.default_rng(seed).choice(len(ids), MAP_POINTS, replace=False))
    c = np.asarray(color, dtype=np.float64)[ids]
    fig = go.Figure(go.Scattergl(
        x=np.asarray(xy[ids, 0], dtype=np.float32), y=np.asarray(xy[ids, 1], dtype=np.float32), mode="markers",
        customdata=ids, marker=dict(size=4, color=np.nan_to_num(c, nan=np.nanmin(c) if np.isfinite(c).any() else 0),
                                    colorscale="Viridis", showscale=True, colorbar=dict(title=color_name)),
        hovertemplate="latent %{customdata}<br>" + color_name + " %{marker.color:.3g}<extra></extra>"))
    fig.update_layout(height=520, margin=dict(l=10, r=10, t=30, b=10), dragmode="zoom")
    return fig


def line_chart(x, ys: dict, title: str, x_title: str) -> go.Figure:
    fig = go.Figure([go.Scatter(x=x, y=y, mode="lines", name=name) for name, y in ys.items()])
    fig.update_layout(title=title, height=280, margin=dict(l=10, r=10, t=40, b=10), xaxis_title=x_title)
    return fig
