"""The ReLU (Anthropic April 2024) and Gated (Rajamanoharan et al. 2024) architectures: each loss against a
hand-computed case, both code paths (packed sparse, dense) against a dense autograd reference, ReLU with λ = 0 as a
plain ReLU autoencoder, Gated's r_mag tie and which loss reaches which parameter, and `saelab train --arch relu|gated`
on the reference model: it learns, resumes bit-exactly mid warm-up, and its saved folder computes what SAELens's
rule computes from the tensors alone. SAELens round trips: tests/test_saelens.py (OURS, fixtures gated*)."""

import json
import os
import shutil
import sys

import pytest
import torch
from safetensors.torch import load_file

import saelab.sae.relu as relu_module
from saelab.activations.in_memory import InMemoryActivations
from saelab.config import SAEConfig
from saelab.sae import SparseAutoencoder
from saelab.training import train

sys.path.insert(0, os.path.dirname(__file__))
from test_train import DiesAfter, Interrupted, final_weights, planted_data, small_cfg  # noqa: E402

T = 32  # the cache's context size


def sae_with(arch, W_enc, b_enc, W_dec, b_dec, normalizer, **options):
    """An SAE with exactly these weights (raw inputs: no normalisation)."""
    W_enc, W_dec = torch.tensor(W_enc), torch.tensor(W_dec)
    sae = SparseAutoencoder(SAEConfig(architecture=arch, d_in=W_enc.shape[0], n_latents=W_enc.shape[1], k=1,
                                      normalize="none", hook_name="h", options=options))
    with torch.no_grad():
        for name, t in (("W_enc", W_enc), ("b_enc", b_enc), ("W_dec", W_dec), ("b_dec", b_dec)):
            getattr(sae, name).copy_(torch.as_tensor(t))
        sae.loss_normalizer.fill_(normalizer)
    return sae


@pytest.fixture(params=["packed", "dense"])
def path(request, monkeypatch):
    """Run each test on both code paths: a support never dense, or always."""
    monkeypatch.setattr(relu_module, "DENSE_FRACTION", 2.0 if request.param == "packed" else -1.0)
    return request.param


# ------------------------------------------------------------------------------------------------ hand-computed
def test_relu_loss_by_hand(path):
    # token 1: pre = (1, 1.5, -1) → f = (1, 1.5, 0), x̂ = (2, 1.5), ‖x − x̂‖² = 1.25, Σ f‖W_dec‖ = 1·2 + 1.5·1 = 3.5
    # token 2: pre = (-1, -0.5, -1) → f = 0, x̂ = b_dec = 0, ‖x − x̂‖² = 1, penalty 0
    # normaliser 2: fvu = (1.25 + 1)/2/2 = 0.5625, l1 = (3.5 + 0)/2/2 = 0.875, loss = fvu + 0.4·l1 = 0.9125
    sae = sae_with("relu", [[1.0, 0.0, 1.0], [0.0, 1.0, -1.0]], [0.0, -0.5, 0.0],
                   [[2.0, 0.0], [0.0, 1.0], [1.0, 1.0]], [0.0, 0.0], 2.0, l1_coef=0.4)
    out = sae(torch.tensor([[1.0, 2.0], [-1.0, 0.0]]))
    torch.testing.assert_close(out.x_hat, torch.tensor([[2.0, 1.5], [0.0, 0.0]]))
    assert out.code.l0().tolist() == [2, 0]
    for name, want in (("fvu", 0.5625), ("l1", 0.875), ("loss", 0.9125)):
        assert abs(float(out.losses[name].detach()) - want) < 1e-6, name
    sae.arch.begin_step(0, 100)  # warm-up over 5 steps: λ/5 at step 0, λ from step 4 on
    loss = sae(torch.tensor([[1.0, 2.0], [-1.0, 0.0]])).losses["loss"].detach()
    assert abs(float(loss) - (0.5625 + 0.08 * 0.875)) < 1e-6
    sae.arch.begin_step(4, 100)
    assert sae.arch.l1_coef() == pytest.approx(0.4)


