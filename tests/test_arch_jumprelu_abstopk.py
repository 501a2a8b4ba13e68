"""JumpReLU (trainable) and AbsTopK, each against an independent reference: the threshold's straight-through gradient
against finite differences of what the estimator estimates, the losses against hand-computed cases, AbsTopK's signed
codes against a dense float64 computation on both kernel paths; plus SAELens's three JumpReLU pains (λ saturating,
thresholds that do not move, a bf16 threshold), --target-l0, the CLI (learns, resumes bit-exactly), SAELens round
trips."""

import json
import math
import os
import subprocess
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
# the kernels' backend fixture; importing test_kernels sets TRITON_INTERPRET before the Triton kernels load
from test_kernels import backend  # noqa: E402,F401
from test_train import DiesAfter, Interrupted, final_weights, planted_data, small_cfg  # noqa: E402

from saelab.activations.in_memory import InMemoryActivations  # noqa: E402
from saelab.config import ConfigError, SAEConfig  # noqa: E402
from saelab.sae import SparseAutoencoder  # noqa: E402
from saelab.sae.sae import load_sae  # noqa: E402
from saelab.sae.saelens import save_sae  # noqa: E402
from saelab.training import train  # noqa: E402


def identity_jumprelu(n=4, theta=(1.0,), **options):
    """A JumpReLU SAE whose pre-activations are its inputs (W_enc = I, zero biases, no normalisation)."""
    sae = SparseAutoencoder(SAEConfig(architecture="jumprelu", d_in=n, n_latents=n, k=1, normalize="none",
                                      aux_coef=0.0, hook_name="h", options=options))
    with torch.no_grad():
        sae.W_enc.copy_(torch.eye(n))
        sae.W_dec.copy_(torch.eye(n))
        sae.b_enc.zero_()
        sae.b_dec.zero_()
        sae.arch.set_threshold(sae, torch.tensor(theta).expand(n))
    return sae


def theta_grad(sae, loss):
    """dloss/dθ (the parameter is log θ: dL/dlog θ = θ·dL/dθ)."""
    sae.zero_grad()
    loss.backward()
    return sae.log_threshold.grad / sae.arch.threshold(sae).detach()


# ------------------------------------------------------------------------------------------------ JumpReLU: STE
def test_ste_of_the_step_is_the_derivative_of_the_kernel_smoothed_step():
    """The rectangle-kernel estimator of ∂1[pre > θ]/∂θ is the exact derivative of the step convolved with the
    kernel (a ramp of width ε): a float64 finite difference of Σ ramp((pre − θ)/ε) gives it batch for batch."""
    eps = 0.3
    sae = identity_jumprelu(theta=(0.5, 1.0, 1.5, 2.0), bandwidth=eps)
    x = torch.randn(512, 4, generator=torch.Generator().manual_seed(0)) + 1.2
    g = theta_grad(sae, sae(x).losses["sparsity"])

    def smoothed(theta):  # E_batch Σ_i clamp((pre − θ)/ε + ½, 0, 1)
        return ((x.double() - theta) / eps + 0.5).clamp(0, 1).sum(-1).mean()

    theta = sae.arch.threshold(sae).detach().double()
    h = 1e-6
    for i in range(4):
        e = torch.zeros(4, dtype=torch.float64)
        e[i] = h
        fd = (smoothed(theta + e) - smoothed(theta - e)) / (2 * h)
        assert float(fd) < -0.1  # the window holds tokens: a real gradient
        assert float(g[i]) == pytest.approx(float(fd), rel=1e-4)


