"""Sparse kernels: both paths (PyTorch, Triton) against a dense float64 reference, values and every gradient.

Without a GPU the Triton kernels run under the Triton interpreter (TRITON_INTERPRET=1, set below before anything
imports triton's kernels), on small shapes; with a GPU they are compiled and run on CUDA tensors.
"""

import os
import subprocess
import sys

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # must precede the first import of saelab.kernels.triton_kernels

import pytest  # noqa: E402

import saelab.kernels as K  # noqa: E402
from saelab.errors import ConfigError  # noqa: E402
from saelab.kernels import backend as kb  # noqa: E402
from saelab.sae.code import SparseCode  # noqa: E402

# (B, k, n, d): odd widths, k = 1, k > 512 (n ≥ 1024, small B; ~5 s a test under the Triton interpreter: slow), a row
# longer than one column block (1500)
SHAPES = [(7, 1, 16, 37), (16, 8, 50, 100), (32, 32, 256, 64), pytest.param((5, 600, 1024, 20), marks=pytest.mark.slow),
          (3, 4, 32, 1500)]


def triton_ready() -> str | None:
    """None when the Triton path can run here, else why not."""
    if not kb.triton_available():
        return "triton is not installed"
    if torch.cuda.is_available():
        return None
    from saelab.kernels import triton_kernels

    if not triton_kernels.INTERPRETED:
        return "triton kernels were imported before TRITON_INTERPRET=1 was set in this process"
    return None


@pytest.fixture(params=["torch", "triton"])
def backend(request, monkeypatch):
    if request.param == "triton" and (why := triton_ready()):
        pytest.skip(why)
    monkeypatch.setenv(kb.ENV_VAR, request.param)
    dev = "cuda" if request.param == "triton" and torch.cuda.is_available() else "cpu"
    return request.param, dev


def random_code(B, k, n, dtype, dev, seed=0):
    """Random code with the awkward cases: a repeated index in a row, zero values, zero padding at the tail."""
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, n, (B, k), generator=g)
    val = torch.randn(B, k, generator=g)
    if k >= 2:
        idx[0, 1] = idx[0, 0]  # repeated latent within a token
        idx[1 % B, :] = idx[1 % B, 0]  # a whole token on one latent
    if k >= 3:
        val[:, -1] = 0.0  # padding of a variable-k code (value 0, arbitrary valid index)
        val[B // 2, :] = 0.0  # an empty token
    idx[:, 0] = idx[0, 0] if B > 2 else idx[:, 0]  # one hot latent shared by every token
    return idx.to(dev), val.to(dev, dtype)


def _tol(dtype):
    return {torch.float64: 1e-9, torch.float32: 2e-5, torch.bfloat16: 3e-2, torch.float16: 5e-3}[dtype]


def _close(got, want, dtype, what):
    """Max error relative to the reference's largest entry (per-element relative error is meaningless at 0)."""
    assert got.shape == want.shape, f"{what}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    scale = max(want.abs().max().item(), 1.0)
    err = (got.double().cpu() - want.double().cpu()).abs().max().item() / scale
    assert err <= _tol(dtype), f"{what}: max error {err:.3g} (relative to {scale:.3g}) > {_tol(dtype)}"


def decode_reference(idx, val, W, g):
    v = val.detach().cpu().double().requires_grad_()
    w = W.detach().cpu().double().requires_grad_()
    out = SparseCode(idx.cpu(), v).to_dense(w.shape[0]) @ w
    out.backward(g.cpu().double())
    return out.detach(), v.grad, w.grad


def _encoder_reference(x, W, b, idx, g):
    xs, ws, bs = (t.detach().cpu().double().requires_grad_() for t in (x, W, b))
    pre = (xs @ ws + bs).gather(1, idx.cpu())
    pre.relu().backward(g.cpu().double())
    return pre.detach(), xs.grad, ws.grad, bs.grad


# ------------------------------------------------------------------------------------------------ decoder
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}-k{}-n{}-d{}".format(*s))
def test_sparse_decode_matches_dense(backend, shape):
    name, dev = backend
    B, k, n, d = shape
    idx, val = random_code(B, k, n, torch.float32, dev)
    val.requires_grad_()
    W = torch.randn(n, d, device=dev, requires_grad=True)
    g = torch.randn(B, d, device=dev)
    assert K.backend_for(idx, val, W) == name
    out = K.sparse_decode(idx, val, W)
    out.backward(g)
    ref, ref_dv, ref_dW = decode_reference(idx, val, W, g)
    _close(out, ref, torch.float32, "out")
    _close(val.grad, ref_dv, torch.float32, "d_values")
    _close(W.grad, ref_dW, torch.float32, "dW_dec")
    assert W.grad.shape == (n, d) and W.grad.layout == torch.strided  # dense, zero rows for unused latents
    unused = torch.ones(n, dtype=torch.bool)
    unused[idx.cpu().reshape(-1)] = False
    assert (W.grad.cpu()[unused] == 0).all()


