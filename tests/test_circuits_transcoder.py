"""Circuits through transcoders (`saelab.eval.circuits`): a transcoder's latents are read at its input hook and write
its target hook, so its nodes live at the target: the splice replaces the target's value by the transcoder's output
plus the error e = target − output. Checked on the linear toy transformer (tests/test_patching.py) with a
skip-transcoder from block 1's MLP hidden layer (16 wide) to its output (8 wide), against a dense reference written
here: the spliced model by hand (TopK code, decoder, skip term and error as autograd leaves), its gradients with
respect to the latent values and errors; edges against a finite difference of the hand-made downstream nodes; the
faithfulness of the empty circuit against the hand-made mean-ablated model."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from saelab.config import SAEConfig
from saelab.eval import circuits, patching
from saelab.sae import SparseAutoencoder

sys.path.insert(0, str(Path(__file__).parent))
from test_patching import assert_edges_sum_to_finite_difference, linear_toy, toy_batch  # noqa: E402

IN, OUT = "blocks.1.mlp.hook_pre", "blocks.1.hook_mlp_out"  # 16 → 8 wide
N_LAT, K = 32, 4


def make_transcoder(read=IN, write=OUT, d_in=16, seed=0) -> SparseAutoencoder:
    tc = SparseAutoencoder(SAEConfig(d_in=d_in, n_latents=N_LAT, k=K, hook_name=read, target_hook=write, d_out=8,
                                     skip=True, normalize="none"))
    tc.reset_parameters(seed=seed)
    g = torch.Generator().manual_seed(seed + 10)
    with torch.no_grad():  # every part of the output counts: biases, and a skip term
        tc.b_in.copy_(0.1 * torch.randn(d_in, generator=g))
        tc.b_enc.copy_(0.1 * torch.randn(N_LAT, generator=g))
        tc.b_dec.copy_(0.1 * torch.randn(8, generator=g))
        tc.W_skip.copy_(0.2 * torch.randn(8, d_in, generator=g))
    return tc


def hand_nodes(tc, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense by hand: f = ReLU of the top-k of (x − b_in)·W_enc + b_enc; e = y − (f·W_dec + b_dec + x·W_skipᵀ)."""
    pre = (x - tc.b_in) @ tc.W_enc + tc.b_enc
    top = pre.topk(K, dim=-1)
    f = torch.zeros_like(pre).scatter(-1, top.indices, top.values.relu())
    return f, y - (f @ tc.W_dec + tc.b_dec + x @ tc.W_skip.T)


def acts_of(model, tokens, hooks):
    _, acts = patching.capture(model, tokens, hooks)
    return acts


