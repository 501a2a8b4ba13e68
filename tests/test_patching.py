"""Patching estimators: exactness on a linear toy transformer, RelP rules against hand derivations on the reference
model, the full-residual patch, batched vs one-at-a-time activation patching, SAE nodes, the CLI."""

from types import SimpleNamespace

import pytest
import torch
from torch import nn

from saelab.eval import circuits, patching
from saelab.eval.relp import RelPRules, stabilise
from saelab.eval.tasks import ContrastPairs, TaskBatch


# ================================================================================================ linear toy
class _Attn(nn.Module):
    def __init__(self):
        super().__init__()
        from transformer_lens.hook_points import HookPoint

        self.hook_pattern, self.hook_z = HookPoint(), HookPoint()


class _MLP(nn.Module):
    def __init__(self):
        super().__init__()
        from transformer_lens.hook_points import HookPoint

        self.hook_pre, self.hook_post = HookPoint(), HookPoint()


class _LN(nn.Module):
    def __init__(self):
        super().__init__()
        from transformer_lens.hook_points import HookPoint

        self.hook_scale = HookPoint()


class _Block(nn.Module):
    def __init__(self):
        super().__init__()
        from transformer_lens.hook_points import HookPoint

        self.hook_resid_pre, self.hook_attn_out, self.hook_mlp_out = HookPoint(), HookPoint(), HookPoint()
        self.ln1, self.attn, self.mlp = _LN(), _Attn(), _MLP()


def linear_toy(n_layers=2, d=8, n_heads=2, vocab=11, length=5, seed=0):
    """A transformer-shaped network that is linear in every activation: norms divide by a constant scale, the
    attention pattern is a fixed causal average, the MLP activation is the identity. Same hook names as a
    TransformerBridge, so every estimator and every RelP rule hook runs on it."""
    from transformer_lens import HookedRootModule

    g = torch.Generator().manual_seed(seed)
    dh = d // n_heads

    class Toy(HookedRootModule):
        def __init__(self):
            super().__init__()
            self.cfg = SimpleNamespace(n_layers=n_layers, n_heads=n_heads, d_model=d)
            self.W_E = torch.randn(vocab, d, generator=g)
            self.W_pos = torch.randn(length, d, generator=g) * 0.1
            self.W_V = torch.randn(n_layers, d, n_heads, dh, generator=g) / d ** 0.5
            self.W_O = torch.randn(n_layers, n_heads, dh, d, generator=g) / d ** 0.5
            self.W_in = torch.randn(n_layers, d, 2 * d, generator=g) / d ** 0.5
            self.W_out = torch.randn(n_layers, 2 * d, d, generator=g) / d ** 0.5
            self.W_U = torch.randn(d, vocab, generator=g)
            self.scale = 1.0 + torch.rand(length, 1, generator=g)
            causal = torch.tril(torch.ones(length, length))
            self.pattern = (causal / causal.sum(1, keepdim=True)).expand(n_heads, length, length)
            self.blocks = nn.ModuleList([_Block() for _ in range(n_layers)])
            self.ln_final = _LN()
            self.setup()

        def forward(self, tokens):
            B, L = tokens.shape
            x = self.W_E[tokens] + self.W_pos[:L]
            for i, b in enumerate(self.blocks):
                x = b.hook_resid_pre(x)
                h = x / b.ln1.hook_scale(self.scale[:L].expand(B, L, 1))
                v = torch.einsum("bld,dhe->blhe", h, self.W_V[i])
                p = b.attn.hook_pattern(self.pattern[:, :L, :L].expand(B, -1, -1, -1))
                z = b.attn.hook_z(torch.einsum("bhqk,bkhe->bqhe", p, v))
                x = x + b.hook_attn_out(torch.einsum("blhe,hed->bld", z, self.W_O[i]))
                post = b.mlp.hook_post(b.mlp.hook_pre(x @ self.W_in[i]))
                x = x + b.hook_mlp_out(post @ self.W_out[i])
            return (x / self.ln_final.hook_scale(self.scale[:L].expand(B, L, 1))) @ self.W_U

    return Toy()


