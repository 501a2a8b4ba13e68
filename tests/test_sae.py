"""SparseAutoencoder (TopK) against a dense float64 reference, decoder hygiene, AuxK, save/load."""

import json

import pytest
import torch

from saelab.config import SAEConfig
from saelab.errors import SAEFileError
from saelab.sae import SparseAutoencoder, SparseCode, geometric_median


def make_sae(d=24, n=96, k=5, normalize="scale", **kw):
    sae = SparseAutoencoder(SAEConfig(d_in=d, n_latents=n, k=k, normalize=normalize, hook_name="blocks.1.hook_resid_post",
                                      **kw))
    sae.reset_parameters(seed=0)
    with torch.no_grad():  # non-trivial biases, so every term of the reference matters
        sae.b_enc.normal_(0, 0.1)
        sae.b_dec.normal_(0, 0.3)
    return sae


def dense_reference(sae, x):
    """The TopK SAE written densely in float64: the independent reference."""
    s = sae.cfg.input_scale if sae.cfg.normalize == "scale" else 1.0
    W_enc, b_enc, W_dec, b_dec = (p.detach().double().requires_grad_() for p in (sae.W_enc, sae.b_enc, sae.W_dec, sae.b_dec))
    xn = x.double() * s
    pre = (xn - b_dec) @ W_enc + b_enc
    idx = pre.topk(sae.cfg.k, dim=-1).indices
    z = torch.zeros_like(pre).scatter(1, idx, pre.gather(1, idx).relu())
    x_hat_n = z @ W_dec + b_dec
    return (W_enc, b_enc, W_dec, b_dec), z, x_hat_n, x_hat_n / s, xn


def test_forward_and_gradients_match_dense_reference():
    torch.manual_seed(0)
    sae = make_sae()
    x = torch.randn(64, 24) * 3 + 1
    sae.init_from_data_(x)
    params, z, x_hat_n, x_hat, xn = dense_reference(sae, x)
    out = sae(x)
    assert torch.allclose(out.x_hat.double(), x_hat, atol=1e-4)
    assert torch.equal(out.code.to_dense(96).ne(0), z.ne(0))
    assert (out.code.l0() == 5).all()  # L0 == k when enough pre-activations are positive
    ref_loss = (xn - x_hat_n).pow(2).sum(-1).mean() / sae.loss_normalizer.double()
    assert torch.allclose(out.losses["fvu"].double(), ref_loss, rtol=1e-4)
    out.losses["loss"].backward()
    ref_loss.backward()
    for p, ref in zip((sae.W_enc, sae.b_enc, sae.W_dec, sae.b_dec), params):
        assert torch.allclose(p.grad.double(), ref.grad, atol=1e-5, rtol=1e-4), p.shape


def test_w_enc_layout_is_saelens_shape_with_contiguous_latent_columns():
    sae = make_sae()
    assert sae.W_enc.shape == (24, 96) and sae.W_dec.shape == (96, 24)
    assert sae.W_enc.T.is_contiguous()
    # tied init: encoder is the decoder's transpose, decoder rows unit norm
    torch.testing.assert_close(sae.W_enc.T, sae.W_dec)
    torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.ones(96))


def test_decoder_hygiene():
    sae = make_sae()
    x = torch.randn(32, 24)
    sae(x).losses["loss"].backward()
    with torch.no_grad():
        sae.W_dec.mul_(torch.rand(96, 1) + 0.5)  # rows off unit norm: the projection divides by ‖w‖²
    g, w = sae.W_dec.grad.double(), sae.W_dec.detach().double()
    want = g - (g * w).sum(1, keepdim=True) / (w * w).sum(1, keepdim=True) * w  # by hand, in float64
    sae.remove_parallel_grad_()
    torch.testing.assert_close(sae.W_dec.grad.double(), want, atol=1e-7, rtol=1e-5)
    dots = (sae.W_dec.grad * sae.W_dec).sum(1)
    assert dots.abs().max() < 1e-6
    with torch.no_grad():
        sae.W_dec.mul_(torch.rand(96, 1) + 0.5)
    sae.normalize_decoder_()
    assert (sae.W_dec.norm(dim=1) - 1).abs().max() < 1e-6


def test_auxk_zero_without_dead_and_trains_only_dead_latents():
    torch.manual_seed(1)
    sae = make_sae(k_aux=8)
    x = torch.randn(64, 24)
    sae.init_from_data_(x)
    out = sae(x, dead_mask=torch.zeros(96, dtype=torch.bool))
    assert "auxk" not in out.losses
    dead = torch.zeros(96, dtype=torch.bool)
    dead[::3] = True
    out = sae(x, dead_mask=dead)
    assert out.losses["auxk"] > 0
    sae.zero_grad()
    out.losses["auxk"].backward()
    # the residual target is detached: only dead latents' decoder rows and encoder columns get gradient
    assert sae.W_dec.grad[~dead].abs().max() == 0
    assert sae.W_enc.grad[:, ~dead].abs().max() == 0
    assert sae.W_dec.grad[dead].abs().max() > 0


