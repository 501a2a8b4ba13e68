"""k-sparse probing (saelab.eval.probing) on synthetic data with a planted predictive latent."""

import numpy as np
import pytest
import torch

from saelab.config import SAEConfig
from saelab.eval.probing import (ProbeData, balanced_indices, binary_metrics, probe_tasks, random_rotation,
                                 rank_features)
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


@pytest.mark.parametrize("selection", ["mean_diff", "f_stat"])
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
