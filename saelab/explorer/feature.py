"""Feature page (Neuronpedia parity): stats strip with dead/dense badges, activation and logit-effect histograms,
top ±logits, decoder and co-activation neighbours, examples (top, intervals with "contains p %", random positives)
as highlighted tokens, scores, prev/next/random, downloads. Signed codes (AbsTopK): the min beside the max, the
histogram's negative bins in red and the bottom (most negative) examples after the top ones.
URL: ?sae=NAME&latent=I&ctx=16&scale=global."""

from __future__ import annotations

import json
import math

import numpy as np
import streamlit as st

from saelab.explorer import render, state
from saelab.errors import SaelabError


def _nav(entry, bundle, i: int) -> None:
    F = bundle.n_latents

    def go(j):
        state.set_params(sae=entry.name, latent=int(j) % F)

    c = st.columns([1, 1, 1, 2, 5])
    c[0].button("◀ prev", key="prev", on_click=go, args=(i - 1,))
    c[1].button("next ▶", key="next", on_click=go, args=(i + 1,))
    c[2].button("random", key="random", on_click=lambda: go(np.random.default_rng().integers(F)))
    j = c[3].number_input("go to latent", 0, F - 1, value=i, step=1, key=f"goto_{i}", label_visibility="collapsed")
    if j != i:
        go(j)
        st.rerun()


def _stats(lat, settings, signed: bool) -> None:
    s = lat.stats
    badges = []
    if s.dead:
        badges.append(":gray-badge[dead]")
    if s.dense:
        badges.append(f":orange-badge[dense > {100 * settings['dense_threshold']:g} %]")
    if badges:
        st.markdown(" ".join(badges))
    shown = [("density", f"{100 * s.density:.4g} %"), ("active tokens", f"{s.n_active:,}"), ("rows", f"{s.n_rows:,}"),
             ("max", "—" if s.dead else f"{s.max:.4g}")]
    if signed:
        shown.append(("min", "—" if s.dead else f"{s.min:.4g}"))
    shown += [("mean", "—" if s.dead else f"{s.mean:.4g}"),
              ("skew", "—" if s.dead or math.isnan(s.skew) else f"{s.skew:.2f}"),
              ("kurtosis", "—" if s.dead or math.isnan(s.kurtosis) else f"{s.kurtosis:.2f}")]
    for col, (label, value) in zip(st.columns(len(shown)), shown):
        col.metric(label, value)


def _logits(lat) -> None:
    c = st.columns(2)
    for col, title, effects, rgb in ((c[0], "Negative logits", lat.logits_bottom, render.NEG_RGB),
                                     (c[1], "Positive logits", lat.logits_top, render.POS_RGB)):
        col.markdown(f"**{title}**")
        if effects:
            col.html(render.logits_html(effects, rgb))
        else:
            col.caption("no logit lens for this hook (not in the residual stream)")


def _same_page_link(entry, j: int, label: str, kind: str) -> None:
    """Another latent on this page: a button that rewrites ?latent= (st.page_link to the page already shown
    changes the view but not the address bar, which would break reload and sharing)."""
    st.button(label, key=f"nb_{kind}_{j}", type="tertiary",
              on_click=lambda: state.set_params(sae=entry.name, latent=j))


def _neighbours(entry, lat) -> None:
    c = st.columns(2)
    with c[0]:
        st.markdown("**Neighbours by decoder cosine**")
        for n in lat.neighbours_decoder:
            _same_page_link(entry, n.latent, f"latent {n.latent} · cos {n.value:.3f}", "dec")
    with c[1]:
        st.markdown("**Neighbours by co-activation** (Jaccard)")
        if not lat.neighbours_coact:
            st.caption("none: this latent never fires together with another on the counted tokens")
        for n in lat.neighbours_coact:
            _same_page_link(entry, n.latent, f"latent {n.latent} · J {n.value:.3f} · {n.count:,} tokens", "co")


