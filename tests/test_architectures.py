"""The architecture seam and BatchTopK, Matryoshka, gradient-TopK: each against a brute-force or dense reference and
the properties of research notes §7 (items 1, 2, 5, 7), plus save/load, resume and the CLI's --arch."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from saelab.activations.in_memory import InMemoryActivations
from saelab.config import ConfigError, SAEConfig
from saelab.kernels import grouped_decode, sparse_decode
from saelab.sae import ARCHITECTURES, SparseAutoencoder
from saelab.sae.architectures import pack_rows
from saelab.sae.batch_select import batch_topk_indices
from saelab.sae.gradient_topk import attribution_scale, gradient_scores, gradient_topk_indices
from saelab.training import train

sys.path.insert(0, os.path.dirname(__file__))
from test_train import final_weights, planted_data, small_cfg  # noqa: E402


def make(arch, d=24, n=96, k=4, **options):
    sae = SparseAutoencoder(SAEConfig(architecture=arch, d_in=d, n_latents=n, k=k, options=options, hook_name="h"))
    sae.reset_parameters(seed=0)
    with torch.no_grad():
        sae.b_enc.normal_(0, 0.1, generator=torch.Generator().manual_seed(1))
    return sae


def test_registry_lists_every_architecture():
    assert {"topk", "batchtopk", "matryoshka", "gtopk", "jumprelu", "relu", "gated"} <= set(ARCHITECTURES)
    with pytest.raises(ConfigError, match="unknown architecture 'bogus'"):
        SAEConfig(architecture="bogus")
    with pytest.raises(ConfigError, match="beta"):
        SAEConfig(architecture="topk", options={"beta": 1.0})  # an option of another architecture
    with pytest.raises(ConfigError, match="threshold_momentum"):
        SAEConfig(architecture="batchtopk", options={"threshold_momentum": 1.5})


# ------------------------------------------------------------------------------------------------ BatchTopK
@pytest.mark.parametrize("B,n,k", [(64, 96, 4), (7, 50, 3), (32, 40, 20), (16, 2000, 8)])
def test_batch_topk_is_the_global_top_kB(B, n, k):
    torch.manual_seed(B + n)
    pre = torch.randn(B, n)
    pre[0] += 5  # one token far more active than the rest: it holds far more than 2k of the global top
    idx, valid = batch_topk_indices(pre, k)
    dense = torch.zeros(B, n, dtype=torch.bool)
    dense[torch.arange(B).unsqueeze(1).expand_as(idx)[valid], idx[valid]] = True
    ref = torch.zeros(B * n, dtype=torch.bool)
    ref[pre.reshape(-1).argsort(descending=True)[:k * B]] = True  # brute force: a full sort
    assert torch.equal(dense, ref.view(B, n))
    assert int(valid.sum()) == k * B  # total L0 is exactly k·B
    assert (idx[valid] == idx.masked_fill(~valid, 10 ** 9).sort(1).values[valid]).all()  # ascending per token


def test_pack_rows_pads_with_invalid_slots():
    idx, valid = pack_rows(torch.tensor([2, 0, 2, 2]), torch.tensor([5, 1, 3, 0]), 4)
    assert idx.tolist() == [[1, 0, 0], [0, 0, 0], [0, 3, 5], [0, 0, 0]]
    assert valid.tolist() == [[True, False, False], [False] * 3, [True] * 3, [False] * 3]


def test_batchtopk_forward_total_l0_and_padding_gets_no_gradient():
    torch.manual_seed(0)
    sae = make("batchtopk")
    x = torch.randn(64, 24) * 2
    sae.init_from_data_(x)
    out = sae(x)
    assert int(out.code.l0().sum()) == 4 * 64
    assert out.code.l0().float().std() > 0  # a variable number of latents per token
    out.losses["loss"].backward()
    # against a dense reference: z = ReLU(pre) on the global top-k·B set, x̂ = z W_dec + b_dec
    xn, _ = sae.normalize_input(x)
    pre = ((xn - sae.b_dec) @ sae.W_enc + sae.b_enc).detach()
    mask = torch.zeros(64 * 96, dtype=torch.bool)
    mask[pre.reshape(-1).argsort(descending=True)[:256]] = True
    W = sae.W_dec.detach().clone().requires_grad_()
    z = pre.relu() * mask.view(64, 96)
    torch.testing.assert_close(out.x_hat, sae.denormalize_output(z @ W + sae.b_dec.detach()), atol=1e-5, rtol=1e-5)
    ref = ((xn - (z @ W + sae.b_dec.detach())).pow(2).sum(-1).mean() / sae.loss_normalizer)
    ref.backward()
    torch.testing.assert_close(sae.W_dec.grad, W.grad, atol=1e-5, rtol=1e-4)


def test_batchtopk_threshold_learns_and_inference_is_batch_independent():
    data = planted_data(n_rows=6144, d=32)
    run = _train("batchtopk", data[:4096], threshold_momentum=0.9)  # a short run: average its last ~10 steps
    sae = SparseAutoencoder.load(run / "sae")
    assert float(sae.threshold[0]) > 0 and torch.all(sae.threshold == sae.threshold[0])
    held = data[4096:]  # same distribution, rows not trained on
    l0 = sae.encode(held).l0().float().mean()
    assert abs(float(l0) - 4) <= 0.4, l0  # thresholded inference: mean L0 within ±10 % of k on held-out data
    one = sae.encode(held[:1])  # batch-independent: a token's code does not depend on its batch
    full = sae.encode(held)
    a = sorted(one.indices[0][one.values[0] != 0].tolist())
    b = sorted(full.indices[0][full.values[0] != 0].tolist())
    assert a == b


def test_batchtopk_calibration_sets_theta_to_the_sample_cut_off():
    sae = make("batchtopk", calibration_tokens=300)
    sae.threshold.fill_(5.0)  # a stale EMA far above the cut-off
    gen = torch.Generator().manual_seed(3)
    batches = [torch.randn(128, 24, generator=gen) for _ in range(4)]
    drawn = iter(batches)
    info = sae.arch.calibrate(sae, lambda: next(drawn, None))
    assert info["tokens"] == 384 and info["threshold_ema"] == 5.0  # whole batches until ≥ 300 tokens
    with torch.no_grad():
        pre = torch.cat([sae.preacts(sae.normalize_input(b)[0]) for b in batches[:3]])
    brute = pre.reshape(-1).sort(descending=True).values[4 * 384 - 1]  # the (k·N)-th largest of the full matrix
    assert float(sae.threshold[0]) == pytest.approx(float(brute)) and torch.all(sae.threshold == sae.threshold[0])
    assert float((pre >= sae.threshold).sum(1).float().mean()) == pytest.approx(4.0)


@pytest.mark.parametrize("arch", ["batchtopk", "matryoshka", "feature_choice"])
def test_short_run_infers_k_latents_per_token_after_calibration(arch):
    # the default EMA (0.99) lags the falling cut-off of a short run; the calibration after the last step fixes it
    data = planted_data(n_rows=6144, d=32)
    held = data[4096:]
    l0 = {}
    for tokens in (0, 65_536):
        sae = SparseAutoencoder.load(_train(arch, data[:4096], calibration_tokens=tokens) / "sae")
        l0[tokens] = float(sae.encode(held).l0().float().mean())
    assert abs(l0[65_536] - 4) <= 0.4, l0
    assert abs(l0[0] - 4) > abs(l0[65_536] - 4), l0  # the EMA alone is further off


def _train(arch, x, tmp=None, **options):
    import tempfile
    from pathlib import Path

    tmp = Path(tmp or tempfile.mkdtemp())
    cfg = small_cfg(sae=SAEConfig(architecture=arch, n_latents=128, k=4, options=options), tokens=256 * 80,
                    lr=2e-3)
    train(cfg, InMemoryActivations(x, 256, seed=1), tmp / arch, progress=False)
    return tmp / arch


def test_batchtopk_saved_for_saelens_as_jumprelu(tmp_path):
    x = planted_data(n_rows=2048, d=32)
    run = _train("batchtopk", x, tmp_path)
    cfg = json.loads((run / "sae" / "cfg.json").read_text())
    from safetensors.torch import load_file

    w = load_file(str(run / "sae" / "sae_weights.safetensors"))
    assert cfg["architecture"] == "jumprelu" and w["threshold"].shape == (128,)
    # the JumpReLU rule SAELens applies: ReLU(pre) where pre > θ, from the saved tensors alone
    pre = (x[:64] - w["b_dec"]) @ w["W_enc"] + w["b_enc"]
    z = pre.relu() * (pre > w["threshold"])
    ours = SparseAutoencoder.load(run / "sae")
    torch.testing.assert_close(ours.decode(ours.encode(x[:64])), z @ w["W_dec"] + w["b_dec"], atol=1e-4, rtol=1e-4)


# ------------------------------------------------------------------------------------------------ Matryoshka
def test_grouped_decode_matches_per_group_dense():
    torch.manual_seed(0)
    B, K, n, d, G = 9, 6, 40, 13, 4
    idx = torch.randint(0, n, (B, K)).sort(1).values
    vals = torch.randn(B, K)
    vals[2, 3:] = 0  # padding
    bounds = torch.tensor([5, 17, 30, n])
    groups = torch.cummax(torch.bucketize(idx, bounds, right=True), 1).values
    W = torch.randn(n, d, requires_grad=True)
    v = vals.clone().requires_grad_()
    out = grouped_decode(idx, v, W, groups, G)
    dense = torch.zeros(B, n).scatter_add(1, idx, vals)
    lo = 0
    for g, hi in enumerate(bounds.tolist()):
        ref = dense[:, lo:hi] @ W[lo:hi].detach()
        torch.testing.assert_close(out[:, g], ref, atol=1e-5, rtol=1e-5)
        lo = hi
    gout = torch.randn_like(out)
    (out * gout).sum().backward()
    Wr, vr = W.detach().clone().requires_grad_(), vals.clone().requires_grad_()
    refs = torch.stack([sparse_decode(idx, vr * (groups == g), Wr) for g in range(G)], 1)
    (refs * gout).sum().backward()
    torch.testing.assert_close(W.grad, Wr.grad, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(v.grad, vr.grad, atol=1e-5, rtol=1e-5)


def test_matryoshka_with_one_prefix_is_batchtopk():
    torch.manual_seed(0)
    x = torch.randn(64, 24) * 2
    a, b = make("batchtopk"), make("matryoshka", group_fractions=[1.0])
    a.init_from_data_(x)
    b.init_from_data_(x)
    oa, ob = a(x), b(x)
    torch.testing.assert_close(ob.losses["loss"], oa.losses["loss"])
    torch.testing.assert_close(ob.x_hat, oa.x_hat, atol=1e-5, rtol=1e-5)
    oa.losses["loss"].backward()
    ob.losses["loss"].backward()
    for pa, pb in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(pb.grad, pa.grad, atol=1e-6, rtol=1e-4)


def test_matryoshka_prefix_losses_match_dense_and_every_prefix_trains_group_one():
    torch.manual_seed(0)
    sae = make("matryoshka", n=128, group_fractions=[1 / 8, 1 / 8, 1 / 4, 1 / 2])
    x = torch.randn(64, 24) * 2
    sae.init_from_data_(x)
    ends = sae.arch.prefix_ends()
    assert ends == [16, 32, 64, 128]
    out = sae(x)
    dense = out.code.to_dense(128)
    xn, _ = sae.normalize_input(x)
    for i, m in enumerate(ends):
        x_hat = dense[:, :m] @ sae.W_dec[:m] + sae.b_dec
        ref = (xn - x_hat).pow(2).sum(-1).mean() / sae.loss_normalizer
        torch.testing.assert_close(out.losses[f"fvu_prefix{i}"], ref.detach(), atol=1e-5, rtol=1e-5)
    # gradient reaches the first group's decoder rows and encoder columns from every prefix loss on its own
    g1 = dense[:, :16].ne(0).any(0)
    assert g1.any()
    for i in range(len(ends)):
        sae.zero_grad()
        sae(x).losses[f"fvu_prefix{i}"].backward()
        assert (sae.W_dec.grad[:16][g1].abs().sum(1) > 0).all()
        assert (sae.W_enc.grad[:, :16][:, g1].abs().sum(0) > 0).all()


def test_matryoshka_trained_prefix_losses_are_non_increasing(tmp_path):
    x = planted_data(n_rows=4096, d=32, n_true=128)  # as many true features as latents: every group has work
    run = _train("matryoshka", x, tmp_path)
    log = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    last = log[-1]
    prefix = [last[f"fvu_prefix{i}"] for i in range(5) if f"fvu_prefix{i}" in last]
    assert len(prefix) >= 3 and all(b <= a + 1e-6 for a, b in zip(prefix, prefix[1:])), prefix


def test_matryoshka_random_prefixes_are_sampled_distinct_and_end_at_n():
    sae = make("matryoshka", n=256, random_prefixes=6)
    torch.manual_seed(0)
    ends = sae.arch.sample_prefix_ends("cpu")
    assert len(ends) == 6 and ends[-1] == 256 and ends == sorted(set(ends))
    out = sae(torch.randn(32, 24))
    assert torch.isfinite(out.losses["loss"])


# ------------------------------------------------------------------------------------------------ g-SAE
def test_gtopk_beta_zero_is_topk_bit_for_bit(tmp_path):
    x = planted_data(n_rows=2048, d=32)
    g = torch.randn_like(x)
    from saelab.activations.batch import Batch

    class WithGrads(InMemoryActivations):
        def __iter__(self):
            for b in super().__iter__():
                yield Batch(b.acts, g[: b.acts.shape[0]], b.tokens, b.positions)

    cfg_t = small_cfg(sae=SAEConfig(architecture="topk", n_latents=128, k=4), tokens=256 * 30)
    cfg_g = small_cfg(sae=SAEConfig(architecture="gtopk", n_latents=128, k=4, options={"beta": 0.0}),
                      tokens=256 * 30)
    train(cfg_t, InMemoryActivations(x, 256, seed=1), tmp_path / "t", progress=False)
    train(cfg_g, WithGrads(x, 256, seed=1), tmp_path / "g", progress=False)
    a, b = final_weights(tmp_path / "t"), final_weights(tmp_path / "g")
    for name in a:
        assert torch.equal(a[name], b[name]), name


@pytest.mark.parametrize("candidates", [0, 3])
def test_gtopk_selects_by_gradient_score_and_keeps_encoder_values(candidates):
    torch.manual_seed(0)
    sae = make("gtopk", beta=2.0, candidates=candidates)
    x, g = torch.randn(64, 24) * 2, torch.randn(64, 24)
    sae.init_from_data_(x)
    out = sae(x, grad=g)
    xn, _ = sae.normalize_input(x)
    gn = sae.grad_to_normalized(g, None)
    pre = ((xn - sae.b_dec) @ sae.W_enc + sae.b_enc).detach()
    att = (gn @ sae.W_dec.detach().T).abs() / attribution_scale(gn, "rms")
    score = pre + 2.0 * pre.relu() * att  # the paper's z + β·z·|W_dec g| where z > 0
    if candidates:  # the approximation: the best scores among each token's top 3k pre-activations
        top = pre.topk(12, dim=-1).indices
        score = torch.full_like(pre, -1e9).scatter(1, top, score.gather(1, top))
    ref = score.topk(4, dim=-1).indices.sort(1).values
    assert torch.equal(out.code.indices.sort(1).values, ref)
    torch.testing.assert_close(out.code.values, pre.gather(1, out.code.indices).relu())  # values stay z
    plain = pre.topk(4, dim=-1).indices.sort(1).values
    assert not torch.equal(ref, plain)  # the gradient did change the selection
    # inference: with the gradient it is the same rule; without one, plain TopK
    assert torch.equal(sae.encode(x, grad=g).indices.sort(1).values, ref)
    assert torch.equal(sae.encode(x).indices.sort(1).values, plain)


@pytest.mark.parametrize("candidates", [0, 3])
def test_gtopk_selection_with_gradient_survives_save_and_load(tmp_path, candidates):
    """Saving folds the input scale into the decoder rows (norm 1/scale): the loaded SAE must still select as the
    trained one did, so the attribution is taken along each row's unit direction."""
    torch.manual_seed(2)
    sae = make("gtopk", beta=2.0, candidates=candidates)
    x, g = torch.randn(64, 24) * 5 + 1, torch.randn(64, 24)
    sae.init_from_data_(x)
    assert abs(sae.cfg.input_scale - 1) > 0.5
    before = sae.encode(x, grad=g).indices.sort(1).values
    sae.save(tmp_path / "sae")
    loaded = SparseAutoencoder.load(tmp_path / "sae")
    assert loaded.W_dec.norm(dim=1).sub(1 / sae.cfg.input_scale).abs().max() < 1e-4  # the folded rows
    assert torch.equal(loaded.encode(x, grad=g).indices.sort(1).values, before)
    assert not torch.equal(before, loaded.encode(x).indices.sort(1).values)


