"""Steering and input/output scores (saelab.eval.steering) and the splice module, on the reference model with
constructed SAEs."""

import math
import os
import sys

import numpy as np
import pytest
import torch

from saelab.config import SAEConfig
from saelab.errors import ConfigError
from saelab.eval.splice import decoder_directions, splice
from saelab.eval.steering import (ActivationSweep, Steer, _forward, activation_sweep, concept_hits,
                                  continuation_loss, format_scores, generate, input_scores, lens_tokens,
                                  output_scores, position_scale, prompt_tokens, score_latents, steer_directions,
                                  steering_success)
from saelab.sae import SparseAutoencoder

sys.path.insert(0, os.path.dirname(__file__))
from autograd_reference import hook_activation_and_grad, next_token_ce  # noqa: E402

LAST = "blocks.3.hook_resid_post"


@pytest.fixture(scope="module")
def model(reference_model):
    return reference_model


@pytest.fixture(scope="module")
def tokens(model):
    return prompt_tokens(model, "def f(x):\n    return x")


def _sae(model, hook=LAST, rows=None, n=64, seed=0):
    d = model.cfg.d_model
    sae = SparseAutoencoder(SAEConfig(d_in=d, n_latents=n, k=8, hook_name=hook, normalize="none",
                                      model_name="reference"))
    sae.reset_parameters(seed=seed)
    if rows is not None:
        with torch.no_grad():
            sae.W_dec[: len(rows)] = rows
            sae.W_enc[:, : len(rows)] = rows.T
    return sae


@torch.no_grad()
def test_alpha_zero_is_the_identity_and_the_splice_keeps_the_forward(model, tokens):
    clean = model(tokens)
    sae = _sae(model)
    zero = steer_directions(sae, [3, 5], [0.0, 0.0]).sum(0, keepdim=True)
    steered = model.run_with_hooks(tokens, fwd_hooks=[(LAST, Steer(LAST, zero).hook)])
    assert torch.equal(steered, clean)
    with splice(model, sae, keep_error=True) as sites:
        spliced = model(tokens)
    assert torch.allclose(spliced, clean, atol=1e-4)
    site = sites[LAST]
    assert site.x.shape == (tokens.shape[1], model.cfg.d_model) and site.code.indices.shape[1] == 8
    with splice(model, sae, keep_error=False):
        assert not torch.allclose(model(tokens), clean, atol=1e-2)  # a random SAE reconstructs badly


def test_splice_gradients_match_the_activation_gradient(model, tokens):
    sae = _sae(model, hook="blocks.1.hook_resid_post")
    with torch.enable_grad(), splice(model, sae, track_grads=True) as sites:
        model(tokens)[0, -1, 7].backward()
    site = sites["blocks.1.hook_resid_post"]
    g = site.error.grad
    # reference: the gradient of the same logit w.r.t. the plain activation
    _, act_grad = hook_activation_and_grad(model, tokens, "blocks.1.hook_resid_post", lambda logits: logits[0, -1, 7])
    assert torch.allclose(g, act_grad[0], atol=1e-5)
    dense = site.latent_grads()
    assert torch.allclose(dense, g @ decoder_directions(sae).T, atol=1e-6)
    vals = site.code.values.grad
    assert torch.allclose(vals, dense.gather(1, site.code.indices), atol=1e-5)


@torch.no_grad()
def test_steering_along_an_unembedding_direction_raises_that_token(model, tokens):
    t = 1234
    u = model.W_U[:, t].detach().float()
    sae = _sae(model, rows=(u / u.norm()).unsqueeze(0))
    p0 = model(tokens)[0, -1].softmax(-1)[t]
    d = steer_directions(sae, [0], [20.0])
    p1 = model.run_with_hooks(tokens, fwd_hooks=[(LAST, Steer(LAST, d).hook)])[0, -1].softmax(-1)[t]
    assert p1 > 10 * p0
    # a huge amount swamps the residual: the prediction becomes the direction's logit-lens top token
    top = int(lens_tokens(model, sae, k=1)[0, 0])
    out = generate(model, tokens, 3, temperature=0, steer=Steer(LAST, steer_directions(sae, [0], [1e4])))
    assert out[0, tokens.shape[1]:].tolist() == [top, top, top]
    with pytest.raises(ConfigError, match="out of range"):
        steer_directions(sae, [64], [1.0])


