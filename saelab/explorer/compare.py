"""Compare: two latents of one SAE (decoder cosine, co-activation, shared example rows, stats side by side), or
two SAEs (for each latent of A, the nearest decoder directions in B; for Matryoshka prefixes, width sweeps or other
architectures on the same hook). URL: ?sae=A&mode=latents&a=I&b=J  or  ?sae=A&mode=saes&other=B&a=I."""

from __future__ import annotations

import numpy as np
import pandas as pd
import streamlit as st

from saelab.explorer import render, state
from saelab.errors import DataError, SaelabError

SUMMARY_LATENTS = 4096  # latents of A summarised (a random sample above this)


def _int(key: str, default: int) -> int:
    try:
        return int(state.qp(key, default))
    except (TypeError, ValueError):
        return default


def shared_rows(lat_a, lat_b) -> list[int]:
    """Rows (of the shared token table) that are examples of both latents."""
    rows = lambda lat: {e.row for e in lat.top + lat.bottom + lat.random + [x for iv in lat.intervals
                                                                           for x in iv.examples]}
    return sorted(rows(lat_a) & rows(lat_b))


def _latent_column(entry, bundle, lat, col) -> None:
    s = lat.stats
    with col:
        state.latent_link(entry, lat.index, f"**latent {lat.index}** ↗")
        st.caption(("dead · " if s.dead else "") + ("dense · " if s.dense else "") +
                   f"density {100 * s.density:.3g} % · max {s.max:.3g}"
                   + (f" · min {s.min:.3g}" if bundle.signed_codes and not s.dead else "") + f" · {s.n_active:,} tokens")
        if not s.dead:
            st.plotly_chart(render.activation_histogram(lat), config=render.PLOT_CONFIG, key=f"h{lat.index}_{id(col)}")
            st.html(render.examples_html(bundle, lat.top[:5], 8, "global", max(abs(s.max), abs(s.min))))


def _two_latents(entry, bundle) -> None:
    F = bundle.n_latents
    c = st.columns(2)
    a = c[0].number_input("latent A", 0, F - 1, value=min(max(_int("a", 0), 0), F - 1), key="c_a")
    b = c[1].number_input("latent B", 0, F - 1, value=min(max(_int("b", 1 % F), 0), F - 1), key="c_b")
    state.set_params(a=a, b=b)
    la, lb = state.latent_view(entry.bundle, a), state.latent_view(entry.bundle, b)
    m = st.columns(3)
    try:
        _, unit = state.decoder_directions(state.sae_dir(entry, bundle))
        m[0].metric("decoder cosine", f"{float(unit[a] @ unit[b]):.4f}")
    except SaelabError as e:
        m[0].caption(f"decoder cosine unavailable: {e.message}")
    co = {n.latent: n for n in la.neighbours_coact}
    if b in co:
        m[1].metric("co-activation (Jaccard)", f"{co[b].value:.4f}", help=f"{co[b].count:,} tokens with both active")
    else:
        m[1].metric("co-activation (Jaccard)", "—", help="B is not among A's top co-activating latents")
    shared = shared_rows(la, lb)
    m[2].metric("shared example rows", f"{len(shared):,}")
    cols = st.columns(2)
    _latent_column(entry, bundle, la, cols[0])
    _latent_column(entry, bundle, lb, cols[1])


def nearest_matches(unit_a, unit_b, latents: list[int], k: int = 5) -> pd.DataFrame:
    """For each latent of A, the k most cosine-similar decoder directions of B (brute force on the rows)."""
    sims = unit_a[latents] @ unit_b.T  # [n, F_b]
    vals, idx = sims.topk(min(k, unit_b.shape[0]), dim=1)
    rows = [{"latent A": a, "rank": r, "latent B": int(idx[n, r]), "cosine": float(vals[n, r])}
            for n, a in enumerate(latents) for r in range(idx.shape[1])]
    return pd.DataFrame(rows)


