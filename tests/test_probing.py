"""k-sparse probing (saelab.eval.probing) on synthetic data with a planted predictive latent."""

import numpy as np
import pytest
import torch

from saelab.config import SAEConfig
from saelab.errors import ConfigError
from saelab.eval.probing import (DENSE_DENSITY, ProbeData, balanced_indices, binary_metrics, format_probing,
                                 probe_losses, probe_tasks, random_rotation, rank_features)
from saelab.sae import SparseAutoencoder


def _identity_sae(d):
    """Latent i reads and writes dimension i (positive part): a constructed SAE, no training."""
    sae = SparseAutoencoder(SAEConfig(d_in=d, n_latents=2 * d, k=2 * d, hook_name="h", normalize="none"))
    with torch.no_grad():
        eye = torch.eye(d)
        sae.W_dec.copy_(torch.cat([eye, -eye]))
        sae.W_enc.copy_(torch.cat([eye, -eye]).T)
        sae.b_enc.zero_()
        sae.b_dec.zero_()
    return sae


def _planted(n=3000, d=16, dim=5, seed=0):
    g = np.random.default_rng(seed)
    y = (g.random(n) < 0.3).astype(np.int8)
    x = g.normal(size=(n, d)).astype(np.float32)
    x[:, dim] = np.where(y == 1, 4.0, 0.0) + 0.1 * g.normal(size=n)  # latent `dim` fires on positives only
    is_test = np.arange(n) % 4 == 0
    return ProbeData(x=torch.from_numpy(x), labels={"planted": y}, is_test=is_test), y


@pytest.mark.parametrize("selection", ["mean_diff", "f_stat", "probe_loss"])
def test_k1_finds_the_planted_latent(selection):
    data, _ = _planted()
    sae = _identity_sae(16)
    r = probe_tasks(data, sae, ks=(1, 2, 5), selection=selection, n_train=800, n_test=200)
    t = r.tasks["planted"]
    assert t["k"]["1"]["sae"]["features"] == [5]
    assert t["k"]["1"]["sae"]["accuracy"] > 0.99 and t["k"]["1"]["sae"]["auroc"] > 0.99
    assert t["k"]["1"]["neurons"]["features"] == [5]  # the neuron basis has it too here
    assert t["k"]["1"]["rotation"]["accuracy"] <= t["k"]["1"]["sae"]["accuracy"]  # a random basis smears it
    assert t["n_train"] == 2 * min(800, int((data.labels["planted"][~data.is_test] == 1).sum()))
    assert r.mean["1"]["sae_accuracy"] == t["k"]["1"]["sae"]["accuracy"]
    assert t["dense"]["accuracy"] > 0.99


def test_pooled_latents_and_too_few_examples():
    data, y = _planted(n=2000, d=8, dim=2)
    z = torch.zeros(2000, 32)
    z[:, 17] = torch.from_numpy(y.astype(np.float32)) * 3  # the planted latent, given pre-pooled
    data.z = z
    data.labels["rare"] = np.zeros(2000, dtype=np.int8)
    data.labels["rare"][:3] = 1
    sae = SparseAutoencoder(SAEConfig(d_in=8, n_latents=32, k=4, hook_name="h"))
    r = probe_tasks(data, sae, ks=(1,))
    assert r.tasks["planted"]["k"]["1"]["sae"]["features"] == [17]
    assert r.tasks["planted"]["k"]["1"]["sae"]["accuracy"] == 1.0
    assert "skipped" in r.tasks["rare"] and r.mean["n_tasks"] == 1


def test_metrics_match_sklearn_and_hand_cases():
    from sklearn.metrics import f1_score, roc_auc_score

    g = np.random.default_rng(1)
    y = g.integers(0, 2, 500)
    s = y + g.normal(size=500)
    s[::7] = 0.25  # ties
    m = binary_metrics(y, s)
    assert m["auroc"] == pytest.approx(roc_auc_score(y, s), abs=1e-12)
    assert m["f1"] == pytest.approx(f1_score(y, s > 0))
    assert m["accuracy"] == pytest.approx(((s > 0) == y).mean())
    assert binary_metrics(np.array([0, 1]), np.array([-1.0, 1.0]))["auroc"] == 1.0


def test_selection_balance_and_rotation():
    X = np.array([[0, 1, 5], [0, 1, 6], [1, 1, 0], [1, 1, 1]], dtype=float)
    y = np.array([1, 1, 0, 0])
    assert rank_features(X, y)[:2].tolist() == [2, 0]  # |5.5 − 0.5| = 5 > |0 − 1| = 1 > 0
    g = np.random.default_rng(0)
    yy = np.array([1] * 10 + [0] * 90)
    idx = balanced_indices(yy, np.arange(100), 50, g)
    assert len(idx) == 20 and yy[idx].sum() == 10
    Q = random_rotation(12, seed=3)
    assert torch.allclose(Q @ Q.T, torch.eye(12), atol=1e-5)


def test_selected_latents_show_their_density_counted_by_brute_force():
    data, _ = _planted(n=1200, d=6, dim=2)
    sae = _identity_sae(6)  # latent i fires where x_i > 0, latent 6 + i where x_i < 0
    r = probe_tasks(data, sae, ks=(1, 3), n_train=300, n_test=100)
    train = ~data.is_test
    x = data.x.numpy()[train]
    brute = np.concatenate([(x > 0).mean(0), (x < 0).mean(0)])  # share of probe-train tokens each latent fires on
    assert r.density_tokens == int(train.sum())
    for k in ("1", "3"):
        sel = r.tasks["planted"]["k"][k]["sae"]
        assert sel["densities"] == pytest.approx(brute[sel["features"]].tolist(), abs=1e-12)
        assert sel["n_dense"] == sum(brute[i] > DENSE_DENSITY for i in sel["features"])
    assert brute[sel["features"]].max() > DENSE_DENSITY  # (the noise dimensions fire on about half the tokens)