def test_gradient_topk_indices_exact_matches_dense_scores():
    torch.manual_seed(3)
    pre, g, W = torch.randn(50, 300), torch.randn(50, 16), torch.randn(300, 16)
    W /= W.norm(dim=1, keepdim=True)
    idx = gradient_topk_indices(pre, g, W, 7, 0.7, "none")
    ref = gradient_scores(pre, (g @ W.T).abs(), 0.7).topk(7, dim=-1).indices
    assert torch.equal(idx.sort(1).values, ref.sort(1).values)


def test_gtopk_training_without_gradients_fails_clearly(tmp_path):
    x = planted_data(n_rows=1024, d=32)
    cfg = small_cfg(sae=SAEConfig(architecture="gtopk", n_latents=128, k=4), tokens=256 * 4)
    with pytest.raises(ConfigError, match="gradient"):
        train(cfg, InMemoryActivations(x, 256, seed=1), tmp_path / "g", progress=False)


# ------------------------------------------------------------------------------------------------ seam-wide
@pytest.mark.parametrize("arch", ["topk", "batchtopk", "matryoshka", "gtopk"])
@pytest.mark.parametrize("normalize", ["scale", "layer_norm"])
def test_save_load_round_trip(tmp_path, arch, normalize):
    torch.manual_seed(0)
    sae = SparseAutoencoder(SAEConfig(architecture=arch, d_in=24, n_latents=96, k=4, normalize=normalize,
                                      hook_name="h"))
    sae.reset_parameters(seed=0)
    x = torch.randn(128, 24) * 3 + 1
    sae.init_from_data_(x)
    out = sae(x, grad=torch.randn_like(x))
    sae.after_step(out, 0)
    before = sae.decode(sae.encode(x))
    sae.save(tmp_path / "sae")
    loaded = SparseAutoencoder.load(tmp_path / "sae")
    assert loaded.cfg.architecture == arch and loaded.cfg.options == sae.cfg.options
    for name, t in sae.state_dict().items():
        if name not in ("W_enc", "W_dec", "b_dec", "loss_normalizer"):  # these carry the folded input scale
            torch.testing.assert_close(loaded.state_dict()[name], t)
    torch.testing.assert_close(loaded.decode(loaded.encode(x)), before, atol=1e-4, rtol=1e-4)


