"""Transcoders and skip-transcoders (`saelab.sae.transcoder`): with target = input a transcoder is the SAE with its
bias untied (same init, outputs, losses; gradients that sum to the SAE's), for every architecture that transcodes;
matching pursuit refuses; the skip term recovers the linear map of linear data; the FVU is against the target, by
hand; a cache's two hooks come row for row aligned (the target is the model's MLP applied to the input rows), and a
stream's rows are the cache's; training from the cache resumes bit-exactly."""

import json
import os
import shutil
import sys

import pytest
import torch
from safetensors.torch import load_file

from saelab.activations.in_memory import InMemoryActivations
from saelab.config import SAEConfig
from saelab.errors import ConfigError
from saelab.sae import SparseAutoencoder
from saelab.sae.architectures import registry
from saelab.training import train

sys.path.insert(0, os.path.dirname(__file__))
from test_train import small_cfg  # noqa: E402

IN, OUT = "blocks.1.mlp.hook_in", "blocks.1.hook_mlp_out"  # the bridge's MLP input (ln2's output) and output
TRANSCODING = sorted(n for n, a in registry().items() if a.trainable and not a.transcoder_refusal)


def data(n=512, d=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g) * (torch.rand(d, generator=g) * 2 + 0.5) + torch.randn(d, generator=g)


@pytest.mark.parametrize("arch", TRANSCODING)
def test_a_transcoder_with_target_equal_to_input_is_the_sae_with_its_bias_untied(arch):
    x = data()
    cfg = dict(architecture=arch, d_in=16, n_latents=64, k=4)
    sae = SparseAutoencoder(SAEConfig(**cfg))
    tc = SparseAutoencoder(SAEConfig(**cfg, target_hook="h", d_out=16))
    for m, kw in ((sae, {}), (tc, {"target": x})):
        m.reset_parameters(seed=3)
        m.init_from_data_(x, **kw)
    # the same parameters: the encoder the decoder's transpose, b_in and b_dec both the SAE's b_dec
    shared = dict(sae.named_parameters())
    for name, p in tc.named_parameters():
        torch.testing.assert_close(p, shared["b_dec" if name == "b_in" else name], rtol=0, atol=0)
    assert tc.cfg.target_scale == sae.cfg.input_scale and torch.equal(tc.loss_normalizer, sae.loss_normalizer)
    dead = torch.zeros(64, dtype=torch.bool)
    dead[:8] = True  # AuxK (and the like) take part
    a, b = sae(x, dead_mask=dead), tc(x, dead_mask=dead, target=x)
    torch.testing.assert_close(b.x_hat, a.x_hat, rtol=0, atol=0)
    assert a.losses.keys() == b.losses.keys()
    for k in a.losses:
        torch.testing.assert_close(b.losses[k], a.losses[k], rtol=0, atol=0)
    a.losses["loss"].backward()
    b.losses["loss"].backward()
    for name, p in sae.named_parameters():
        if name != "b_dec" and p.grad is not None:
            torch.testing.assert_close(dict(tc.named_parameters())[name].grad, p.grad)
    # the SAE's b_dec centres the input and offsets the output; the transcoder's two biases take the two parts
    torch.testing.assert_close(tc.b_in.grad + tc.b_dec.grad, sae.b_dec.grad, atol=1e-6, rtol=1e-5)
    assert tc.b_in.grad.abs().max() > 0 and tc.b_dec.grad.abs().max() > 0
    code_a, code_b = sae.encode(x), tc.encode(x)
    torch.testing.assert_close(tc.decode(code_b), sae.decode(code_a), rtol=0, atol=0)


def test_matching_pursuit_and_per_token_normalisations_cannot_transcode_and_skip_needs_a_target():
    with pytest.raises(ConfigError, match="mp SAE cannot be a transcoder: matching pursuit explains its input"):
        SAEConfig(architecture="mp", target_hook=OUT)
    with pytest.raises(ConfigError, match="normalise.*'scale' or 'none'.*target's own statistics"):
        SAEConfig(target_hook=OUT, normalize="layer_norm")
    with pytest.raises(ConfigError, match="sae.skip: a skip-transcoder needs a target hook"):
        SAEConfig(skip=True)


