"""The feature explorer (saelab/explorer/) under Streamlit's AppTest, on a tiny real run built by the dashboard's
own builder.

Checks are against independent computations: the bundle's arrays read directly, brute-force scans over the
examples, the SAE's decoder rows from its safetensors file, and direct encodes of the model's activations.
"""

from __future__ import annotations

import html
import json
import math
import re
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))
from explorer_data import DEAD, DENSE, N_LATENTS, make_tiny_run  # noqa: E402

APP = Path(__file__).resolve().parents[1] / "saelab" / "explorer" / "app"  # the entry script's folder
streamlit_testing = pytest.importorskip("streamlit.testing.v1")
AppTest = streamlit_testing.AppTest


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return make_tiny_run(tmp_path_factory.mktemp("explorer"))


@pytest.fixture(scope="module")
def bundle(run):
    import saelab.dashboard as dash

    return dash.open(run / "dashboard")


@pytest.fixture
def explore(monkeypatch):
    """explore(paths) → a function page(name, **query) → the AppTest after one run of that page."""

    def make(*paths):
        monkeypatch.setenv("SAELAB_EXPLORE", json.dumps([str(p) for p in paths]))
        from saelab.explorer import state

        state.discover.clear()

        def page(name: str, **query):
            at = AppTest.from_file(str(APP / "explore.py"), default_timeout=180)
            at.run()
            for k, v in query.items():
                at.query_params[k] = str(v)
            at.switch_page(f"views/{name}.py")
            at.run()
            assert not at.exception, at.exception
            return at

        return page

    return make


def normal_latent(bundle) -> int:
    t = bundle.table()
    return int(t[(~t["dead"]) & (~t["dense"]) & (t["n_rows"] >= 3)].index[0])


def figures(at) -> list[dict]:
    return [json.loads(el.proto.spec) for el in at.get("plotly_chart")]


def arr(v) -> np.ndarray:
    """A Plotly JSON array: a list, or (Plotly >= 6) a base64 typed array {"dtype", "bdata"}."""
    if isinstance(v, dict) and "bdata" in v:
        import base64

        return np.frombuffer(base64.b64decode(v["bdata"]), dtype=np.dtype(v["dtype"])).reshape(v.get("shape", -1))
    return np.asarray(v)


def html_bodies(at) -> str:
    return "".join(el.proto.body for el in at.get("html"))


# ================================================================================================ feature page
def test_feature_page_normal_latent(run, bundle, explore):
    i = normal_latent(bundle)
    at = explore(run)("feature", latent=i)
    assert at.title[0].value == f"Latent {i}" and not at.error
    lat = bundle.latent(i)
    hist = next(f for f in figures(at) if f["layout"]["title"]["text"].startswith("Activations"))
    bars = hist["data"][0]
    assert len(bars["y"]) == bundle.settings["bins"]  # one bar per stored bin
    assert sum(bars["y"]) == int(bundle.table().loc[i, "n_active"])  # the bars count every active token
    np.testing.assert_allclose(bars["y"], np.load(run / "dashboard" / "act_hist.npy")[i])
    edges = np.linspace(*np.load(run / "dashboard" / "act_hist_range.npy")[i], len(bars["y"]) + 1)
    np.testing.assert_allclose(arr(bars["x"]), (edges[:-1] + edges[1:]) / 2, rtol=1e-5)
    logit = next(f for f in figures(at) if f["layout"]["title"]["text"] == "Logit effects")
    assert sum(logit["data"][0]["y"]) == len(bundle.vocab)  # each vocabulary token in one bin
    # highlighted tokens: one coloured span per active position inside each ±16 window (brute force)
    body = html_bodies(at)
    want = 0
    for ex in lat.top + [e for iv in lat.intervals for e in iv.examples] + lat.random:
        s, e = max(0, ex.pos - 16), min(len(ex.acts), ex.pos + 17)
        want += int((ex.acts[s:e] != 0).sum())
    assert body.count('class="xp-act') == want and want > 0
    n_examples = len(lat.top) + sum(len(iv.examples) for iv in lat.intervals) + len(lat.random)
    assert body.count('class="xp-act xp-peak"') == n_examples  # one outlined peak per example
    assert "contains" in " ".join(e.label for e in at.expander)
    # the ± logit tables: every token of the bundle's lists, in order, with its effect
    tables = re.findall(r'<table class="xp-logits">(.*?)</table>', body)
    assert len(tables) == 2
    for table, effects in zip(tables, (lat.logits_bottom, lat.logits_top)):
        cells = re.findall(r'<span style="[^"]*">(.*?)</span></td><td class="xp-val">([^<]*)</td>', table)
        assert [(html.unescape(t), float(v)) for t, v in cells] == \
            [(repr(e.text), pytest.approx(e.value, abs=1e-4)) for e in effects] and cells