@pytest.mark.parametrize("every", [3, 1])  # 32 dead: the dense path; 96 dead with k_aux 4: the sparse kernels
def test_auxk_loss_and_gradients_match_a_dense_float64_reference(every):
    from saelab.sae import architectures

    torch.manual_seed(4)
    k_aux = 8 if every == 3 else 4
    sae = make_sae(k_aux=k_aux).double()
    x = torch.randn(64, 24, dtype=torch.float64) * 2
    sae.init_from_data_(x)
    dead = torch.zeros(96, dtype=torch.bool)
    dead[::every] = True
    assert (int(dead.sum()) <= architectures.AUXK_DENSE_RATIO * k_aux) == (every == 3)
    out = sae(x, dead_mask=dead)
    sae.zero_grad()
    out.losses["auxk"].backward()
    got = {name: p.grad.clone() for name, p in sae.named_parameters()}

    ref = {name: p.detach().clone().requires_grad_() for name, p in sae.named_parameters()}
    x_norm = sae.normalize_input(x)[0]
    x_c = x_norm - ref["b_dec"]
    pre = x_c @ ref["W_enc"] + ref["b_enc"]
    x_hat = sae.normalize_input(out.x_hat.detach())[0]  # the main reconstruction, normalised (scale mode)
    err = x_norm - x_hat  # the detached residual AuxK reconstructs
    masked = pre.masked_fill(~dead, float("-inf"))
    top = masked.topk(k_aux, dim=-1)
    z = torch.zeros_like(pre).scatter(1, top.indices, top.values.relu())
    e_hat = z @ ref["W_dec"]
    denom = (err - err.mean(0)).pow(2).sum(-1).mean()
    loss = min(int(dead.sum()) / k_aux, 1.0) * (err - e_hat).pow(2).sum(-1).mean() / denom
    loss.backward()
    torch.testing.assert_close(out.losses["auxk"], loss.detach())
    for name, p in ref.items():
        want = p.grad if p.grad is not None else torch.zeros_like(p)
        torch.testing.assert_close(got[name], want, msg=name)


def test_multi_topk_adds_a_loss():
    sae = make_sae(options={"multi_topk": True})
    out = sae(torch.randn(16, 24))
    assert "multi_topk_fvu" in out.losses
    torch.testing.assert_close(out.losses["loss"], out.losses["fvu"] + out.losses["multi_topk_fvu"] / 8)


def test_encode_decode_equals_forward_reconstruction():
    sae = make_sae()
    x = torch.randn(10, 24)
    code = sae.encode(x)
    assert isinstance(code, SparseCode) and code.k == 5
    torch.testing.assert_close(sae.decode(code), sae(x).x_hat, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="d_in"):
        sae.encode(torch.randn(3, 25))


@pytest.mark.parametrize("normalize", ["scale", "none", "layer_norm"])
def test_save_load_round_trip_on_raw_activations(tmp_path, normalize):
    torch.manual_seed(2)
    sae = make_sae(normalize=normalize)
    x = torch.randn(40, 24) * 5 + 2
    sae.init_from_data_(x)
    before = sae.decode(sae.encode(x))
    sae.save(tmp_path / "sae")
    cfg = json.loads((tmp_path / "sae" / "cfg.json").read_text())
    for key in ("architecture", "d_in", "d_sae", "hook_name", "k", "dtype", "model_name"):
        assert key in cfg
    assert cfg["d_sae"] == 96 and cfg["architecture"] == "topk"
    loaded = SparseAutoencoder.load(tmp_path / "sae")
    assert loaded.cfg.input_scale == 1.0  # the scale is folded into the weights
    torch.testing.assert_close(loaded.decode(loaded.encode(x)), before, atol=1e-4, rtol=1e-4)


def test_load_refuses_pickles(tmp_path):
    (tmp_path / "sae.pt").write_bytes(b"not loaded")
    with pytest.raises(SAEFileError, match="safetensors"):
        SparseAutoencoder.load(tmp_path)


def test_the_sae_package_imports_no_stage_above_it_and_no_cycle():
    """saelab/sae/ is a floor below training, models, activations and the evaluators: its modules import only each
    other, the kernels and the low floors (config's SAEConfig, errors, settings, distributed), and never in a cycle
    (the SAELens format gets the SAE as an argument; `SparseAutoencoder.save`/`load` call it)."""
    import ast
    from pathlib import Path

    import saelab

    floors = ("saelab.kernels", "saelab.config", "saelab.errors", "saelab.settings", "saelab.distributed")
    root = Path(saelab.__file__).parent / "sae"
    mods = {f"saelab.sae.{p.stem}" if p.stem != "__init__" else "saelab.sae": p for p in root.glob("*.py")}
    edges = {m: set() for m in mods}
    for mod, path in mods.items():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "saelab":
                names = [a.name for a in node.names]
                if node.module == "saelab":
                    assert names == ["__version__"], f"{path.name} imports {names} from saelab"
                elif node.module.startswith(floors):
                    assert not {"TrainConfig", "CacheConfig"} & set(names), f"{path.name}: {names} are a stage's"
                else:
                    assert node.module in mods, f"{path.name} imports {node.module}, a stage above saelab/sae"
                    edges[mod] |= {f"{node.module}.{n}" if f"{node.module}.{n}" in mods else node.module
                                   for n in names}
            elif isinstance(node, ast.Import):
                assert not any(a.name.startswith("saelab") for a in node.names), f"{path.name}: import saelab..."
    done, stack = set(), []

    def visit(m):  # depth-first: a module met again on the current path closes a cycle
        assert m not in stack, f"import cycle: {' -> '.join(stack[stack.index(m):] + [m])}"
        if m not in done:
            stack.append(m)
            for n in sorted(edges[m]):
                visit(n)
            stack.pop()
            done.add(m)

    for m in sorted(edges):
        visit(m)


def test_geometric_median():
    pts = torch.tensor([[1.0, 0], [-1, 0], [0, 1], [0, -1], [100, 100]])
    med = geometric_median(pts)
    assert med.norm() < 1.0  # the outlier barely moves it, unlike the mean (at norm ≈ 28)
    assert torch.allclose(geometric_median(torch.tensor([[2.0, 3.0]] * 3)), torch.tensor([2.0, 3.0]))