def test_decode_takes_a_sparse_code(backend):
    _, dev = backend
    idx, val = random_code(6, 3, 20, torch.float32, dev)
    W = torch.randn(20, 9, device=dev)
    torch.testing.assert_close(K.decode(SparseCode(idx, val), W), K.sparse_decode(idx, val, W))


def test_decode_grad_only_where_needed(backend):
    """Values without grad (e.g. a detached code) or a frozen W_dec: the other gradient still comes out right."""
    _, dev = backend
    idx, val = random_code(8, 4, 30, torch.float32, dev)
    W = torch.randn(30, 13, device=dev)
    g = torch.randn(8, 13, device=dev)
    _, ref_dv, ref_dW = decode_reference(idx, val, W, g)
    W1 = W.clone().requires_grad_()
    K.sparse_decode(idx, val, W1).backward(g)
    _close(W1.grad, ref_dW, torch.float32, "dW_dec only")
    v2 = val.clone().requires_grad_()
    K.sparse_decode(idx, v2, W).backward(g)
    _close(v2.grad, ref_dv, torch.float32, "d_values only")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decode_dtypes(backend, dtype):
    """Output and dW_dec in the weight dtype, d_values in the values' dtype; bf16 within a loose tolerance."""
    _, dev = backend
    B, k, n, d = 24, 16, 64, 100
    idx, val = random_code(B, k, n, dtype, dev)
    val.requires_grad_()
    W = torch.randn(n, d, device=dev, dtype=dtype, requires_grad=True)
    g = torch.randn(B, d, device=dev, dtype=dtype)
    out = K.sparse_decode(idx, val, W)
    out.backward(g)
    assert out.dtype == W.grad.dtype == val.grad.dtype == dtype
    ref, ref_dv, ref_dW = decode_reference(idx, val, W, g)
    _close(out, ref, dtype, "out")
    _close(val.grad, ref_dv, dtype, "d_values")
    _close(W.grad, ref_dW, dtype, "dW_dec")


def test_decode_mixed_dtypes(backend):
    """float32 values with a bf16 decoder: bf16 output and dW, float32 d_values."""
    _, dev = backend
    idx, val = random_code(10, 6, 40, torch.float32, dev)
    val.requires_grad_()
    W = torch.randn(40, 24, device=dev, dtype=torch.bfloat16, requires_grad=True)
    g = torch.randn(10, 24, device=dev, dtype=torch.bfloat16)
    out = K.sparse_decode(idx, val, W)
    out.backward(g)
    assert out.dtype == W.grad.dtype == torch.bfloat16 and val.grad.dtype == torch.float32
    ref, ref_dv, ref_dW = decode_reference(idx, val, W, g)
    _close(out, ref, torch.bfloat16, "out")
    _close(val.grad, ref_dv, torch.bfloat16, "d_values")
    _close(W.grad, ref_dW, torch.bfloat16, "dW_dec")