def toy_batch(vocab=11, length=5, n=6, seed=1):
    g = torch.Generator().manual_seed(seed)
    clean = torch.randint(0, vocab, (n, length), generator=g)
    corrupted = clean.clone()
    corrupted[:, 2] = (clean[:, 2] + 1 + torch.randint(0, vocab - 1, (n,), generator=g)) % vocab
    answer = torch.randint(0, vocab, (n,), generator=g)
    wrong = (answer + 1) % vocab
    pairs = ContrastPairs("toy", ["c"] * n, ["r"] * n, ["a"] * n, ["w"] * n)
    return TaskBatch("toy", clean, corrupted, answer, wrong, pairs)


def assert_edges_sum_to_finite_difference(E, down_nodes, c, D, nodes_at, x, dx, eps=1e-3):
    """Row r of E (the edges into downstream node `down_nodes[r]` = (position, latent or -1: the error)) sums to
    ∇_d m · (the node's change along dx at x), by a finite difference of `nodes_at(x)` → (latents, error) of the
    downstream SAE with x written upstream; a latent reaches the metric through its decoder row D[j], with c the
    metric's gradient at the downstream hook."""
    f0, e0 = nodes_at(x)
    f1, e1 = nodes_at(x + eps * dx)
    for r, (t, j) in enumerate(down_nodes):
        if j >= 0:
            hand = ((c[:, t] @ D[j]) * (f1[:, t, j] - f0[:, t, j]) / eps).sum()
        else:
            hand = (c[:, t] * (e1[:, t] - e0[:, t]) / eps).sum()
        assert float(E[r].sum()) == pytest.approx(float(hand), rel=2e-2, abs=1e-4)


def test_every_estimator_exact_on_linear_toy():
    model, batch = linear_toy(), toy_batch()
    sites = patching.model_sites(model)
    assert {s.kind for s in sites} == set(patching.KINDS)
    base = patching.baseline(model, batch)
    # the toy's norms are built for the token batch: batched patching takes the all-copies-from-the-start path
    assert not patching._grows_mid_forward(model, batch, [], model(batch.corrupted))
    ap = patching.activation_patching(model, batch, sites, base)
    estimates = {"attribution": patching.attribution_patching(model, batch, sites, base),
                 "relp": patching.relp(model, batch, sites, base, RelPRules(attention=True)),
                 "ig": patching.integrated_gradients(model, batch, sites, base, steps=3)}
    for kind, truth in ap.items():
        assert truth.abs().max() > 1e-2, kind  # something to agree on
        for name, est in estimates.items():
            # RelP's ε (1e-6) stabiliser in the identity rule is the only departure from exactness
            torch.testing.assert_close(est[kind], truth, rtol=1e-3, atol=1e-4, msg=f"{name} {kind}")
    # a head's effect summed over heads is the attention output's effect summed over positions (linear O map)
    torch.testing.assert_close(ap["head"].sum(1), ap["attn"].sum(1), rtol=1e-4, atol=1e-5)


def test_sae_nodes_exact_on_linear_toy():
    from saelab.config import SAEConfig
    from saelab.sae import SparseAutoencoder

    model, batch = linear_toy(), toy_batch()
    sae = SparseAutoencoder(SAEConfig(d_in=8, n_latents=32, k=4, hook_name="blocks.1.hook_resid_pre"))
    sae.reset_parameters(seed=0)
    out = circuits.feature_attribution(model, batch, [sae], ig_steps=2)
    (truth,) = out["truth"]
    assert truth["latents"].shape[0] > 10 and truth["errors"].numel() >= 1
    for method in ("attribution", "relp", "ig"):
        lat, err = out["estimates"][method][0]
        torch.testing.assert_close(lat[truth["latents"][:, 0], truth["latents"][:, 1]], truth["ap_latents"],
                                   rtol=1e-3, atol=1e-4)
        torch.testing.assert_close(err[truth["errors"]], truth["ap_errors"], rtol=1e-3, atol=1e-4)
        assert out["correlation"][method]["sae_latents"] > 0.9999
    # nodes decompose the activation exactly: x = bias + f·D + e
    (nodes,) = out["nodes"]
    _, acts = patching.capture(model, batch.clean, [sae.cfg.hook_name])
    rebuilt = nodes.bias + nodes.f_clean @ nodes.D + nodes.e_clean
    torch.testing.assert_close(rebuilt, acts[sae.cfg.hook_name], rtol=1e-5, atol=1e-5)


