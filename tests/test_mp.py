"""MP-SAE against a naive matching-pursuit loop (one r·Dᵀ per step, autograd through the loop as the author codes
do) and the properties of research notes §7 item 6: ‖r_t‖ non-increasing, x̂ + r = x̃, L0 ≤ T, more inference steps
never raise the error; plus the stop rule, save/load and bit-exact resume."""

import json
import os
import sys

import pytest
import torch

from saelab.activations.in_memory import InMemoryActivations
from saelab.config import ConfigError, SAEConfig
from saelab.sae import SparseAutoencoder
from saelab.sae.matching_pursuit import merge_repeats, pursuit_indices, pursuit_values, row_argmax
from saelab.training import train

sys.path.insert(0, os.path.dirname(__file__))
from test_train import DiesAfter, Interrupted, final_weights, planted_data, small_cfg  # noqa: E402


def make(d=16, n=64, k=8, double=False, **options):
    sae = SparseAutoencoder(SAEConfig(architecture="mp", d_in=d, n_latents=n, k=k, options=options, hook_name="h"))
    sae.reset_parameters(seed=0)
    if double:
        sae.double().normalize_decoder_()  # unit rows in float64
    return sae


def naive_mp(x_c, D, T, select):
    """Textbook matching pursuit, one token-batch step at a time: dense codes [B, n] and the residual."""
    r = x_c
    z = torch.zeros(x_c.shape[0], D.shape[0], dtype=x_c.dtype)
    for _ in range(T):
        c = r @ D.T
        with torch.no_grad():
            j = (c.abs() if select == "abs" else c).argmax(1)
        v = c.gather(1, j[:, None])
        if select == "relu":
            v = v.relu()
        z = z + torch.zeros_like(z).scatter(1, j[:, None], v)
        r = r - v * D[j]
    return z, r


@pytest.mark.parametrize("select", ["relu", "max", "abs"])
@pytest.mark.parametrize("gram", [True, False])
def test_pursuit_matches_naive_loop_values_and_gradients(select, gram):
    torch.manual_seed(0)
    sae = make(double=True, select=select, gram_max_latents=10 ** 6 if gram else 0)
    x = torch.randn(40, 16, dtype=torch.float64) * 2
    sae.init_from_data_(x)
    out = sae(x)
    out.losses["loss"].backward()
    xn, _ = sae.normalize_input(x)
    D = sae.W_dec.detach().clone().requires_grad_()
    b = sae.b_dec.detach().clone().requires_grad_()
    z, r = naive_mp(xn - b, D, 8, select)
    torch.testing.assert_close(out.code.to_dense(64), z.detach())
    ref = (xn - (z @ D + b)).pow(2).sum(-1).mean() / sae.loss_normalizer
    torch.testing.assert_close(out.losses["fvu"], ref.detach())
    ref.backward()
    # the pursuit runs on W_dec/‖W_dec‖, so its gradient has no component along each (unit) row; the trainer
    # projects that component out anyway (remove_parallel_grad_)
    radial = (D.grad * D).sum(1, keepdim=True) * D
    torch.testing.assert_close(sae.W_dec.grad, D.grad - radial)
    torch.testing.assert_close(sae.b_dec.grad, b.grad)
    if select != "relu":  # the argmax correlation is positive for almost every token here; signed codes exist
        assert (out.code.values < 0).any() or select == "max"


def test_gram_and_direct_correlations_choose_the_same_atoms():
    torch.manual_seed(1)
    D = torch.nn.functional.normalize(torch.randn(300, 32), dim=1)
    x = torch.randn(100, 32)
    a = pursuit_indices(x, D, 16, "abs", gram=True, chunk=7)  # chunks of tokens give the same result
    b = pursuit_indices(x, D, 16, "abs", gram=False)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_row_argmax_is_argmax_ties_included():
    torch.manual_seed(4)
    c = torch.randn(50, 512)
    c[3, 10] = c[3, 400] = c[3].max() + 1  # a tie across blocks: the first index wins, as torch.argmax
    c[7, 65] = c[7, 66] = c[7].max() + 1  # a tie inside a block
    assert torch.equal(row_argmax(c), c.argmax(1))
    assert row_argmax(c)[3] == 10 and row_argmax(c)[7] == 65