# ------------------------------------------------------------------------------------------------ encoder
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}-k{}-n{}-d{}".format(*s))
def test_encoder_values_matches_dense(backend, shape):
    _, dev = backend
    B, k, n, d = shape
    idx, _ = random_code(B, k, n, torch.float32, dev)
    x = torch.randn(B, d, device=dev, requires_grad=True)
    W_enc = torch.nn.Parameter(torch.randn(n, d, device=dev).T)  # the SAE's column-major layout
    b_enc = torch.nn.Parameter(torch.randn(n, device=dev))
    with torch.no_grad():
        pre = (x @ W_enc + b_enc).gather(1, idx)
    out = K.encoder_values(x, W_enc, b_enc, idx, pre)
    g = torch.randn(B, k, device=dev)
    out.relu().backward(g)  # the caller's ReLU masks g before the sparse backward
    ref, ref_gx, ref_gW, ref_gb = _encoder_reference(x, W_enc, b_enc, idx, g)
    _close(out, ref, torch.float32, "values")
    _close(x.grad, ref_gx, torch.float32, "grad_x")
    _close(W_enc.grad, ref_gW, torch.float32, "grad_W_enc")
    _close(b_enc.grad, ref_gb, torch.float32, "grad_b_enc")
    assert W_enc.grad.stride() == W_enc.stride()  # same column-major layout as the parameter


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_encoder_dtypes_and_partial_grads(backend, dtype):
    """bf16 within a loose tolerance; a detached x / no bias / row-major W_enc also work."""
    _, dev = backend
    B, k, n, d = 12, 5, 40, 37
    idx, _ = random_code(B, k, n, torch.float32, dev)
    x = torch.randn(B, d, device=dev, dtype=dtype)
    W_enc = torch.randn(d, n, device=dev, dtype=dtype, requires_grad=True)  # row-major: copied, still right
    b = torch.zeros(n, device=dev, dtype=dtype)
    with torch.no_grad():
        pre = (x @ W_enc).gather(1, idx)
    out = K.encoder_values(x, W_enc, None, idx, pre)
    assert out.dtype == dtype
    g = torch.randn(B, k, device=dev, dtype=dtype)
    out.relu().backward(g)
    _, ref_gx, ref_gW, _ = _encoder_reference(x, W_enc, b, idx, g)
    assert W_enc.grad.dtype == dtype
    _close(W_enc.grad, ref_gW, dtype, "grad_W_enc")
    x.requires_grad_()  # grad_x through a row-major W_enc (its transpose is not row-contiguous)
    K.encoder_values(x, W_enc.detach(), None, idx, pre).relu().backward(g)
    assert x.grad.dtype == dtype
    _close(x.grad, ref_gx, dtype, "grad_x")


def test_sae_style_step_shares_the_sort(backend):
    """Decoder and encoder backward of one code (as in SparseAutoencoder.forward), then a second code."""
    _, dev = backend
    B, k, n, d = 16, 6, 48, 20
    x = torch.randn(B, d, device=dev, requires_grad=True)
    W_enc = torch.nn.Parameter(torch.randn(n, d, device=dev).T)
    b_enc = torch.nn.Parameter(torch.zeros(n, device=dev))
    W_dec = torch.nn.Parameter(torch.randn(n, d, device=dev))

    def loss_fn(enc, dec, W_e, b_e, W_d, xx):
        with torch.no_grad():
            pre = xx @ W_e + b_e
        idx = pre.topk(k, dim=-1).indices
        vals = enc(xx, W_e, b_e, idx, pre.gather(1, idx)).relu()
        return (dec(idx, vals, W_d) - xx).pow(2).sum()

    loss_fn(K.encoder_values, K.sparse_decode, W_enc, b_enc, W_dec, x).backward()
    params = [t.detach().cpu().double().requires_grad_() for t in (W_enc, b_enc, W_dec, x)]

    def dense_enc(xx, W_e, b_e, idx, _):
        return (xx @ W_e + b_e).gather(1, idx)

    def dense_dec(idx, vals, W_d):
        return SparseCode(idx, vals).to_dense(W_d.shape[0]) @ W_d

    loss_fn(dense_enc, dense_dec, *params).backward()
    for got, want, what in zip((W_enc.grad, b_enc.grad, W_dec.grad, x.grad), params, ("W_enc", "b_enc", "W_dec", "x")):
        _close(got, want.grad, torch.float32, what)