@st.fragment
def _examples(entry, bundle, lat) -> None:
    """The examples block reruns alone when its controls change (histograms and tables stay put)."""
    c = st.columns(3)
    widths = list(render.CONTEXT_WIDTHS)
    ctx = state.qp("ctx", "16")
    ctx = c[0].segmented_control("context", widths, default=ctx if ctx in widths else "16", key="ctx_ctl",
                               format_func=lambda w: "full row" if w == "full" else f"±{w} tokens") or "16"
    scale = state.qp("scale", "global")
    scale = c[1].radio("colour scale", ["global", "example"], index=0 if scale != "example" else 1,
                       horizontal=True, key="scale_ctl",
                       format_func=lambda s: "latent max" if s == "global" else "per example")
    if ctx != state.qp("ctx", "16") or scale != state.qp("scale", "global"):
        state.set_params(ctx=ctx, scale=scale)
    half = render.CONTEXT_WIDTHS[ctx]
    gmax = max(abs(lat.stats.max), abs(lat.stats.min)) if not lat.stats.dead else 1.0
    st.subheader(f"Top activations ({len(lat.top)})")
    st.html(render.examples_html(bundle, lat.top, half, scale, gmax))
    if bundle.signed_codes:
        st.subheader(f"Bottom activations: most negative ({len(lat.bottom)})")
        if not lat.bottom:
            st.caption("this latent never takes a negative value on the bundle's tokens")
        st.html(render.examples_html(bundle, lat.bottom, half, scale, gmax))
    for iv in lat.intervals:
        if not iv.examples and iv.n_rows == 0:
            continue
        with st.expander(f"Interval {iv.index + 1}: ({iv.lo:.3g}, {iv.hi:.3g}] · contains {100 * iv.contains:.1f} % "
                         f"· {len(iv.examples)} of {iv.n_rows:,} rows", expanded=iv.index == len(lat.intervals) - 1):
            st.html(render.examples_html(bundle, iv.examples, half, scale, gmax))
    st.subheader(f"Random {'active' if bundle.signed_codes else 'positive'} examples ({len(lat.random)})")
    st.html(render.examples_html(bundle, lat.random, half, scale, gmax))


def _downloads(entry, bundle, i: int) -> None:
    """Both files are made only when clicked (a callable), so they cost the page nothing."""
    c = st.columns(2)
    c[0].download_button("Download latent (Neuronpedia JSON)", lambda: json.dumps(bundle.to_neuronpedia(i)),
                         file_name=f"{entry.name}-latent-{i}.json", mime="application/json", key="dl_json",
                         on_click="ignore")
    try:
        sae_path = state.sae_dir(entry, bundle)
    except SaelabError as e:
        c[1].caption(f"decoder vector unavailable: {e.message}")
        return

    def vector() -> str:
        w, _ = state.decoder_directions(sae_path)
        m = bundle.manifest["sae"]  # a transcoder's decoder vector lives at its target hook
        return json.dumps({"latent": i, "hook_name": m["hook_name"],
                           **({"target_hook": bundle.target_hook} if bundle.target_hook else {}),
                           "space": f"raw activations at {bundle.target_hook or m['hook_name']}",
                           "vector": w[i].tolist()})

    c[1].download_button("Download decoder vector (JSON)", vector, file_name=f"{entry.name}-latent-{i}-decoder.json",
                         mime="application/json", key="dl_dec", on_click="ignore")


def page() -> None:
    cur = state.begin()
    if cur is None:
        return
    entry, bundle = cur
    i = state.latent_param(bundle)
    if i is None:
        state.latent_link(entry, 0, "open latent 0")
        return
    lat = state.latent_view(entry.bundle, i)
    m = bundle.manifest
    st.title(f"Latent {i}")
    st.caption(f"{entry.name} · {state.hook_name(bundle)} on {m['model'].get('name', '?')} · "
               f"{bundle.n_latents:,} latents · {m['corpus']['tokens']:,} tokens")
    _nav(entry, bundle, i)
    _stats(lat, bundle.settings, bundle.signed_codes)
    if lat.stats.dead and not st.toggle("Show anyway", key="show_dead"):
        st.warning(f"This latent never fired on the bundle's {m['corpus']['tokens']:,} tokens (dead): no "
                   f"histogram or examples. Its decoder neighbours and logit effects are still defined.")
        _neighbours(entry, lat)
        _downloads(entry, bundle, i)
        return
    c = st.columns(2)
    log_y = st.session_state.get("log_y", False)
    c[0].plotly_chart(render.activation_histogram(lat, log_y), config=render.PLOT_CONFIG, key="act_hist")
    c[0].checkbox("log y", key="log_y")
    c[1].plotly_chart(render.logit_histogram(lat), config=render.PLOT_CONFIG, key="logit_hist")
    _logits(lat)
    _neighbours(entry, lat)
    if lat.scores:
        st.markdown("**Evaluator scores**\n\n| score | value |\n|---|---|\n"
                    + "\n".join(f"| {k} | {v:.4g} |" if isinstance(v, float) else f"| {k} | {v} |"
                                for k, v in lat.scores.items()))
    state.latent_link(entry, i, "Test this latent on your own text →", page="prompt")
    _examples(entry, bundle, lat)
    _downloads(entry, bundle, i)