def test_nodes_and_their_effects_equal_the_hand_made_splice():
    model, batch = linear_toy(), toy_batch()
    tc = make_transcoder()
    for p in tc.parameters():
        p.requires_grad_(False)
    out = circuits.feature_attribution(model, batch, [tc], ig_steps=2)
    (nodes,) = out["nodes"]
    assert (nodes.hook, nodes.read, nodes.D.shape) == (OUT, IN, (N_LAT, 8))
    # the nodes are the hand-made ones; with the skip term they rebuild the target exactly
    clean, corrupt = acts_of(model, batch.clean, [IN, OUT]), acts_of(model, batch.corrupted, [IN, OUT])
    with torch.no_grad():
        f_c, e_c = hand_nodes(tc, clean[IN], clean[OUT])
        f_r, e_r = hand_nodes(tc, corrupt[IN], corrupt[OUT])
    for got, want in ((nodes.f_clean, f_c), (nodes.f_corrupt, f_r), (nodes.e_clean, e_c), (nodes.e_corrupt, e_r)):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(nodes.bias, tc.b_dec, rtol=0, atol=1e-7)
    torch.testing.assert_close(nodes.bias + f_c @ nodes.D + clean[IN] @ tc.W_skip.T + nodes.e_clean, clean[OUT],
                               rtol=1e-5, atol=1e-5)
    assert (f_c != f_r).any() and (e_c - e_r).abs().max() > 1e-3  # latents and errors both change

    # the reference: the spliced model by hand, latent values and errors as leaves at the corrupted run
    base = patching.baseline(model, batch)
    f_leaf, e_leaf = f_r.clone().requires_grad_(True), e_r.clone().requires_grad_(True)
    box = {}

    def keep_input(act, hook):
        box["x"] = act
        return act

    def splice(act, hook):
        return f_leaf @ tc.W_dec + tc.b_dec + box["x"] @ tc.W_skip.T + e_leaf

    with torch.enable_grad():
        logits = model.run_with_hooks(batch.corrupted, fwd_hooks=[(IN, keep_input), (OUT, splice)])
        g_f, g_e = torch.autograd.grad(base.normalise(patching.mean_ld(logits, batch)).sum(), [f_leaf, e_leaf])
    lat_ref, err_ref = ((f_c - f_r) * g_f).sum(0), ((e_c - e_r) * g_e).sum((0, 2))
    lat, err = out["estimates"]["attribution"][0]
    torch.testing.assert_close(lat, lat_ref, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(err, err_ref, rtol=1e-4, atol=1e-6)
    assert lat.abs().max() > 1e-3 and err.abs().max() > 1e-3
    # the toy is linear: every estimator equals activation patching of each node at the target hook
    (truth,) = out["truth"]
    assert truth["latents"].shape[0] > 10 and truth["errors"].numel() >= 1
    for method in ("attribution", "relp", "ig"):
        lat, err = out["estimates"][method][0]
        torch.testing.assert_close(lat[truth["latents"][:, 0], truth["latents"][:, 1]], truth["ap_latents"],
                                   rtol=1e-3, atol=1e-4)
        torch.testing.assert_close(err[truth["errors"]], truth["ap_errors"], rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("where", ["down", "up"])
def test_edges_through_a_transcoder_sum_to_a_finite_difference(where):
    """Σ over the upstream nodes of IE(u→d) = ∇_d m · (∂d/∂x_up)·Δx_up, x_up where the upstream latents write (a
    transcoder's target) and d a downstream node made by hand (a transcoder's latents from its input hook, its error
    from both hooks), by a finite difference along Δx_up."""
    model, batch = linear_toy(), toy_batch()
    if where == "down":  # an SAE on block 1's residual input, then the transcoder of block 1's MLP
        up_sae = SparseAutoencoder(SAEConfig(d_in=8, n_latents=16, k=4, hook_name="blocks.1.hook_resid_pre"))
        up_sae.reset_parameters(seed=1)
        saes = [up_sae, make_transcoder()]
    else:  # the transcoder of block 0's MLP, then an SAE on block 1's MLP output
        down_sae = SparseAutoencoder(SAEConfig(d_in=8, n_latents=16, k=4, hook_name=OUT))
        down_sae.reset_parameters(seed=1)
        saes = [make_transcoder("blocks.0.mlp.hook_pre", "blocks.0.hook_mlp_out"), down_sae]
    for s in saes:
        for p in s.parameters():
            p.requires_grad_(False)
    base = patching.baseline(model, batch)
    up, down = circuits.sae_nodes(model, batch, saes)
    L = batch.length
    up_nodes = [(t, i) for t in range(L) for i in range(up.n_latents)] + [(t, -1) for t in range(L)]
    active = [(t, j) for t, j in down.f_corrupt[0].nonzero().tolist() if t == L - 1][:3]
    assert len(active) == 3
    down_nodes = [(int(t), int(j)) for t, j in active] + [(L - 1, -1)]
    E = circuits.edges(model, batch, up, down, down_nodes, up_nodes, base)

    coef, _, _ = patching.hook_coefficients(model, batch, [down.hook], base, "attribution")
    c = coef[down.hook]
    x_r = acts_of(model, batch.corrupted, [up.hook])[up.hook]
    dx = (up.f_clean - up.f_corrupt) @ up.D + (up.e_clean - up.e_corrupt)

    def down_nodes_at(x):
        box = {}

        def keep(a, hook):
            box[hook.name] = a
            return a

        with torch.no_grad():
            model.run_with_hooks(batch.corrupted, fwd_hooks=[(up.hook, lambda a, hook: x), (down.read, keep),
                                                              (down.hook, keep)])
            if where == "down":
                return hand_nodes(down.sae, box[IN], box[OUT])
            f = down.sae.encode(box[OUT].reshape(-1, 8)).to_dense(16).view(*box[OUT].shape[:2], -1)
            return f, box[OUT] - (f @ down.sae.W_dec + down.sae.b_dec)

    assert_edges_sum_to_finite_difference(E, down_nodes, c, down.D, down_nodes_at, x_r, dx)
    assert E[:-1].sum(1).abs().max() > 1e-3 and E[-1].abs().max() > 1e-4  # latents' and error's edges to check


def test_faithfulness_of_nothing_is_the_hand_made_mean_ablation():
    model, batch = linear_toy(), toy_batch()
    tc = make_transcoder()
    nodes = circuits.sae_nodes(model, batch, [tc])
    L = batch.length
    scores = [(torch.rand(L, N_LAT) + 0.1, torch.rand(L) + 0.1)]
    curve = circuits.faithfulness_curve(model, batch, nodes, scores, sizes=[0, 7, L * (N_LAT + 1)])
    assert curve["faithfulness"] == pytest.approx([0.0, curve["faithfulness"][1], 1.0], abs=1e-5)
    assert curve["completeness"] == pytest.approx([1.0, curve["completeness"][1], 0.0], abs=1e-5)
    # m(∅) by hand: the target ← b_dec + W_skip·x (live) + mean latents · W_dec + mean error; m(M) the model
    clean, corrupt = acts_of(model, batch.clean, [IN, OUT]), acts_of(model, batch.corrupted, [IN, OUT])
    with torch.no_grad():
        f_c, e_c = hand_nodes(tc, clean[IN], clean[OUT])
        f_r, e_r = hand_nodes(tc, corrupt[IN], corrupt[OUT])
        f_mean, e_mean = torch.cat([f_c, f_r]).mean(0), torch.cat([e_c, e_r]).mean(0)
        box = {}

        def keep_input(act, hook):
            box["x"] = act
            return act

        def ablated(act, hook):
            return tc.b_dec + box["x"] @ tc.W_skip.T + f_mean @ tc.W_dec + e_mean

        lds = [patching.mean_ld(model.run_with_hooks(batch.clean, fwd_hooks=hooks), batch)
               for hooks in ([], [(IN, keep_input), (OUT, ablated)])]
    assert curve["m_full"] == pytest.approx(float(lds[0]), rel=1e-5)
    assert curve["m_empty"] == pytest.approx(float(lds[1]), rel=1e-5, abs=1e-6)
    assert abs(curve["m_full"] - curve["m_empty"]) > 1e-2


@pytest.mark.slow
def test_cli_patch_with_a_skip_transcoder_and_an_sae(tmp_path):
    """`saelab patch` on the reference model with a skip-transcoder of block 1's MLP and an SAE downstream of it:
    the transcoder's nodes are reported at its target hook, the splices keep the model's metric, attribution agrees
    with activation patching, edges connect the two."""
    import json

    from saelab.cli import main

    tc = SparseAutoencoder(SAEConfig(d_in=256, n_latents=256, k=8, hook_name="blocks.1.mlp.hook_in", d_out=256,
                                     target_hook="blocks.1.hook_mlp_out", skip=True, model_name="reference"))
    tc.reset_parameters(seed=0)
    with torch.no_grad():
        tc.W_skip.normal_(0, 0.02, generator=torch.Generator().manual_seed(1))
    tc.save(tmp_path / "tc")
    sae = SparseAutoencoder(SAEConfig(d_in=256, n_latents=256, k=8, hook_name="blocks.2.hook_resid_pre"))
    sae.reset_parameters(seed=0)
    sae.save(tmp_path / "sae")
    out = tmp_path / "out"
    assert main(["patch", "--task", "bracket", "--pairs", "4", "--sae", str(tmp_path / "tc"), "--sae",
                 str(tmp_path / "sae"), "--method", "activation,attribution,relp", "--circuit-method", "relp",
                 "--out", str(out), "--no-progress"]) == 0
    full = json.loads((out / "patching-bracket.json").read_text())
    report = full["sae"]
    assert report["hooks"] == ["blocks.1.hook_mlp_out", "blocks.2.hook_resid_pre"]
    # every node kept: the splices (a transcoder's output + its error at the target) leave the model as it is
    assert report["circuit"]["m_full"] == pytest.approx(full["baseline"]["ld_clean"], rel=1e-4)
    assert report["correlation"]["attribution"]["sae_latents"] > 0.9
    (edges,) = report["edges"]
    assert edges["upstream"] == "blocks.1.hook_mlp_out" and any(v != 0 for row in edges["effects"] for v in row)