@pytest.mark.parametrize("recipe", ["deepmind", "anthropic"])
def test_ste_threshold_gradient_matches_the_finite_difference_of_the_expected_loss(recipe):
    """The estimator is a kernel density estimate of ∂E[loss]/∂θ: on many tokens from a known density its mean
    equals the float64 finite difference of the exact expectations, ∂E[1[pre > θ]]/∂θ = −p(θ) and
    ∂E[c·pre·1[pre > θ]]/∂θ = −c·θ·p(θ) (pre ~ N(μ, σ) per latent, closed forms)."""
    eps = 0.1
    mu, sigma = torch.tensor([0.0, 0.5, 1.0, -0.5]), torch.tensor([1.0, 0.7, 1.5, 2.0])
    theta = (0.8, 1.2, 1.0, 0.6)
    sae = identity_jumprelu(theta=theta, bandwidth=eps, recipe=recipe)
    x = mu + sigma * torch.randn(400_000, 4, generator=torch.Generator().manual_seed(1))
    c = torch.tensor([1.0, -2.0, 0.5, 3.0])  # a reconstruction-like weight on each latent's value

    def survival(t):  # P(pre > t) and E[pre·1[pre > t]], Gaussian closed forms, float64
        m, s = mu.double(), sigma.double()
        z = (t - m) / s
        tail = 0.5 * torch.erfc(z / math.sqrt(2))
        density = torch.exp(-z ** 2 / 2) / math.sqrt(2 * math.pi)
        return tail, m * tail + s * density

    t0, h = torch.tensor(theta, dtype=torch.float64), 1e-5
    fd_step = torch.stack([(survival(t0 + h * e)[0] - survival(t0 - h * e)[0])[i] / (2 * h)
                           for i, e in enumerate(torch.eye(4, dtype=torch.float64))])
    fd_value = torch.stack([(survival(t0 + h * e)[1] - survival(t0 - h * e)[1])[i] / (2 * h)
                            for i, e in enumerate(torch.eye(4, dtype=torch.float64))])

    out = sae(x)
    if recipe == "deepmind":  # the L0 term's estimator
        torch.testing.assert_close(theta_grad(sae, out.losses["sparsity"]).double(), fd_step, rtol=0.04, atol=0)
    out = sae(x)
    weighted = (out.code.to_dense(4) * c).sum(-1).mean()
    torch.testing.assert_close(theta_grad(sae, weighted).double(), c.double() * fd_value, rtol=0.04, atol=0)


def test_anthropic_estimator_reaches_the_encoder_and_deepmind_does_not():
    """Anthropic's recipe sends the estimator's gradient to the pre-activations too (∂/∂pre = −∂/∂θ): a token just
    below θ gets encoder gradient from its (zero) value; in DeepMind's it gets none."""
    grads = {}
    for recipe in ("deepmind", "anthropic"):
        sae = identity_jumprelu(theta=(1.0,), recipe=recipe, bandwidth=0.2)
        x = torch.tensor([[0.95, -3.0, -3.0, -3.0]])  # latent 0 within ε/2 below θ: inactive, in the window
        out = sae(x)
        assert float(out.code.l0()[0]) == 0
        sae.zero_grad()
        (out.code.to_dense(4)[:, 0] * 2.0).sum().backward()
        grads[recipe] = (float(sae.b_enc.grad[0]), float(sae.log_threshold.grad[0]))
    assert grads["deepmind"][0] == 0.0
    # ∂f/∂θ = −(θ/ε)·2 = −10 → dlogθ = θ·(−10); ∂f/∂pre = +10
    assert grads["deepmind"][1] == pytest.approx(-10.0) and grads["anthropic"][1] == pytest.approx(-10.0)
    assert grads["anthropic"][0] == pytest.approx(10.0)


# ------------------------------------------------------------------------------------------------ JumpReLU: losses
def hand_sae(recipe):
    """d_in 2, 3 latents: pre = x·W_enc (b = 0), θ = (1, 1, 1.5), W_dec rows (1,0), (0,1), (0.6,0.8)·s."""
    s = 2.0 if recipe == "anthropic" else 1.0
    sae = SparseAutoencoder(SAEConfig(architecture="jumprelu", d_in=2, n_latents=3, k=1, normalize="none",
                                      aux_coef=0.0, hook_name="h",
                                      options={"recipe": recipe, "l0_coef": 0.01, "bandwidth": 0.1,
                                               "pre_act_coef": 0.1}))
    with torch.no_grad():
        sae.W_enc.copy_(torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 1.0]]))
        sae.W_dec.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6 * s, 0.8 * s]]))
        sae.b_enc.zero_()
        sae.b_dec.zero_()
        sae.loss_normalizer.fill_(2.0)
        sae.arch.set_threshold(sae, torch.tensor([1.0, 1.0, 1.5]))
    return sae


X_HAND = torch.tensor([[2.0, 0.5], [0.2, 1.0]])  # pre: (2, 0.5, 2.5) and (0.2, 1.0, 1.2)


