"""The evaluators on signed codes (an AbsTopK SAE, values of either sign, "active" = value != 0), each against a
dense brute-force computation: core sparsity metrics, probing densities, and steering's strength unit (the largest
|value| at a position), clamp and corpus sweep (positive values: steering raises a latent along +d_f)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from saelab.config import SAEConfig
from saelab.sae import SparseAutoencoder

HOOK = "blocks.1.hook_resid_post"


def abstopk(d: int = 256, n: int = 32, k: int = 6, seed: int = 0) -> SparseAutoencoder:
    sae = SparseAutoencoder(SAEConfig(d_in=d, n_latents=n, k=k, hook_name=HOOK, normalize="none",
                                      architecture="abstopk", model_name="reference"))
    sae.reset_parameters(seed=seed)
    return sae


def gaussian(n: int = 400, d: int = 256, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def test_core_sparsity_counts_negative_values_as_active():
    from saelab.eval.core import reconstruction_metrics

    sae, x = abstopk(), gaussian()
    code = sae.encode(x)
    dense = code.to_dense(32)
    assert (dense < 0).any() and (dense > 0).any()
    m = reconstruction_metrics(x, sae.decode(code), code, n_latents=32)
    active = dense != 0
    assert m["l0"] == pytest.approx(float(active.sum(1).double().mean()))
    assert m["l1"] == pytest.approx(float(dense.abs().sum(1).double().mean()), rel=1e-6)
    np.testing.assert_allclose(m["latent_density"], active.double().mean(0).numpy())
    assert m["n_dead"] == int((~active.any(0)).sum())


@torch.no_grad()
def test_probing_density_counts_negative_values_as_active():
    from saelab.eval.probing import latent_density, sae_features

    sae, x = abstopk(), gaussian()
    dense = sae.encode(x).to_dense(32).numpy()
    assert (dense < 0).sum() > 0
    np.testing.assert_allclose(latent_density(sae, x, batch=64), (dense != 0).mean(0))
    np.testing.assert_allclose(sae_features(sae, x, batch=64), dense)  # probes see the signs


@pytest.fixture(scope="module")
def model(reference_model):
    return reference_model


@torch.no_grad()
def test_steering_strength_unit_is_the_largest_magnitude(model):
    from saelab.eval.steering import _forward, position_scale, prompt_tokens

    sae = abstopk()
    tokens = prompt_tokens(model, "def f(x):\n    return [x + 1 for x in range(10)]\n")
    _, cache = model.run_with_cache(tokens, names_filter=[HOOK])
    x = cache[HOOK][0]
    dense = sae.encode(x).to_dense(32)
    top = dense.abs().amax(1)
    # the case the magnitude is for: positions whose strongest latent is negative (max_j f_j would pick a weaker one)
    assert (dense.amin(1).abs() > dense.amax(1)).any()
    torch.testing.assert_close(position_scale(sae, cache[HOOK]), top[None])
    # clamp with the position rule: latent 5 set to 3 × max_j |f_j(x_t)| at every position, the error term kept
    clamped = (x + (3.0 * top - dense[:, 5])[:, None] * sae.W_dec[5]).unsqueeze(0)
    want = model.run_with_hooks(tokens, fwd_hooks=[(HOOK, lambda a, hook: clamped)])
    got = _forward(model, tokens, None, (sae, torch.tensor([5]), torch.tensor([3.0]), 0, True))
    torch.testing.assert_close(got, want, atol=1e-3, rtol=1e-4)


@torch.no_grad()
def test_activation_sweep_keeps_the_positive_side(model):
    """A signed latent's sweep (max activation, top rows behind its input score) is over its positive values, the
    side that steering along +d_f reproduces; brute force over the dense codes."""
    from saelab.eval.steering import activation_sweep

    sae = abstopk()
    rows = torch.randint(1, 8192, (6, 24), generator=torch.Generator().manual_seed(0))
    rows[:, 0] = 0
    sw = activation_sweep(model, sae, rows, n_top=3, batch_rows=4)
    _, cache = model.run_with_cache(rows, names_filter=[HOOK])
    dense = sae.encode(cache[HOOK][:, 1:].reshape(-1, 256)).to_dense(32).reshape(6, 23, 32)
    assert (dense < 0).any()
    np.testing.assert_allclose(sw.max_activation, dense.amax((0, 1)).clamp_min(0).double().numpy(), atol=1e-6)
    assert (sw.top_value > 0).all()
    for f in range(32):
        per_row = dense[:, :, f].amax(1)
        want = sorted(per_row[per_row > 0].tolist(), reverse=True)[:3]
        np.testing.assert_allclose(sorted(sw.top_value[sw.top_latent == f], reverse=True), want, atol=1e-6)


@torch.no_grad()
def test_most_negative_contexts_from_the_model_match_a_brute_force_scan(model):
    import saelab
    from saelab.data.corpus import CorpusSpec
    from saelab.eval.splice import corpus_rows

    sae = abstopk()
    rows = corpus_rows(model, CorpusSpec(), "validation", 128, 4)  # (an SAE without a run: rows of 128)
    _, cache = model.run_with_cache(rows, names_filter=HOOK)
    z = sae.encode(cache[HOOK][:, 1:].reshape(-1, 256)).to_dense(32).reshape(4, -1, 32)  # BOS never scored
    f = int((z.amin((0, 1)) < 0).logical_and(z.amax((0, 1)) > 0).nonzero()[0])  # a latent of both signs
    for negative, sign in ((False, 1), (True, -1)):
        got = saelab.top_activations(sae, f, n=3, model=model, tokens=4 * 128, negative=negative)
        peak, pos = (sign * z[:, :, f]).max(1)
        want = [r for r in torch.argsort(-peak, stable=True)[:3].tolist() if peak[r] > 0]
        assert [e.row for e in got.examples] == want and want
        assert [e.pos for e in got.examples] == (pos[want] + 1).tolist()
        torch.testing.assert_close(torch.tensor([e.act for e in got.examples]), sign * peak[want])
        assert all((e.act < 0) == negative for e in got.examples)
        assert ("most negative" in got._repr_html_()) == negative
