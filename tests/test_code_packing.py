"""`PackedRows`: variable-k codes packed for the kernels with the overflow rows of wide tokens (saelab/sae/code.py),
against dense references on ragged rows that include one very wide row; and the ReLU, Gated and JumpReLU steps on
split rows against the same steps with every token in one row padded to the widest (the layout before the split)
and against dense autograd."""

import pytest
import torch

import saelab.sae.code as code_module
import saelab.sae.relu as relu_module
from saelab.config import SAEConfig
from saelab.kernels import encoder_values, sparse_decode
from saelab.sae import SparseAutoencoder
from saelab.sae.architectures import pack_rows
from saelab.sae.code import PackedRows, SparseCode, row_width

N = 64
COUNTS = [0, 3, 1, 60, 2, 5, 1, 4]  # ragged, one very wide token


def ragged_mask(counts=COUNTS, n=N, seed=0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    mask = torch.zeros(len(counts), n, dtype=torch.bool)
    for b, c in enumerate(counts):
        mask[b, torch.randperm(n, generator=g)[:c]] = True
    return mask


def test_row_width_splits_a_few_wide_tokens_and_not_even_ones():
    wide = torch.tensor([40] + [2] * 99)
    # one row per token would be 100 × 40 slots; K 4 puts the wide token on 10 rows: 109 rows of 4 (+16 each)
    assert row_width(wide, 40) < 40
    n_rows = lambda K: 100 + int(((wide - 1).clamp_min(0) // K).sum())  # noqa: E731
    K = row_width(wide, 40)
    assert n_rows(K) * (K + code_module.ROW_COST) < 100 * (40 + code_module.ROW_COST)
    assert row_width(torch.full((50,), 7), 7) == 7  # even rows: nothing to gain


def test_packed_rows_hold_each_pair_once_against_dense():
    mask = ragged_mask()
    rows, cols = mask.nonzero(as_tuple=True)
    p = PackedRows.pack(rows, cols, mask.shape[0])
    R, K = p.indices.shape
    assert p.token is not None and R > mask.shape[0] and K < max(COUNTS)  # the wide token was split
    assert p.token[: mask.shape[0]].tolist() == list(range(mask.shape[0]))
    assert p.token[mask.shape[0]:].tolist() == [3] * (R - mask.shape[0])  # its overflow rows, after every token's
    # every (token, latent) pair in exactly one valid slot; padded slots hold index 0
    hits = torch.zeros(mask.shape, dtype=torch.long)
    hits.index_put_((p.token.unsqueeze(1).expand(R, K)[p.valid], p.indices[p.valid]), torch.tensor(1), accumulate=True)
    assert torch.equal(hits, mask.long())
    assert not p.indices[~p.valid].any()
    # valid slots are each row's first ones, latents ascending within a row
    assert torch.equal(p.valid, torch.arange(K) < p.valid.sum(1, keepdim=True))
    for r in range(R):
        live = p.indices[r][p.valid[r]]
        assert torch.equal(live, live.sort().values)
    # the per-token layout is the SparseCode's (pack_rows: one row per token, padded to the widest)
    ref_idx, ref_valid = pack_rows(rows, cols, mask.shape[0], presorted=True)
    assert torch.equal(p.code_indices, ref_idx) and torch.equal(p.code_valid, ref_valid)
    whole = PackedRows.pack(rows, cols, mask.shape[0], split=False)
    assert whole.token is None and torch.equal(whole.indices, ref_idx)


def test_packed_rows_decode_encode_and_code_against_dense():
    torch.manual_seed(0)
    mask = ragged_mask()
    B, d = mask.shape[0], 5
    rows, cols = mask.nonzero(as_tuple=True)
    p = PackedRows.pack(rows, cols, B)
    assert p.token is not None
    x = torch.randn(B, d, requires_grad=True)
    W_enc = torch.randn(d, N, requires_grad=True)
    b_enc = torch.randn(N, requires_grad=True)
    W_dec = torch.randn(N, d, requires_grad=True)
    target = torch.randn(B, d)
    params = (x, W_enc, b_enc, W_dec)

    # dense reference: the code is the pre-activations on the mask
    pre = x @ W_enc + b_enc
    z_ref = pre * mask
    ref = (target - z_ref @ W_dec).pow(2).sum() + (z_ref * z_ref).sum()
    want = torch.autograd.grad(ref, params)

    # packed: gather on the split rows, the sparse encoder backward with each row's token's input, decode, sum rows
    vals = encoder_values(p.token_rows(x), W_enc, b_enc, p.indices, p.gather(pre.detach())) * p.valid
    torch.testing.assert_close(vals[p.valid], z_ref.detach()[p.token.unsqueeze(1).expand_as(p.indices)[p.valid],
                                                              p.indices[p.valid]])
    y = p.sum_tokens(sparse_decode(p.indices, vals, W_dec))
    torch.testing.assert_close(y, z_ref @ W_dec)
    code = SparseCode(p.code_indices, p.code_values(vals))
    torch.testing.assert_close(code.to_dense(N), z_ref)
    assert code.l0().tolist() == COUNTS
    got = torch.autograd.grad((target - y).pow(2).sum() + (code.values * code.values).sum(), params)
    for name, g, w in zip(("x", "W_enc", "b_enc", "W_dec"), got, want):
        torch.testing.assert_close(g, w, atol=1e-4, rtol=1e-5, msg=name)


def test_no_pairs_packs_one_empty_row_per_token():
    empty = torch.zeros(0, dtype=torch.long)
    p = PackedRows.pack(empty, empty, 3)
    assert p.indices.shape == (3, 1) and not p.valid.any() and p.token is None


# ------------------------------------------------------------------------------------------------ whole steps
def wide_token_sae(arch, **options):
    """An SAE whose batch has one token far wider than the rest (its input scaled up): the step splits it."""
    torch.manual_seed(0)
    d, n = 16, 128
    sae = SparseAutoencoder(SAEConfig(architecture=arch, d_in=d, n_latents=n, k=4, normalize="none", hook_name="h",
                                      options=options))
    x = torch.randn(48, d)
    sae.init_from_data_(x)
    with torch.no_grad():
        sae.b_enc.normal_(-1.0, 0.2)
        sae.W_dec.mul_(torch.rand(n, 1) + 0.5)
        if arch == "gated":
            sae.r_mag.normal_(0, 0.5)
            sae.b_mag.normal_(0, 0.3)
    x[7] *= 8
    return sae, x


def step(sae, x):
    sae.zero_grad(set_to_none=True)
    out = sae(x)
    out.losses["loss"].backward()
    return out, {name: p.grad.clone() for name, p in sae.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("arch, options", [("relu", {}), ("gated", {}), ("jumprelu", {}),
                                           ("jumprelu", {"recipe": "anthropic"})])
def test_split_step_equals_the_padded_step_and_dense_autograd(arch, options, monkeypatch):
    sae, x = wide_token_sae(arch, **options)

    monkeypatch.setattr(relu_module, "DENSE_FRACTION", 2.0)  # always packed
    packed = []
    pack = PackedRows.pack.__func__
    monkeypatch.setattr(PackedRows, "pack", classmethod(lambda cls, *a, **kw: packed.append(pack(cls, *a, **kw))
                                                        or packed[-1]))
    split_out, split_grads = step(sae, x)
    assert packed[0].token is not None  # this batch did take the overflow rows
    with monkeypatch.context() as m:
        m.setattr(code_module, "row_width", lambda counts, widest: widest)  # one row per token
        pad_out, pad_grads = step(sae, x)
        # and the dense path (every latent listed, plain matrix products)
        m.setattr(relu_module, "DENSE_FRACTION", -1.0)
        dense_out, dense_grads = step(sae, x)
    assert torch.equal(split_out.code.indices, pad_out.code.indices)
    for other_out, other_grads in ((pad_out, pad_grads), (dense_out, dense_grads)):
        torch.testing.assert_close(split_out.code.to_dense(sae.n_latents), other_out.code.to_dense(sae.n_latents))
        torch.testing.assert_close(split_out.x_hat, other_out.x_hat)
        for name, value in other_out.losses.items():
            torch.testing.assert_close(split_out.losses[name], value, msg=name)
        assert split_grads.keys() == other_grads.keys()
        for name, g in other_grads.items():
            torch.testing.assert_close(split_grads[name], g, atol=1e-5, rtol=1e-4, msg=name)