def test_residual_norm_non_increasing_orthogonal_and_x_hat_plus_r_is_x():
    torch.manual_seed(2)
    D = torch.nn.functional.normalize(torch.randn(40, 12, dtype=torch.float64), dim=1)  # small n: re-selection
    x = torch.randn(64, 12, dtype=torch.float64)
    idx, keep = pursuit_indices(x, D, 24, "abs")
    v = pursuit_values(x, D, idx, keep)
    steps = v.unsqueeze(2) * D[idx]  # [B, T, d]
    r = x.unsqueeze(1) - steps.cumsum(1)  # residual after each step
    norms = torch.cat([x.norm(dim=1, keepdim=True), r.norm(dim=2)], 1)
    assert (norms[:, 1:] <= norms[:, :-1] + 1e-12).all()  # ‖r_t‖ non-increasing
    torch.testing.assert_close(norms[:, :-1].pow(2) - norms[:, 1:].pow(2), v.pow(2))  # drops by v² each step
    last = (r[:, -1] * D[idx[:, -1]]).sum(-1)
    torch.testing.assert_close(last, torch.zeros_like(last))  # r ⟂ the atom just used
    z = torch.zeros(64, 40, dtype=torch.float64).scatter_add(1, idx, merge_repeats(idx, v))
    torch.testing.assert_close(z @ D + r[:, -1], x)  # x̂ + r = x
    reselected = (idx.unsqueeze(2) == idx.unsqueeze(1)).sum((1, 2)) > 24
    assert reselected.any()  # the same atom was chosen twice by some token ...
    l0 = (merge_repeats(idx, v) != 0).sum(1)
    assert (l0 <= 24).all() and (l0[reselected] < 24).all()  # ... so L0 < T there: L0 counts distinct atoms


def test_l0_at_most_steps_and_tolerance_stops_tokens_early():
    torch.manual_seed(3)
    sae = make(k=8, select="abs")
    x = torch.randn(128, 16)
    sae.init_from_data_(x)
    code = sae.encode(x)
    assert code.k == 8 and (code.l0() <= 8).all()
    xn, _ = sae.normalize_input(x)
    r = (xn - sae.b_dec).norm(dim=1)
    tol = float(r.detach().median()) * 0.8
    sae.cfg.options["tol"] = tol
    sae.arch = type(sae.arch)(sae.cfg)
    stopped = sae.encode(x)
    res = (xn - sae.decode(stopped)).norm(dim=1)
    assert (stopped.l0() < code.l0()).any()
    assert (stopped.l0()[r <= tol] == 0).all()  # already within tolerance: no atom at all
    # a token that stopped early did so because its residual reached tol
    early = stopped.l0() < code.l0()
    assert (res[early] <= tol + 1e-5).all()