def test_feature_page_dead_and_dense(run, bundle, explore):
    page = explore(run)
    dead = page("feature", latent=DEAD)
    assert dead.title[0].value == f"Latent {DEAD}" and not dead.error
    assert any("never fired" in w.value for w in dead.warning) and not figures(dead)
    assert "xp-act" not in html_bodies(dead)
    dense = page("feature", latent=DENSE)
    assert not dense.error and any("dense" in m.value for m in dense.markdown)
    assert bundle.latent(DENSE).stats.density == 1.0
    assert html_bodies(dense).count("xp-act") > 0


def test_deep_links_navigation_and_bad_ids(run, bundle, explore):
    page = explore(run)
    i = normal_latent(bundle)
    at = page("feature", latent=i, ctx="full", scale="example")
    assert at.title[0].value == f"Latent {i}"
    lat = bundle.latent(i)
    full = sum(int((e.acts != 0).sum()) for e in lat.top + [x for iv in lat.intervals for x in iv.examples]
               + lat.random)
    assert html_bodies(at).count('class="xp-act') == full  # whole rows, as the URL asked
    at.button(key="next").click().run()
    assert at.title[0].value == f"Latent {i + 1}" and at.query_params["latent"] == str(i + 1)
    nb = bundle.latent(i + 1).neighbours_decoder[0].latent
    at.button(key=f"nb_dec_{nb}").click().run()
    assert at.title[0].value == f"Latent {nb}" and at.query_params["latent"] == str(nb)
    for bad in (N_LATENTS, -1, "abc"):
        at = page("feature", latent=bad)
        assert not at.title and len(at.error) == 1
        assert "does not exist" in at.error[0].value or "not an integer" in at.error[0].value
    assert f"0..{N_LATENTS - 1}" in page("feature", latent=N_LATENTS).error[0].value


# ================================================================================================ finder
def test_filter_latents_matches_a_direct_scan(bundle):
    from saelab.explorer.finder import filter_latents

    t = bundle.table()
    out = filter_latents(t, "live", (-2.5, -0.5), 1.0, None, None, None, "max", True)
    want = [i for i in range(N_LATENTS) if not t.loc[i, "dead"] and t.loc[i, "max"] >= 1.0
            and -2.5 <= math.log10(t.loc[i, "density"]) <= -0.5]
    assert sorted(out.index) == want
    assert list(out["max"]) == sorted(out["max"], reverse=True)
    assert list(filter_latents(t, "dead").index) == [i for i in range(N_LATENTS) if t.loc[i, "dead"]]
    # "all": the density range filters live latents, dead ones stay (their density is 0, not in any range)
    both = [i for i in range(N_LATENTS) if t.loc[i, "dead"] or -2.5 <= math.log10(t.loc[i, "density"]) <= -0.5]
    assert sorted(filter_latents(t, "all", (-2.5, -0.5)).index) == both


