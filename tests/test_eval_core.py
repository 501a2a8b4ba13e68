"""Core metrics against known answers (research/evals.md Appendix A): identity / zero / mean reconstructions, the
centred-EV formula on a hand-made example, batch-size independence, density counting, special-token exclusion."""

import json
import math
import os
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from saelab.eval.core import (CoreMetrics, DownstreamStats, ReconstructionStats, evaluate_core, format_core,
                              hook_activation_mean, prediction_mask, reconstruction_metrics, special_mask)
from saelab.sae.code import SparseCode

sys.path.insert(0, os.path.dirname(__file__))
from autograd_reference import hook_activation_and_grad, next_token_ce  # noqa: E402

HOOK = "blocks.1.hook_resid_post"


# ------------------------------------------------------------------------------------------ stand-in SAEs
class IdentitySAE:
    """n_latents = d; latent j = coordinate j. decode scatters the values into zeros, so x̂ == x bit for bit."""

    def __init__(self, d, hook=HOOK):
        self.n_latents, self.d = d, d
        self.cfg = SimpleNamespace(hook_name=hook)

    def encode(self, x):
        return SparseCode(torch.arange(self.d).expand(x.shape[0], self.d).clone(), x.clone())

    def decode(self, code):
        out = torch.zeros(code.values.shape[0], self.d, dtype=code.values.dtype)
        return out.scatter_add_(1, code.indices, code.values)


class ConstantSAE:
    """Reconstructs every token as the same vector `c` (0 → zero SAE); one latent, fires nowhere."""

    def __init__(self, c, hook=HOOK, n_latents=4):
        self.c, self.n_latents = c, n_latents
        self.cfg = SimpleNamespace(hook_name=hook)

    def encode(self, x):
        return SparseCode(torch.zeros(x.shape[0], 1, dtype=torch.long), torch.zeros(x.shape[0], 1))

    def decode(self, code):
        return self.c.to(torch.float32).expand(code.values.shape[0], -1).clone()


class BOSBombSAE(IdentitySAE):
    """Identity, except that a token whose activation equals the BOS activation is reconstructed 1e4 off."""

    def __init__(self, d, bos_act):
        super().__init__(d)
        self.bos_act = bos_act

    def decode(self, code):
        x = super().decode(code)
        is_bos = (x - self.bos_act).abs().amax(-1) < 1e-6
        return x + 1e4 * is_bos[:, None].float()


def dense_code(f: torch.Tensor) -> SparseCode:
    """A SparseCode holding every entry of a dense [N, n] matrix (zeros are padding)."""
    return SparseCode(torch.arange(f.shape[1]).expand(f.shape[0], -1).clone(), f.clone())


# ------------------------------------------------------------------------------------------ pure tensors
def test_ev_matches_formula_on_hand_example():
    x = torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 0.0]])
    xh = torch.tensor([[1.0, 1.0], [2.0, 4.0], [5.0, 2.0]])
    m = reconstruction_metrics(x, xh)
    # by hand: errors² per token 1, 1, 4 → E‖x−x̂‖² = 2; E‖x‖² = (5 + 25 + 25)/3 = 55/3; E x = (3, 2), ‖E x‖² = 13
    assert m["mse"] == pytest.approx(2.0, abs=1e-15)
    assert m["total_variance"] == pytest.approx(55 / 3 - 13, abs=1e-13)
    assert m["explained_variance"] == pytest.approx(1 - 2 / (55 / 3 - 13), abs=1e-13)
    assert m["fvu"] == pytest.approx(2 / (55 / 3 - 13), abs=1e-13)
    assert m["explained_variance_uncentred"] == pytest.approx(1 - 2 / (55 / 3), abs=1e-13)
    assert m["mse_per_dim"] == pytest.approx([1 / 3, 5 / 3], abs=1e-15)
    # x·x̂ = 3, 22, 25;  ‖x̂‖² = 2, 20, 29
    assert m["relative_reconstruction_bias"] == pytest.approx(51 / 50, abs=1e-14)
    cos = [3 / (math.sqrt(5) * math.sqrt(2)), 22 / (5 * math.sqrt(20)), 25 / (5 * math.sqrt(29))]
    assert m["cossim"] == pytest.approx(sum(cos) / 3, abs=1e-14)
    ratio = [math.sqrt(2) / math.sqrt(5), math.sqrt(20) / 5, math.sqrt(29) / 5]
    assert m["l2_ratio"] == pytest.approx(sum(ratio) / 3, abs=1e-14)
    assert "l0" not in m  # no code given