@torch.no_grad()
def test_output_score_matches_a_per_latent_brute_force(model):
    toks = [5, 77, 1234, 4000]
    U = model.W_U[:, toks].detach().float().T
    sae = _sae(model, rows=U / U.norm(dim=1, keepdim=True), n=16)
    lens = lens_tokens(model, sae)
    # the logit lens by hand: unembed(ln_final(d))
    by_hand = model.unembed(model.ln_final(decoder_directions(sae)[:2].unsqueeze(1)))[:, 0]
    assert torch.equal(lens[:2], by_hand.topk(20, dim=-1).indices)
    got = output_scores(model, sae, lens, prompt="import os\n\n", batch=5)
    tok = prompt_tokens(model, "import os\n\n")
    box = {}

    def grab(act, hook):
        box["x"] = act[0, -1].clone()
        return act

    model.run_with_hooks(tok, fwd_hooks=[(LAST, grab)])
    amount = 10 * float(sae.encode(box["x"][None]).values.max())
    V = model.cfg.d_vocab
    for f in (0, 3, 9):
        def add(act, hook, f=f):
            act = act.clone()
            act[0, -1] += amount * sae.W_dec[f]
            return act

        p = model.run_with_hooks(tok, fwd_hooks=[(LAST, add)])[0, -1].softmax(-1).double()
        order = torch.argsort(p, descending=True)
        rank = torch.empty(V, dtype=torch.long)
        rank[order] = torch.arange(V)
        T = lens[f]
        want = (1 - rank[T].min().item() / V) * p[T].max().item()
        assert got[f] == pytest.approx(want, rel=1e-4)
    assert got[:4].mean() > np.median(got[4:])  # unembedding rows promote their own tokens


def test_input_score_definition_on_a_hand_made_sweep():
    lens = torch.tensor([[1, 2, 3], [4, 5, 6]])
    lat = np.array([0] * 10 + [1] * 9)
    tok = np.array([1, 2, 9, 9, 3, 9, 9, 9, 9, 9] + [4] * 9)
    sw = ActivationSweep(2, 100, np.ones(2), lat, np.ones(19), tok, np.arange(19), np.zeros(19, dtype=int))
    s = input_scores(sw, lens)
    assert s[0] == pytest.approx(0.3) and math.isnan(s[1])  # latent 1 has fewer than 10 examples


@torch.no_grad()
def test_activation_sweep_against_brute_force(model):
    sae = _sae(model, hook="blocks.1.hook_resid_post", n=32)
    g = torch.Generator().manual_seed(0)
    rows = torch.randint(1, 8192, (6, 24), generator=g)
    rows[:, 0] = 0
    sw = activation_sweep(model, sae, rows, n_top=3, batch_rows=4)
    _, cache = model.run_with_cache(rows, names_filter=["blocks.1.hook_resid_post"])
    x = cache["blocks.1.hook_resid_post"][:, 1:].reshape(-1, model.cfg.d_model)
    dense = sae.encode(x).to_dense(32).reshape(6, 23, 32)
    assert np.allclose(sw.max_activation, dense.amax((0, 1)).clamp_min(0).double().numpy(), atol=1e-6)
    for f in range(32):
        per_row = dense[:, :, f].amax(1)
        want = sorted(per_row[per_row != 0].tolist(), reverse=True)[:3]
        assert np.allclose(sorted(sw.top_value[sw.top_latent == f], reverse=True), want, atol=1e-6)
        for v, r, p, t in zip(*(a[sw.top_latent == f] for a in (sw.top_value, sw.top_row, sw.top_position,
                                                                   sw.top_token))):
            assert dense[r, p - 1, f] == pytest.approx(v) and rows[r, p] == t