@pytest.mark.slow
def test_more_inference_steps_never_raise_error_on_trained_sae(tmp_path):
    x = planted_data(n_rows=4096, d=32)
    cfg = small_cfg(sae=SAEConfig(architecture="mp", n_latents=128, k=4), tokens=256 * 40, lr=3e-3)
    res = train(cfg, InMemoryActivations(x, 256, seed=1), tmp_path / "mp", progress=False)
    rows = [json.loads(line) for line in (tmp_path / "mp" / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["fvu"] < rows[0]["fvu"] / 2 and rows[-1]["l0"] <= 4
    sae = SparseAutoencoder.load(tmp_path / "mp" / "sae")
    held = planted_data(n_rows=512, d=32, seed=5)
    errs = []
    for T in (1, 2, 4, 8, 16, 32):
        sae.cfg.options["inference_steps"] = T
        sae.arch = type(sae.arch)(sae.cfg)
        with torch.no_grad():
            errs.append(float((held - sae.decode(sae.encode(held))).pow(2).sum(-1).mean()))
    assert all(b <= a * (1 + 1e-5) for a, b in zip(errs, errs[1:])), errs
    assert errs[-1] < errs[2]  # beyond the training T it keeps improving
    assert res.sae.cfg.k == 4


def test_save_load_round_trip_and_saelens_view(tmp_path):
    torch.manual_seed(0)
    sae = make(inference_steps=12, tol=0.01)
    x = torch.randn(64, 16) * 3 + 1
    sae.init_from_data_(x)
    sae.after_step(sae(x), 0)
    torch.testing.assert_close(sae.W_enc, sae.W_dec.T)  # tied: the saved encoder is the dictionary
    before = sae.decode(sae.encode(x))
    sae.save(tmp_path / "sae")
    cfg = json.loads((tmp_path / "sae" / "cfg.json").read_text())
    assert cfg["architecture"] == "matching_pursuit" and cfg["max_iterations"] == 12
    assert cfg["residual_threshold"] == 0.01
    loaded = SparseAutoencoder.load(tmp_path / "sae")
    assert loaded.cfg.options == sae.cfg.options
    torch.testing.assert_close(loaded.decode(loaded.encode(x)), before, atol=1e-4, rtol=1e-4)


@pytest.mark.slow
def test_resume_is_bit_exact(tmp_path):
    x = planted_data(n_rows=4096)
    opts = dict(sae=SAEConfig(architecture="mp", n_latents=128, k=4), tokens=256 * 30)
    train(small_cfg(**opts), InMemoryActivations(x, 256, seed=3), tmp_path / "a", progress=False)
    with pytest.raises(Interrupted):
        train(small_cfg(**opts), DiesAfter(x, 256, seed=3, n=23), tmp_path / "b", progress=False)
    train(small_cfg(resume=True, **opts), InMemoryActivations(x, 256, seed=3), tmp_path / "b", progress=False)
    a, b = final_weights(tmp_path / "a"), final_weights(tmp_path / "b")
    for name in a:
        assert torch.equal(a[name], b[name]), name


def test_bad_options_are_named():
    with pytest.raises(ConfigError, match="select"):
        SAEConfig(architecture="mp", options={"select": "softmax"})
    with pytest.raises(ConfigError, match="tol"):
        SAEConfig(architecture="mp", options={"tol": -1.0})


def test_stop_on_duplicate_support_matches_the_authors_loop():
    """The toy code's rule (mpsae/MP-SAE): a token is done once a step leaves its support unchanged (it re-selected
    an atom, whose value still counts, or added nothing) or its residual is below tol."""
    torch.manual_seed(5)
    D = torch.nn.functional.normalize(torch.randn(10, 6, dtype=torch.float64), dim=1)  # few atoms: re-selection
    x = torch.randn(200, 6, dtype=torch.float64)
    tol = 0.3
    z = torch.zeros(200, 10, dtype=torch.float64)
    r, done = x.clone(), torch.zeros(200, dtype=torch.bool)
    for _ in range(40):
        v, j = (r @ D.T).relu().max(1, keepdim=True)
        step = torch.zeros_like(z).scatter(1, j, v) * ~done[:, None]
        before = z != 0
        z, r = z + step, r - step @ D
        done |= ((z != 0) == before).all(1) | (r.norm(dim=1) < tol)
    assert done.all()
    idx, keep = pursuit_indices(x, D, 40, "relu", tol=tol, stop_on_repeat=True)
    got = torch.zeros_like(z).scatter_add(1, idx, merge_repeats(idx, pursuit_values(x, D, idx, keep)))
    torch.testing.assert_close(got, z)
    stopped = keep.sum(1) < 40
    assert stopped.all() and ((z != 0).sum(1) < keep.sum(1)).any()  # some tokens stopped on a re-selected atom