def test_deepmind_loss_by_hand():
    # token 1: 2 > 1 and 2.5 > 1.5 fire, f = (2, 0, 2.5); token 2: 0.2, 1.0 (= θ, not >), 1.2 < 1.5: nothing.
    # x̂₁ = 2·(1,0) + 2.5·(0.6,0.8) = (3.5, 2), err² = 1.5² + 1.5² = 4.5; x̂₂ = 0, err² = 0.04 + 1 = 1.04
    # FVU = (4.5 + 1.04)/2 / 2 = 1.385; L0 = (2 + 0)/2 = 1; loss = 1.385 + 0.01·1
    out = hand_sae("deepmind")(X_HAND)
    assert out.code.l0().tolist() == [2, 0]
    assert float(out.losses["fvu"]) == pytest.approx(1.385)
    assert float(out.losses["sparsity"]) == pytest.approx(1.0)
    assert float(out.losses["loss"]) == pytest.approx(1.395)
    torch.testing.assert_close(out.x_hat, torch.tensor([[3.5, 2.0], [0.0, 0.0]]))


def test_anthropic_loss_by_hand():
    # decoder row 2 has norm 2: x̂₁ = 2·(1,0) + 2.5·(1.2,1.6) = (5, 4), err² = 9 + 12.25 = 21.25; x̂₂ = 0, 1.04
    # FVU = (21.25 + 1.04)/2 / 2 = 5.5725; tanh penalty = (tanh(4·2·1) + tanh(4·2.5·2))/2
    # pre-activation loss on dead latent 1 (θ 1, ‖W_dec,1‖ 1): (ReLU(1 − 0.5) + ReLU(1 − 1.0))/2 / 2 = 0.125
    sae = hand_sae("anthropic")
    out = sae(X_HAND, dead_mask=torch.tensor([False, True, False]))
    tanh = (math.tanh(8.0) + math.tanh(20.0)) / 2
    assert float(out.losses["fvu"]) == pytest.approx(5.5725)
    assert float(out.losses["sparsity"]) == pytest.approx(tanh)
    assert float(out.losses["pre_act"]) == pytest.approx(0.125)
    assert float(out.losses["loss"]) == pytest.approx(5.5725 + 0.01 * tanh + 0.1 * 0.125)
    assert "auxk" not in out.losses and not sae.arch.unit_decoder  # free decoder norms: the recipe's


def test_inference_is_the_training_code_without_the_window():
    torch.manual_seed(0)
    sae = SparseAutoencoder(SAEConfig(architecture="jumprelu", d_in=16, n_latents=64, k=4, hook_name="h",
                                      options={"bandwidth": 0.5}))
    x = torch.randn(256, 16) * 2
    sae.init_from_data_(x)
    train_code, code = sae(x).code, sae.encode(x)
    assert train_code.k > code.k  # the window's inactive latents ride along in training
    torch.testing.assert_close(train_code.to_dense(64).detach(), code.to_dense(64))
    pre = sae.preacts(sae.normalize_input(x)[0])
    dense = pre * (pre > sae.arch.threshold(sae))
    torch.testing.assert_close(code.to_dense(64), dense.detach())
    # θ starts at the first batch's cut-off for a mean L0 of k
    assert float(code.l0().float().mean()) == pytest.approx(4.0, abs=0.05)


def test_target_l0_wider_than_the_sae_is_refused():
    with pytest.raises(ConfigError, match=r"target_l0: must be <= n_latents \(64\), got 100"):
        SAEConfig(architecture="jumprelu", d_in=8, n_latents=64, options={"target_l0": 100})


# ------------------------------------------------------------------------------------------------ JumpReLU: pains
def _run(tmp_path, name, x, tokens=256 * 100, **options):
    cfg = small_cfg(sae=SAEConfig(architecture="jumprelu", n_latents=128, k=4, options=options), tokens=tokens)
    train(cfg, InMemoryActivations(x, 256, seed=1), tmp_path / name, progress=False)
    return [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]


