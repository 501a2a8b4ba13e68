"""The explorer on signed codes: an AbsTopK run on the reference model, its bundle built by the dashboard's own
builder, its pages under Streamlit's AppTest. Checked against the bundle read directly (brute-force counts of the
negative and positive activations the page must colour) and a direct encode of the model's activations."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))
from explorer_data import DEAD, DENSE, make_tiny_run  # noqa: E402
from test_explorer import arr, explore, figures, html_bodies  # noqa: E402,F401  (explore: the fixture)

pytest.importorskip("streamlit.testing.v1")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return make_tiny_run(tmp_path_factory.mktemp("explorer_signed"), architecture="abstopk")


@pytest.fixture(scope="module")
def bundle(run):
    import saelab.dashboard as dash

    return dash.open(run / "dashboard")


def both_signs_latent(bundle) -> int:
    return next(i for i in range(bundle.n_latents)
                if len(bundle.latent(i).top) >= 2 and len(bundle.latent(i).bottom) >= 2)


def test_the_bundle_knows_its_codes_are_signed(bundle):
    assert bundle.signed_codes and bundle.manifest["sae"]["signed_codes"]
    t = bundle.table()
    assert t.loc[DENSE, "density"] == 1.0 and t.loc[DENSE, "max"] < 0  # always in the top k, always negative
    assert t.loc[DEAD, "dead"]
    assert bundle.latent(DENSE).top == [] and len(bundle.latent(DENSE).bottom) > 0


def test_feature_page_shows_both_signs(run, bundle, explore):
    i = both_signs_latent(bundle)
    at = explore(run)("feature", latent=i)
    lat = bundle.latent(i)
    headers = [h.value for h in at.subheader]
    assert f"Bottom activations: most negative ({len(lat.bottom)})" in headers
    assert f"Random active examples ({len(lat.random)})" in headers
    metrics = {m.label: m.value for m in at.metric}
    assert metrics["min"] == f"{lat.stats.min:.4g}" and lat.stats.min < 0
    # every active token in each ±16 window coloured by its sign: red below zero, emerald above (brute force)
    body = html_bodies(at)
    shown = lat.top + lat.bottom + [e for iv in lat.intervals for e in iv.examples] + lat.random
    neg = pos = 0
    for ex in shown:
        w = ex.acts[max(0, ex.pos - 16):ex.pos + 17]
        neg, pos = neg + int((w < 0).sum()), pos + int((w > 0).sum())
    assert len(re.findall(r'class="xp-act[^"]*" style="background:rgba\(248,113,113,', body)) == neg > 0
    assert len(re.findall(r'class="xp-act[^"]*" style="background:rgba\(52,211,153,', body)) == pos > 0
    # the activation histogram spans the negative values, its bins below zero red
    hist = next(f for f in figures(at) if f["layout"]["title"]["text"].startswith("Activations"))
    centres = arr(hist["data"][0]["x"])
    colors = hist["data"][0]["marker"]["color"]
    assert centres.min() < 0 < centres.max()
    assert [c == "rgb(248,113,113)" for c in colors] == [bool(x < 0) for x in centres]


def test_unsigned_feature_page_has_no_bottom_section(tmp_path, explore):
    run = make_tiny_run(tmp_path, tokens=300)
    import saelab.dashboard as dash

    b = dash.open(run / "dashboard")
    assert not b.signed_codes
    i = int(b.table()["n_active"].idxmax())
    at = explore(run)("feature", latent=i)
    assert not any(h.value.startswith("Bottom") for h in at.subheader)
    assert "min" not in {m.label for m in at.metric}


def test_prompt_ranking_orders_by_magnitude_with_the_sign_kept():
    from saelab.explorer.prompt import PromptCodes

    codes = PromptCodes(["a", "b"], np.array([[0, 1, 2], [1, 3, 0]]),
                        np.array([[0.5, -3.0, 0.0], [1.0, -0.25, 2.0]], dtype=np.float32))
    r = codes.ranking([0, 1])
    # sums: latent 0: 0.5 + 2.0 = 2.5, latent 1: -3.0 + 1.0 = -2.0, latent 3: -0.25 (latent 2 never active)
    assert list(r["latent"]) == [0, 1, 3] and list(r["value"]) == pytest.approx([2.5, -2.0, -0.25])


def test_steering_page_amounts_use_the_largest_magnitude(bundle):
    from saelab.explorer.steering import _amounts

    t = bundle.table()
    assert t.loc[DENSE, "max"] < 0  # only negative: its scale is |min|
    assert _amounts(bundle, [DENSE, DEAD], -2.0) == pytest.approx([2.0 * t.loc[DENSE, "min"], -2.0])
    both = both_signs_latent(bundle)
    want = max(t.loc[both, "max"], -t.loc[both, "min"])
    assert _amounts(bundle, [both], 3.0) == pytest.approx([3.0 * want])


def test_compare_counts_bottom_examples_as_shared_rows(bundle):
    from saelab.explorer.compare import shared_rows

    lat = bundle.latent(DENSE)  # only negative: every example row is a bottom or random one
    want = {e.row for e in lat.bottom + lat.random + [x for iv in lat.intervals for x in iv.examples]}
    assert shared_rows(lat, lat) == sorted(want) and {e.row for e in lat.bottom} <= want and lat.bottom