def test_ev_matches_numpy_reference_check():
    """The centred convention of research/ev_check.py (own numpy code), on a smaller sample."""
    rng = np.random.default_rng(0)
    n, d = 2000, 64
    X = rng.normal(0, 1.0, d) * 0.6 + rng.normal(0, 0.5, (n, d))
    Xh = X + rng.normal(0, 0.15, (n, d))
    sse = ((X - Xh) ** 2).sum(1).mean()
    ev = 1 - sse / ((X ** 2).sum(1).mean() - (X.mean(0) ** 2).sum())
    m = reconstruction_metrics(torch.from_numpy(X), torch.from_numpy(Xh))
    assert m["explained_variance"] == pytest.approx(ev, abs=1e-12)
    assert m["explained_variance_uncentred"] > m["explained_variance"] + 0.01  # the SAEBench-0.6 number is higher


def _sample(n=50, d=8, n_lat=20, k=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g) + 3.0  # non-zero mean
    xh = x + 0.3 * torch.randn(n, d, generator=g)
    idx = torch.stack([torch.randperm(n_lat, generator=g)[:k] for _ in range(n)])
    val = torch.rand(n, k, generator=g) * (torch.rand(n, k, generator=g) > 0.3)  # some padding zeros
    return x, xh, SparseCode(idx, val)


@pytest.mark.parametrize("batch", [1, 7])
def test_metrics_do_not_depend_on_batch_size(batch):
    x, xh, code = _sample()
    whole = reconstruction_metrics(x, xh, code, n_latents=20)
    s = ReconstructionStats(n_latents=20)
    for i in range(0, x.shape[0], batch):
        s.update(x[i:i + batch], xh[i:i + batch], SparseCode(code.indices[i:i + batch], code.values[i:i + batch]))
    part = s.compute()
    for k, v in whole.items():
        if isinstance(v, float):
            assert part[k] == pytest.approx(v, rel=1e-12, abs=1e-14), k
        else:
            assert part[k] == v, k  # counts, histograms, quantiles: exactly equal


def test_merge_equals_one_accumulator():
    x, xh, code = _sample(n=40)
    a, b = ReconstructionStats(20), ReconstructionStats(20)
    a.update(x[:13], xh[:13], SparseCode(code.indices[:13], code.values[:13]))
    b.update(x[13:], xh[13:], SparseCode(code.indices[13:], code.values[13:]))
    merged = a.merge(b).compute()
    whole = reconstruction_metrics(x, xh, code, n_latents=20)
    for k in ("explained_variance", "mse", "l0", "cossim", "n_dead"):
        assert merged[k] == pytest.approx(whole[k], rel=1e-12), k
    assert merged["latent_density"] == pytest.approx(whole["latent_density"])


def test_identity_zero_and_mean_reconstructions():
    x, _, _ = _sample(n=64)
    ident = reconstruction_metrics(x, x.clone())
    assert ident["explained_variance"] == 1.0 and ident["fvu"] == 0.0 and ident["mse"] == 0.0
    assert ident["cossim"] == pytest.approx(1.0) and ident["relative_reconstruction_bias"] == pytest.approx(1.0)
    zero = reconstruction_metrics(x, torch.zeros_like(x))
    xd = x.double()
    msn, mean = xd.pow(2).sum(1).mean(), xd.mean(0)
    assert zero["explained_variance"] < 0  # centred; the uncentred-EV bug would report ≈ 0
    assert zero["explained_variance"] == pytest.approx(float(1 - msn / (msn - mean @ mean)), rel=1e-12)
    assert zero["explained_variance_uncentred"] == pytest.approx(0.0, abs=1e-14)
    assert zero["cossim"] == 0.0 and math.isnan(zero["relative_reconstruction_bias"])
    mean_rec = reconstruction_metrics(xd, mean.expand_as(xd))
    assert mean_rec["explained_variance"] == pytest.approx(0.0, abs=1e-12)


