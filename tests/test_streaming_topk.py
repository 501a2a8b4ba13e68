"""The streaming encoder (saelab.kernels.topk_stream per token, saelab.sae.batch_select over the batch) against
today's dense path: `pre.topk`, BatchTopK's and feature choice's selections of the one dense addmm. Equality is exact
(torch.equal): the same indices in the same slots, the same values, through a training step the same losses,
gradients and state, and the same `encode`, ties included (rows whose ties decide the answer are re-scanned; ties at
BatchTopK's cut a buffer dropped are collected by one more pass). Set membership is also checked by a full sort."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from saelab.config import SAEConfig
from saelab.errors import ConfigError
from saelab.kernels.topk_stream import BLOCK_ALIGN, abs_key, block_bounds, relu_key, streaming_topk
from saelab.sae.architectures import auxk_loss
from saelab.sae.batch_select import (batch_topk_entries, batch_topk_indices, batch_topk_streaming, packed,
                                     preact_blocks)
from saelab.sae.choice import capacities, feature_choice_entries, feature_choice_indices
from saelab.sae.sae import SparseAutoencoder


def dense_topk(x, W, b, k, key=None):
    pre = torch.addmm(b, x, W)
    idx = (pre if key is None else key(pre, 0, pre.shape[1])).topk(k, dim=-1, sorted=False).indices
    return pre.gather(1, idx), idx


def tied_problem(n, d=48, B=64, seed=0):
    """Random encoder with ties: three identical latents (5, 17, 700 % n), zero tokens whose pre-activations are the
    biases, and biases repeated at the zero tokens' k-th place, so ties sit inside and at the edge of the top-k."""
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(n, d, generator=g)
    b = torch.randn(n, generator=g) * 0.1
    x = torch.randn(B, d, generator=g)
    dup = 700 % n
    W[5] = W[17] = W[dup]
    b[5] = b[17] = b[dup]
    x[3] = 0
    x[10] = 0
    b[torch.randperm(n, generator=g)[:6]] = b.sort(descending=True).values[3]  # ties at the 4th place of b
    return x, W.T, b  # W_enc column-major, as the SAE stores it


def boundary_ties(pre, k):
    s = pre.sort(dim=1, descending=True).values
    return int((s[:, k - 1] == s[:, k]).sum())


@pytest.mark.parametrize("n,k", [(1000, 4), (3001, 8)])
@pytest.mark.parametrize("key", [None, abs_key, relu_key], ids=["pre", "abs", "relu"])
def test_streaming_equals_dense_topk(n, k, key):
    x, W, b = tied_problem(n)
    pre = torch.addmm(b, x, W)
    if key is None:
        assert boundary_ties(pre, k) > 0  # the zero tokens' k-th and (k+1)-th values tie
    dv, di = dense_topk(x, W, b, k, key)
    for chunk in (16, 100, 333, 1000, n - 1, n, 2 * n):  # aligned, not dividing n, remainder, one block, chunk > n
        sv, si = streaming_topk(x, W, b, k, chunk, key=key)
        assert torch.equal(si, di), chunk
        assert torch.equal(sv, dv), chunk


def test_streaming_ties_with_relu_key_zero_rows():
    """Mostly negative pre-activations: ReLU'd keys tie at 0 on many rows (relu_before_topk's padding case)."""
    x, W, b = tied_problem(1024, B=32)
    b -= 20.0
    ranked = torch.addmm(b, x, W).clamp_min(0)
    assert boundary_ties(ranked, 8) > 16
    dv, di = dense_topk(x, W, b, 8, relu_key)
    sv, si = streaming_topk(x, W, b, 8, 64, key=relu_key)
    assert torch.equal(si, di) and torch.equal(sv, dv)


def test_streaming_narrow_width_and_columns():
    """k·64 > n (torch's nth_element order): the dense top-k itself; `columns`: positions within the subset."""
    x, W, b = tied_problem(300)
    dv, di = dense_topk(x, W, b, 8)
    sv, si = streaming_topk(x, W, b, 8, 32)
    assert torch.equal(si, di) and torch.equal(sv, dv)
    x, W, b = tied_problem(2000)
    cols = torch.randperm(2000, generator=torch.Generator().manual_seed(1))[:1500].sort().values
    pre = torch.addmm(b, x, W).index_select(1, cols)
    idx = pre.abs().topk(4, dim=-1, sorted=False).indices
    sv, si = streaming_topk(x, W, b, 4, 200, key=abs_key, columns=cols)
    assert torch.equal(si, idx) and torch.equal(sv, pre.gather(1, idx))