# ================================================================================================ reference model
@pytest.fixture(scope="module")
def bracket(reference_model):
    from saelab.eval.tasks import make_task

    batch = make_task(reference_model, "bracket", n=8, seed=0)
    return batch, patching.baseline(reference_model, batch)


def test_full_residual_patch_at_last_layer_gives_clean_metric(reference_model, bracket):
    batch, base = bracket
    last = f"blocks.{reference_model.cfg.n_layers - 1}.hook_resid_post"
    _, clean = patching.capture(reference_model, batch.clean, [last, "blocks.0.hook_resid_pre"])
    for hook in (last, "blocks.0.hook_resid_pre"):
        with torch.no_grad():
            logits = reference_model.run_with_hooks(batch.corrupted, fwd_hooks=[(hook, lambda a, hook, h=hook:
                                                                                 clean[h])])
        assert float(base.normalise(patching.mean_ld(logits, batch))[0]) == pytest.approx(1.0, abs=1e-5)


@pytest.mark.parametrize("kinds, layers, max_rows", [(["resid", "head"], [3], 64),  # one forward per kind
                                                     (patching.KINDS, [0, 1, 2, 3], 24)])  # 3 copies a forward
def test_batched_activation_patching_equals_loop(reference_model, bracket, kinds, layers, max_rows):
    batch, base = bracket
    # the bridge takes a batch that grows at a block: the batched path here starts each forward at its layer
    last = patching.last_position_hooks(reference_model)
    with torch.no_grad():
        plain = reference_model.run_with_hooks(batch.corrupted, fwd_hooks=last)
    assert patching._grows_mid_forward(reference_model, batch, last, plain)
    sites = [s for s in patching.model_sites(reference_model, kinds) if s.layer in layers]
    batched = patching.activation_patching(reference_model, batch, sites, base, max_rows=max_rows)
    loop = patching.activation_patching(reference_model, batch, sites, base, batched=False)
    for kind in batched:
        torch.testing.assert_close(batched[kind], loop[kind], rtol=1e-4, atol=1e-5)
    # before the first corrupted token clean and corrupted activations are equal: those patches do nothing
    first = int((batch.clean != batch.corrupted).any(0).nonzero()[0])
    assert batched["resid"][0, :first].abs().max() < 1e-6 < batched["resid"][0, first:].abs().max()


def test_relp_ln_rule_conserves_relevance_through_final_layernorm(reference_model, bracket):
    """m = Σ_i u_i·LN(x_i)/(N·den) + const with u = W_U[:, answer] − W_U[:, wrong]. With σ frozen (LN-rule),
    Σ x·R̃ = Σ_i u_i·(LN(x_i) − b)/(N·den) by hand; the true gradient gives Σ x·∂m/∂x = 0 (LN is scale invariant)."""
    batch, base = bracket
    hook = f"blocks.{reference_model.cfg.n_layers - 1}.hook_resid_post"
    ln_only = RelPRules(layernorm=True, identity=False, half=False)
    coef, _, acts = patching.hook_coefficients(reference_model, batch, [hook], base, "relp", ln_only)
    x = acts[hook]
    relevance = float((x * coef[hook]).sum())
    with torch.no_grad():
        ln_out = reference_model.ln_final(x)[:, -1]
        W_U = reference_model.unembed.W_U
        u = W_U[:, batch.answer].T - W_U[:, batch.wrong].T
        b = reference_model.ln_final.b
        hand = float(((ln_out - b) * u).sum() / batch.n_pairs / (base.ld_clean - base.ld_corrupted))
    assert relevance == pytest.approx(hand, rel=1e-4)
    grad, _, _ = patching.hook_coefficients(reference_model, batch, [hook], base, "attribution")
    assert abs(float((x * grad[hook]).sum())) < 1e-3 * abs(hand)


def test_relp_identity_rule_through_gelu(reference_model, bracket):
    """Identity rule: the coefficient at GELU's input is the output's times φ(x)/x_s, so the relevance
    x·R̃_x = φ(x)·R̃_y passes through unchanged; the true gradient (φ'(x)) differs."""
    batch, base = bracket
    pre, post = "blocks.3.mlp.hook_pre", "blocks.3.mlp.hook_post"
    rules = RelPRules()
    coef, _, acts = patching.hook_coefficients(reference_model, batch, [pre, post], base, "relp", rules)
    expect = coef[post] * acts[post] / stabilise(acts[pre], rules.eps)
    torch.testing.assert_close(coef[pre], expect, rtol=1e-5, atol=1e-8)
    torch.testing.assert_close((acts[pre] * coef[pre]).sum(), (acts[post] * coef[post]).sum(), rtol=1e-4,
                               atol=1e-6)
    grad, _, _ = patching.hook_coefficients(reference_model, batch, [pre, post], base, "attribution")
    assert not torch.allclose(grad[pre], expect, rtol=1e-2, atol=1e-6)