# ------------------------------------------------------------------------------------------ strength rule
def _hand_steered(model, sae, tokens, latent, alpha, start):
    """The activation at LAST with the paper's rule applied by hand: x_t + α · max_j f_j(x_t) · d_f, t >= start."""
    _, cache = model.run_with_cache(tokens, names_filter=[LAST])
    x = cache[LAST][0]
    top = torch.stack([sae.encode(x[t:t + 1]).values.max().clamp_min(0) for t in range(x.shape[0])])
    out = x.clone()
    out[start:] += alpha * top[start:, None] * sae.W_dec[latent]
    return out.unsqueeze(0), top


@torch.no_grad()
def test_position_strength_is_alpha_times_the_largest_latent_at_each_position(model, tokens):
    sae = _sae(model)
    steered_act, top = _hand_steered(model, sae, tokens, latent=5, alpha=3.0, start=2)
    assert top[2:].std() > 0.1 * top[2:].mean()  # the unit changes from position to position
    want = model.run_with_hooks(tokens, fwd_hooks=[(LAST, lambda a, hook: steered_act)])
    rule = Steer(LAST, steer_directions(sae, [5], [3.0]), start=2, scale_sae=sae)
    got = model.run_with_hooks(tokens, fwd_hooks=[(LAST, rule.hook)])
    assert torch.allclose(got, want, atol=1e-4)
    assert torch.allclose(position_scale(sae, model.run_with_cache(tokens, names_filter=[LAST])[1][LAST]), top[None])
    # clamp: latent 5 set to α · max_j f_j(x_t) at every position (error term kept)
    _, cache = model.run_with_cache(tokens, names_filter=[LAST])
    x = cache[LAST][0]
    f5 = sae.encode(x).to_dense(64)[:, 5]
    clamped = (x + (3.0 * top - f5)[:, None] * sae.W_dec[5]).unsqueeze(0)
    want = model.run_with_hooks(tokens, fwd_hooks=[(LAST, lambda a, hook: clamped)])
    got = _forward(model, tokens, None, (sae, torch.tensor([5]), torch.tensor([3.0]), 0, True))
    assert torch.allclose(got, want, atol=1e-3)


@torch.no_grad()
def test_steering_success_generates_with_the_position_rule(model):
    sae = _sae(model)
    lens = lens_tokens(model, sae)
    tok = prompt_tokens(model, "def ")
    P = tok.shape[1]
    seq = tok.clone()
    for _ in range(4):  # greedy generation, the rule applied by hand from the last prompt token on
        steered_act, _ = _hand_steered(model, sae, seq, latent=9, alpha=6.0, start=P - 1)
        logits = model.run_with_hooks(seq, fwd_hooks=[(LAST, lambda a, hook: steered_act)])
        seq = torch.cat([seq, logits[:, -1].argmax(-1, keepdim=True)], 1)
    res = steering_success(model, sae, [9], [6.0], None, lens, prompts=["def "], max_new_tokens=4, temperature=0)
    assert res["strength_scale"] == "position"
    assert res["fluency_nats"][0][0] == pytest.approx(float(continuation_loss(model, seq, P)[0]), rel=1e-5)
    assert res["success"][0][0] == float(concept_hits(seq, P, lens[9:10])[0])
    corpus = steering_success(model, sae, [9], [6.0], np.ones(64), lens, prompts=["def "], max_new_tokens=4,
                              temperature=0, strength_scale="corpus")  # α × 1: a constant 6·d_f
    const = generate(model, tok, 4, temperature=0, steer=Steer(LAST, steer_directions(sae, [9], [6.0]), start=P - 1))
    assert corpus["fluency_nats"][0][0] == pytest.approx(float(continuation_loss(model, const, P)[0]), rel=1e-5)
    with pytest.raises(ConfigError, match="strength scale"):
        steering_success(model, sae, [9], [1.0], None, lens, strength_scale="logits")
    with pytest.raises(ConfigError, match="max activation"):
        steering_success(model, sae, [9], [1.0], None, lens, strength_scale="corpus")