def test_thresholds_move_and_the_log_says_how_far(tmp_path):
    """SAELens #494: at bandwidth 0.001, with the threshold at the SAE's learning rate, thresholds hardly move.
    metrics.jsonl logs threshold_shift (mean |Δ log θ| since init); at the defaults (ε 0.1, θ at 10× the learning
    rate) they move several times further than at ε 0.001, and ten times further than in SAELens's setup."""
    x = planted_data(n_rows=8192, d=32)
    runs = {"default": {}, "eps": {"bandwidth": 0.001}, "saelens": {"bandwidth": 0.001, "threshold_lr_scale": 1.0}}
    shift = {name: _run(tmp_path, name, x, **opts)[-1]["threshold_shift"] for name, opts in runs.items()}
    assert shift["default"] > 0.1 and shift["default"] > 2 * shift["eps"], shift
    assert shift["default"] > 10 * shift["saelens"], shift


def test_threshold_stays_float32_in_a_bfloat16_sae(tmp_path):
    """SAELens PR #728: a bf16 threshold rounds Adam's steps away. log θ is float32 whatever the SAE's dtype: built,
    trained (with float32 Adam state), checkpointed, saved (SAELens's file) and loaded; the estimator's gradient
    reaches it in float32."""
    from safetensors.torch import load_file

    from saelab.training.checkpoint import STATE_TENSORS

    x = planted_data(n_rows=4096, d=32)
    cfg = small_cfg(sae=SAEConfig(architecture="jumprelu", n_latents=128, k=4, dtype="bfloat16"), tokens=256 * 40)
    res = train(cfg, InMemoryActivations(x, 256, seed=1), tmp_path / "bf16", progress=False)
    sae = res.sae
    assert sae.W_enc.dtype == torch.bfloat16 and sae.log_threshold.dtype == torch.float32
    assert float((sae.log_threshold - sae.log_threshold_init).abs().mean()) > 0.01  # it learned
    out = sae(x[:256])
    out.losses["loss"].backward()
    assert sae.log_threshold.grad.dtype == torch.float32 and bool(sae.log_threshold.grad.abs().sum() > 0)
    ckpt = sorted((tmp_path / "bf16" / "checkpoints").glob("step-*"))[-1]
    state = load_file(str(ckpt / STATE_TENSORS))
    assert state["sae.log_threshold"].dtype == torch.float32 and state["sae.W_enc"].dtype == torch.bfloat16
    moments = [t for k, t in state.items() if k.startswith("opt.") and t.shape == (128,) and t.dtype == torch.float32]
    assert len(moments) >= 2  # the threshold's Adam moments (the bf16 b_enc's are bf16)
    w = final_weights(tmp_path / "bf16")
    assert w["threshold"].dtype == torch.float32 and w["W_enc"].dtype == torch.bfloat16
    loaded = SparseAutoencoder.load(tmp_path / "bf16" / "sae")
    assert loaded.cfg.dtype == "bfloat16" and loaded.log_threshold.dtype == torch.float32
    torch.testing.assert_close(loaded.arch.threshold(loaded), sae.arch.threshold(sae).detach())


def test_target_l0_steers_l0_to_the_target(tmp_path):
    """Thresholds started far too low (L0 ≈ 25): with --target-l0 4 the controller raises λ until L0 comes down to
    about 4; at the same fixed λ without a target, L0 stays high."""
    x = planted_data(n_rows=8192, d=32)
    steered = _run(tmp_path, "target", x, init_threshold=0.2, target_l0=4.0)
    fixed = _run(tmp_path, "fixed", x, init_threshold=0.2)
    start = steered[0]["l0"]
    assert start > 12, start
    assert abs(steered[-1]["l0"] - 4) < 1.5, [r["l0"] for r in steered]
    assert fixed[-1]["l0"] > 2 * steered[-1]["l0"], (fixed[-1]["l0"], steered[-1]["l0"])
    assert steered[-1]["l0_coef"] > 10 * fixed[-1]["l0_coef"]  # λ was raised


def test_resume_is_bit_exact_with_the_controller(tmp_path):
    x = planted_data(n_rows=4096)
    opts = dict(sae=SAEConfig(architecture="jumprelu", n_latents=128, k=4, options={"target_l0": 3.0}),
                dead_tokens=256 * 8)
    train(small_cfg(**opts), InMemoryActivations(x, 256, seed=3), tmp_path / "a", progress=False)
    with pytest.raises(Interrupted):
        train(small_cfg(**opts), DiesAfter(x, 256, seed=3, n=47), tmp_path / "b", progress=False)
    train(small_cfg(resume=True, **opts), InMemoryActivations(x, 256, seed=3), tmp_path / "b", progress=False)
    a, b = final_weights(tmp_path / "a"), final_weights(tmp_path / "b")
    for name in a:
        assert torch.equal(a[name], b[name]), name
    log = [(tmp_path / r / "metrics.jsonl").read_text().splitlines() for r in "ab"]
    strip = [[{k: v for k, v in json.loads(line).items() if "per_s" not in k} for line in lines] for lines in log]
    assert strip[0] == strip[1]