# ------------------------------------------------------------------------------------------------ core op
@pytest.mark.parametrize("shape", SHAPES[:4], ids=lambda s: "B{}-k{}-n{}-d{}".format(*s))
def test_sparse_transpose_matmul(backend, shape):
    _, dev = backend
    B, k, n, d = shape
    idx, w = random_code(B, k, n, torch.float32, dev)
    dense = torch.randn(B, d, device=dev)
    out = K.sparse_transpose_matmul(idx, w, dense, n)
    want = SparseCode(idx.cpu(), w.cpu().double()).to_dense(n).T @ dense.cpu().double()
    _close(out, want, torch.float32, "sparse_transpose_matmul")


def test_sort_cache_follows_in_place_changes(backend):
    _, dev = backend
    idx, w = random_code(8, 4, 16, torch.float32, dev)
    dense = torch.randn(8, 5, device=dev)
    K.sparse_transpose_matmul(idx, w, dense, 16)
    idx[:, 1] = (idx[:, 1] + 3) % 16  # same tensor object, new version: a stale sort would give wrong rows
    want = SparseCode(idx.cpu(), w.cpu().double()).to_dense(16).T @ dense.cpu().double()
    _close(K.sparse_transpose_matmul(idx, w, dense, 16), want, torch.float32, "after in-place change")


def test_empty_and_degenerate(backend):
    _, dev = backend
    W = torch.randn(10, 7, device=dev, requires_grad=True)
    v = torch.zeros(0, 3, device=dev, requires_grad=True)
    out = K.sparse_decode(torch.zeros(0, 3, dtype=torch.long, device=dev), v, W)
    assert out.shape == (0, 7)
    out.sum().backward()
    assert (W.grad == 0).all()
    out = K.sparse_decode(torch.zeros(4, 0, dtype=torch.long, device=dev), torch.zeros(4, 0, device=dev), W)
    assert out.shape == (4, 7) and (out == 0).all()


# ------------------------------------------------------------------------------------------------ Triton specifics
def test_triton_unfused_long_rows(monkeypatch):
    """Rows too long for the fused owner kernel: dW by the owner kernel over column blocks, d_values separately."""
    if why := triton_ready():
        pytest.skip(why)
    from saelab.kernels import triton_ops

    monkeypatch.setenv(kb.ENV_VAR, "triton")
    monkeypatch.setattr(triton_ops, "MAX_FUSED_D", 64)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    for B, k, n, d in [(6, 5, 24, 100), (3, 4, 32, 1500)]:
        idx, val = random_code(B, k, n, torch.float32, dev)
        val.requires_grad_()
        W = torch.randn(n, d, device=dev, requires_grad=True)
        g = torch.randn(B, d, device=dev)
        K.sparse_decode(idx, val, W).backward(g)
        _, ref_dv, ref_dW = decode_reference(idx, val, W, g)
        _close(val.grad, ref_dv, torch.float32, f"d_values d={d}")
        _close(W.grad, ref_dW, torch.float32, f"dW_dec d={d}")


def test_triton_deterministic_mode(monkeypatch):
    """Under torch.use_deterministic_algorithms the reverse map is a stable argsort: same bits every run."""
    if why := triton_ready():
        pytest.skip(why)
    monkeypatch.setenv(kb.ENV_VAR, "triton")
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    idx, val = random_code(20, 8, 12, torch.float32, dev)  # few latents: long occurrence lists
    W = torch.randn(12, 33, device=dev)
    g = torch.randn(20, 33, device=dev)
    was = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        grads = []
        for _ in range(2):
            v, w = val.clone().requires_grad_(), W.clone().requires_grad_()
            K.sparse_decode(idx.clone(), v, w).backward(g)  # a fresh indices tensor: no cached sort
            grads.append((v.grad, w.grad))
    finally:
        torch.use_deterministic_algorithms(was)
    assert torch.equal(grads[0][0], grads[1][0]) and torch.equal(grads[0][1], grads[1][1])
    _, ref_dv, ref_dW = decode_reference(idx, val, W, g)
    _close(grads[0][1], ref_dW, torch.float32, "dW_dec")


