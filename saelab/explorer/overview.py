"""Overview: the run's training and eval metrics, the log-density histogram (dead / dense counts), L0, and the
decoder map (WebGL points; selecting one opens its latent). URL: ?sae=NAME&color=density|<score column>."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import streamlit as st

from saelab.explorer import render, state
from saelab.rundir import RunDir

BASE_COLUMNS = {"latent", "n_active", "density", "max", "min", "mean", "var", "skew", "kurtosis", "dead", "dense",
                "n_rows", "map_x", "map_y"}


def score_columns(table) -> list[str]:
    return [c for c in table.columns if c not in BASE_COLUMNS and pd.api.types.is_numeric_dtype(table[c])]


def _training(run: str | None) -> None:
    if not run:
        st.caption("No run folder next to this bundle: no training or eval metrics to show.")
        return
    run = RunDir(run)
    core = run.core
    if core.exists():
        try:
            m = json.loads(core.read_text())
            flat = {k: v for k, v in (m.get("metrics", m)).items() if isinstance(v, (int, float))}
            cols = st.columns(min(6, max(1, len(flat))))
            for j, (k, v) in enumerate(list(flat.items())[:12]):
                cols[j % len(cols)].metric(k, f"{v:.4g}")
        except (json.JSONDecodeError, AttributeError):
            st.caption(f"{core} is not readable JSON")
    mf = run.metrics
    if mf.exists():
        rows = []
        for line in mf.read_text().splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue  # a line cut by a killed run
        df = pd.DataFrame(rows)
        if len(df) and "tokens" in df:
            ys = {k: df[k] for k in ("fvu", "l0", "dead_pct") if k in df}
            c = st.columns(len(ys) or 1)
            for col, (k, y) in zip(c, ys.items()):
                col.plotly_chart(render.line_chart(df["tokens"], {k: y}, f"training {k}", "tokens"),
                                 config=render.PLOT_CONFIG, key=f"train_{k}")


def page() -> None:
    cur = state.begin()
    if cur is None:
        return
    entry, bundle = cur
    m = bundle.manifest
    t = bundle.table()
    st.title(f"Overview · {entry.name}")
    st.caption(f"{state.hook_name(bundle)} on {m['model'].get('name', '?')} · built {m.get('created', '?')} by "
               f"{m.get('created_by', '?')} · {m['corpus']['tokens']:,} tokens from the {m['corpus'].get('split')} "
               f"split of {m['corpus'].get('source')}")
    n_dead, n_dense = int(t["dead"].sum()), int(t["dense"].sum())
    c = st.columns(5)
    c[0].metric("latents", f"{bundle.n_latents:,}")
    c[1].metric("dead", f"{n_dead:,}", help="never active on the bundle's tokens")
    c[2].metric("dense", f"{n_dense:,}", help=f"active on > {100 * bundle.settings['dense_threshold']:g} % of tokens")
    c[3].metric("mean L0", f"{t['density'].sum():.2f}", help="active latents per token = the sum of densities")
    c[4].metric("k", str(m["sae"].get("k", "—")))
    _training(entry.run)
    c = st.columns(2)
    c[0].plotly_chart(render.density_histogram(t, bundle.settings["dense_threshold"]), config=render.PLOT_CONFIG,
                      key="density_hist")
    live = t[~t["dead"]]
    n_active = live["n_active"].to_numpy(dtype=np.float64)
    if len(n_active):
        # a signed latent's strongest activation may be negative: the largest |value| (= max for codes >= 0)
        peak = np.maximum(live["max"].to_numpy(dtype=np.float64), -live["min"].to_numpy(dtype=np.float64))
        name = "max |activation|" if bundle.signed_codes else "max activation"
        counts, edges = np.histogram(np.log10(peak.clip(1e-12)), bins=min(50, max(5, len(live) // 4)))
        fig = render.go.Figure(render._bars(counts, edges, "rgb(96,165,250)", "latents", f"log10 {name}"))
        fig.update_layout(title=f"Log10 {name} of live latents", height=300, bargap=0,
                          margin=dict(l=10, r=10, t=40, b=10))
        c[1].plotly_chart(fig, config=render.PLOT_CONFIG, key="max_hist")

    st.subheader("Decoder map")
    xy, method = bundle.decoder_map()
    options = ["log10 density"] + score_columns(t)
    color = state.qp("color", "log10 density")
    color = st.selectbox("colour by", options, index=options.index(color) if color in options else 0, key="map_color")
    if color != state.qp("color", "log10 density"):
        state.set_params(color=color)
    values = np.log10(t["density"].to_numpy(dtype=np.float64).clip(1e-9)) if color == "log10 density" \
        else t[color].to_numpy(dtype=np.float64)
    st.caption(f"{method.upper()} of the decoder directions; select a point (click, box or lasso) to open its latent"
               + (f"; {render.MAP_POINTS:,} of {len(xy):,} latents shown" if len(xy) > render.MAP_POINTS else ""))
    event = st.plotly_chart(render.decoder_map(np.asarray(xy), values, color), key="decoder_map",
                            on_select="rerun", selection_mode=("points", "box", "lasso"), config=render.PLOT_CONFIG)
    points = (event or {}).get("selection", {}).get("points", []) if isinstance(event, dict) else \
        getattr(getattr(event, "selection", None), "points", [])
    if points:
        p = points[0]
        latent = p.get("customdata")
        if isinstance(latent, list):
            latent = latent[0]
        if latent is not None:
            state.goto_latent(entry, int(latent))