def test_density_dead_dense_and_signed_values():
    n, n_lat = 100, 6
    f = torch.zeros(n, n_lat)
    f[17, 0] = 2.5  # latent 0: exactly one token
    f[:, 1] = -1.0  # latent 1: every token, negative values count as active
    f[:11, 2] = 1.0  # latent 2: 11 % — dense at 0.1
    f[:10, 3] = 1.0  # latent 3: exactly 10 % — not dense (density > threshold)
    # latents 4, 5: dead
    x = torch.randn(n, 3)
    m = reconstruction_metrics(x, x, dense_code(f), n_latents=n_lat, dense_threshold=0.1)
    assert m["latent_density"] == pytest.approx([1 / n, 1.0, 0.11, 0.10, 0.0, 0.0])
    assert m["latent_density"][0] == 1 / n
    assert m["n_dead"] == 2 and m["frac_dead"] == pytest.approx(2 / 6)
    assert m["n_dense"] == 2 and m["frac_dense"] == pytest.approx(2 / 6)
    assert reconstruction_metrics(x, x, dense_code(f), n_latents=n_lat, dense_threshold=0.05)["n_dense"] == 3
    assert m["l1"] == pytest.approx((2.5 + 100 + 11 + 10) / n)
    expect_l0 = (f != 0).sum(1)
    assert m["l0"] == pytest.approx(float(expect_l0.double().mean()))
    assert m["l0_hist"] == torch.bincount(expect_l0).tolist()
    assert m["l0_quantiles"]["p50"] == int(expect_l0.sort().values[49])  # smallest value with CDF >= 0.5
    hist = m["log10_density_hist"]
    assert sum(hist["counts"]) == 4 and hist["n_dead"] == 2
    assert len(hist["edges"]) == len(hist["counts"]) + 1 and hist["edges"][0] <= math.log10(1 / n)
    assert hist["counts"][-1] == 1  # density 1.0 falls in the last bin


def test_repeated_indices_are_summed_like_to_dense():
    idx = torch.tensor([[3, 3, 1], [2, 2, 0], [5, 0, 0]])
    val = torch.tensor([[1.0, 2.0, 0.0], [1.0, -1.0, 4.0], [1.0, 0.0, 0.0]])  # row 1: latent 2 cancels to 0
    x = torch.randn(3, 2)
    m = reconstruction_metrics(x, x, SparseCode(idx, val), n_latents=6)
    dense = SparseCode(idx, val).to_dense(6)
    assert m["l0_hist"] == torch.bincount((dense != 0).sum(1)).tolist()
    assert m["latent_density"] == pytest.approx(((dense != 0).sum(0).double() / 3).tolist())
    assert m["l1"] == pytest.approx(float(dense.abs().sum(1).mean()))


def test_special_positions_are_excluded():
    tok = torch.tensor([[0, 5, 6, 0, 7], [0, 8, 9, 10, 11]])
    spec = special_mask(tok, [0])
    assert spec.tolist() == [[True, False, False, True, False], [True, False, False, False, False]]
    assert special_mask(torch.tensor([[4, 5, 4]]), [], first_position=True).tolist() == [[True, False, False]]
    # prediction t → t+1 counts when neither end is special
    assert prediction_mask(spec).tolist() == [[False, True, False, False], [False, True, True, True]]
    # a huge activation at an excluded position does not change EV
    x = torch.randn(2, 5, 4) + 1
    xh = x + 0.1 * torch.randn(2, 5, 4)
    base = reconstruction_metrics(x[~spec], xh[~spec])
    x[:, 0] = 1e6
    assert reconstruction_metrics(x[~spec], xh[~spec])["explained_variance"] == base["explained_variance"]


