"""Mutual Choice (≡ BatchTopK, same code) and Feature Choice against brute-force references and research notes §7
items 3–4: per-latent capacity, no dead latents, thresholded inference near the training L0, aux_zipf (ours) vs
AuxK, save/load, resume, and data-parallel equal to one process."""

import json
import os
import sys

import pytest
import torch

from saelab.activations.in_memory import InMemoryActivations
from saelab.config import ConfigError, SAEConfig
from saelab.sae import SparseAutoencoder
from saelab.sae.batchtopk import BatchTopK
from saelab.sae.choice import FeatureChoice, MutualChoice, capacities, feature_choice_indices
from saelab.training import train

sys.path.insert(0, os.path.dirname(__file__))
from test_train import DiesAfter, Interrupted, final_weights, planted_data, small_cfg  # noqa: E402


def make(arch, d=24, n=96, k=4, **options):
    sae = SparseAutoencoder(SAEConfig(architecture=arch, d_in=d, n_latents=n, k=k, options=options, hook_name="h"))
    sae.reset_parameters(seed=0)
    with torch.no_grad():
        sae.b_enc.normal_(0, 0.1, generator=torch.Generator().manual_seed(1))
    return sae


def dense_mask(idx, valid, n):
    B = idx.shape[0]
    mask = torch.zeros(B, n, dtype=torch.bool)
    mask[torch.arange(B).unsqueeze(1).expand_as(idx)[valid], idx[valid]] = True
    return mask


# ------------------------------------------------------------------------------------------------ mutual choice
def test_mutual_choice_is_batchtopk_same_code_same_selection():
    assert issubclass(MutualChoice, BatchTopK) and MutualChoice.select is BatchTopK.select
    torch.manual_seed(0)
    x = torch.randn(64, 24) * 2
    a, b = make("batchtopk"), make("mutual")
    a.init_from_data_(x)
    b.init_from_data_(x)
    oa, ob = a(x), b(x)
    assert torch.equal(oa.code.indices, ob.code.indices) and torch.equal(oa.code.values, ob.code.values)
    assert int(ob.code.l0().sum()) == 4 * 64  # Σ L0 over the batch = k·B
    # and the mask is the global top-k·B of the batch×latent matrix (brute force: a full sort)
    xn, _ = b.normalize_input(x)
    pre = ((xn - b.b_dec) @ b.W_enc + b.b_enc).detach()
    ref = torch.zeros(64 * 96, dtype=torch.bool)
    ref[pre.reshape(-1).argsort(descending=True)[:256]] = True
    assert torch.equal(ob.code.to_dense(96) != 0, ref.view(64, 96))


def test_mutual_trains_bit_identical_to_batchtopk(tmp_path):
    x = planted_data(n_rows=2048, d=32)
    for arch in ("batchtopk", "mutual"):
        cfg = small_cfg(sae=SAEConfig(architecture=arch, n_latents=128, k=4), tokens=256 * 15)
        train(cfg, InMemoryActivations(x, 256, seed=1), tmp_path / arch, progress=False)
    a, b = final_weights(tmp_path / "batchtopk"), final_weights(tmp_path / "mutual")
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


# ------------------------------------------------------------------------------------------------ feature choice
def test_capacities_sum_to_kB_and_zipf_follows_density_rank():
    m = capacities(4 * 100, 100, 96)
    assert int(m.sum()) == 400 and int(m.max()) - int(m.min()) <= 1
    density = torch.rand(96)
    z = capacities(4 * 100, 100, 96, "zipf", 1.0, density)
    assert int(z.sum()) == 400 and (z >= 1).all() and (z <= 100).all()
    by_rank = z[torch.argsort(-density)]
    assert (by_rank[1:] <= by_rank[:-1]).all() and by_rank[0] > 4 * by_rank[-1]  # Zipf-shaped, most used first
    assert int(capacities(10 * 8, 8, 4).max()) == 8  # never more than the batch


