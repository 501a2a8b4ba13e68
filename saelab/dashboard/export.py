"""One latent as Neuronpedia-style feature JSON (the `Neuron` + `Activation` fields of its feature API that a
bundle can fill; `research/browsers.md` §1.5). Example windows are whole rows; `binMin == -1` marks the top group,
as Neuronpedia does."""

from __future__ import annotations

import math


def _finite(x: float) -> float | None:
    return None if x is None or not math.isfinite(x) else float(x)


def _activation(bundle, ex, bin_min: float, bin_max: float, contains: float) -> dict:
    toks = bundle.token_text(ex.tokens)
    values = [float(v) for v in ex.acts]
    return {"tokens": toks, "values": values, "maxValue": float(ex.act), "maxValueTokenIndex": int(ex.pos),
            "minValue": float(min(values)), "binMin": bin_min, "binMax": bin_max, "binContains": contains,
            "qualifyingTokenIndex": int(ex.pos), "dataIndex": int(ex.row)}


def neuronpedia_feature(bundle, lat) -> dict:
    m = bundle.manifest
    s = lat.stats
    acts = [_activation(bundle, e, -1, -1, -1) for e in lat.top]
    for iv in lat.intervals:
        acts += [_activation(bundle, e, iv.lo, iv.hi, iv.contains) for e in iv.examples]
    centres = ((lat.hist_edges[:-1] + lat.hist_edges[1:]) / 2).tolist()
    lcentres = ((lat.logit_hist_edges[:-1] + lat.logit_hist_edges[1:]) / 2).tolist()
    return {
        "modelId": m["model"]["name"],
        "layer": m["sae"]["hook_name"],
        "index": str(lat.index),
        "maxActApprox": _finite(s.max) or 0.0,
        "frac_nonzero": s.density,
        "freq_hist_data_bar_values": centres,
        "freq_hist_data_bar_heights": [int(c) for c in lat.hist_counts],
        "logits_hist_data_bar_values": lcentres,
        "logits_hist_data_bar_heights": [int(c) for c in lat.logit_hist_counts],
        "pos_str": [t.text for t in lat.logits_top],
        "pos_values": [t.value for t in lat.logits_top],
        "neg_str": [t.text for t in lat.logits_bottom],
        "neg_values": [t.value for t in lat.logits_bottom],
        "topkCosSimIndices": [n.latent for n in lat.neighbours_decoder],
        "topkCosSimValues": [n.value for n in lat.neighbours_decoder],
        "umap_x": lat.map_xy[0], "umap_y": lat.map_xy[1],
        "activations": acts,
        "saelab": {"schema_version": m["schema_version"], "sae_hash": m["sae"]["sha256"],
                   "random_examples": [_activation(bundle, e, -1, -1, -1) for e in lat.random],
                   "signed_codes": bundle.signed_codes,  # Neuronpedia's lists hold no negative examples: here
                   "bottom_examples": [_activation(bundle, e, -1, -1, -1) for e in lat.bottom],
                   "coactivation": [{"latent": n.latent, "jaccard": n.value, "count": n.count}
                                    for n in lat.neighbours_coact],
                   "stats": {k: _finite(v) if isinstance(v, float) else v for k, v in vars(s).items()},
                   "scores": lat.scores},
    }