def test_fvu_is_against_the_target_by_hand():
    g = torch.Generator().manual_seed(1)
    x, y = data(256, 12), torch.randn(256, 7, generator=g) * 3 + 2  # the target: another width, scale and mean
    tc = SparseAutoencoder(SAEConfig(d_in=12, n_latents=48, k=5, target_hook="h", d_out=7, skip=True))
    tc.reset_parameters(seed=0)
    tc.init_from_data_(x, target=y)
    with torch.no_grad():
        tc.W_skip.copy_(torch.randn(7, 12, generator=g) * 0.1)  # a skip term that counts
    out = tc(x, target=y)
    assert out.x_hat.shape == (256, 7)
    by_hand = (y - out.x_hat).pow(2).sum(-1).mean() / (y - y.mean(0)).pow(2).sum(-1).mean()
    torch.testing.assert_close(out.losses["fvu"], by_hand, rtol=1e-5, atol=1e-6)
    # the output is the code's decode plus W_skip·x, in raw target space (fixed scales undone)
    s, t = tc.cfg.input_scale, tc.cfg.target_scale
    f = out.code.to_dense(48).detach()
    want = (f @ tc.W_dec + tc.b_dec + (x * s) @ tc.W_skip.T) / t
    torch.testing.assert_close(out.x_hat, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(tc.decode(tc.encode(x), x), out.x_hat.detach(), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="decode\\(code, x\\)"):
        tc.decode(tc.encode(x))


def test_the_skip_term_learns_the_linear_map_of_linear_data(tmp_path):
    """target = A·x: a ReLU skip-transcoder whose L1 penalty makes latents cost something explains the target with
    its skip term alone: W_skip (in raw space) recovers A and the FVU goes to ~0."""
    g = torch.Generator().manual_seed(0)
    x = data(4096, 16, seed=2)
    A = torch.randn(12, 16, generator=g) / 4
    y = x @ A.T
    cfg = small_cfg(sae=SAEConfig(architecture="relu", n_latents=32, target_hook="h", skip=True,
                                  options={"l1_coef": 5.0}), tokens=256 * 100, lr=2e-2)
    res = train(cfg, InMemoryActivations(x, 256, seed=0, targets=y), tmp_path / "run", progress=False)
    sae = res.sae
    W = sae.W_skip.detach() * sae.cfg.input_scale / sae.cfg.target_scale  # raw space: y = W·x
    assert (W - A).norm() / A.norm() < 0.02, float((W - A).norm() / A.norm())  # 0.008 measured
    assert res.last["fvu"] < 1e-3 and res.last["l0"] < 0.1, res.last  # the latents fall silent
    loaded = SparseAutoencoder.load(tmp_path / "run" / "sae")  # the saved folder gives the same output
    torch.testing.assert_close(loaded.decode(loaded.encode(x[:64]), x[:64]), y[:64], atol=0.05, rtol=0.05)


# ------------------------------------------------------------------------------------------------ from a cache
@pytest.fixture(scope="module")
def cache(tmp_path_factory, reference_model):
    from saelab.activations import write_cache
    from saelab.config import CacheConfig

    root = tmp_path_factory.mktemp("transcoder-cache")
    return write_cache(CacheConfig(hooks=[IN, OUT], out=str(root / "cache"), tokens=8192, context_size=32,
                                   batch_rows=16, shard_rows=64), progress=False, model=reference_model)


def test_a_caches_two_hooks_come_row_for_row_aligned(cache, reference_model):
    """The target rows are the model's MLP applied to the input rows: the same tokens, in the same shuffled order,
    across shuffle windows and epochs."""
    from saelab.activations import ActivationCache

    reader = ActivationCache(cache, hook_name=IN, target_hook=OUT, batch_size=500, seed=4, buffer_rows=1024,
                             block_rows=128)
    alone = ActivationCache(cache, hook_name=IN, batch_size=500, seed=4, buffer_rows=1024, block_rows=128)
    mlp = reference_model.blocks[1].mlp
    for _, batch, other in zip(range(20), reader, alone):  # 10,000 rows: more than one epoch of ~7,900
        assert torch.equal(batch.acts, other.acts) and torch.equal(batch.positions, other.positions)
        with torch.no_grad():
            torch.testing.assert_close(batch.targets, mlp(batch.acts), atol=1e-5, rtol=1e-5)


def test_streaming_gives_the_caches_rows_with_their_targets(cache, reference_model):
    """Training without a cache streams from the model (`saelab train --source stream`, below): each streamed row
    (input and target) is the cache's row of the same (sequence, position), and its target is the model's MLP of its
    input."""
    from saelab.activations import ActivationCache, stream_activations

    reader = ActivationCache(cache, hook_name=IN, target_hook=OUT, batch_size=512, seed=0)
    rows = {}
    for _, batch in zip(range(16), reader):  # (nearly) every cached row, keyed by its provenance
        for key, a, t in zip(map(tuple, batch.positions.tolist()), batch.acts, batch.targets):
            rows[key] = (a, t)
    stream = stream_activations(reference_model, IN, context_size=32, batch_size=512, seed=0, target_hook=OUT,
                                shuffle_buffer=2048)  # windows of 96 sequences
    found = 0
    mlp = reference_model.blocks[1].mlp
    for _, batch in zip(range(4), stream):
        with torch.no_grad():
            torch.testing.assert_close(batch.targets, mlp(batch.acts), atol=1e-5, rtol=1e-5)
        for key, a, t in zip(map(tuple, batch.positions.tolist()), batch.acts, batch.targets):
            if key in rows:
                found += 1
                torch.testing.assert_close(a, rows[key][0], atol=1e-5, rtol=1e-5)
                torch.testing.assert_close(t, rows[key][1], atol=1e-5, rtol=1e-5)
    assert found > 1500, found  # the stream's first window lies within the cache's sequences


@pytest.mark.slow
def test_a_transcoder_trains_from_the_stream(tmp_path):
    from saelab.cli import main

    assert main(["train", "--source", "stream", "--hook", IN, "--target-hook", OUT, "--context-size", "32",
                 "--tokens", "2k", "--batch-size", "256", "--n-latents", "128", "--k", "4", "--eval-tokens", "0",
                 "--no-progress", "--out", str(tmp_path / "s")]) == 0
    info = json.loads((tmp_path / "s" / "sae" / "saelab.json").read_text())["sae"]
    assert info["hook_name"] == IN and info["target_hook"] == OUT and info["d_out"] == 256


def test_training_from_a_cache_resumes_bit_exactly(cache, tmp_path):
    from saelab.cli import main

    args = ["train", "--cache", str(cache), "--hook", IN, "--target-hook", OUT, "--skip", "--arch", "batchtopk",
            "--tokens", "12k", "--batch-size", "400", "--n-latents", "256", "--k", "8", "--checkpoint-every", "10",
            "--lr", "3e-3", "--calibration-tokens", "4000", "--eval-tokens", "0", "--no-progress"]
    assert main([*args, "--out", str(tmp_path / "a")]) == 0
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    shutil.rmtree(tmp_path / "b" / "sae")
    shutil.rmtree(tmp_path / "b" / "checkpoints" / "step-00000030")
    assert main([*args, "--out", str(tmp_path / "b"), "--resume"]) == 0
    a, b = (load_file(str(tmp_path / r / "sae" / "sae_weights.safetensors")) for r in "ab")
    assert a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)
    assert a["W_skip"].shape == (256, 256) and a["W_dec"].shape == (256, 256)
    info = json.loads((tmp_path / "a" / "sae" / "saelab.json").read_text())["sae"]
    assert info["target_hook"] == OUT and info["skip"] and info["d_out"] == 256
    log = [json.loads(line) for line in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    assert log[-1]["fvu"] < 0.8 * log[0]["fvu"], (log[0], log[-1])


# ------------------------------------------------------------------------------------------------ evaluation
def test_core_metrics_compare_with_the_target_and_splice_the_output_there(reference_model):
    """evaluate_core of a skip-transcoder: FVU against the target's activations, and CE with the target hook
    replaced by the transcoder's output (computed from the input hook), each against a hand-made computation."""
    from saelab.eval.core import evaluate_core, format_core
    from saelab.eval.splice import capture, prediction_mask, special_mask

    model = reference_model
    rows = torch.randint(5, 1000, (6, 32), generator=torch.Generator().manual_seed(0))
    rows[:, 0] = model.tokenizer.bos_token_id
    with torch.no_grad():
        _, acts = capture(model, rows, [IN, OUT])
    spec = special_mask(rows, [model.tokenizer.bos_token_id, model.tokenizer.eos_token_id])
    x, y = acts[IN][~spec], acts[OUT][~spec]
    tc = SparseAutoencoder(SAEConfig(d_in=x.shape[1], n_latents=512, k=16, hook_name=IN, target_hook=OUT,
                                     d_out=y.shape[1], skip=True))
    tc.reset_parameters(seed=0)
    tc.init_from_data_(x, target=y)
    with torch.no_grad():
        tc.W_skip.normal_(0, 0.02, generator=torch.Generator().manual_seed(1))
    m = evaluate_core(model, tc, rows=rows, n_tokens=None, batch_rows=4,
                      special_token_ids=[model.tokenizer.bos_token_id, model.tokenizer.eos_token_id])
    with torch.no_grad():
        y_hat = tc.decode(tc.encode(x), x)
        fvu = float((y - y_hat).pow(2).sum() / (y - y.mean(0)).pow(2).sum())

        def replace(act, hook):  # the hand-made splice: the target hook's non-special rows ← the output
            new = act.clone()
            new[~spec] = y_hat.to(act.dtype)
            return new

        logits = model.run_with_hooks(rows, fwd_hooks=[(OUT, replace)]).double()
    ce = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), rows[:, 1:].reshape(-1),
                                           reduction="none").reshape(6, 31)
    counted = prediction_mask(spec)
    assert m.target_hook == OUT and m.hook_name == IN
    assert m.fvu == pytest.approx(fvu, rel=1e-4)
    assert m.ce_sae == pytest.approx(float(ce[counted].mean()), rel=1e-5)
    assert m.delta_ce > 0  # an untrained transcoder costs loss
    assert f"{IN} → target: {OUT}" in format_core(m).splitlines()[0]


@pytest.mark.parametrize("suite", ["probing", "steering"])
def test_probing_and_steering_refuse_a_transcoder_before_loading_its_model(tmp_path, suite):
    """A transcoder of a model this machine cannot load (gpt2, no hub) is refused for what it is, not for the hub."""
    import saelab

    tc = SparseAutoencoder(SAEConfig(d_in=16, n_latents=32, k=4, hook_name="blocks.0.hook_resid_pre",
                                     target_hook="blocks.0.hook_mlp_out", d_out=16, model_name="gpt2"))
    tc.save(tmp_path / "tc")
    with pytest.raises(ConfigError, match="is a transcoder"):
        saelab.evaluate(tmp_path / "tc", suites=["core", suite])