def test_layer_norm_decode_does_not_depend_on_the_last_encode():
    sae = make("topk")
    sae.cfg.normalize = "layer_norm"
    x, y = torch.randn(8, 24) * 3 + 2, torch.randn(8, 24) * 9 - 4
    cx = sae.encode(x)
    first = sae.decode(cx)
    sae.encode(y)  # another batch in between
    torch.testing.assert_close(sae.decode(cx), first)
    torch.testing.assert_close(sae.decode(cx[2:5]), first[2:5])


@pytest.mark.parametrize("arch", ["batchtopk", "matryoshka"])
def test_resume_is_bit_exact_with_architecture_state(tmp_path, arch):
    from test_train import DiesAfter, Interrupted

    x = planted_data(n_rows=4096)
    opts = dict(sae=SAEConfig(architecture=arch, n_latents=128, k=4), dead_tokens=256 * 8)
    train(small_cfg(**opts), InMemoryActivations(x, 256, seed=3), tmp_path / "a", progress=False)
    with pytest.raises(Interrupted):
        train(small_cfg(**opts), DiesAfter(x, 256, seed=3, n=47), tmp_path / "b", progress=False)
    train(small_cfg(resume=True, **opts), InMemoryActivations(x, 256, seed=3), tmp_path / "b", progress=False)
    a, b = final_weights(tmp_path / "a"), final_weights(tmp_path / "b")
    assert "threshold" in a
    for name in a:
        assert torch.equal(a[name], b[name]), name