def test_downstream_stats_by_hand():
    clean = torch.tensor([[[0.0, 1.0, 2.0], [1.0, 1.0, -math.inf], [3.0, 0.0, 0.0]]])
    patched = torch.tensor([[[0.0, 0.0, 0.0], [2.0, 0.0, -math.inf], [9.0, 9.0, 9.0]]])
    tokens = torch.tensor([[0, 2, 1]])
    mask = torch.tensor([[True, True]])  # the last position has no target
    s = DownstreamStats()
    s.begin(clean, tokens, mask)
    for k in ("sae", "zero", "mean"):
        s.add(k, patched if k == "sae" else clean)
    s.end()
    r = s.compute()

    def logp(v):
        v = np.asarray(v, dtype=np.float64)
        return v - np.log(np.exp(v).sum())

    lc0, lc1 = logp([0, 1, 2]), logp([1, 1, -np.inf])
    lp0, lp1 = logp([0, 0, 0]), logp([2, 0, -np.inf])
    assert r["n_predictions"] == 2
    assert r["ce_clean"] == pytest.approx(-(lc0[2] + lc1[1]) / 2, rel=1e-6)
    assert r["ce_sae"] == pytest.approx(-(lp0[2] + lp1[1]) / 2, rel=1e-6)
    kl0 = (np.exp(lc0) * (lc0 - lp0)).sum()
    kl1 = (np.exp(lc1[:2]) * (lc1[:2] - lp1[:2])).sum()  # 0 · log 0 = 0 on the masked entry
    assert r["kl_sae"] == pytest.approx((kl0 + kl1) / 2, rel=1e-5)
    assert r["kl_zero"] == 0.0 and r["delta_ce"] == pytest.approx(r["ce_sae"] - r["ce_clean"])
    assert math.isnan(r["loss_recovered_zero"])  # ce_zero == ce_clean: no denominator


# ------------------------------------------------------------------------------------------ with the model
@pytest.fixture(scope="module")
def model(reference_model):  # the session's shared reference model (tests/conftest.py); only hooks are added
    return reference_model


@pytest.fixture(scope="module")
def rows():
    g = torch.Generator().manual_seed(1)
    r = torch.randint(1, 8192, (3, 40), generator=g)
    r[:, 0] = 0  # BOS
    r[1, 20] = 0  # a document separator (EOS = BOS id in GPT-2 style tokenizers)
    return r


@pytest.fixture(scope="module")
def d_model(model):
    return model.cfg.d_model


def _json_roundtrip(m: CoreMetrics) -> dict:
    return json.loads(json.dumps(m.to_dict(), allow_nan=False))


def test_identity_sae_is_lossless(model, rows, d_model):
    m = evaluate_core(model, IdentitySAE(d_model), rows=rows, batch_rows=2)
    spec = special_mask(rows, [0])
    assert m.n_tokens == int((~spec).sum()) == 3 * 39 - 1
    assert m.n_predictions == int(prediction_mask(spec).sum())
    assert m.explained_variance == 1.0 and m.fvu == 0.0 and m.mse == 0.0
    assert m.delta_ce == 0.0 and m.kl_sae == 0.0
    assert m.loss_recovered_zero == 1.0 and m.loss_recovered_mean == 1.0
    assert m.kl_zero > 0 and m.kl_mean > 0 and m.ce_zero_ablation != m.ce_clean
    assert m.l0 == d_model and m.n_dead == 0
    d = _json_roundtrip(m)
    assert d["explained_variance"] == 1.0 and len(d["latent_density"]) == d_model
    assert "loss recovered" in format_core(m) and "ΔCE" in format_core(m)


def test_ce_matches_a_hand_computation(model, rows, d_model):
    m = evaluate_core(model, IdentitySAE(d_model), rows=rows, n_ce_tokens=80)  # first 2 rows for CE
    with torch.no_grad():
        logits = model(rows[:2])
    lp = torch.log_softmax(logits[:, :-1].double(), -1)
    ce = -lp.gather(-1, rows[:2, 1:, None]).squeeze(-1)
    keep = prediction_mask(special_mask(rows[:2], [0]))
    assert m.n_predictions == int(keep.sum())
    assert m.ce_clean == pytest.approx(float(ce[keep].mean()), rel=1e-5)
    assert m.n_tokens == 3 * 39 - 1  # reconstruction metrics still over all rows


def test_zero_sae_recovers_exactly_nothing(model, rows, d_model):
    m = evaluate_core(model, ConstantSAE(torch.zeros(d_model)), rows=rows)
    assert m.loss_recovered_zero == 0.0  # splice and zero ablation touch exactly the same positions
    assert m.ce_sae == m.ce_zero_ablation and m.kl_sae == m.kl_zero
    assert m.explained_variance < 0  # the residual stream has a non-zero mean
    assert m.l0 == 0 and m.n_dead == 4
    assert _json_roundtrip(m)["relative_reconstruction_bias"] is None  # 0/0