def test_relp_without_rules_is_attribution_patching(reference_model, bracket):
    batch, base = bracket
    sites = [s for s in patching.model_sites(reference_model, ["mlp", "head"])]
    none = patching.relp(reference_model, batch, sites, base, RelPRules.parse("none"))
    atp = patching.attribution_patching(reference_model, batch, sites, base)
    for kind in atp:
        torch.testing.assert_close(none[kind], atp[kind])
    with_rules = patching.relp(reference_model, batch, sites, base, RelPRules.parse("ln,identity,half"))
    assert not torch.allclose(with_rules["mlp"], atp["mlp"], rtol=1e-3, atol=1e-6)


def test_sae_splice_with_error_keeps_logits(reference_model, bracket):
    from saelab.config import SAEConfig
    from saelab.eval.splice import splice
    from saelab.sae import SparseAutoencoder

    batch, _ = bracket
    sae = SparseAutoencoder(SAEConfig(d_in=256, n_latents=512, k=8, hook_name="blocks.2.hook_resid_pre"))
    sae.reset_parameters(seed=0)
    with torch.no_grad():
        clean = reference_model(batch.clean)
        with splice(reference_model, sae, keep_error=True):
            spliced = reference_model(batch.clean)
        with splice(reference_model, sae, keep_error=False):
            recon_only = reference_model(batch.clean)
    # x̂ + (x − x̂) differs from x by float32 rounding only
    torch.testing.assert_close(spliced, clean, rtol=0, atol=1e-4)
    assert (recon_only - clean).abs().max() > 1e-1  # the splice is live: without the error term logits move


@pytest.mark.slow
def test_cli_patch_end_to_end_and_errors(reference_model, tmp_path, capsys):
    import json

    from saelab.cli import main
    from saelab.config import SAEConfig
    from saelab.sae import SparseAutoencoder

    sae = SparseAutoencoder(SAEConfig(d_in=256, n_latents=512, k=8, hook_name="blocks.2.hook_resid_pre"))
    sae.reset_parameters(seed=0)
    sae.save(tmp_path / "sae")
    out = tmp_path / "out"
    rc = main(["patch", "--task", "bracket", "--pairs", "4", "--sae", str(tmp_path / "sae"), "--ig-steps", "2",
               "--out", str(out), "--no-progress"])
    assert rc == 0
    report = json.loads((out / "patching-bracket.json").read_text())
    assert set(report["correlation"]) >= {"attribution", "relp", "ig"}
    assert report["sae"]["circuit"]["faithfulness"][-1] is not None
    assert (out / "patching-bracket.html").stat().st_size > 1000
    assert not list(out.glob("*.tmp"))
    capsys.readouterr()

    pairs = tmp_path / "uneven.jsonl"
    pairs.write_text(json.dumps({"clean": "x = f(a", "corrupted": "x = f[a, b", "answer": ")", "wrong": "]"}))
    assert main(["patch", "--task", str(pairs), "--out", str(tmp_path / "o2")]) == 2
    assert "clean prompt is" in capsys.readouterr().err
    other = SparseAutoencoder(SAEConfig(d_in=256, n_latents=64, k=4, hook_name="blocks.2.hook_resid_pre",
                                        model_name="gpt2"))
    other.reset_parameters(seed=0)
    other.save(tmp_path / "other")
    assert main(["patch", "--sae", str(tmp_path / "other"), "--out", str(tmp_path / "o3")]) == 2
    assert "trained on model 'gpt2'" in capsys.readouterr().err
    assert not (tmp_path / "o2").exists() and not (tmp_path / "o3").exists()