def test_gated_loss_by_hand(path):
    # W_gate = I, b_gate = (0, -1), exp(r_mag) = (2, 1), b_mag = (-0.5, 0.5), W_dec = diag(1, 2), b_dec = 0
    # token 1 (1, 3):   π_gate (1, 2), π_mag (1.5, 3.5) → f (1.5, 3.5), x̂ (1.5, 7): 16.25; penalty 1·1 + 2·2 = 5;
    #                   aux x̂ (1, 4): 1
    # token 2 (2, .5):  π_gate (2, -0.5), π_mag (3.5, 1) → f (3.5, 0) (latent 2 gated off): 2.5; penalty 2; aux 0.25
    # token 3 (.2, 0):  π_gate (0.2, -1), π_mag (-0.1, 0.5) → f (0, 0) (gate open, magnitude ≤ 0): 0.04;
    #                   penalty 0.2; aux 0
    # normaliser 1: fvu 18.79/3, l1 7.2/3 = 2.4, aux 1.25/3; loss = fvu + 0.5·l1 + aux = 7.88
    sae = sae_with("gated", [[1.0, 0.0], [0.0, 1.0]], [0.0, -1.0], [[1.0, 0.0], [0.0, 2.0]], [0.0, 0.0], 1.0,
                   l1_coef=0.5)
    with torch.no_grad():
        sae.r_mag.copy_(torch.tensor([2.0, 1.0]).log())
        sae.b_mag.copy_(torch.tensor([-0.5, 0.5]))
    x = torch.tensor([[1.0, 3.0], [2.0, 0.5], [0.2, 0.0]])
    out = sae(x)
    torch.testing.assert_close(out.code.to_dense(2), torch.tensor([[1.5, 3.5], [3.5, 0.0], [0.0, 0.0]]))
    assert out.code.l0().tolist() == [2, 1, 0]  # active = value ≠ 0: an open gate with magnitude ≤ 0 is inactive
    for name, want in (("fvu", 18.79 / 3), ("l1", 2.4), ("aux_fvu", 1.25 / 3), ("loss", 7.88)):
        assert abs(float(out.losses[name].detach()) - want) < 1e-5, name
    torch.testing.assert_close(sae.encode(x).to_dense(2), out.code.to_dense(2).detach())


# ------------------------------------------------------------------------------------------------ dense references
def random_sae(arch, seed=0, d=24, n=96, **options):
    torch.manual_seed(seed)
    sae = SparseAutoencoder(SAEConfig(architecture=arch, d_in=d, n_latents=n, k=4, normalize="none", hook_name="h",
                                      options=options))
    sae.reset_parameters(seed=seed)
    x = torch.randn(64, d) * 2 + 0.5
    sae.init_from_data_(x)
    with torch.no_grad():
        sae.b_enc.normal_(0, 0.3)
        sae.W_dec.mul_(torch.rand(n, 1) + 0.5)  # free decoder norms: each one matters
        if arch == "gated":
            sae.r_mag.normal_(0, 0.5)
            sae.b_mag.normal_(0, 0.3)
    return sae, x


def reference_losses(sae, x, lam):
    """The losses as plain dense autograd, written from the papers' formulas (SAELens's W_mag = W_enc·exp(r_mag))."""
    xn, _ = sae.normalize_input(x)
    xc, N = xn - sae.b_dec, sae.loss_normalizer
    if sae.cfg.architecture == "relu":
        f = (xc @ sae.W_enc + sae.b_enc).relu()
        err = xn - (f @ sae.W_dec + sae.b_dec)
        return f, {"fvu": err.pow(2).sum(-1).mean() / N,
                   "l1": (f * sae.W_dec.norm(dim=1)).sum(-1).mean() / N}
    pi_gate = xc @ sae.W_enc + sae.b_enc
    pi_mag = xc @ (sae.W_enc * sae.r_mag.exp()) + sae.b_mag
    f = (pi_gate > 0) * pi_mag.relu()
    W_frozen, b_frozen = sae.W_dec.detach(), sae.b_dec.detach()
    return f, {"fvu": (xn - (f @ sae.W_dec + sae.b_dec)).pow(2).sum(-1).mean() / N,
               "l1": (pi_gate.relu() * W_frozen.norm(dim=1)).sum(-1).mean() / N,
               "aux_fvu": (xn - (pi_gate.relu() @ W_frozen + b_frozen)).pow(2).sum(-1).mean() / N}


def grads(sae, loss):
    sae.zero_grad(set_to_none=True)
    loss.backward(retain_graph=True)
    return {n: (p.grad.clone() if p.grad is not None else torch.zeros_like(p)) for n, p in sae.named_parameters()}