# ------------------------------------------------------------------------------------------------ AbsTopK
def test_abstopk_keeps_signs_and_equals_a_dense_computation(backend):  # noqa: F811
    """The k largest |pre| per token, signed values; x̂, the loss and every gradient equal a dense float64
    computation, on the PyTorch path and the Triton path (interpreted on CPU)."""
    _, dev = backend
    torch.manual_seed(0)
    sae = SparseAutoencoder(SAEConfig(architecture="abstopk", d_in=24, n_latents=96, k=6, hook_name="h", k_aux=8),
                            device=dev)
    sae.reset_parameters(seed=0)
    x = (torch.randn(64, 24) * 2 + 0.5).to(dev)
    sae.init_from_data_(x)
    dead = torch.zeros(96, dtype=torch.bool, device=dev)
    dead[::5] = True
    out = sae(x, dead_mask=dead)
    assert bool((out.code.values < 0).any()) and bool((out.code.values > 0).any())
    assert out.code.l0().tolist() == [6] * 64  # negative values are active too
    out.losses["loss"].backward()

    p = {n: t.detach().cpu().double().requires_grad_() for n, t in sae.named_parameters()}
    xn = sae.normalize_input(x)[0].cpu().double()
    pre = (xn - p["b_dec"]) @ p["W_enc"] + p["b_enc"]
    top = pre.detach().abs().topk(6, dim=-1).indices
    z = torch.zeros_like(pre).scatter(1, top, pre.gather(1, top))  # signed
    x_hat = z @ p["W_dec"] + p["b_dec"]
    err = xn - x_hat
    fvu = err.pow(2).sum(-1).mean() / float(sae.loss_normalizer)
    # AuxK: the dead latents' top-8 by |pre|, signed, reconstruct the detached residual
    sub = torch.where(dead.cpu(), pre, torch.zeros_like(pre))
    pick = torch.where(dead.cpu(), pre.detach().abs(), torch.full_like(pre, -1.0)).topk(8, dim=-1).indices
    za = torch.zeros_like(pre).scatter(1, pick, sub.gather(1, pick))
    e = err.detach()
    auxk = (e - za @ p["W_dec"]).pow(2).sum(-1).mean() / (e - e.mean(0)).pow(2).sum(-1).mean()
    ref = fvu + sae.cfg.aux_coef * min(int(dead.sum()) / 8, 1.0) * auxk
    ref.backward()
    torch.testing.assert_close(out.x_hat.detach().cpu().double(), sae.denormalize_output(x_hat).detach(),
                               atol=1e-4, rtol=1e-4)
    assert float(out.losses["loss"]) == pytest.approx(float(ref), rel=1e-5)
    for name, t in sae.named_parameters():
        torch.testing.assert_close(t.grad.cpu().double(), p[name].grad, atol=1e-5, rtol=1e-4, msg=name)


def test_signed_codes_count_as_active_everywhere():
    """A latent with a negative value is active: L0, the evaluators' active entries (repeats summed with their signs),
    the dashboard's packed codes."""
    from saelab.dashboard.codes import pack_code
    from saelab.eval.core import active_entries
    from saelab.sae.code import SparseCode

    code = SparseCode(torch.tensor([[3, 1, 0], [2, 0, 0], [2, 2, 0]]),
                      torch.tensor([[-1.5, 0.5, 0.0], [-2.0, 0.0, 0.0], [-2.0, 0.5, 0.0]]))
    assert code.l0()[:2].tolist() == [2, 1]
    rows, lat, val = active_entries(code, 4)
    assert sorted(zip(rows.tolist(), lat.tolist(), val.tolist())) == [(0, 1, 0.5), (0, 3, -1.5), (1, 2, -2.0),
                                                                      (2, 2, -1.5)]
    ids, vals = pack_code(code, 4)
    assert sorted(zip(ids[0].tolist(), vals[0].tolist())) == [(1, 0.5), (3, -1.5)]
    assert (ids[1].tolist(), vals[1].tolist()) == ([2, -1], [-2.0, 0.0])
    assert (ids[2].tolist(), vals[2].tolist()) == ([2, -1], [-1.5, 0.0])