def test_mean_sae_has_zero_ev_and_matches_mean_ablation(model, rows, d_model):
    mean = hook_activation_mean(model, rows, HOOK)
    assert mean.shape == (d_model,) and mean.dtype == torch.float64
    m = evaluate_core(model, ConstantSAE(mean), rows=rows, batch_rows=3)
    assert m.explained_variance == pytest.approx(0.0, abs=1e-5)  # x̂ is the float32-rounded mean
    assert m.loss_recovered_mean == 0.0 and m.ce_sae == m.ce_mean_ablation
    given = evaluate_core(model, ConstantSAE(mean), rows=rows, batch_rows=3, mean_activation=mean)
    assert given.ce_mean_ablation == m.ce_mean_ablation


def test_bos_is_excluded_from_everything(model, rows, d_model):
    box = {}

    def grab(act, hook):
        box["x"] = act[0, 0].clone()  # position 0 (BOS) has the same activation in every row
        return act

    with torch.no_grad():
        model.run_with_hooks(rows[:1], fwd_hooks=[(HOOK, grab)])
    sae = BOSBombSAE(d_model, box["x"])
    m = evaluate_core(model, sae, rows=rows)
    assert m.explained_variance == 1.0 and m.delta_ce == 0.0 and m.kl_sae == 0.0
    everything = evaluate_core(model, sae, rows=rows, exclude_special=False)
    assert everything.n_tokens == rows.numel()
    assert everything.explained_variance < -100 and everything.delta_ce != 0.0


def test_batching_and_input_forms_agree(model, rows, d_model):
    sae = ConstantSAE(torch.zeros(d_model))
    a = evaluate_core(model, IdentitySAE(d_model), rows=rows, batch_rows=1)
    b = evaluate_core(model, IdentitySAE(d_model), rows=[rows[:2].numpy(), rows[2]], batch_rows=3)
    for k in ("ce_clean", "ce_zero_ablation", "ce_mean_ablation", "kl_zero", "kl_mean", "l0"):
        assert getattr(a, k) == pytest.approx(getattr(b, k), rel=1e-5), k
    c = evaluate_core(model, sae, rows=rows, n_tokens=50)  # ceil(50 / 40) = 2 rows
    assert c.n_rows == 2
    skip = evaluate_core(model, sae, rows=rows, n_ce_tokens=0)
    assert skip.n_predictions == 0 and math.isnan(skip.ce_clean)
    assert _json_roundtrip(skip)["ce_clean"] is None and "CE" not in format_core(skip)
    assert skip.explained_variance == pytest.approx(c.explained_variance, rel=0.5)  # computed without the CE pass
    assert CoreMetrics.from_dict(skip.to_dict()).n_tokens == skip.n_tokens


def test_last_layer_hook_and_corpus_rows(model, d_model):
    sae = IdentitySAE(d_model, hook=f"blocks.{model.cfg.n_layers - 1}.hook_resid_post")
    m = evaluate_core(model, sae, n_tokens=64, context_size=32)  # standard-library validation rows
    assert m.n_rows == 2 and m.context_size == 32
    assert m.explained_variance == 1.0 and m.delta_ce == 0.0


# ------------------------------------------------------------------------------------------ g-SAE: both rules
def _gsae(d_model, beta=4.0, n=64, k=4, seed=3):
    from saelab.config import SAEConfig
    from saelab.sae import SparseAutoencoder

    sae = SparseAutoencoder(SAEConfig(architecture="gtopk", d_in=d_model, n_latents=n, k=k, hook_name=HOOK,
                                      normalize="none", options={"beta": beta}))
    sae.reset_parameters(seed=seed)
    with torch.no_grad():
        sae.b_enc.fill_(0.5)  # most pre-activations positive, so the gradient term has room to reorder them
        sae.W_dec.mul_(1.7)  # rows of norm ≠ 1, as a saved SAE's (its input scale folded in)
    return sae


def _hand_gradient(model, rows):
    """d/d(activation at HOOK) of the next-token CE summed over every predicted position (the cache's loss),
    written out with a retained activation gradient, independent of saelab's helpers."""
    return hook_activation_and_grad(model, rows, HOOK, lambda logits: next_token_ce(logits, rows))