def _dense_decoy(n=3000, seed=0):
    """Latent 0 is dense (fires on 90 % of tokens, same law in both classes) but a few probe-train positives carry
    huge values, so it has by far the largest mean difference on train and predicts nothing; latent 1 fires on
    every positive (8 % of tokens) with a small value (mean difference 0.2) and separates the classes exactly."""
    g = np.random.default_rng(seed)
    y = (np.arange(n) % 25 < 2).astype(np.int8)
    is_test = g.random(n) < 0.3
    x = np.zeros((n, 4), dtype=np.float32)
    x[:, 0] = np.where(g.random(n) < 0.9, 1.0 + g.random(n), 0.0)
    outliers = np.flatnonzero((y == 1) & ~is_test)[:5]
    x[outliers, 0] = 500.0
    x[:, 1] = 0.2 * y
    x[:, 2:] = g.normal(size=(n, 2))
    return ProbeData(x=torch.from_numpy(x), labels={"decoy": y}, is_test=is_test)


def test_max_density_leaves_out_a_dense_latent_with_the_largest_mean_difference():
    data = _dense_decoy()
    sae = _identity_sae(4)
    n_pos_train = int((data.labels["decoy"][~data.is_test] == 1).sum())
    kw = dict(ks=(1,), n_train=n_pos_train, n_test=1000)  # every train positive (with the outliers) is used
    plain = probe_tasks(data, sae, **kw)
    sel = plain.tasks["decoy"]["k"]["1"]["sae"]
    assert sel["features"] == [0] and sel["densities"][0] > 0.85 and sel["n_dense"] == 1
    assert sel["accuracy"] < 0.6  # the dense latent's k = 1 probe is close to chance
    assert plain.mean["1"]["sae_tasks_with_dense"] == 1
    text = format_probing(plain)
    assert "#0 (" in text and "DENSE" in text and "--max-density" in text

    capped = probe_tasks(data, sae, max_density=DENSE_DENSITY, **kw)
    sel = capped.tasks["decoy"]["k"]["1"]["sae"]
    assert sel["features"] == [1] and sel["accuracy"] == 1.0 and sel["n_dense"] == 0
    assert capped.to_dict()["max_density"] == DENSE_DENSITY and "DENSE" not in format_probing(capped).split("\n")[2]
    # the 1-D probe ranking needs no cap: the decoy's own probe is poor, the sparse latent's perfect
    assert probe_tasks(data, sae, selection="probe_loss", **kw).tasks["decoy"]["k"]["1"]["sae"]["features"] == [1]
    with pytest.raises(ConfigError, match="max_density"):
        probe_tasks(data, sae, max_density=0.0, **kw)
    noisy, _ = _planted(n=400, d=4, dim=1)  # every latent of the identity SAE fires on some train token
    with pytest.raises(ConfigError, match="leaves no latent"):
        probe_tasks(noisy, sae, max_density=1e-9, ks=(1,))


def test_ranking_variants_on_a_hand_computed_case():
    X = np.array([[10, 1, 2, 0], [0, 1, 1, 0], [0, 0, 0, 0], [0, 0, 1, 0]], dtype=float)
    y = np.array([1, 1, 0, 0])
    # mean differences 5, 1, 1, 0; over the (population) std 4.33, 0.5, 0.707, -: 1.15, 2, 1.41, 0
    assert rank_features(X, y, "mean_diff").tolist() == [0, 1, 2, 3]
    assert rank_features(X, y, "f_stat").tolist() == [1, 2, 0, 3]
    assert rank_features(X, y, "mean_diff", exclude=np.array([True, False, False, False])).tolist() == [1, 2, 3]
    # f_stat is the std-normalised mean difference on balanced classes: the same order as |Δ| / std
    g = np.random.default_rng(3)
    Xr = g.exponential(size=(200, 30)) * g.random(30) * 10
    yr = np.repeat([0, 1], 100)
    Xr[yr == 1] += g.random(30)
    ratio = np.abs(Xr[yr == 1].mean(0) - Xr[yr == 0].mean(0)) / Xr.std(0)
    assert rank_features(Xr, yr, "f_stat").tolist() == np.argsort(-ratio, kind="stable").tolist()


def test_probe_loss_matches_one_feature_sklearn_fits():
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import log_loss

    g = np.random.default_rng(0)
    n = 300
    y = (g.random(n) < 0.5).astype(int)
    X = g.normal(size=(n, 6))
    X[:, 1] += 1.5 * y  # informative
    X[:, 2] = np.where(y == 1, 0.5, 0.0)  # separable (the L2 penalty keeps its weight finite), small
    X[:, 3] = 0.0  # constant
    X[:, 4] = np.where(g.random(n) < 0.9, 3 + 50 * g.random(n), 0.0)  # dense, large, uninformative
    X[:, 5] = np.where((y == 1) & (g.random(n) < 0.3), 1.0 + g.random(n), 0.0)  # sparse, fires on some positives
    want = []
    for j in range(X.shape[1]):
        c = X[:, j:j + 1]
        c = (c - c.mean()) / (c.std() if c.std() > 0 else 1.0)
        m = LogisticRegression(C=1.0, tol=1e-12, max_iter=10_000).fit(c, y)
        want.append(log_loss(y, m.predict_proba(c)[:, 1]))
    got = probe_losses(X, y)
    assert got == pytest.approx(want, abs=1e-7)
    assert rank_features(X, y, "probe_loss").tolist() == np.argsort(want, kind="stable").tolist()
    assert rank_features(X, y, "probe_loss")[0] == 2 and rank_features(X, y, "mean_diff")[0] == 4