def test_abstopk_training_counts_negative_latents_as_firing(tmp_path):
    x = planted_data(n_rows=4096, d=32) - 1.0  # centred data: half of the useful directions point down
    cfg = small_cfg(sae=SAEConfig(architecture="abstopk", n_latents=128, k=4), tokens=256 * 40)
    res = train(cfg, InMemoryActivations(x, 256, seed=1), tmp_path / "abs", progress=False)
    rows = [json.loads(line) for line in (tmp_path / "abs" / "metrics.jsonl").read_text().splitlines()]
    assert all(r["l0"] == 4 for r in rows) and rows[-1]["fvu"] < 0.5 * rows[0]["fvu"]
    code = res.sae.encode(x[:512])
    assert bool((code.values < 0).any())


# ------------------------------------------------------------------------------------------------ SAELens
def trained(arch, tmp_path, **options):
    x = planted_data(n_rows=4096, d=32)
    cfg = small_cfg(sae=SAEConfig(architecture=arch, n_latents=128, k=4, options=options,
                                  hook_name="blocks.1.hook_resid_pre"), tokens=256 * 30)
    train(cfg, InMemoryActivations(x, 256, seed=1), tmp_path / arch, progress=False)
    return SparseAutoencoder.load(tmp_path / arch / "sae"), x


@pytest.mark.parametrize("arch, options", [("jumprelu", {}), ("jumprelu", {"recipe": "anthropic"}), ("abstopk", {})])
def test_saelens_round_trip(tmp_path, arch, options):
    sae, x = trained(arch, tmp_path, **options)
    cfg = json.loads((tmp_path / arch / "sae" / "cfg.json").read_text())
    assert cfg["architecture"] == arch and (arch != "abstopk" or (cfg["k"] == 4
                                                                 and cfg["rescale_acts_by_decoder_norm"] is False))
    save_sae(sae, tmp_path / "again")
    loaded = load_sae(tmp_path / "again")
    assert loaded.cfg.architecture == arch and loaded.cfg.options == sae.cfg.options
    a, b = sae.encode(x[:256]), loaded.encode(x[:256])
    assert torch.equal(a.to_dense(128) != 0, b.to_dense(128) != 0)
    torch.testing.assert_close(loaded.decode(b), sae.decode(a), atol=1e-5, rtol=1e-5)
    # the weights alone, read as SAELens's JumpReLU / AbsTopK reads them, give the same x̂
    from safetensors.torch import load_file

    w = load_file(str(tmp_path / "again" / "sae_weights.safetensors"))
    pre = (x[:256] - w["b_dec"]) @ w["W_enc"] + w["b_enc"]
    if arch == "jumprelu":
        z = pre.relu() * (pre > w["threshold"].relu())
    else:
        top = pre.abs().topk(4, dim=-1).indices
        z = torch.zeros_like(pre).scatter(1, top, pre.gather(1, top))
    torch.testing.assert_close(sae.decode(a), z @ w["W_dec"] + w["b_dec"], atol=1e-4, rtol=1e-4)


def test_saelens_abstopk_folder_loads(tmp_path):
    """A SAELens-layout abstopk folder (no saelab.json) with rescale_acts_by_decoder_norm: folded like TopK's."""
    sae, x = trained("abstopk", tmp_path)
    save_sae(sae, tmp_path / "plain")
    (tmp_path / "plain" / "saelab.json").unlink()
    from safetensors.torch import load_file, save_file

    w = load_file(str(tmp_path / "plain" / "sae_weights.safetensors"))
    scale = torch.linspace(0.5, 2.0, 128)  # decoder rows of other norms, ranked and decoded as SAELens does
    w["W_dec"] = (w["W_dec"] * scale[:, None]).contiguous()
    w["W_enc"] = (w["W_enc"] / scale).contiguous()
    w["b_enc"] = (w["b_enc"] / scale).contiguous()
    save_file(w, str(tmp_path / "plain" / "sae_weights.safetensors"))
    cfg = json.loads((tmp_path / "plain" / "cfg.json").read_text())
    cfg["rescale_acts_by_decoder_norm"] = True
    (tmp_path / "plain" / "cfg.json").write_text(json.dumps(cfg))
    loaded = load_sae(tmp_path / "plain")
    assert loaded.cfg.architecture == "abstopk" and loaded.cfg.k == 4
    torch.testing.assert_close(loaded.decode(loaded.encode(x[:256])), sae.decode(sae.encode(x[:256])),
                               atol=1e-4, rtol=1e-4)


