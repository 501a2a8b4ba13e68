"""Finder: filter, sort and paginate latents by density, max activation and scores, or by token ("which latents
peak on `return`?", from the bundle's inverted token index). Never a widget holding every latent: one page of rows
at a time. URL: ?sae=NAME&kind=live&dmin=-4&dmax=0&amin=0&token=return&sort=density&desc=1&page=1&size=50."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import streamlit as st

from saelab.explorer import state
from saelab.explorer.overview import score_columns

KINDS = {"all": "all latents", "live": "live (not dead)", "dead": "dead", "dense": "dense"}
SIZES = [25, 50, 100, 200]


def filter_latents(table: pd.DataFrame, kind: str = "all", log_density: tuple[float, float] | None = None,
                   min_max: float | None = None, token_hits: list | None = None, score: str | None = None,
                   min_score: float | None = None, sort: str = "density", descending: bool = True) -> pd.DataFrame:
    """The finder's query: a filtered, sorted view of the latent table (plain pandas, tested on its own)."""
    t = table
    mask = np.ones(len(t), dtype=bool)
    if kind == "live":
        mask &= ~t["dead"].to_numpy()
    elif kind == "dead":
        mask &= t["dead"].to_numpy()
    elif kind == "dense":
        mask &= t["dense"].to_numpy()
    if log_density is not None:
        d = t["density"].to_numpy()
        lo, hi = log_density
        with np.errstate(divide="ignore"):
            ld = np.log10(d)
        mask &= ((ld >= lo) & (ld <= hi)) | (d == 0)  # the range is for live latents; `kind` handles dead ones
    if min_max is not None:
        mask &= np.nan_to_num(t["max"].to_numpy(dtype=np.float64), nan=-np.inf) >= min_max
    if score and min_score is not None:
        mask &= np.nan_to_num(t[score].to_numpy(dtype=np.float64), nan=-np.inf) >= min_score
    out = t[mask]
    if token_hits is not None:  # restrict to the token's latents, and show how they peak on it
        ids = [h.latent for h in token_hits]
        extra = pd.DataFrame({"token_act": [h.act for h in token_hits], "token_hits": [h.hits for h in token_hits]},
                             index=ids)
        out = out.loc[out.index.intersection(ids)].join(extra)
    if sort == "latent":  # also the index's name: sort by the index
        out = out.sort_index(ascending=not descending)
    elif sort in out.columns:
        out = out.sort_values(sort, ascending=not descending, na_position="last", kind="stable")
    return out


def _num(key: str, default: float) -> float:
    try:
        v = float(state.qp(key, default))
        return v if math.isfinite(v) else default
    except (TypeError, ValueError):
        return default


def page() -> None:
    cur = state.begin("Finder")
    if cur is None:
        return
    entry, bundle = cur
    t = bundle.table()
    scores = score_columns(t)
    c = st.columns([2, 3, 2, 3])
    kind = state.qp("kind", "all")
    kind = c[0].selectbox("latents", list(KINDS), index=list(KINDS).index(kind) if kind in KINDS else 0,
                          format_func=KINDS.get, key="f_kind")
    tokens = int(bundle.manifest["corpus"]["tokens"]) or 1
    floor = math.floor(math.log10(1 / tokens))
    dmin, dmax = max(floor, _num("dmin", floor)), min(0.0, _num("dmax", 0.0))
    dmin, dmax = c[1].slider("log10 density", float(floor), 0.0, (float(dmin), float(max(dmin, dmax))), step=0.25,
                             key="f_density",
                             help="applies to live latents; 'live' or 'dead' above include or exclude dead ones")
    amin = c[2].number_input("max activation ≥", value=_num("amin", 0.0), key="f_amin")
    token = c[3].text_input("peaks on token", value=state.qp("token", ""), key="f_token",
                            help="exact token text, e.g. 'return' or ' return' (leading space matters); "
                                 "from the bundle's token index, no model needed")
    c = st.columns([3, 2, 2, 2, 2])
    stat_cols = ["max", "min"] if bundle.signed_codes else ["max"]  # signed codes: the most negative value too
    sort_options = ["density", *stat_cols, "mean", "n_active", "n_rows", "skew", "kurtosis", "latent"] + scores
    if token:
        sort_options = ["token_act", "token_hits"] + sort_options
    sort = state.qp("sort", "token_act" if token else "density")
    sort = c[0].selectbox("sort by", sort_options, index=sort_options.index(sort) if sort in sort_options else 0,
                          key="f_sort")
    desc = c[1].toggle("descending", value=state.qp("desc", "1") != "0", key="f_desc")
    score = c[2].selectbox("score filter", ["—"] + scores, key="f_score") if scores else "—"
    min_score = c[3].number_input("score ≥", value=_num("smin", 0.0), key="f_smin") if score != "—" else None
    size = int(_num("size", 50))
    size = c[4].selectbox("rows per page", SIZES, index=SIZES.index(size) if size in SIZES else 1, key="f_size")

    hits = None
    if token:
        tid = bundle.token_id(token)
        if tid is None and bundle.token_id(" " + token) is not None:
            st.caption(f"no token {token!r}; using {' ' + token!r}")
            token = " " + token
        hits = bundle.latents_for_token(token)
        if bundle.token_id(token) is None:
            st.warning(f"{token!r} is not a token of this vocabulary (tokens are matched exactly)")
    log_density = (dmin, dmax)
    out = filter_latents(t, kind, log_density, amin if amin > 0 else None, hits,
                         score if score != "—" else None, min_score, sort, desc)
    n_pages = max(1, math.ceil(len(out) / size))
    pg = min(max(1, int(_num("page", 1))), n_pages)
    state.set_params(kind=kind, dmin=dmin, dmax=dmax, amin=amin or None, token=token or None, sort=sort,
                     desc=int(desc), size=size, smin=min_score, page=pg)
    c = st.columns([1, 1, 3])
    if c[0].button("◀ previous page", disabled=pg <= 1, key="f_prev"):
        state.set_params(page=pg - 1)
        st.rerun()
    if c[1].button("next page ▶", disabled=pg >= n_pages, key="f_next"):
        state.set_params(page=pg + 1)
        st.rerun()
    c[2].markdown(f"**{len(out):,}** of {len(t):,} latents · page {pg} of {n_pages}")
    view = out.iloc[(pg - 1) * size: pg * size].copy()
    view.insert(0, "open", [state.latent_url(entry, int(i)) for i in view["latent"]])
    cols = ["open", "latent"] + (["token_act", "token_hits"] if token else []) + \
        ["density", *stat_cols, "mean", "n_active", "n_rows", "dead", "dense"] + scores
    event = st.dataframe(view[cols], hide_index=True, key="f_table", on_select="rerun",
                         selection_mode="single-row",
                         column_config={"open": st.column_config.LinkColumn("open", display_text="open ↗"),
                                        "density": st.column_config.NumberColumn(format="%.3e")})
    rows = getattr(getattr(event, "selection", None), "rows", None) or []
    if rows:
        state.goto_latent(entry, int(view["latent"].iloc[rows[0]]))