@pytest.mark.slow
def test_triton_kernels_compile_for_gpus():
    """Every kernel variant lowers to a cubin for sm_80 and sm_90 (no GPU needed), with no register spills."""
    if not kb.triton_available():
        pytest.skip("triton is not installed")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run([sys.executable, "-m", "saelab.kernels.compile_check", "80", "90"], env=env,
                         capture_output=True, text=True, timeout=600)
    if res.returncode != 0 and "ptxas" in res.stderr and "not found" in res.stderr.lower():
        pytest.skip("triton's ptxas is unavailable")
    assert res.returncode == 0, res.stderr[-3000:]
    lines = res.stdout.strip().splitlines()
    assert len(lines) >= 40
    assert not [ln for ln in lines if "LOCAL:" in ln and "LOCAL:0" not in ln], res.stdout
    stream = [ln for ln in lines if "stream_topk_kernel" in ln]  # the fused top-k: 5 variants per arch, no spills
    assert len(stream) == 10 and all("STACK:0 " in ln for ln in stream if "STACK:" in ln), "\n".join(stream)


# ------------------------------------------------------------------------------------------------ selection & API
def test_backend_selection(monkeypatch):
    cpu = torch.zeros(2, 2)
    monkeypatch.delenv(kb.ENV_VAR, raising=False)
    assert K.backend_for(cpu) == "torch"
    monkeypatch.setenv(kb.ENV_VAR, "torch")
    assert K.backend_for(cpu) == "torch"
    monkeypatch.setenv(kb.ENV_VAR, "cuda-please")
    with pytest.raises(ValueError, match="SAELAB_KERNELS"):
        K.backend_for(cpu)
    if kb.triton_available():
        from saelab.kernels import triton_kernels

        monkeypatch.setenv(kb.ENV_VAR, "triton")
        monkeypatch.setattr(triton_kernels, "INTERPRETED", False)
        with pytest.raises(ConfigError, match="interpreter"):
            K.backend_for(cpu)


def test_input_validation():
    W = torch.randn(10, 4)
    with pytest.raises(ValueError, match=r"\[B, k\]"):
        K.sparse_decode(torch.zeros(3, 2, dtype=torch.long), torch.zeros(3, 3), W)
    with pytest.raises(TypeError, match="integer"):
        K.sparse_decode(torch.zeros(3, 2), torch.zeros(3, 2), W)
    with pytest.raises(ValueError, match="x"):
        K.encoder_values(torch.zeros(3, 5), W.T, None, torch.zeros(3, 2, dtype=torch.long), torch.zeros(3, 2))


def test_torch_public_fallback(monkeypatch):
    """The torch path without the private aten ops or COO (as on a GPU without Triton): autograd through
    F.embedding_bag gives the same gradients."""
    from saelab.kernels import torch_ops

    monkeypatch.setenv(kb.ENV_VAR, "torch")
    monkeypatch.setattr(torch_ops, "_HAS_PRIVATE", False)
    monkeypatch.setattr(torch_ops, "COO_MAX_D", 0)
    B, k, n, d = 9, 4, 30, 11
    idx, val = random_code(B, k, n, torch.float32, "cpu")
    val.requires_grad_()
    W = torch.randn(n, d, requires_grad=True)
    g = torch.randn(B, d)
    K.sparse_decode(idx, val, W).backward(g)
    _, ref_dv, ref_dW = decode_reference(idx, val, W, g)
    _close(val.grad, ref_dv, torch.float32, "d_values")
    _close(W.grad, ref_dW, torch.float32, "dW_dec")