def test_saelens_jumprelu_fixture_loads_into_the_trainable_architecture():
    from pathlib import Path

    fixture = Path(__file__).parent / "fixtures" / "saelens" / "jumprelu"
    sae = load_sae(fixture)
    assert sae.cfg.architecture == "jumprelu" and sae.arch.trainable and sae.log_threshold.dtype == torch.float32
    from safetensors.torch import load_file

    raw = load_file(str(fixture / "sae_weights.safetensors"))["threshold"]
    torch.testing.assert_close(sae.arch.threshold(sae).detach(), raw.float().clamp_min(0), rtol=1e-6, atol=0)


@pytest.mark.slow
def test_saelens_itself_loads_our_jumprelu_and_abstopk(tmp_path):
    from test_saelens import FIXTURES, SAELENS_PYTHON

    if not SAELENS_PYTHON.exists():
        pytest.skip(f"no SAELens venv at {SAELENS_PYTHON} (SAELENS_PYTHON)")
    ours = {}
    for arch, options in [("jumprelu", {}), ("jumprelu", {"recipe": "anthropic"}), ("abstopk", {})]:
        name = f"{arch}-{options.get('recipe', 'default')}"
        sae, x = trained(arch, tmp_path / name, **options)
        save_sae(sae, tmp_path / name / "out",
                 extra={"train_config": {"context_size": 32, "corpus": {"source": "stdlib"}}})
        code = sae.encode(x[:64])
        ours[name] = (sae.decode(code).detach(), code.to_dense(sae.n_latents))
        (tmp_path / name / "out" / "x.json").write_text(json.dumps(x[:64].tolist()))
    root = tmp_path / "check"
    root.mkdir()
    for name in ours:
        (root / name).symlink_to(tmp_path / name / "out")
    proc = subprocess.run([str(SAELENS_PYTHON), str(FIXTURES / "check_in_saelens.py"), str(root), *ours],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((root / "saelens_report.json").read_text())
    for name, (x_hat, z) in ours.items():
        r = report[name]
        assert r["class"] == ("AbsTopKSAE" if name.startswith("abstopk") else "JumpReLUSAE"), r["class"]
        assert float((torch.tensor(r["x_hat"]) - x_hat).abs().max()) < 1e-5 * max(1.0, float(x_hat.abs().max()))
        assert torch.equal(torch.tensor(r["acts"]) != 0, z != 0), name
        assert (torch.tensor(r["acts"]) < 0).any() == name.startswith("abstopk")


# ------------------------------------------------------------------------------------------------ reference model
@pytest.fixture(scope="module")
def cache(tmp_path_factory, reference_model):
    from saelab.activations import write_cache
    from saelab.config import CacheConfig

    root = tmp_path_factory.mktemp("jumprelu-cache")
    return write_cache(CacheConfig(hooks=["blocks.2.hook_resid_pre"], out=str(root / "cache"), tokens=20_000,
                                   context_size=32, batch_rows=8), progress=False, model=reference_model)


def test_l0_coefficient_works_around_its_default_on_the_reference_model(cache, tmp_path):
    """SAELens #719: its coefficient acts only between 1e-3 and 1e-1 and its default (1.0) sits where nothing
    changes. Here λ is FVU per active latent; on the reference model's middle residual stream a tenth of the default
    and ten times it give clearly different L0s, on either side of the default's."""
    from saelab.activations.reader import ActivationCache
    from saelab.config import TrainConfig
    from saelab.sae.jumprelu import JumpReLUOptions

    hook, default = "blocks.2.hook_resid_pre", JumpReLUOptions().l0_coef
    l0 = {}
    for coef in (default / 10, default, default * 10):
        cfg = TrainConfig(cache=str(cache), tokens=40_000, batch_size=256, eval_tokens=0, checkpoint_every=10 ** 6,
                          sae=SAEConfig(architecture="jumprelu", n_latents=512, k=32, hook_name=hook,
                                        options={"l0_coef": coef}))
        train(cfg, ActivationCache(cache, hook_name=hook, batch_size=256, seed=0), tmp_path / str(coef),
              progress=False)
        l0[coef] = json.loads((tmp_path / str(coef) / "metrics.jsonl").read_text().splitlines()[-1])["l0"]
    low, mid, high = l0.values()
    assert low > 1.2 * mid and mid > 2 * high and high > 1, l0


@pytest.mark.parametrize("arch", ["jumprelu", "abstopk"])
def test_cli_trains_learns_and_resumes_bit_exactly(cache, tmp_path, monkeypatch, arch):
    """`saelab train --arch A --tokens 20k` on the reference model's activations: FVU falls; a run killed at step 50
    and resumed ends bit-identical to one that was not, metrics included."""
    from saelab.cli import main
    from saelab.training.trainer import SAERun

    def cli(out, *extra):
        return main(["train", "--cache", str(cache), "--arch", arch, "--tokens", "20k", "--batch-size", "256",
                     "--n-latents", "512", "--k", "8", "--eval-tokens", "0", "--checkpoint-every", "20",
                     "--out", str(tmp_path / out), "--no-progress", *extra])

    assert cli("a") == 0
    rows = [json.loads(line) for line in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["step"] == 78 and rows[-1]["fvu"] < 0.75 * rows[0]["fvu"], [r["fvu"] for r in rows]
    if arch == "jumprelu":
        assert rows[-1]["threshold_shift"] > 0 and "l0_coef" in rows[-1]

    real_step = SAERun.step

    def dies_at_50(self, step, x, grad, target=None):
        if step == 50:
            raise KeyboardInterrupt
        return real_step(self, step, x, grad, target)

    monkeypatch.setattr(SAERun, "step", dies_at_50)
    assert cli("b") == 130
    monkeypatch.setattr(SAERun, "step", real_step)
    assert cli("b", "--resume") == 0
    a, b = final_weights(tmp_path / "a"), final_weights(tmp_path / "b")
    assert set(a) == set(b)
    for name in a:
        assert torch.equal(a[name], b[name]), name
    strip = [[{k: v for k, v in json.loads(line).items() if "per_s" not in k}
              for line in (tmp_path / r / "metrics.jsonl").read_text().splitlines()] for r in "ab"]
    assert strip[0] == strip[1]


DIST_SCRIPT = """
import sys, torch, torch.distributed as dist
sys.path.insert(0, {tests!r})
from test_train import planted_data, small_cfg
from saelab.activations.in_memory import InMemoryActivations
from saelab.config import SAEConfig
from saelab.training import train
torch.set_num_threads(1)
dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
cfg = small_cfg(sae=SAEConfig(architecture={arch!r}, n_latents=128, k=4, options={options!r}), tokens=512 * 20,
                batch_size=256, dead_tokens=10**9)
train(cfg, InMemoryActivations(planted_data(n_rows=4096), 256, seed=7, rank=rank, world_size=world), {run!r},
      progress=False)
dist.barrier()
dist.destroy_process_group()
"""


@pytest.mark.slow
@pytest.mark.parametrize("arch, options", [("jumprelu", {"target_l0": 3.0}), ("abstopk", {})])
def test_data_parallel_equals_one_process(tmp_path, arch, options):
    """Under torchrun (2 ranks, gloo) the SAE ends as one process training on the global batches ends: the
    controller's L0 is the global batch's, the thresholds' gradients are averaged like every other."""
    script = tmp_path / "dist.py"
    script.write_text(DIST_SCRIPT.format(tests=os.path.dirname(__file__), run=str(tmp_path / "ddp"), arch=arch,
                                         options=options))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29541",
                    str(script)], check=True, env=env, timeout=600)
    cfg = small_cfg(sae=SAEConfig(architecture=arch, n_latents=128, k=4, options=options), tokens=512 * 20,
                    batch_size=512, dead_tokens=10 ** 9)
    train(cfg, InMemoryActivations(planted_data(n_rows=4096), 512, seed=7), tmp_path / "single", progress=False)
    a, b = final_weights(tmp_path / "ddp"), final_weights(tmp_path / "single")
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=2e-5, rtol=1e-4)
