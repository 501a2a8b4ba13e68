"""Mutual Choice (≡ BatchTopK, same code) and Feature Choice against brute-force references and research notes §7
items 3–4: Zipf capacities (Σ = k·B exactly, water-filled at the batch size, ranked by usage that follows planted
frequencies), per-latent selection, no dead latents, thresholded inference near the training L0, aux_zipf (ours)
vs AuxK, save/load, resume, and data-parallel equal to one process."""

import json
import os
import sys

import pytest
import torch

from saelab.activations.in_memory import InMemoryActivations
from saelab.config import ConfigError, SAEConfig
from saelab.sae import SparseAutoencoder
from saelab.sae.batchtopk import BatchTopK
from saelab.sae.choice import (FeatureChoice, MutualChoice, capacities, feature_choice_entries, feature_choice_indices,
                               fitted_exponent, zipf_by_rank)
from saelab.training import train
from saelab.training.checkpoint import latest_checkpoint, load_checkpoint

sys.path.insert(0, os.path.dirname(__file__))
from test_architectures import make  # noqa: E402
from test_train import DiesAfter, Interrupted, final_weights, planted_data, small_cfg  # noqa: E402


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
def brute_usage(pre, k):
    """Each latent's share of the batch's mutual-choice matches, by a full sort of the batch × latent matrix."""
    B, n = pre.shape
    top = pre.reshape(-1).argsort(descending=True)[: k * B]
    top = top[pre.reshape(-1)[top] > 0]
    return torch.bincount(top % n, minlength=n).float() / B


def brute_mask(pre, m):
    """Each column's m_i largest entries, by sorting the column (stably: of equal entries the earlier rows)."""
    mask = torch.zeros_like(pre, dtype=torch.bool)
    for i in range(pre.shape[1]):
        mask[pre[:, i].argsort(descending=True, stable=True)[: int(m[i])], i] = True
    return mask


# (n latents, k, batch B, Zipf exponent s): plain, clamped at B (the top ranks' Zipf share exceeds the batch),
# heavily clamped, lifted to 1 (steep s), k·B < n (capacities of 0), k = n (every latent takes the whole batch)
SHAPES = [(96, 4, 100, 1.0), (4096, 32, 4096, 1.0), (4096, 64, 4096, 1.0), (64, 16, 20, 1.0), (300, 4, 100, 2.5),
          (1000, 3, 200, 0.5), (65536, 32, 1024, 1.0), (50, 7, 5, 1.0), (10, 10, 7, 1.3), (7, 1, 1, 1.0)]


@pytest.mark.parametrize("n,k,B,s", SHAPES)
def test_zipf_capacities_sum_to_kB_exactly_and_water_fill_the_clamp(n, k, B, s):
    total = k * B
    m = zipf_by_rank(total, B, n, s)
    lo = 1 if total >= n else 0
    assert m.dtype == torch.long and int(m.sum()) == total  # exactly k·B, clamped or not
    assert int(m.min()) >= lo and int(m.max()) <= B and bool((m[1:] <= m[:-1]).all())
    # water-filling, checked without the algorithm: one λ puts every m_r within 1 of clamp(λ·r^-s, lo, B), so a
    # latent at B (or at lo) was clamped there and the others share the rest in proportion to r^-s
    w = torch.arange(1, n + 1, dtype=torch.float64).pow(-s)
    mf = m.double()
    free = (mf > lo) & (mf < B)
    lower = torch.cat([((mf - 1) / w)[free], ((B - 1) / w)[mf == B]])  # λ must exceed all of these ...
    upper = torch.cat([((mf + 1) / w)[free], ((lo + 1) / w)[mf == lo]])  # ... and stay below all of these
    assert lower.numel() == 0 or upper.numel() == 0 or float(lower.max()) < float(upper.min())
    if (n, k, B) == (4096, 32, 4096):  # the clamp bites: clamping without redistributing loses ~11 % of k·B
        share = w / w.sum() * total
        assert int(m[0]) == B and float(share.clamp_max(B).sum()) < 0.9 * total


