"""Signed codes (AbsTopK) in the dashboard bundle: density counts value != 0, histograms span negative values, top
examples are the most positive rows and bottom examples the most negative ones, random examples centre on each
row's strongest |value|, and the manifest says the codes are signed. Checked against brute-force scans of planted
codes, and of an AbsTopK SAE's codes on the reference model."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import saelab.dashboard as dash
from saelab.dashboard.build import DashboardSettings
from test_dashboard import T, planted_build


def signed_codes(R=24, F=10, density=0.35, seed=3):
    """Planted signed codes, rounded to halves (ties are common); latent 0 only negative, latent 1 only positive,
    latent 2 dead."""
    rng = np.random.default_rng(seed)
    A = rng.exponential(1.0, size=(R, T, F)) * rng.choice([-1.0, 1.0], size=(R, T, F))
    A = (np.round(A * 2) / 2).astype(np.float32)
    A *= rng.random((R, T, F)) < density
    A[..., 0] = -np.abs(A[..., 0])
    A[..., 1] = np.abs(A[..., 1])
    A[..., 2] = 0
    A[:, 0] = 0
    return A


def ranked_rows(A, i, sign: int, k: int):
    """Brute force: rows whose extreme value of sign `sign` exists, by |extreme| descending, ties → earlier row;
    with the first position of that extreme."""
    act = A[:, 1:, i] * sign
    ext, pos = act.max(1), act.argmax(1) + 1
    rows = sorted((r for r in range(A.shape[0]) if ext[r] > 0), key=lambda r: (-ext[r], r))[:k]
    return rows, ext * sign, pos


@pytest.fixture(scope="module")
def signed(tmp_path_factory):
    A = signed_codes()
    path, extra = planted_build(tmp_path_factory.mktemp("s") / "bundle", A)
    return A, dash.open(path), extra


def test_signed_statistics_and_histograms(signed):
    A, b, _ = signed
    assert b.signed_codes and b.manifest["sae"]["signed_codes"]  # seen in the codes (no architecture declared it)
    X = A[:, 1:].reshape(-1, A.shape[2]).astype(np.float64)
    t = b.table()
    for i in range(A.shape[2]):
        v = X[:, i][X[:, i] != 0]
        assert t.loc[i, "n_active"] == len(v) and t.loc[i, "density"] == pytest.approx(len(v) / X.shape[0])
        lat = b.latent(i)
        assert lat.hist_counts.sum() == len(v)
        if len(v):
            assert t.loc[i, "min"] == pytest.approx(v.min()) and t.loc[i, "max"] == pytest.approx(v.max())
            edges = lat.hist_edges.astype(np.float64)
            assert edges[0] == pytest.approx(min(0.0, v.min())) and edges[-1] == pytest.approx(max(0.0, v.max()))
            ref, _ = np.histogram(-v, bins=-edges[::-1])  # the (a, b] convention, as test_dashboard checks it
            assert np.array_equal(lat.hist_counts, ref[::-1])
    assert b.latent(0).hist_edges[-1] == 0 and b.latent(0).hist_counts.sum() > 0  # all its mass below zero


def test_top_and_bottom_examples_equal_a_brute_force_scan(signed):
    A, b, extra = signed
    k = extra["settings"].n_top
    for i in range(A.shape[2]):
        lat = b.latent(i)
        for sign, got in ((1, lat.top), (-1, lat.bottom)):
            want, ext, pos = ranked_rows(A, i, sign, k)
            assert [e.row for e in got] == want, (i, sign)
            for e in got:
                assert e.act == pytest.approx(ext[e.row]) and e.pos == pos[e.row]
                assert np.allclose(e.acts, A[e.row, :, i])  # the whole row, signs kept
                assert (e.act > 0) == (sign > 0)
    assert b.latent(0).top == [] and len(b.latent(0).bottom) == k  # only negative: no top, full bottom
    assert b.latent(1).bottom == [] and b.latent(2).bottom == []  # only positive / dead


def test_random_examples_centre_on_the_strongest_value(signed):
    A, b, _ = signed
    for i in range(A.shape[2]):
        for e in b.latent(i).random:
            row = A[e.row, 1:, i]
            peak, trough = row.max(), row.min()
            want = trough if -trough > peak else peak
            assert e.act == pytest.approx(want) and A[e.row, e.pos, i] == pytest.approx(want)
            assert e.pos == 1 + int(np.argmax(row == want))  # the first position of that value


def test_unsigned_bundles_have_no_bottom_examples(tmp_path):
    A = np.abs(signed_codes())
    b = dash.open(planted_build(tmp_path / "b", A)[0])
    assert not b.signed_codes
    assert all(b.latent(i).bottom == [] for i in range(A.shape[2]))


def test_neuronpedia_export_carries_the_bottom_examples(signed):
    A, b, _ = signed
    f = b.to_neuronpedia(0)
    assert f["saelab"]["signed_codes"] is True
    assert [x["dataIndex"] for x in f["saelab"]["bottom_examples"]] == [e.row for e in b.latent(0).bottom]
    assert all(x["maxValue"] < 0 for x in f["saelab"]["bottom_examples"])


# ================================================================================================ reference model
def test_abstopk_bundle_on_the_reference_model(tmp_path):
    """An AbsTopK SAE on the reference model: density is a dense count of value != 0 over the bundle's tokens, and
    each latent's bottom examples are the rows a brute-force scan of `sae.encode` finds most negative."""
    import saelab
    from saelab.activations.capture import HookCapture
    from saelab.config import SAEConfig
    from saelab.dashboard.run import build_run_bundle
    from saelab.sae import SparseAutoencoder

    F, L, R = 64, 32, 8
    sae = SparseAutoencoder(SAEConfig(d_in=256, n_latents=F, k=6, hook_name="blocks.1.hook_resid_post",
                                      architecture="abstopk"))
    sae.reset_parameters(seed=0)
    sae.save(tmp_path / "sae")
    s = DashboardSettings(segment_rows=4, batch_rows=4, n_top=4, n_random=2, per_interval=1, n_intervals=2,
                          map_method="pca")
    b = dash.open(build_run_bundle(tmp_path / "sae", tokens=R * (L - 1), context_size=L, settings=s,
                                   progress=False))
    assert b.signed_codes and b.manifest["sae"]["architecture"] == "abstopk"
    loaded = SparseAutoencoder.load(tmp_path / "sae")
    hook = sae.cfg.hook_name
    acts, _ = HookCapture(saelab.load_model("reference"), [hook])(torch.from_numpy(np.asarray(b.tokens, np.int64)))
    dense = loaded.encode(acts[hook]).to_dense(F).view(R, L - 1, F).numpy()
    assert (dense < 0).any() and (dense > 0).any()
    np.testing.assert_allclose(b.table()["density"].to_numpy(), (dense != 0).sum((0, 1)) / (R * (L - 1)))
    A = np.concatenate([np.zeros((R, 1, F), np.float32), dense], 1)  # position 0 (BOS) is never scored
    checked = 0
    for i in range(F):
        lat = b.latent(i)
        for sign, got in ((1, lat.top), (-1, lat.bottom)):
            want, ext, pos = ranked_rows(A, i, sign, s.n_top)
            # float rounding between this encode and the pass's may swap near-equal rows: compare values
            assert len(got) == len(want)
            np.testing.assert_allclose([e.act for e in got], [ext[r] for r in want], rtol=1e-4, atol=1e-5)
            for e in got:
                np.testing.assert_allclose(e.acts[1:], dense[e.row, :, i], rtol=1e-4, atol=1e-5)
            checked += len(got) * (sign < 0)
    assert checked > 0
