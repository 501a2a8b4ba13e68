"""A transcoder's dashboard and explorer: its latents are read at the input hook and write the target hook, so the
pass encodes the input hook's activations while the decoder views (logit lens, decoder neighbours) use the target's
d_out-wide directions; the manifest records both hooks and the explorer shows "IN → OUT". A skip-transcoder from the
reference model's MLP hidden layer (d_in 1024) to the MLP's output (d_out 256, the residual width) is built by
`saelab dashboard` itself; its logit lens is checked against a hand computation from the model's safetensors (final
LayerNorm's gain and the tied unembedding), its examples against a direct encode of the input hook."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from test_explorer import explore  # noqa: E402,F401  (the fixture)

IN, OUT = "blocks.1.mlp.hook_post", "blocks.1.hook_mlp_out"  # d_mlp 1024 → d_model 256
N_LATENTS = 48


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    from saelab.cli import main
    from saelab.config import SAEConfig
    from saelab.sae import SparseAutoencoder

    run = tmp_path_factory.mktemp("dashboard_transcoder") / "tc"
    sae = SparseAutoencoder(SAEConfig(d_in=1024, n_latents=N_LATENTS, k=4, hook_name=IN, target_hook=OUT, d_out=256,
                                      skip=True, normalize="none", model_name="reference"))
    sae.reset_parameters(seed=0)
    with torch.no_grad():
        sae.b_dec.normal_(0, 0.1, generator=torch.Generator().manual_seed(1))  # the lens must ignore the biases
        sae.W_skip.normal_(0, 0.01, generator=torch.Generator().manual_seed(2))
    sae.save(run / "sae")
    assert main(["dashboard", str(run), "--tokens", "1200", "--context-size", "32", "--map", "pca", "--device", "cpu",
                 "--no-progress"]) == 0
    return run


@pytest.fixture(scope="module")
def bundle(run):
    import saelab.dashboard as dash

    return dash.open(run / "dashboard")


def test_the_manifest_records_both_hooks(run, bundle, capsys):
    from saelab.dashboard.run import summary

    sae = bundle.manifest["sae"]
    assert (sae["hook_name"], sae["target_hook"], sae["d_in"], sae["d_out"], sae["skip"]) == (IN, OUT, 1024, 256, True)
    assert bundle.hooks == f"{IN} → {OUT}" and bundle.target_hook == OUT
    assert bundle.manifest["settings"]["logit_lens"]  # d_out is the residual width and OUT writes the stream
    assert f"latents of {IN} → {OUT} on reference" in summary(run / "dashboard")
    assert f"{IN} → {OUT}" in repr(bundle)


def test_logit_lens_is_the_target_side_decoder_through_the_unembedding(run, bundle):
    """By hand from the model's own weights: ((d − mean d) ⊙ γ_ln_f) W_U, centred over the vocabulary, d the
    transcoder's decoder row in the target's space (256 wide; the input side is 1024 wide and has no lens)."""
    from safetensors.torch import load_file

    import saelab
    from saelab.sae import SparseAutoencoder

    w = load_file(str(Path(saelab.__file__).parent / "models" / "reference" / "model.safetensors"))
    W_U, gamma = w["transformer.wte.weight"].double().T, w["transformer.ln_f.weight"].double()
    D = SparseAutoencoder.load(run / "sae").W_dec.detach().double()
    assert D.shape == (N_LATENTS, 256)
    eff = ((D - D.mean(1, keepdim=True)) * gamma) @ W_U
    eff = eff - eff.mean(1, keepdim=True)
    n = len(bundle.latent(0).logits_top)
    assert n == bundle.settings["n_logits"] > 0
    for i in range(N_LATENTS):
        lat = bundle.latent(i)
        top, bottom = eff[i].topk(n), eff[i].topk(n, largest=False)
        assert [t.token for t in lat.logits_top] == top.indices.tolist()
        assert [t.token for t in lat.logits_bottom] == bottom.indices.tolist()
        np.testing.assert_allclose([t.value for t in lat.logits_top], top.values.numpy(), rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose([t.value for t in lat.logits_bottom], bottom.values.numpy(), rtol=1e-4, atol=1e-5)
    # decoder neighbours are cosines of the 256-wide target-side rows
    unit = D / D.norm(dim=1, keepdim=True)
    cos = unit @ unit.T
    cos.fill_diagonal_(-2)
    lat = bundle.latent(7)
    assert lat.neighbours_decoder[0].latent == int(cos[7].argmax())
    assert lat.neighbours_decoder[0].value == pytest.approx(float(cos[7].max()), rel=1e-5)


def test_the_pass_encodes_the_input_hook(run, bundle, reference_model):
    """Each latent's largest activation in the bundle equals a brute-force encode of the input hook's activations
    of the bundle's own rows (positions 1..T−1)."""
    from saelab.eval.splice import capture
    from saelab.sae import SparseAutoencoder

    sae = SparseAutoencoder.load(run / "sae")
    tokens = torch.as_tensor(np.array(bundle.tokens), dtype=torch.long)
    with torch.no_grad():
        _, acts = capture(reference_model, tokens, IN)
        f = sae.encode(acts[IN][:, 1:].reshape(-1, 1024)).to_dense(N_LATENTS)
    t = bundle.table()
    active = (f != 0).sum(0).numpy()
    np.testing.assert_array_equal(t["n_active"].to_numpy(), active)
    alive = active > 0
    assert alive.sum() > N_LATENTS // 2
    np.testing.assert_allclose(t["max"].to_numpy()[alive], f.max(0).values.numpy()[alive], rtol=1e-4, atol=1e-5)


def test_explorer_pages_show_both_hooks(run, explore):  # noqa: F811
    pages = explore(run)
    at = pages("overview")
    assert any(f"{IN} → {OUT} on reference" in c.value for c in at.caption)
    at = pages("feature", latent=7)
    assert any(f"{IN} → {OUT} on reference" in c.value for c in at.caption)


@pytest.mark.slow
def test_explorer_steering_adds_the_direction_at_the_target_hook(run, bundle, explore, reference_model):  # noqa: F811
    """The steering page adds α × max activation × the latent's decoder row where the decoder writes (OUT, 256 wide),
    as the evaluator's `generate` does with that hook called directly here."""
    from saelab.eval import steering as mod
    from saelab.sae import SparseAutoencoder

    i = int(bundle.table()["max"].idxmax())
    at = explore(run)("steering", latents=str(i), alpha="4", prompt="def ")
    assert not at.error
    sae = SparseAutoencoder.load(run / "sae")
    tokens = mod.prompt_tokens(reference_model, "def ")
    P = tokens.shape[1]
    d = 4.0 * float(bundle.table().loc[i, "max"]) * sae.W_dec.detach()[i][None]
    steered = mod.generate(reference_model, tokens, 24, 0.7, 0, steer=mod.Steer(OUT, d))
    assert [c.value for c in at.code][1] == "def " + reference_model.tokenizer.decode(steered[0, P:])