def test_capacities_rank_latents_by_usage():
    usage = torch.rand(96, generator=torch.Generator().manual_seed(0))
    m = capacities(4 * 100, 100, 96, "zipf", 1.0, usage)
    assert torch.equal(m[usage.argsort(descending=True)], zipf_by_rank(400, 100, 96, 1.0))  # most used first
    by_rank = m[usage.argsort(descending=True)]
    assert by_rank[0] > 4 * by_rank[-1]
    flat = capacities(4 * 100, 100, 96, "zipf", 1.0, torch.full((96,), -1.0))  # no usage yet: uniform
    assert int(flat.sum()) == 400 and int(flat.max()) - int(flat.min()) <= 1
    u = capacities(4 * 100, 100, 96, "uniform")
    assert int(u.sum()) == 400 and int(u.max()) - int(u.min()) <= 1
    assert int(capacities(10 * 8, 8, 10, "uniform").max()) == 8  # k = n: every latent takes the whole batch
    with pytest.raises(ValueError):
        capacities(11 * 8, 8, 10)  # more matches than latents × tokens


def test_fitted_exponent_is_the_zipf_slope_of_the_used_half():
    n = 400
    rank = torch.arange(1, n + 1).double()
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(0))
    for s in (0.45, 1.0, 1.7):
        usage = torch.empty(n)
        usage[perm] = (0.3 * rank.pow(-s)).float()  # an exact Zipf law, in shuffled latent order
        assert fitted_exponent(usage) == pytest.approx(s, abs=0.01)
        tail = usage.clone()
        tail[perm[n // 2:]] = 1e-7  # the rare half below the law (the paper's "dying" tail) does not move the fit
        assert fitted_exponent(tail) == pytest.approx(s, abs=0.01)
        # the default capacities (exponent 0) are the Zipf capacities at the fitted s
        fitted, fixed = (capacities(4 * 100, 100, n, "zipf", e, usage) for e in (0.0, s))
        assert torch.equal(fitted, fixed)
    assert fitted_exponent(torch.full((n,), 0.01)) == 0.0  # flat usage: uniform capacities
    assert fitted_exponent(torch.zeros(n)) == 1.0  # nothing used yet


CAPACITY_CASES = {  # B = 50 tokens, n = 40 latents
    "uniform": lambda u: capacities(3 * 50, 50, 40, "uniform"),
    "zipf": lambda u: capacities(3 * 50, 50, 40, "zipf", 1.0, u),
    "zipf clamped at B": lambda u: capacities(20 * 50, 50, 40, "zipf", 1.0, u),
    "zipf with zeros (k·B < n)": lambda u: capacities(25, 50, 40, "zipf", 1.0, u),
}


@pytest.mark.parametrize("case", sorted(CAPACITY_CASES))
def test_feature_choice_is_per_column_top_m(case):
    torch.manual_seed(0)
    B, n = 50, 40
    pre = torch.randn(B, n)
    m = CAPACITY_CASES[case](torch.rand(n))
    idx, valid, cut = feature_choice_indices(pre, m, with_cut=True)
    got = dense_mask(idx, valid, n)
    assert torch.equal(got, brute_mask(pre, m))  # brute force: sort each column
    assert (got.sum(0) == m).all()  # every latent exactly m_i tokens
    if case != "zipf clamped at B":
        assert got.sum(1).min() < got.sum(1).max()  # tokens get 0…many latents
    col = pre.sort(dim=0, descending=True).values
    for i in range(n):  # the cut: midpoint of the m_i-th and (m_i+1)-th largest (the m_i-th at B, the max at 0)
        q = int(m[i])
        want = col[0, i] if q == 0 else col[q - 1, i] if q == B else (col[q - 1, i] + col[q, i]) / 2
        assert float(cut[i]) == pytest.approx(float(want)), (case, i)


def test_feature_choice_ties_at_the_cut_go_to_the_first_tokens():
    """Identical rows (the same token after the same prefix) tie in every column: a latent whose m_i-th place is
    shared keeps exactly m_i, above the tie all and at it the earliest tokens (the order a data-parallel run's ranks
    agree on), densely and in blocks of columns."""
    g = torch.Generator().manual_seed(0)
    B, n = 50, 40
    pre = torch.randn(12, n, generator=g)[torch.randint(0, 12, (B,), generator=g)]  # 12 distinct rows
    m = capacities(3 * B, B, n, "zipf", 1.0, torch.rand(n, generator=g))
    col = pre.sort(dim=0, descending=True).values
    inside = (m >= 1) & (m < B)
    tied = inside & (col.gather(0, (m - 1).clamp_min(0)[None])[0] == col.gather(0, m.clamp_max(B - 1)[None])[0])
    assert int(tied.sum()) >= n // 2  # most columns' cut falls inside a tie
    want = brute_mask(pre, m)
    idx, valid = feature_choice_indices(pre, m)
    assert torch.equal(dense_mask(idx, valid, n), want) and (want.sum(0) == m).all()
    rows, cols, vals, _ = feature_choice_entries(lambda: [(s, pre[:, s:s + 16]) for s in range(0, n, 16)], m)
    got = torch.zeros_like(want)
    got[rows, cols] = True
    assert torch.equal(got, want) and rows.numel() == int(m.sum()) and torch.equal(vals, pre[rows, cols])


def test_feature_choice_forward_matches_dense_reference():
    """The default (Zipf) forward against a reference built by brute force: usage from a full sort of the batch,
    capacities ranked by it, each column's top m_i by sorting it, then decode and the gradient densely."""
    torch.manual_seed(0)
    sae = make("feature_choice")
    with torch.no_grad():
        sae.b_enc.fill_(5.0)  # all pre-activations positive: every chosen match is active
    x = torch.randn(64, 24)
    sae.init_from_data_(x)
    out = sae(x)
    xn, _ = sae.normalize_input(x)
    pre = ((xn - sae.b_dec) @ sae.W_enc + sae.b_enc).detach()
    usage = brute_usage(pre, 4)
    torch.testing.assert_close(sae.arch.step_usage, usage)  # the first batch sets the usage
    m = capacities(4 * 64, 64, 96, "zipf", fitted_exponent(usage), usage)  # the default: s fitted to the usage
    assert torch.equal(sae.arch.step_capacity, m) and int(m.max()) > 2 * int(m.min())
    dense = out.code.to_dense(96)
    fires = (dense != 0).sum(0)
    assert torch.equal(fires, m) and int(fires.sum()) == 4 * 64  # m_i each, Σ = k·B; none dead (§7 item 4)
    out.losses["fvu"].backward()
    W = sae.W_dec.detach().clone().requires_grad_()
    z = pre.relu() * brute_mask(pre, m)
    torch.testing.assert_close(dense.detach(), z)
    ref = (xn - (z @ W + sae.b_dec.detach())).pow(2).sum(-1).mean() / sae.loss_normalizer
    ref.backward()
    torch.testing.assert_close(sae.W_dec.grad, W.grad, atol=1e-5, rtol=1e-4)
    sae.after_step(out, 0)
    torch.testing.assert_close(sae.usage, usage)  # committed after the step
    out2 = sae(x)  # the next batch enters the EMA with the usage momentum
    torch.testing.assert_close(sae.arch.step_usage, 0.95 * usage + 0.05 * brute_usage(pre, 4))
    assert out2.code.l0().sum() == 4 * 64


def planted_stream(n, d, freq, batches, B, seed):
    """Tokens made of unit directions D_i (latent i's encoder and decoder direction), each present with
    probability freq[i] at magnitude U(1, 2)."""
    g = torch.Generator().manual_seed(seed)
    D = torch.randn(n, d, generator=g)
    D /= D.norm(dim=1, keepdim=True)
    out = []
    for _ in range(batches):
        on = torch.rand(B, n, generator=g) < freq
        out.append((on * (1 + torch.rand(B, n, generator=g))) @ D)
    return D, out


def test_usage_ranks_the_capacities_by_planted_frequency():
    """A stream where some latents are clearly used more often than others (three tiers of frequency, assigned to
    a random permutation of the latents, so index order is not the answer): after a warm-up of a few batches the
    usage, and so the Zipf capacities, follow the planted frequencies. Firing counts could not tell: under feature
    choice each latent fires exactly its capacity whatever the data."""
    n, d, B = 64, 48, 256
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(5))
    often, sometimes, rarely = perm[:6], perm[6:20], perm[20:]
    freq = torch.empty(n)
    freq[often], freq[sometimes], freq[rarely] = 0.15, 0.04, 0.004
    D, stream = planted_stream(n, d, freq, 30, B, seed=6)
    sae = SparseAutoencoder(SAEConfig(architecture="feature_choice", d_in=d, n_latents=n, k=2, hook_name="h",
                                      normalize="none"))
    with torch.no_grad():
        sae.W_enc.copy_(D.T)
        sae.W_dec.copy_(D)
        sae.b_enc.fill_(-0.8)  # the planted magnitudes are 1–2; most cross-talk of the other directions stays below
        sae.b_dec.zero_()
    for step, x in enumerate(stream):
        with torch.no_grad():
            sae.after_step(sae(x), step)
    torch.testing.assert_close(sae.usage[often], freq[often], atol=0.03, rtol=0)  # usage measures the frequency
    m = sae.arch.capacities(sae, B)
    assert int(m.sum()) == 2 * B
    assert m[often].min() > m[perm[6:]].max()  # the most used get the largest capacities
    assert m[sometimes].float().mean() > 2 * m[rarely].float().mean()
    assert torch.corrcoef(torch.stack([m.float(), torch.arange(n).float()]))[0, 1].abs() < 0.3  # not index order


def test_aux_zipf_covers_underused_latents_and_auxk_only_dead():
    torch.manual_seed(0)
    x = torch.randn(64, 24) * 2
    z, a = make("feature_choice"), make("feature_choice", aux="auxk")
    m = torch.full((96,), 4 * 64 // 96)
    usage = m.float() / 64
    usage[:10] = 0.001  # ten latents far below their capacity share ...
    under = z.arch.underused(usage, m, 64)
    assert under.sum() == 10 and under[:10].all()
    usage[:10] = 0.6 * m[:10] / 64  # ... and above half of it: not under-used (underuse = 0.5)
    assert not z.arch.underused(usage, m, 64).any()
    for sae in (z, a):
        sae.init_from_data_(x)
    none_dead = torch.zeros(96, dtype=torch.bool)
    out = z(x, dead_mask=none_dead)  # the first batch's usage: most latents are far below a Zipf share of it
    assert z.arch.underused(z.arch.step_usage, z.arch.step_capacity, 64).any() and "aux_zipf" in out.losses
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
    # one learned threshold per latent; 0 where a latent's capacity exceeds the tokens it has a positive affinity
    # for (the planted features are equally frequent, Zipf capacities give the top ranks more than they use)
    assert (sae.threshold >= 0).all() and (sae.threshold > 0).float().mean() > 0.8 and sae.threshold.std() > 0
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
    sae.usage.copy_(torch.rand(96, generator=torch.Generator().manual_seed(2)))  # orders the Zipf capacities
    sae.threshold.fill_(5.0)  # stale EMA thresholds far above the cut
    gen = torch.Generator().manual_seed(3)
    batches = [torch.randn(128, 24, generator=gen) * 2 for _ in range(4)]
    drawn = iter(batches)
    info = sae.arch.calibrate(sae, lambda: next(drawn, None))
    assert info["tokens"] == 384  # whole batches until ≥ 300 tokens
    with torch.no_grad():
        pre = torch.cat([sae.preacts(sae.normalize_input(b)[0]) for b in batches[:3]])
    m = capacities(4 * 384, 384, 96, capacity, fitted_exponent(sae.usage), sae.usage)
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
    sae = make(arch)
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
    opts = dict(sae=SAEConfig(architecture="feature_choice", n_latents=128, k=4), dead_tokens=256 * 8)  # Zipf
    train(small_cfg(**opts), InMemoryActivations(x, 256, seed=3), tmp_path / "a", progress=False)
    with pytest.raises(Interrupted):
        train(small_cfg(**opts), DiesAfter(x, 256, seed=3, n=47), tmp_path / "b", progress=False)
    train(small_cfg(resume=True, **opts), InMemoryActivations(x, 256, seed=3), tmp_path / "b", progress=False)
    a, b = final_weights(tmp_path / "a"), final_weights(tmp_path / "b")
    assert "threshold" in a
    for name in a:
        assert torch.equal(a[name], b[name]), name
    # the usage that ranks the capacities is saved in checkpoints and continues exactly
    ua, ub = (load_checkpoint(latest_checkpoint(tmp_path / r))[0]["sae.usage"] for r in ("a", "b"))
    assert torch.equal(ua, ub) and ua.min() >= 0 and ua.std() > 0


def test_bad_options_are_named():
    with pytest.raises(ConfigError, match="capacity"):
        SAEConfig(architecture="feature_choice", options={"capacity": "pareto"})
    with pytest.raises(ConfigError, match="aux"):
        SAEConfig(architecture="feature_choice", options={"aux": "l1"})
    assert FeatureChoice.name == "feature_choice" and MutualChoice.name == "mutual"