@pytest.mark.parametrize("arch", ["relu", "gated"])
def test_both_paths_match_dense_autograd(arch, path):
    sae, x = random_sae(arch, l1_coef=0.7)
    out = sae(x)
    f_ref, ref = reference_losses(sae, x, 0.7)
    torch.testing.assert_close(out.code.to_dense(sae.n_latents), f_ref, atol=1e-5, rtol=1e-5)
    # dense: every latent listed; packed: padded to the batch's largest support, not to n
    support = (sae.preacts(sae.normalize_input(x)[0]) > 0).sum(1)
    if path == "dense":
        assert out.code.k == sae.n_latents
    else:
        assert out.code.k == int(support.max()) < sae.n_latents
    for name, value in ref.items():
        torch.testing.assert_close(out.losses[name], value, atol=1e-6, rtol=1e-5)
    total = ref["fvu"] + 0.7 * ref["l1"] + ref.get("aux_fvu", 0.0)
    for name, (g, want) in {n: (grads(sae, out.losses["loss"])[n], grads(sae, total)[n])
                            for n, _ in sae.named_parameters()}.items():
        torch.testing.assert_close(g, want, atol=1e-6, rtol=1e-4, msg=name)
    # inference packs the same code (no gradients, batch-independent)
    torch.testing.assert_close(sae.encode(x).to_dense(sae.n_latents), f_ref.detach(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(sae.encode(x[:5]).to_dense(sae.n_latents), f_ref[:5].detach(), atol=1e-5, rtol=1e-5)


def test_relu_without_penalty_is_a_plain_relu_autoencoder(path):
    sae, x = random_sae("relu", l1_coef=0.0)
    plain = torch.nn.functional.relu((x - sae.b_dec) @ sae.W_enc + sae.b_enc) @ sae.W_dec + sae.b_dec
    mse = torch.nn.functional.mse_loss(plain, x, reduction="sum") / x.shape[0] / sae.loss_normalizer
    out = sae(x)
    torch.testing.assert_close(out.losses["loss"], mse)
    torch.testing.assert_close(out.x_hat, plain, atol=1e-5, rtol=1e-5)
    a, b = grads(sae, out.losses["loss"]), grads(sae, mse)
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=1e-6, rtol=1e-4, msg=name)


# ------------------------------------------------------------------------------------------------ Gated's tie
def test_gated_r_mag_tie_and_where_each_loss_goes(path):
    sae, x = random_sae("gated", l1_coef=1.0)
    out = sae(x)
    # the magnitude path is W_gate scaled per latent: the code equals SAELens's x_c·(W_enc·exp(r_mag)) + b_mag
    xc = x - sae.b_dec
    pi_mag = xc @ (sae.W_enc * sae.r_mag.exp()) + sae.b_mag
    f = (xc @ sae.W_enc + sae.b_enc > 0) * pi_mag.relu()
    torch.testing.assert_close(out.code.to_dense(sae.n_latents), f, atol=1e-5, rtol=1e-5)
    # reconstruction: through the magnitude path only (the Heaviside gate passes nothing to b_gate)
    g = grads(sae, out.losses["fvu"])
    assert torch.equal(g["b_enc"], torch.zeros_like(g["b_enc"]))
    assert all(g[n].abs().sum() > 0 for n in ("W_enc", "r_mag", "b_mag", "W_dec", "b_dec"))
    # W_enc's gradient from it is exp(r_mag) times what an untied magnitude matrix would get (the chain rule of
    # W_mag = exp(r_mag)·W_gate), and r_mag's is Σ_j W_enc ⊙ that untied gradient
    W_mag = (sae.W_enc * sae.r_mag.exp()).detach().requires_grad_()
    pm = xc.detach() @ W_mag + sae.b_mag.detach()
    gate = (xc @ sae.W_enc + sae.b_enc > 0).detach()
    loss = (x - ((gate * pm.relu()) @ sae.W_dec.detach() + sae.b_dec.detach())).pow(2).sum(-1).mean()
    (gW_mag,) = torch.autograd.grad(loss / sae.loss_normalizer, W_mag)
    torch.testing.assert_close(g["r_mag"], (gW_mag * W_mag).sum(0).detach(), atol=1e-6, rtol=1e-4)
    # the gate terms train the gate only: nothing reaches the (frozen) decoder or the magnitude parameters
    for name in ("l1", "aux_fvu"):
        g = grads(sae, out.losses[name])
        assert g["W_enc"].abs().sum() > 0 and g["b_enc"].abs().sum() > 0, name
        for frozen in ("W_dec", "r_mag", "b_mag"):
            assert torch.equal(g[frozen], torch.zeros_like(g[frozen])), (name, frozen)
    assert torch.equal(grads(sae, out.losses["aux_fvu"])["b_dec"] != 0, torch.ones(sae.d_in, dtype=torch.bool))


def test_free_decoder_is_neither_renormalised_nor_projected():
    sae, x = random_sae("relu")
    norms = sae.W_dec.norm(dim=1).clone()
    sae(x).losses["loss"].backward()
    g = sae.W_dec.grad.clone()
    sae.remove_parallel_grad_()
    sae.normalize_decoder_()
    assert torch.equal(sae.W_dec.grad, g) and torch.equal(sae.W_dec.norm(dim=1), norms)
    fresh = SparseAutoencoder(SAEConfig(architecture="gated", d_in=24, n_latents=96, k=4))
    torch.testing.assert_close(fresh.W_dec.norm(dim=1), torch.full((96,), 0.1))  # Anthropic's init norm
    torch.testing.assert_close(fresh.W_enc, fresh.W_dec.T)
    assert torch.equal(fresh.r_mag, torch.zeros(96)) and torch.equal(fresh.b_mag, torch.zeros(96))


@pytest.mark.parametrize("arch", ["relu", "gated"])
def test_resume_mid_warm_up_is_bit_exact(tmp_path, arch):
    """Killed at step 47 of 60 while λ still warms up (over 90 % of the steps): the resumed run is the same SAE."""
    x = planted_data(n_rows=4096)
    opts = dict(sae=SAEConfig(architecture=arch, n_latents=128, options={"l1_coef": 2.0, "l1_warmup_fraction": 0.9}))
    train(small_cfg(**opts), InMemoryActivations(x, 256, seed=3), tmp_path / "a", progress=False)
    with pytest.raises(Interrupted):
        train(small_cfg(**opts), DiesAfter(x, 256, seed=3, n=47), tmp_path / "b", progress=False)
    train(small_cfg(resume=True, **opts), InMemoryActivations(x, 256, seed=3), tmp_path / "b", progress=False)
    a, b = final_weights(tmp_path / "a"), final_weights(tmp_path / "b")
    assert a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)
    rows = [json.loads(line) for line in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["fvu"] < 0.5 * rows[0]["fvu"] and rows[-1]["l0"] < 0.9 * rows[0]["l0"]  # it learns, sparser


# ------------------------------------------------------------------------------------------------ the command
@pytest.fixture(scope="module")
def cache(tmp_path_factory, reference_model):
    from saelab.activations import write_cache
    from saelab.config import CacheConfig

    root = tmp_path_factory.mktemp("relu-gated-cache")
    return write_cache(CacheConfig(hooks=["blocks.2.hook_resid_pre"], out=str(root / "cache"), tokens=20_480,
                                   context_size=T, batch_rows=16), progress=False, model=reference_model)


def rows(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["relu", "gated"])
def test_train_command_learns_resumes_and_saves_for_saelens(cache, tmp_path, arch):
    from saelab.cli import main

    # 40 steps of 512 tokens; λ warms up over 80 % of them, so the resume point (step 30) is mid warm-up
    args = ["train", "--cache", str(cache), "--arch", arch, "--tokens", "20k", "--batch-size", "512",
            "--n-latents", "512", "--lr", "2e-3", "--l1-coef", "2", "--l1-warmup-fraction", "0.8",
            "--checkpoint-every", "10",
            "--eval-tokens", "0", "--no-progress"]
    assert main([*args, "--out", str(tmp_path / "a")]) == 0
    log = rows(tmp_path / "a")
    assert log[-1]["step"] == 39 and log[-1]["fvu"] < 0.6 * log[0]["fvu"], (log[0], log[-1])
    assert log[-1]["l0"] < 0.5 * 512  # the penalty makes it sparse (it starts near half the latents)

    # a run killed after its step-30 checkpoint, resumed: the same SAE bit for bit, the same log
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    shutil.rmtree(tmp_path / "b" / "sae")
    for ckpt in (tmp_path / "b" / "checkpoints").iterdir():
        if ckpt.name != "step-00000030":
            shutil.rmtree(ckpt) if ckpt.is_dir() else ckpt.unlink()
    assert main([*args, "--out", str(tmp_path / "b"), "--resume"]) == 0
    a, b = (load_file(str(tmp_path / r / "sae" / "sae_weights.safetensors")) for r in "ab")
    assert a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)
    drop = ("tokens_per_s", "sae_tokens_per_s")
    assert [{k: v for k, v in r.items() if k not in drop} for r in rows(tmp_path / "b")] == \
        [{k: v for k, v in r.items() if k not in drop} for r in log]

    # the saved folder: SAELens's architecture and tensors, and SAELens's rule on them reproduces our SAE
    cfg = json.loads((tmp_path / "a" / "sae" / "cfg.json").read_text())
    w = a
    x = torch.randn(64, 256, generator=torch.Generator().manual_seed(0)) * 2
    xc = x - w["b_dec"]
    if arch == "relu":
        assert cfg["architecture"] == "standard" and set(w) == {"W_enc", "b_enc", "W_dec", "b_dec"}
        f = (xc @ w["W_enc"] + w["b_enc"]).relu()
    else:
        assert cfg["architecture"] == "gated" and set(w) == {"W_enc", "b_gate", "r_mag", "b_mag", "W_dec", "b_dec"}
        f = (xc @ w["W_enc"] + w["b_gate"] > 0) * (xc @ (w["W_enc"] * w["r_mag"].exp()) + w["b_mag"]).relu()
    norms = w["W_dec"].norm(dim=1)
    assert (norms - 1).abs().max() > 0.05  # the decoder norms were free
    sae = SparseAutoencoder.load(tmp_path / "a" / "sae")
    torch.testing.assert_close(sae.decode(sae.encode(x)), f @ w["W_dec"] + w["b_dec"], atol=1e-4, rtol=1e-4)