def test_output_score_correlation_picks_across_the_ranking_and_ranks_by_hand(monkeypatch):
    from scipy.stats import spearmanr

    from saelab.eval.steering import SteeringScores, output_score_correlation

    n = 12
    out = np.linspace(0.9, 0.0, n)  # latent i has the i-th highest output score
    alive = np.ones(n)
    alive[3] = 0  # never fires: left out
    scores = SteeringScores(np.arange(n), out, np.full(n, np.nan), alive, np.zeros(n), np.zeros((n, 20), int), {})
    calls = {}

    def fake_success(model, sae, latents, alphas, max_activation, lens, **kw):  # success grows with output score
        calls.update(latents=latents, kw=kw)
        lat = np.asarray(latents)
        success = np.stack([0.5 * (lat % 2), 20 - lat + 0.3 * (lat % 3)], 1)  # α = 0 column, α = 8 column
        return {"success": success.tolist(), "strength_scale": kw.get("strength_scale", "position")}

    monkeypatch.setattr("saelab.eval.steering.steering_success", fake_success)
    res = output_score_correlation(None, None, scores, n=5, alphas=[0.0, 8.0], strength_scale="corpus")
    assert res["latents"] == calls["latents"] and 3 not in res["latents"]
    assert res["latents"][0] == 0 and res["latents"][-1] == n - 1 and len(res["latents"]) == 5  # both ends
    assert calls["kw"]["strength_scale"] == "corpus" and res["strength_scale"] == "corpus"
    success = np.asarray(res["success"])
    assert res["spearman_best"] == pytest.approx(spearmanr(out[res["latents"]], success.max(1))[0])
    gain = success.max(1) - success[:, 0]
    assert res["spearman_gain"] == pytest.approx(spearmanr(out[res["latents"]], gain)[0])
    assert res["best_alpha"] == [8.0] * 5 and res["success_top_half"] > res["success_bottom_half"]


# ------------------------------------------------------------------------------------------ g-SAE scores
def _gsae(model, hook="blocks.1.hook_resid_post", n=32):
    sae = SparseAutoencoder(SAEConfig(architecture="gtopk", d_in=model.cfg.d_model, n_latents=n, k=4,
                                      hook_name=hook, normalize="none", model_name="reference",
                                      options={"beta": 4.0}))
    sae.reset_parameters(seed=1)
    with torch.no_grad():
        sae.b_enc.fill_(0.5)
    return sae


def test_gsae_scores_use_the_gradient_and_report_the_fallback(model):
    from saelab.eval.splice import lm_loss_grad

    sae = _gsae(model)
    hook = sae.cfg.hook_name
    g = torch.Generator().manual_seed(0)
    rows = torch.randint(1, 8192, (4, 24), generator=g)
    rows[:, 0] = 0
    sw = activation_sweep(model, sae, rows, batch_rows=4, with_grad=True)
    plain = activation_sweep(model, sae, rows, batch_rows=4)
    # brute force: the gradient of the summed next-token CE by autograd, the code by encode(x, grad=g)
    act, act_grad = hook_activation_and_grad(model, rows, hook, lambda logits: next_token_ce(logits, rows))
    x, grad = act[:, 1:].reshape(-1, 256), act_grad[:, 1:].reshape(-1, 256)
    with torch.no_grad():
        with_g = sae.encode(x, grad=grad).to_dense(32)
        without = sae.encode(x).to_dense(32)
    assert not torch.equal(with_g != 0, without != 0)  # the rules pick different latents here
    assert np.allclose(sw.max_activation, with_g.amax(0).clamp_min(0).double().numpy(), atol=1e-5)
    assert np.allclose(plain.max_activation, without.amax(0).clamp_min(0).double().numpy(), atol=1e-6)
    # the output score's prompt position predicts nothing: its gradient is exactly 0, so both rules agree there
    tok = prompt_tokens(model, "import os\n\n")
    _, act, gl = lm_loss_grad(model, tok, hook)
    assert torch.count_nonzero(gl[0, -1]) == 0 and torch.count_nonzero(gl[0, :-1]) > 0
    with torch.no_grad():
        last = act[0, -1:]
        assert torch.equal(sae.encode(last, grad=gl[0, -1:]).indices, sae.encode(last).indices)
    scores, _ = score_latents(model, sae, rows=rows)
    assert scores.fallback is not None and np.array_equal(scores.max_activation, sw.max_activation)
    assert np.array_equal(scores.fallback["max_activation"], plain.max_activation)
    df = scores.to_frame()
    assert {"input_score_topk_fallback", "max_activation_topk_fallback", "n_examples_topk_fallback"} <= set(df)
    assert scores.meta["rule"] == "with gradient" and "TopK fallback" in format_scores(scores)