@pytest.mark.parametrize("down_arch", ["topk", "gated", "abstopk"])
def test_edges_sum_to_finite_difference_on_linear_toy(down_arch):
    """Σ over every upstream node u of IE(u→d) = ∇_d m · (∂d/∂x_up) Δx_up; checked against a finite difference of
    the downstream node d along Δx_up (small step: the SAE's support does not change). The downstream SAE's latents
    are differentiated by their architecture's value function (Gated: ∂value/∂pre = exp(r_mag); AbsTopK: signed)."""
    from saelab.config import SAEConfig
    from saelab.sae import SparseAutoencoder

    model, batch = linear_toy(), toy_batch()
    saes = []
    for i, hook in enumerate(("blocks.1.hook_resid_pre", "blocks.1.hook_mlp_out")):
        sae = SparseAutoencoder(SAEConfig(d_in=8, n_latents=16, k=4, hook_name=hook,
                                          architecture=down_arch if i else "topk"))
        sae.reset_parameters(seed=i)
        if down_arch == "gated" and i:
            with torch.no_grad():  # away from the tie's init (r_mag = 0 would hide a wrong derivative)
                sae.r_mag.copy_(torch.linspace(-0.8, 0.8, 16))
                sae.b_mag.copy_(torch.linspace(-0.1, 0.1, 16))
        saes.append(sae)
    base = patching.baseline(model, batch)
    up, down = circuits.sae_nodes(model, batch, saes)
    L, n_up = batch.length, up.n_latents
    up_nodes = [(t, i) for t in range(L) for i in range(n_up)] + [(t, -1) for t in range(L)]
    # the last position: the only one whose downstream activation reaches the metric (the last layer's MLP out)
    active = [(t, j) for t, j in down.f_corrupt[0].nonzero().tolist() if t == L - 1][:3]
    assert len(active) == 3
    down_nodes = [(int(t), int(j)) for t, j in active] + [(L - 1, -1)]
    E = circuits.edges(model, batch, up, down, down_nodes, up_nodes, base)

    coef, _, _ = patching.hook_coefficients(model, batch, [down.hook], base, "attribution")
    c = coef[down.hook]
    _, acts = patching.capture(model, batch.corrupted, [up.hook])
    x_r = acts[up.hook]
    dx = (up.f_clean - up.f_corrupt) @ up.D + (up.e_clean - up.e_corrupt)

    def down_nodes_at(x):
        box = {}
        with torch.no_grad():
            model.run_with_hooks(batch.corrupted, fwd_hooks=[(up.hook, lambda a, hook: x),
                                                              (down.hook, lambda a, hook: box.setdefault("d", a))])
        with torch.no_grad():
            return circuits.dense_codes(down.sae, box["d"])

    assert_edges_sum_to_finite_difference(E, down_nodes, c, down.D, down_nodes_at, x_r, dx)
    assert E[:-1].sum(1).abs().max() > 1e-3  # the latent nodes have edges to check, not only the error node


def test_faithfulness_of_everything_is_one_and_of_nothing_zero():
    from saelab.config import SAEConfig
    from saelab.sae import SparseAutoencoder

    model, batch = linear_toy(), toy_batch()
    sae = SparseAutoencoder(SAEConfig(d_in=8, n_latents=16, k=4, hook_name="blocks.1.hook_resid_pre"))
    sae.reset_parameters(seed=0)
    nodes = circuits.sae_nodes(model, batch, [sae])
    L = batch.length
    scores = [(torch.rand(L, 16) + 0.1, torch.rand(L) + 0.1)]  # every node scored: size L·17 is all of them
    curve = circuits.faithfulness_curve(model, batch, nodes, scores, sizes=[0, 5, L * 17])
    assert curve["faithfulness"][0] == pytest.approx(0.0, abs=1e-6)
    assert curve["faithfulness"][-1] == pytest.approx(1.0, abs=1e-5)
    assert curve["completeness"][0] == pytest.approx(1.0, abs=1e-5)
    assert curve["completeness"][-1] == pytest.approx(0.0, abs=1e-6)


def test_ig_with_one_step_is_attribution_patching(reference_model, bracket):
    """IG's first point is the corrupted run itself (left Riemann sum), so one step is AtP (the IG path unembeds
    the last position only)."""
    batch, base = bracket
    sites = [s for s in patching.model_sites(reference_model) if s.layer in (0, 2)]
    ig = patching.integrated_gradients(reference_model, batch, sites, base, steps=1)
    atp = patching.attribution_patching(reference_model, batch, sites, base)
    for kind in atp:
        torch.testing.assert_close(ig[kind], atp[kind], rtol=1e-4, atol=1e-5)