def test_block_bounds():
    for n, chunk in [(1000, 16), (1000, 100), (3001, 333), (4096, 4095), (1000, 1000), (50, 7)]:
        bounds = block_bounds(n, chunk)
        assert bounds[0][0] == 0 and bounds[-1][1] == n
        assert all(a[1] == c[0] for a, c in zip(bounds, bounds[1:]))
        widths = [e - s for s, e in bounds]
        if len(bounds) > 1:
            assert all(w % BLOCK_ALIGN == 0 and w <= max(chunk, BLOCK_ALIGN) for w in widths[:-1])
            assert BLOCK_ALIGN <= widths[-1] < widths[0] + BLOCK_ALIGN
    assert block_bounds(4096, 4095) == [(0, 4080), (4080, 4096)]
    assert block_bounds(1000, 992) == [(0, 1000)]  # an 8-wide remainder joins the block before it


def make_sae(arch, chunk, options=None, n=512, d=32, k=4, k_aux=4):
    cfg = SAEConfig(architecture=arch, d_in=d, n_latents=n, k=k, k_aux=k_aux, encoder_chunk=chunk,
                    options=options or {})
    sae = SparseAutoencoder(cfg)
    sae.reset_parameters(seed=0)
    with torch.no_grad():
        sae.b_enc.normal_(0, 0.05, generator=torch.Generator().manual_seed(2))
        sae.b_dec.normal_(0, 0.05, generator=torch.Generator().manual_seed(3))
    return sae


def step(sae, x, grad, dead):
    sae.zero_grad()
    out = sae(x, grad=grad, dead_mask=dead)
    out.losses["loss"].backward()
    return out, {name: p.grad.clone() for name, p in sae.named_parameters()}


@pytest.mark.parametrize("arch,options", [
    ("topk", {}), ("topk", {"relu_before_topk": True, "multi_topk": True}), ("abstopk", {}),
    ("gtopk", {}), ("gtopk", {"candidates": 4}), ("batchtopk", {}), ("matryoshka", {}), ("mutual", {}),
    ("feature_choice", {}), ("feature_choice", {"capacity": "uniform", "aux": "auxk"}),
], ids=["topk", "topk-relu-multi", "abstopk", "gtopk", "gtopk-candidates", "batchtopk", "matryoshka", "mutual",
        "feature-choice", "feature-choice-uniform"])
@pytest.mark.parametrize("n_dead", [20, 400], ids=["few-dead", "many-dead"])
def test_training_step_streaming_equals_dense(arch, options, n_dead):
    """A whole step, AuxK on both of its branches (few dead: dense over the dead columns; many: their top-k in
    blocks): the same code, losses and parameter gradients, bit for bit, and the same state after the step (BatchTopK's
    threshold, feature choice's usage and thresholds)."""
    g = torch.Generator().manual_seed(4)
    x = torch.randn(64, 32, generator=g)
    grad = torch.randn(64, 32, generator=g)
    dead = torch.zeros(512, dtype=torch.bool)
    dead[torch.randperm(512, generator=g)[:n_dead]] = True
    dense_sae = make_sae(arch, 0, options)
    dense_out, dense_grads = step(dense_sae, x, grad, dead)
    dense_sae.after_step(dense_out, 0)
    for chunk in (48, 100):
        sae = make_sae(arch, chunk, options)
        out, grads = step(sae, x, grad, dead)
        assert torch.equal(out.code.indices, dense_out.code.indices)
        assert torch.equal(out.code.values, dense_out.code.values)
        assert out.losses.keys() == dense_out.losses.keys() and {"auxk", "aux_zipf"} & out.losses.keys()
        for name, value in dense_out.losses.items():
            assert torch.equal(out.losses[name], value), name
        for name, value in dense_grads.items():
            assert torch.equal(grads[name], value), name
        sae.after_step(out, 0)
        for name, value in dense_sae.named_buffers():
            assert torch.equal(dict(sae.named_buffers())[name], value), name


@pytest.mark.parametrize("signed", [False, True])
def test_auxk_blocked_equals_dense(signed):
    sae = make_sae("topk", 0, n=2048, d=32, k=8, k_aux=8)
    g = torch.Generator().manual_seed(5)
    x_c = torch.randn(48, 32, generator=g) - sae.b_dec
    err = torch.randn(48, 32, generator=g)
    dead = torch.rand(2048, generator=g) < 0.6  # ~1200 dead: many, the blocked branch
    pre = torch.addmm(sae.b_enc, x_c, sae.W_enc).detach()
    results = []
    for kwargs in ({"pre": pre}, {"pre": None, "chunk": 128}, {"pre": None, "chunk": 2048}):
        sae.zero_grad()
        loss = auxk_loss(sae, x_c, err=err, dead_mask=dead, k_aux=8, signed=signed, **kwargs)
        loss.backward()
        results.append((loss.detach(), sae.W_enc.grad.clone(), sae.b_enc.grad.clone(), sae.W_dec.grad.clone()))
    for other in results[1:]:
        assert all(torch.equal(a, c) for a, c in zip(results[0], other))