def test_resume_refuses_a_changed_run(tmp_path):
    x = planted_data(n_rows=2048)
    train(small_cfg(tokens=256 * 20), InMemoryActivations(x, 256, seed=3), tmp_path / "a", progress=False)
    with pytest.raises(ConfigError, match="batch_size"):
        train(small_cfg(tokens=256 * 40, batch_size=128, resume=True), InMemoryActivations(x, 128, seed=3),
              tmp_path / "a", progress=False)
    with pytest.raises(ConfigError, match="sae.k"):
        train(small_cfg(tokens=256 * 40, resume=True, sae=SAEConfig(n_latents=128, k=8)),
              InMemoryActivations(x, 256, seed=3), tmp_path / "a", progress=False)


def test_cli_arch_help_lists_only_that_architectures_options(capsys):
    from saelab.cli import main

    def help_text(arch):
        with pytest.raises(SystemExit):
            main(["train", "--arch", arch, "--help"])
        return capsys.readouterr().out

    out = help_text("gtopk")
    assert "--beta" in out and "--grad-norm" in out and "--group-fractions" not in out
    out = help_text("matryoshka")
    assert "--group-fractions" in out and "--beta" not in out


DIST_SCRIPT = textwrap.dedent("""
    import sys, torch, torch.distributed as dist
    sys.path.insert(0, {tests!r})
    from test_architectures import dist_case
    from test_train import small_cfg
    from saelab.activations.in_memory import InMemoryActivations
    from saelab.training import train
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    x, y, sae = dist_case({arch!r})
    cfg = small_cfg(sae=sae, tokens=512 * 20, batch_size=256, dead_tokens=10**9)
    train(cfg, InMemoryActivations(x, 256, seed=7, rank=rank, world_size=world, targets=y), {run!r}, progress=False)
    dist.barrier()  # leave together: a rank exiting while its peer still saves can abort gloo at teardown
    dist.destroy_process_group()
""")