def _two_saes(entry, bundle) -> None:
    others = [e for e in state.entries() if e.name != entry.name]
    if not others:
        st.info("Compare two SAEs by exploring both: `saelab explore runs/A runs/B`.")
        return
    names = [e.name for e in others]
    want = state.qp("other", names[0])
    other = others[names.index(want) if want in names else 0]
    other = others[names.index(st.selectbox("SAE B", names, index=names.index(other.name), key="c_other"))]
    try:
        bundle_b = state.open_bundle(other.bundle)
        _, ua = state.decoder_directions(state.sae_dir(entry, bundle))
        _, ub = state.decoder_directions(state.sae_dir(other, bundle_b))
    except SaelabError as e:
        state.show_error(e)
        return
    hook_a, hook_b = state.hook_name(bundle), state.hook_name(bundle_b)
    if ua.shape[1] != ub.shape[1] or hook_a != hook_b:
        st.warning(f"{entry.name} is on {hook_a} (d {ua.shape[1]}), {other.name} on "
                   f"{hook_b} (d {ub.shape[1]}): decoder directions are only "
                   f"comparable on the same hook.")
        if ua.shape[1] != ub.shape[1]:
            return
    a = min(max(_int("a", 0), 0), bundle.n_latents - 1)
    a = st.number_input(f"latent of {entry.name}", 0, bundle.n_latents - 1, value=a, key="c_sa")
    state.set_params(mode="saes", other=other.name, a=a)
    matches = nearest_matches(ua, ub, [a], k=10)
    st.markdown(f"**Nearest decoder directions of {other.name}** to {entry.name} latent {a}")
    matches["open"] = ["feature?" + f"sae={other.name}&latent={j}" for j in matches["latent B"]]
    st.dataframe(matches[["rank", "latent B", "cosine", "open"]], hide_index=True,
                 column_config={"open": st.column_config.LinkColumn("open", display_text="open ↗")})
    same_rows = bundle.manifest.get("corpus") == bundle_b.manifest.get("corpus")
    best = int(matches["latent B"].iloc[0])
    la, lb = state.latent_view(entry.bundle, a), state.latent_view(other.bundle, best)
    if same_rows:
        st.metric(f"shared example rows with {other.name} latent {best}", f"{len(shared_rows(la, lb)):,}")
    else:
        st.caption("The two bundles were built on different rows, so their examples cannot be matched by row.")
    cols = st.columns(2)
    _latent_column(entry, bundle, la, cols[0])
    _latent_column(other, bundle_b, lb, cols[1])
    # a whole-dictionary summary on request: best match in B for (a sample of) A's latents, in chunks
    if st.button(f"How many latents of {entry.name} have a close match in {other.name}?", key="c_summary"):
        ids = np.arange(ua.shape[0])
        if len(ids) > SUMMARY_LATENTS:
            ids = np.sort(np.random.default_rng(0).choice(len(ids), SUMMARY_LATENTS, replace=False))
        best_cos = np.concatenate([(ua[ids[s:s + 256]] @ ub.T).max(1).values.numpy() for s in range(0, len(ids), 256)])
        st.plotly_chart(render.go.Figure(render.go.Histogram(x=best_cos, nbinsx=50)).update_layout(
            title=f"Best decoder cosine in {other.name} for {len(ids):,} latents of {entry.name}", height=260,
            margin=dict(l=10, r=10, t=40, b=10)), config=render.PLOT_CONFIG, key="best_cos")
        st.caption(f"{(best_cos > 0.9).mean():.1%} have a match with cosine > 0.9, {(best_cos > 0.7).mean():.1%} "
                   f"above 0.7")


def page() -> None:
    cur = state.begin("Compare")
    if cur is None:
        return
    entry, bundle = cur
    modes = {"latents": "two latents", "saes": "two SAEs"}
    mode = state.qp("mode", "latents")
    mode = st.radio("compare", list(modes), index=list(modes).index(mode) if mode in modes else 0,
                    format_func=modes.get, horizontal=True, key="c_mode")
    state.set_params(mode=mode)
    try:
        (_two_latents if mode == "latents" else _two_saes)(entry, bundle)
    except DataError as e:
        state.show_error(e)