def test_gsae_eval_uses_the_gradient_selection_built_by_hand(model, rows, d_model):
    sae = _gsae(d_model)
    m = evaluate_core(model, sae, rows=rows, batch_rows=len(rows))  # one batch: the RMS scale spans all its tokens
    act, grad = _hand_gradient(model, rows)
    keep = ~special_mask(rows, [0])
    x, g = act[keep], grad[keep]
    W_dec, W_enc, b_enc, b_dec = (t.detach() for t in (sae.W_dec, sae.W_enc, sae.b_enc, sae.b_dec))
    z = ((x - b_dec) @ W_enc + b_enc).relu()
    # |d_i·g| along each unit decoder direction, over the batch RMS of g
    att = (g @ W_dec.T).abs() / W_dec.norm(dim=1) / (g.pow(2).sum(1).mean() / d_model).sqrt()
    chosen = (z + 4.0 * z * att).topk(4, dim=1).indices  # the paper's score z + β·z·|W_dec g|
    plain = z.topk(4, dim=1).indices
    changed = (chosen.sort(1).values != plain.sort(1).values).any(1)
    assert changed.float().mean() > 0.2  # the two rules really differ on these tokens
    x_hat = (z.gather(1, chosen).unsqueeze(-1) * W_dec[chosen]).sum(1) + b_dec  # values stay z
    x_top = (z.gather(1, plain).unsqueeze(-1) * W_dec[plain]).sum(1) + b_dec
    n_tok = x.shape[0]
    for got, idx, xh in ((m, chosen, x_hat), (m.topk_fallback, plain, x_top)):
        assert got.n_tokens == n_tok
        density = torch.bincount(idx.reshape(-1), minlength=64).double() / n_tok
        assert got.latent_density == density.tolist()  # the very latents chosen, token by token
        assert got.mse == pytest.approx(float((x - xh).pow(2).sum(1).mean()), rel=1e-4)
        # CE with the hand reconstruction spliced in at the scored positions
        patched = act.clone()
        patched[keep] = xh
        with torch.no_grad():
            logits = model.run_with_hooks(rows, fwd_hooks=[(HOOK, lambda a, hook: patched)])
        lp = torch.log_softmax(logits[:, :-1].double(), -1).gather(-1, rows[:, 1:, None]).squeeze(-1)
        assert got.ce_sae == pytest.approx(float(-lp[prediction_mask(special_mask(rows, [0]))].mean()), rel=1e-5)
    assert m.rule == "with gradient" and m.topk_fallback.rule == "TopK fallback"
    assert m.ce_clean == m.topk_fallback.ce_clean and m.kl_zero == m.topk_fallback.kl_zero  # shared baselines
    assert m.mse != m.topk_fallback.mse
    # both rules in the JSON and the printed table; an ordinary SAE's output has neither
    d = _json_roundtrip(m)
    assert d["rule"] == "with gradient" and d["topk_fallback"]["rule"] == "TopK fallback"
    assert d["topk_fallback"]["delta_ce"] == pytest.approx(m.topk_fallback.delta_ce)
    back = CoreMetrics.from_dict(d)
    assert back.topk_fallback.mse == m.topk_fallback.mse and back.rule == m.rule
    assert "latent_density" not in m.to_dict(per_latent=False)["topk_fallback"]
    text = format_core(m)
    assert "with gradient" in text.splitlines()[1] and "TopK fallback" in text.splitlines()[1]
    plain_d = evaluate_core(model, IdentitySAE(d_model), rows=rows, n_ce_tokens=0).to_dict()
    assert "topk_fallback" not in plain_d and "rule" not in plain_d


def test_gsae_without_inference_grads_or_beta_is_scored_once(model, rows, d_model):
    from saelab.eval.splice import infers_with_grad

    assert infers_with_grad(_gsae(d_model))
    off = _gsae(d_model)
    off.arch.opt.inference_grads = False
    assert not infers_with_grad(off) and not infers_with_grad(_gsae(d_model, beta=0.0))
    m = evaluate_core(model, off, rows=rows, n_ce_tokens=0)
    assert m.topk_fallback is None and m.rule == ""