def test_finder_pagination_filters_and_token_search(run, bundle, explore):
    page = explore(run)
    t = bundle.table()
    at = page("finder", size=25, sort="latent", desc=0, kind="all", dmin=-9)
    df = at.dataframe[0].value
    assert list(df["latent"]) == list(range(25))
    at.button(key="f_next").click().run()
    assert list(at.dataframe[0].value["latent"]) == list(range(25, N_LATENTS))
    assert at.query_params["page"] == "2"
    assert list(page("finder", kind="dead").dataframe[0].value["latent"]) == list(t.index[t["dead"]])
    # which latents peak on a token: brute force over every latent's top examples
    lat = bundle.latent(normal_latent(bundle))
    tok = bundle.vocab[int(lat.top[0].tokens[lat.top[0].pos])]
    want = {i for i in range(N_LATENTS) for e in bundle.latent(i).top if bundle.vocab[int(e.tokens[e.pos])] == tok}
    got = page("finder", token=tok, kind="all", dmin=-9).dataframe[0].value
    assert set(got["latent"]) == want and lat.index in want
    assert list(got["token_act"]) == sorted(got["token_act"], reverse=True)


# ================================================================================================ overview, compare
def test_overview_counts_and_map(run, bundle, explore):
    at = explore(run)("overview")
    t = bundle.table()
    metrics = {m.label: m.value for m in at.metric}
    assert metrics["dead"] == f"{int(t['dead'].sum()):,}" and int(metrics["dead"]) >= 1
    assert metrics["dense"] == f"{int(t['dense'].sum()):,}" and int(metrics["dense"]) >= 1
    density = next(f for f in figures(at) if f["layout"]["title"]["text"].startswith("Log10 density"))
    assert sum(density["data"][0]["y"]) == int((~t["dead"]).sum())
    dmap = next(f for f in figures(at) if f["data"][0]["type"] == "scattergl")
    assert sorted(arr(dmap["data"][0]["customdata"]).tolist()) == list(range(N_LATENTS))  # every latent, by id
    assert any(f["layout"]["title"]["text"] == "training fvu" for f in figures(at))


def test_compare_two_latents_and_two_saes(run, bundle, explore, tmp_path):
    from safetensors.numpy import load_file

    W = load_file(str(run / "sae" / "sae_weights.safetensors"))["W_dec"].astype(np.float64)
    W /= np.linalg.norm(W, axis=1, keepdims=True)
    a, b = normal_latent(bundle), DENSE
    at = explore(run)("compare", mode="latents", a=a, b=b)
    metrics = {m.label: m.value for m in at.metric}
    assert float(metrics["decoder cosine"]) == pytest.approx(W[a] @ W[b], abs=1e-4)
    rows = lambda lat: {e.row for e in lat.top + lat.random + [x for iv in lat.intervals for x in iv.examples]}
    assert metrics["shared example rows"] == f"{len(rows(bundle.latent(a)) & rows(bundle.latent(b))):,}"
    twin = tmp_path / "twin"
    shutil.copytree(run, twin)
    at = explore(run, twin)("compare", mode="saes", other="twin", a=a)
    table = at.dataframe[0].value
    assert int(table["latent B"].iloc[0]) == a and table["cosine"].iloc[0] == pytest.approx(1.0, abs=1e-5)
    np.testing.assert_allclose(table["cosine"], np.sort(W @ W[a])[::-1][:len(table)], atol=1e-5)


# ================================================================================================ errors
def test_missing_bundle_old_schema_and_missing_path(run, explore, tmp_path):
    bare = tmp_path / "bare"
    shutil.copytree(run / "sae", bare / "sae")
    at = explore(bare)("overview")
    text = " ".join(e.value for e in list(at.error) + list(at.warning))
    assert f"saelab dashboard {bare}" in text and not at.exception
    old = tmp_path / "old"
    shutil.copytree(run, old)
    mf = old / "dashboard" / "manifest.json"
    m = json.loads(mf.read_text())
    m["schema_version"] = 0
    mf.write_text(json.dumps(m))
    at = explore(old)("feature", latent=1)
    assert len(at.error) == 1 and "schema version 0" in at.error[0].value
    assert f"saelab dashboard {old} --force" in at.error[0].value
    at = explore(tmp_path / "nowhere")("finder")
    assert any("does not exist" in w.value for w in at.warning) and at.error


