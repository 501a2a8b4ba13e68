"""Sparse probing of a g-SAE (saelab.eval.probing): latents selected with the LM-loss gradient, the TopK fallback
probed beside them, and the gradient gathered over padded rows."""

import os
import sys

import numpy as np
import pytest
import torch

from saelab.config import SAEConfig
from saelab.eval.probing import FALLBACK_BASIS, ProbeData, format_probing, hook_rows, probe_tasks
from saelab.sae import SparseAutoencoder

sys.path.insert(0, os.path.dirname(__file__))
from autograd_reference import hook_activation_and_grad, next_token_ce  # noqa: E402


def _identity_gsae(d, beta=100.0):
    """Latent i reads and writes dimension i; k = 1, so TopK keeps each token's largest coordinate only."""
    sae = SparseAutoencoder(SAEConfig(architecture="gtopk", d_in=d, n_latents=d, k=1, hook_name="h",
                                      normalize="none", options={"beta": beta}))
    with torch.no_grad():
        sae.W_dec.copy_(torch.eye(d))
        sae.W_enc.copy_(torch.eye(d))
        sae.b_enc.zero_()
        sae.b_dec.zero_()
    return sae


def test_the_gradient_rule_finds_a_latent_that_topk_never_keeps():
    g = np.random.default_rng(0)
    n, d = 2000, 8
    y = (g.random(n) < 0.4).astype(np.int8)
    x = np.zeros((n, d), dtype=np.float32)
    x[:, 0] = 3.0 + 0.1 * g.normal(size=n)  # the largest coordinate of every token: TopK (k 1) keeps only it
    x[:, 5] = np.where(y == 1, 1.0, 0.1)  # the label, in a smaller coordinate
    grad = np.zeros((n, d), dtype=np.float32)
    grad[:, 5] = 1.0  # the loss is sensitive along dimension 5 only: z₅ + β·z₅·|g₅| / rms(g) outranks z₀
    data = ProbeData(x=torch.from_numpy(x), labels={"planted": y}, is_test=np.arange(n) % 4 == 0,
                     grad=torch.from_numpy(grad))
    r = probe_tasks(data, _identity_gsae(d), ks=(1,), n_train=500, n_test=200)
    t = r.tasks["planted"]["k"]["1"]
    assert t["sae"]["features"] == [5] and t["sae"]["accuracy"] == 1.0
    assert t[FALLBACK_BASIS]["features"] == [0] and t[FALLBACK_BASIS]["accuracy"] < 0.7
    assert r.rule == "with gradient" and r.mean["1"][f"{FALLBACK_BASIS}_accuracy"] == t[FALLBACK_BASIS]["accuracy"]
    assert FALLBACK_BASIS in r.to_dict()["bases"] and r.to_dict()["fallback_rule"] == "TopK fallback"
    assert "TopK fallback" in format_probing(r)
    data.grad = None  # without gradients the same SAE is probed once, by encode(x)
    plain = probe_tasks(data, _identity_gsae(d), ks=(1,), n_train=500, n_test=200)
    assert plain.tasks["planted"]["k"]["1"]["sae"]["features"] == [0] and FALLBACK_BASIS not in plain.to_dict()["bases"]


def test_hook_rows_gradient_counts_only_the_real_tokens_targets(reference_model):
    model, hook = reference_model, "blocks.1.hook_resid_post"
    gen = torch.Generator().manual_seed(0)
    rows = torch.randint(1, 8192, (2, 12), generator=gen)
    rows[:, 0] = 0
    real = torch.zeros(2, 12, dtype=torch.bool)
    real[0, 1:] = True
    real[1, 1:7] = True  # row 1: six tokens, then padding
    rows[1, 7:] = 0
    x, got = hook_rows(model, hook, rows.numpy(), real.numpy(), with_grad=True)
    act, act_grad = hook_activation_and_grad(
        model, rows, hook, lambda logits: next_token_ce(logits, rows, "none")[real[:, 1:].reshape(-1)].sum())
    assert x.shape == got.shape == (int(real.sum()), model.cfg.d_model)
    assert torch.allclose(x, act[real], atol=1e-6)
    assert torch.allclose(got, act_grad[real], atol=1e-5)
    assert torch.count_nonzero(got[-1]) == 0  # row 1's last real token predicts only padding: no loss behind it
    assert hook_rows(model, hook, rows.numpy(), real.numpy()).shape == x.shape  # without: activations alone