# ------------------------------------------------------------------------------------------ CLI and errors
@pytest.fixture(scope="module")
def sae_dir(tmp_path_factory, model):
    path = tmp_path_factory.mktemp("run") / "sae"
    _sae(model, hook="blocks.1.hook_resid_post", n=32).save(path)
    return path


def test_cli_errors_exit_2_and_write_nothing(sae_dir, capsys):
    from saelab.cli import main

    assert main(["steer", str(sae_dir), "--latent", "32"]) == 2
    assert "latent 32 is out of range" in capsys.readouterr().err
    assert main(["steer", str(sae_dir), "--latent", "1", "--prompt", "x " * 400]) == 2
    assert "context" in capsys.readouterr().err
    assert not (sae_dir / "eval").exists()


def test_sae_of_another_model_or_hook_is_refused(model):
    from saelab.errors import ModelError
    from saelab.eval.splice import check_sae_fits

    other = SparseAutoencoder(SAEConfig(d_in=256, n_latents=8, k=2, hook_name=LAST, model_name="gpt2"))
    with pytest.raises(ModelError, match="trained on model 'gpt2'"):
        check_sae_fits(model, other)
    wide = SparseAutoencoder(SAEConfig(d_in=64, n_latents=8, k=2, hook_name=LAST, model_name="reference"))
    with pytest.raises(ModelError, match="d_in=64"):
        check_sae_fits(model, wide)
    missing = SparseAutoencoder(SAEConfig(d_in=256, n_latents=8, k=2, hook_name="blocks.9.hook_resid_post"))
    with pytest.raises(ModelError, match="does not exist"):
        check_sae_fits(model, missing)


@pytest.mark.slow
def test_cli_steer_sweep_and_probing_suite_end_to_end(sae_dir, capsys):
    import json

    from saelab.cli import main

    assert main(["steer", str(sae_dir), "--latent", "3", "--alpha", "2", "--prompt", "def ",
                 "--max-new-tokens", "5"]) == 0
    assert "--- steered ---" in capsys.readouterr().out
    assert main(["steer", str(sae_dir), "--latent", "3", "--sweep", "--alpha", "0", "--alpha", "4",
                 "--prompt", "x = ", "--max-new-tokens", "4"]) == 0
    res = json.loads((sae_dir / "eval" / "steer_sweep_3.json").read_text())
    assert res["alphas"] == [0.0, 4.0] and len(res["success"][0]) == 2
    assert (sae_dir / "eval" / "steer_sweep_3.html").exists()
    assert main(["eval", str(sae_dir), "--suite", "probing", "--tokens", "20k"]) == 0
    probing = json.loads((sae_dir / "eval" / "probing.json").read_text())
    assert probing["mean"]["n_tasks"] >= 5 and "features" in next(
        t for t in probing["tasks"].values() if "k" in t)["k"]["1"]["sae"]
    assert main(["eval", str(sae_dir), "--suite", "steering", "--tokens", "2k"]) == 0
    import pandas as pd

    df = pd.read_parquet(sae_dir / "eval" / "steering_scores.parquet")
    assert list(df.columns[:3]) == ["latent", "output_score", "input_score"] and len(df) == 32