def test_model_failure_only_affects_model_pages(run, explore, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(run, broken)
    mf = broken / "dashboard" / "manifest.json"
    m = json.loads(mf.read_text())
    m["model"]["name"] = str(tmp_path / "no-such-model")
    mf.write_text(json.dumps(m))
    page = explore(broken)
    at = page("prompt")
    assert len(at.error) == 1 and "needs the model" in at.error[0].value
    assert page("feature", latent=1).title[0].value == "Latent 1"
    at = page("steering")
    from saelab.explorer.steering import evaluator

    if evaluator() is None:
        assert any("not available" in w.value for w in at.warning)
    else:
        assert at.error and "needs the model" in at.error[0].value


# ================================================================================================ prompt view
@pytest.mark.slow
def test_prompt_view_matches_a_direct_encode(run, bundle, explore):
    """The page's per-token codes equal the SAE applied to the model's activations at the hook, computed here
    with TransformerLens's own run_with_cache; the dense latent is active on every token."""
    import torch

    import saelab
    from saelab.data.packing import special_ids
    from saelab.sae import SparseAutoencoder

    text = "def f(x):\n    return x + 1\n"
    at = explore(run)("prompt", text=text, pos="2")
    assert not at.error and at.title[0].value == "Prompt view"
    model = saelab.load_model("reference")
    sae = SparseAutoencoder.load(run / "sae")
    ids = [special_ids(model.tokenizer)[0]] + model.tokenizer(text, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        _, cache = model.run_with_cache(torch.tensor([ids]), names_filter=[sae.cfg.hook_name])
        code = sae.encode(cache[sae.cfg.hook_name][0, 1:])
    want = {int(j): float(v) for j, v in zip(code.indices[2], code.values[2]) if v != 0}
    got = at.dataframe[0].value
    assert dict(zip(got["latent"].astype(int), got["value"])) == pytest.approx(want, rel=1e-4, abs=1e-5)
    assert DENSE in want
    spans = html_bodies(at).count('class="xp-act')
    assert spans == len(ids) - 1  # every token has active latents (the dense one), so every token is coloured


# ================================================================================================ CLI
def test_cli_explore_flags(capsys, tmp_path):
    from saelab.cli import main
    from saelab.cli.dashboard import explorer_script

    assert explorer_script() == APP / "explore.py"
    assert main(["explore", str(tmp_path / "nowhere")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["explore", "--port", "70000", str(tmp_path)]) == 2
    assert "--port" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["explore", "--help"])
    assert e.value.code == 0 and "127.0.0.1" in capsys.readouterr().out


@pytest.mark.slow
def test_steering_page_against_the_evaluator(run, bundle, explore):
    """Steered text = the evaluator's `generate` with α × max activation along the latent, called directly here;
    unsteered text = plain `generate` with the same seed; the sweep has one point per strength."""
    from saelab.explorer.steering import SWEEP, evaluator

    mod = evaluator()
    if mod is None:
        pytest.skip("saelab.eval.steering is not in this saelab")
    import saelab
    from saelab.sae import SparseAutoencoder

    i = normal_latent(bundle)
    at = explore(run)("steering", latents=str(i), alpha="4", prompt="def ")
    assert not at.error and at.title[0].value == "Steering"
    model = saelab.load_model("reference")
    sae = SparseAutoencoder.load(run / "sae")
    tokens = mod.prompt_tokens(model, "def ")
    P = tokens.shape[1]
    d = mod.steer_directions(sae, [i], [4.0 * bundle.table().loc[i, "max"]]).sum(0, keepdim=True)
    steered = mod.generate(model, tokens, 24, 0.7, 0, steer=mod.Steer(sae.cfg.hook_name, d))
    plain = mod.generate(model, tokens, 24, 0.7, 0)
    codes = [c.value for c in at.code]
    assert codes == ["def " + model.tokenizer.decode(plain[0, P:]), "def " + model.tokenizer.decode(steered[0, P:])]
    at.toggle(key="s_sweep").set_value(True).run()
    curve = next(json.loads(el.proto.spec) for el in at.get("plotly_chart"))
    assert len(arr(curve["data"][0]["y"])) == len(SWEEP)
    bad = explore(run)("steering", latents=f"{N_LATENTS}")
    assert bad.error and f"0..{N_LATENTS - 1}" in bad.error[0].value