def test_encoder_chunk_config_errors():
    with pytest.raises(ConfigError, match="sae.encoder_chunk: must be a number of latents, auto"):
        SAEConfig(encoder_chunk=-2)
    with pytest.raises(ConfigError, match=r"sae.encoder_chunk: must be <= n_latents \(512\)"):
        SAEConfig(d_in=32, n_latents=512, encoder_chunk=513)
    with pytest.raises(ConfigError, match="relu trains with the dense encoder"):
        SAEConfig(architecture="relu", encoder_chunk=1024)
    assert SAEConfig(d_in=32, n_latents=512, encoder_chunk=512).encoder_chunk == 512


def test_encoder_chunk_auto_streams_only_wide_saes_that_can():
    from saelab.config import AUTO_CHUNK, AUTO_DENSE_LATENTS, parse_encoder_chunk

    assert SAEConfig().encoder_chunk == -1  # auto until the width is known
    wide = AUTO_DENSE_LATENTS * 2
    assert SAEConfig(d_in=32, n_latents=AUTO_DENSE_LATENTS).encoder_chunk == 0  # dense where it is faster
    assert SAEConfig(d_in=32, n_latents=wide).encoder_chunk == AUTO_CHUNK
    assert SAEConfig(architecture="batchtopk", d_in=32, n_latents=wide).encoder_chunk == AUTO_CHUNK
    assert SAEConfig(architecture="relu", d_in=32, n_latents=wide).encoder_chunk == 0  # cannot stream
    assert SAEConfig(d_in=32, n_latents=wide, encoder_chunk=0).encoder_chunk == 0  # dense when asked
    assert [parse_encoder_chunk(t) for t in ("auto", "dense", "16k", "0")] == [-1, 0, 16_000, 0]
    with pytest.raises(ConfigError, match="not a number of latents"):
        parse_encoder_chunk("-3")


# ------------------------------------------------------------------ batch-level selections (saelab.sae.batch_select)
def quantized_problem(B, n, d=16, seed=0):
    """One-hot tokens and encoder entries on a grid of quarters: every pre-activation is exactly one of 13 values,
    so the batch's cut sits inside a large tie."""
    g = torch.Generator().manual_seed(seed)
    x = F.one_hot(torch.randint(0, d, (B,), generator=g), d).float()
    return x, (torch.randint(-6, 7, (n, d), generator=g).float() / 4).T, torch.zeros(n)


def brute_batch_topk(pre, k):
    """Every entry at or above the (k·B)-th largest of the whole matrix (a full sort)."""
    cut = pre.reshape(-1).sort(descending=True).values[k * pre.shape[0] - 1]
    return pre >= cut


def counting(blocks):
    """`blocks` that counts the passes made over it."""
    passes = []

    def again():
        passes.append(1)
        return blocks()
    return again, passes


@pytest.mark.parametrize("problem", ["random", "tied", "nan"])
def test_batch_topk_streaming_equals_dense(problem):
    """The same packed selection and values as the dense BatchTopK in blocks narrower than k (k·B larger than one
    block), wider, and one block; the set against a full sort."""
    B, n, k = 64, 600, 24
    x, W, b = quantized_problem(B, n) if problem == "tied" else tied_problem(n, d=16, B=B)
    if problem == "nan":
        W = W.clone()
        W[3, 5] = float("nan")  # latent 5's pre-activations are NaN on every token with x[:, 3] != 0
    pre = torch.addmm(b, x, W)
    idx, valid = batch_topk_indices(pre, k)
    if problem == "nan":
        assert not valid.any()  # the dense cut is NaN: nothing selected
    else:
        chosen = torch.zeros(B, n, dtype=torch.bool)
        chosen[torch.arange(B).unsqueeze(1).expand_as(idx)[valid], idx[valid]] = True
        assert torch.equal(chosen, brute_batch_topk(pre, k))
    if problem == "tied":
        assert int(valid.sum()) > k * B  # ties at the cut are all kept
    for chunk in (16, 100, n):
        vals, sidx, svalid = batch_topk_streaming(x, W, b, k, chunk)
        assert torch.equal(sidx, idx) and torch.equal(svalid, valid), chunk
        assert torch.equal(vals, pre.gather(1, idx)), chunk