def test_torch_path_gradcheck(monkeypatch):
    monkeypatch.setenv(kb.ENV_VAR, "torch")
    idx, val = random_code(5, 3, 9, torch.float64, "cpu")
    W = torch.randn(9, 4, dtype=torch.float64)
    assert torch.autograd.gradcheck(K.sparse_decode, (idx, val.requires_grad_(), W.requires_grad_()))
    x = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    W_enc = torch.randn(9, 4, dtype=torch.float64).T.requires_grad_()
    b = torch.randn(9, dtype=torch.float64, requires_grad=True)

    def enc(x, W_enc, b):  # values recomputed from the inputs, so gradcheck's perturbations see the function
        return K.encoder_values(x, W_enc, b, idx, (x @ W_enc + b).gather(1, idx).detach())

    assert torch.autograd.gradcheck(enc, (x, W_enc, b))


def test_grouped_decode_matches_dense_per_group(backend):
    """Matryoshka's one-pass decode, both paths: per-(token, group) sums and both gradients."""
    _, dev = backend
    torch.manual_seed(0)
    B, slots, n, d, G = 11, 7, 60, 37, 3
    idx = torch.randint(0, n, (B, slots)).sort(1).values
    vals = torch.randn(B, slots)
    vals[4, 5:] = 0  # padding at the end of a row
    bounds = torch.tensor([8, 30, n])
    groups = torch.cummax(torch.bucketize(idx, bounds, right=True), 1).values
    W = torch.randn(n, d, dtype=torch.float64)
    g = torch.randn(B, G, d, dtype=torch.float64)
    v = vals.clone().to(dev).requires_grad_()
    Wt = W.float().to(dev).requires_grad_()
    out = K.grouped_decode(idx.to(dev), v, Wt, groups.to(dev), G)
    (out * g.float().to(dev)).sum().backward()
    Wr, vr = W.clone().requires_grad_(), vals.detach().double().requires_grad_()
    dense = torch.zeros(B, n, dtype=torch.float64).scatter_add(1, idx, vr)
    lo, refs = 0, []
    for hi in bounds.tolist():
        refs.append(dense[:, lo:hi] @ Wr[lo:hi])
        lo = hi
    ref = torch.stack(refs, 1)
    (ref * g).sum().backward()
    _close(out, ref, torch.float32, "grouped out")
    _close(v.grad, vr.grad, torch.float32, "grouped d_values")
    _close(Wt.grad, Wr.grad, torch.float32, "grouped dW")


@pytest.mark.parametrize("arch", ["batchtopk", "matryoshka", "gtopk", "mp", "mutual", "feature_choice"])
def test_architecture_step_same_on_both_paths(arch, monkeypatch):
    """A whole training step of each architecture gives the same loss and gradients on the Triton path as on the
    PyTorch path (the Triton kernels under the interpreter on CPU)."""
    if why := triton_ready():
        pytest.skip(why)
    from saelab.config import SAEConfig
    from saelab.sae import SparseAutoencoder

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    x, gr = torch.randn(48, 20, device=dev) * 2, torch.randn(48, 20, device=dev)
    dead = torch.zeros(64, dtype=torch.bool, device=dev)
    dead[::7] = True
    results = {}
    for path in ("torch", "triton"):
        monkeypatch.setenv(kb.ENV_VAR, path)
        sae = SparseAutoencoder(SAEConfig(architecture=arch, d_in=20, n_latents=64, k=3, hook_name="h", k_aux=4),
                                device=dev)
        sae.reset_parameters(seed=0)
        sae.init_from_data_(x)
        out = sae(x, grad=gr, dead_mask=dead)
        out.losses["loss"].backward()
        # MP's tied encoder (W_enc, b_enc) takes no gradient
        results[path] = (out.losses["loss"].detach(), [p.grad for p in sae.parameters()])
    torch.testing.assert_close(results["triton"][0], results["torch"][0], atol=1e-5, rtol=1e-5)
    assert sum(g is not None for g in results["torch"][1]) >= 2
    for a, b in zip(results["triton"][1], results["torch"][1]):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