def dist_case(arch: str):
    """(rows, targets or None, SAEConfig) of the data-parallel test; "skip-transcoder": a BatchTopK skip-transcoder
    onto a nonlinear map of the rows (12 wide: its own width, target scale and b_in, W_skip)."""
    x = planted_data(n_rows=4096)
    if arch != "skip-transcoder":
        return x, None, SAEConfig(architecture=arch, n_latents=128, k=4)
    w = torch.randn(x.shape[1], 12, generator=torch.Generator().manual_seed(5))
    return x, torch.relu(x @ w), SAEConfig(architecture="batchtopk", n_latents=128, k=4, target_hook="h", skip=True)


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["batchtopk", "matryoshka", "feature_choice", "mp", "relu", "gated",
                                  "skip-transcoder"])
def test_data_parallel_batch_is_global(tmp_path, arch):
    """Under torchrun the batch of batch-level selections (BatchTopK, feature choice) is the global one: two ranks
    train exactly what one process does. MP (per token, tied, W_enc without a gradient) too, and ReLU and Gated (each
    rank picks its own packed or dense path; Gated's r_mag and b_mag are broadcast and averaged like the rest), and a
    skip-transcoder (each rank's target rows stay with its input rows; both sides' init from the global batch)."""
    script = tmp_path / "dist.py"
    script.write_text(DIST_SCRIPT.format(tests=os.path.dirname(__file__), run=str(tmp_path / "ddp"), arch=arch))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29533",
                    str(script)], check=True, env=env, timeout=600)
    x, y, sae = dist_case(arch)
    cfg = small_cfg(sae=sae, tokens=512 * 20, batch_size=512, dead_tokens=10 ** 9)
    train(cfg, InMemoryActivations(x, 512, seed=7, targets=y), tmp_path / "single", progress=False)
    a, b = final_weights(tmp_path / "ddp"), final_weights(tmp_path / "single")
    assert y is None or (a["W_dec"].shape == (128, 12) and a["W_skip"].abs().max() > 0)
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=2e-5, rtol=1e-4)