def test_batch_topk_collects_ties_a_shrink_dropped():
    """When the running buffer overflows it drops entries tied at what becomes the cut: one more pass over the
    blocks collects them (otherwise one pass)."""
    x, W, b = quantized_problem(64, 800)
    pre = torch.addmm(b, x, W)
    for problem, k, passes_expected in [("tied", 6, 2), ("random", 6, 1)]:
        p = pre if problem == "tied" else pre + torch.rand(pre.shape, generator=torch.Generator().manual_seed(1))
        blocks, passes = counting(lambda: [(s, p[:, s:s + 32]) for s in range(0, 800, 32)])
        rows, cols, vals = batch_topk_entries(blocks, k)
        chosen = torch.zeros_like(p, dtype=torch.bool)
        chosen[rows, cols] = True
        assert torch.equal(chosen, brute_batch_topk(p, k)) and torch.equal(vals, p[rows, cols])
        assert len(passes) == passes_expected, problem


def test_feature_choice_streaming_equals_dense():
    """Each latent's top m_i tokens in blocks: the dense path's matches, values and cuts, ties included (quantized
    pre-activations tie at most columns' m_i-th place)."""
    B, n = 48, 300
    for x, W, b in (quantized_problem(B, n), tied_problem(n, d=16, B=B)):
        pre = torch.addmm(b, x, W)
        m = capacities(5 * B, B, n, "zipf", 1.0, torch.rand(n, generator=torch.Generator().manual_seed(2)))
        idx, valid, cut = feature_choice_indices(pre, m, with_cut=True)
        for chunk in (16, 100):
            first = []
            rows, cols, vals, scut = feature_choice_entries(preact_blocks(x, W, b, chunk, first), m)
            svals, sidx, svalid = packed(rows, cols, vals, first[0], n)
            assert torch.equal(sidx, idx) and torch.equal(svalid, valid) and torch.equal(scut, cut)
            assert torch.equal(svals, pre.gather(1, idx))


STREAMING = ["topk", "abstopk", "gtopk", "batchtopk", "matryoshka", "mutual", "feature_choice"]


@pytest.mark.parametrize("arch", STREAMING)
def test_encode_streaming_equals_dense(arch):
    """`sae.encode` with encoder_chunk: the dense encode's code, for the per-token rules (TopK-style, and the
    threshold architectures before their threshold is learned) and the learned thresholds (a global one, per latent
    ones with some unlearned); a batch of 5 tokens runs as one block (MKL sums narrow blocks of so few rows in
    another order)."""
    g = torch.Generator().manual_seed(6)
    x, grad = torch.randn(64, 32, generator=g), torch.randn(64, 32, generator=g)
    dense, streamed = make_sae(arch, 0), make_sae(arch, 48)
    thresholds = [None]
    if hasattr(dense, "threshold"):
        pre = dense.preacts(dense.normalize_input(x)[0])
        theta = pre.quantile(0.97).expand(512).clone()
        if arch == "feature_choice":
            theta = pre.quantile(0.97, dim=0)
            theta[::7] = -1  # never learned: never fires
        thresholds.append(theta)
    for theta in thresholds:
        if theta is not None:
            dense.threshold.copy_(theta)
            streamed.threshold.copy_(theta)
        for rows in (x, x[:5]):
            a, c = dense.encode(rows, grad=grad[:len(rows)]), streamed.encode(rows, grad=grad[:len(rows)])
            assert torch.equal(a.indices, c.indices) and torch.equal(a.values, c.values), (theta is None, len(rows))
            if theta is not None and len(rows) == 64:
                assert a.k > 4  # thresholded: variable k, padded


def test_batchtopk_calibration_streaming_equals_dense():
    """θ calibrated over several batches in blocks of latents is the dense calibration's, bit for bit."""
    g = torch.Generator().manual_seed(7)
    batches = [torch.randn(64, 32, generator=g) for _ in range(3)]
    thetas = []
    for chunk in (0, 48):
        sae = make_sae("batchtopk", chunk)
        it = iter(batches)
        record = sae.arch.calibrate(sae, lambda: next(it, None), tokens=192)
        thetas.append((sae.threshold.clone(), record["threshold"]))
    assert torch.equal(thetas[0][0], thetas[1][0]) and thetas[0][1] == thetas[1][1] > 0