@pytest.mark.parametrize("kind", ["uniform", "zipf"])
def test_feature_choice_is_per_column_top_m(kind):
    torch.manual_seed(0)
    B, n = 50, 40
    pre = torch.randn(B, n)
    m = capacities(3 * B, B, n, kind, 1.0, torch.rand(n))
    idx, valid = feature_choice_indices(pre, m)
    got = dense_mask(idx, valid, n)
    ref = torch.zeros(B, n, dtype=torch.bool)
    for i in range(n):  # brute force: sort each column
        ref[pre[:, i].argsort(descending=True)[: int(m[i])], i] = True
    assert torch.equal(got, ref)
    assert (got.sum(0) == m).all()  # every latent exactly m_i tokens
    assert got.sum(1).min() < got.sum(1).max()  # tokens get 0…many latents


def test_feature_choice_forward_every_latent_fires_and_matches_dense_reference():
    torch.manual_seed(0)
    sae = make("feature_choice")
    with torch.no_grad():
        sae.b_enc.fill_(5.0)  # all pre-activations positive: every chosen match is active
    x = torch.randn(64, 24)
    sae.init_from_data_(x)
    out = sae(x)
    dense = out.code.to_dense(96)
    fires = (dense != 0).sum(0)
    assert (fires >= 1).all()  # no dead latent in the batch (§7 item 4)
    assert (fires <= 64 * 4 // 96 + 1).all() and int(fires.sum()) == 4 * 64  # ≤ m_i each, Σ = k·B
    out.losses["fvu"].backward()
    xn, _ = sae.normalize_input(x)
    pre = ((xn - sae.b_dec) @ sae.W_enc + sae.b_enc).detach()
    mask = dense_mask(*feature_choice_indices(pre, capacities(256, 64, 96)), 96)
    W = sae.W_dec.detach().clone().requires_grad_()
    z = pre.relu() * mask
    torch.testing.assert_close(dense.detach(), z)
    ref = (xn - (z @ W + sae.b_dec.detach())).pow(2).sum(-1).mean() / sae.loss_normalizer
    ref.backward()
    torch.testing.assert_close(sae.W_dec.grad, W.grad, atol=1e-5, rtol=1e-4)


def test_aux_zipf_covers_underused_latents_and_auxk_only_dead():
    torch.manual_seed(0)
    x = torch.randn(64, 24) * 2
    z, a = make("feature_choice"), make("feature_choice", aux="auxk")
    for sae in (z, a):
        sae.init_from_data_(x)
        with torch.no_grad():
            sae.density.fill_(4 / 96)  # every latent at its capacity share ...
            sae.density[:10] = 0.001  # ... except ten under-used ones
    under = z.arch.underused(z, 64)
    assert under.sum() == 10 and under[:10].all()
    none_dead = torch.zeros(96, dtype=torch.bool)
    assert "aux_zipf" in z(x, dead_mask=none_dead).losses  # under-used latents get the auxiliary loss
    assert "auxk" not in a(x, dead_mask=none_dead).losses  # plain AuxK: only for dead latents
    dead = none_dead.clone()
    dead[50] = True
    assert "auxk" in a(x, dead_mask=dead).losses


def _train(arch, x, run, tokens=256 * 60, **options):
    cfg = small_cfg(sae=SAEConfig(architecture=arch, n_latents=128, k=4, options=options), tokens=tokens, lr=2e-3)
    return train(cfg, InMemoryActivations(x, 256, seed=1), run, progress=False)


@pytest.mark.slow
def test_feature_choice_thresholds_give_training_l0_no_dead(tmp_path):
    data = planted_data(n_rows=6144, d=32)
    # θ_i averages ~10 steps' cuts and lags a model still training; 120 steps leave it within a few per cent
    res = _train("feature_choice", data[:4096], tmp_path / "fc", tokens=256 * 120, threshold_momentum=0.9)
    rows = [json.loads(line) for line in (tmp_path / "fc" / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["dead_pct"] == 0.0 and rows[-1]["fvu"] < rows[0]["fvu"] / 2
    sae = SparseAutoencoder.load(tmp_path / "fc" / "sae")
    assert (sae.threshold > 0).all() and sae.threshold.std() > 0  # one learned threshold per latent
    held = data[4096:]
    train_l0 = rows[-1]["l0"]
    l0 = float(sae.encode(held).l0().float().mean())
    assert abs(l0 - train_l0) <= 0.1 * train_l0, (l0, train_l0)  # within ±10 % of training L0
    one, full = sae.encode(held[:1]), sae.encode(held)  # batch-independent
    assert sorted(one.indices[0][one.values[0] != 0].tolist()) == sorted(full.indices[0][full.values[0] != 0].tolist())
    cfg = json.loads((tmp_path / "fc" / "sae" / "cfg.json").read_text())
    assert cfg["architecture"] == "jumprelu"
    assert res.sae.cfg.options["aux"] == "aux_zipf"


@pytest.mark.parametrize("capacity", ["uniform", "zipf"])
def test_feature_choice_calibration_sets_each_threshold_to_the_sample_cut(capacity):
    sae = make("feature_choice", capacity=capacity, calibration_tokens=300)
    sae.density.copy_(torch.rand(96, generator=torch.Generator().manual_seed(2)))  # orders the Zipf capacities
    sae.threshold.fill_(5.0)  # stale EMA thresholds far above the cut
    gen = torch.Generator().manual_seed(3)
    batches = [torch.randn(128, 24, generator=gen) * 2 for _ in range(4)]
    drawn = iter(batches)
    info = sae.arch.calibrate(sae, lambda: next(drawn, None))
    assert info["tokens"] == 384  # whole batches until ≥ 300 tokens
    with torch.no_grad():
        pre = torch.cat([sae.preacts(sae.normalize_input(b)[0]) for b in batches[:3]])
    m = capacities(4 * 384, 384, 96, capacity, 1.0, sae.density)
    col = pre.sort(dim=0, descending=True).values  # brute force: every column fully sorted
    for i in range(96):
        q = int(m[i])
        want = col[q - 1, i] if q == 384 else (col[q - 1, i] + col[q, i]) / 2
        assert float(sae.threshold[i]) == pytest.approx(max(float(want), 0.0), abs=1e-6), i
    fired = (pre > sae.threshold).sum(0)
    assert torch.equal(fired, torch.minimum(m, (pre > 0).sum(0)))  # each latent fires on exactly m_i sample tokens
    assert info["l0_calibrated"] == pytest.approx(float(fired.sum()) / 384)
    assert info["l0_ema_thresholds"] == pytest.approx(float((pre > 5.0).sum()) / 384)


@pytest.mark.parametrize("arch", ["mutual", "feature_choice"])
def test_save_load_round_trip(tmp_path, arch):
    torch.manual_seed(0)
    sae = make(arch, capacity="zipf") if arch == "feature_choice" else make(arch)
    x = torch.randn(128, 24) * 3 + 1
    sae.init_from_data_(x)
    sae.after_step(sae(x + 0.5 * torch.randn_like(x)), 0)  # θ_i from another batch: no value sits exactly at θ_i
    before = sae.decode(sae.encode(x))
    sae.save(tmp_path / "sae")
    loaded = SparseAutoencoder.load(tmp_path / "sae")
    assert loaded.cfg.architecture == arch and loaded.cfg.options == sae.cfg.options
    torch.testing.assert_close(loaded.decode(loaded.encode(x)), before, atol=1e-4, rtol=1e-4)


@pytest.mark.slow
def test_feature_choice_resume_is_bit_exact(tmp_path):
    x = planted_data(n_rows=4096)
    opts = dict(sae=SAEConfig(architecture="feature_choice", n_latents=128, k=4, options={"capacity": "zipf"}),
                dead_tokens=256 * 8)
    train(small_cfg(**opts), InMemoryActivations(x, 256, seed=3), tmp_path / "a", progress=False)
    with pytest.raises(Interrupted):
        train(small_cfg(**opts), DiesAfter(x, 256, seed=3, n=47), tmp_path / "b", progress=False)
    train(small_cfg(resume=True, **opts), InMemoryActivations(x, 256, seed=3), tmp_path / "b", progress=False)
    a, b = final_weights(tmp_path / "a"), final_weights(tmp_path / "b")
    assert "threshold" in a
    for name in a:
        assert torch.equal(a[name], b[name]), name


def test_bad_options_are_named():
    with pytest.raises(ConfigError, match="capacity"):
        SAEConfig(architecture="feature_choice", options={"capacity": "pareto"})
    with pytest.raises(ConfigError, match="aux"):
        SAEConfig(architecture="feature_choice", options={"aux": "l1"})
    assert FeatureChoice.name == "feature_choice" and MutualChoice.name == "mutual"
