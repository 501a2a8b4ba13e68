"""The fused Triton streaming top-k (saelab.kernels.triton_topk_stream) against dense references: torch.topk of the
full pre-activation matrix, and a stable sort of it (the tie rule: among equal keys the lowest latent wins).

Without a GPU the kernel runs under the Triton interpreter (TRITON_INTERPRET=1, set before anything imports the
kernels), on small ragged shapes: B, n and d not multiples of the tiles, several latent splits, k up to 128. Inputs
are small integers, so every GEMM summation order gives the same pre-activations and ties are plentiful: the
selection must then equal the reference exactly. One case with random floats checks values to float tolerance.
"""

import os
import sys

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # must precede the first import of saelab.kernels.triton_kernels

import pytest  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))
from test_kernels import triton_ready  # noqa: E402

from saelab.kernels import backend as kb  # noqa: E402
from saelab.kernels.topk_stream import abs_key, relu_key, streaming_topk  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"
KEY_FNS = {"pre": lambda p: p, "relu": lambda p: p.clamp_min(0), "abs": lambda p: p.abs()}


@pytest.fixture(scope="module")
def tk():
    if why := triton_ready():
        pytest.skip(why)
    from saelab.kernels import triton_topk_stream

    return triton_topk_stream


def integer_problem(B, n, d, dtype, seed=0, row_major=False):
    """x [B, d], W_enc [d, n] (column-major as the SAE stores it, or row-major), b [n]: integers in [-3, 3], plus an
    all-zero token (its pre-activations are the biases, full of ties) and two identical latents."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(-3, 4, (B, d), generator=g).float()
    W = torch.randint(-3, 4, (n, d), generator=g).float()
    b = torch.randint(-3, 4, (n,), generator=g).float()
    x[B // 2] = 0
    W[n - 1], b[n - 1] = W[1], b[1]
    W_enc = W.T.contiguous() if row_major else W.T
    return x.to(DEV, dtype), W_enc.to(DEV, dtype), b.to(DEV, dtype)


def dense_pre(x, W, b, columns=None):
    """The exact pre-activations (float64 of integer inputs), rounded once to the inputs' dtype as addmm does."""
    W, b = (W, b) if columns is None else (W[:, columns], b[columns])
    return torch.addmm(b.double(), x.double(), W.double()).to(b.dtype)


def reference(pre, k, key="pre"):
    """(values, indices) best first by (key descending, index ascending): a stable sort of the dense keys."""
    order = KEY_FNS[key](pre.double()).sort(dim=1, descending=True, stable=True).indices[:, :k]
    return pre.gather(1, order), order


CASES = {  # B, n, d, k, dtype, key, columns, splits
    "ragged-3-splits": (37, 300, 40, 5, torch.float32, "pre", False, 3),
    "relu-auto-splits": (20, 257, 33, 16, torch.float32, "relu", False, None),
    "abs-bf16-columns": (19, 200, 20, 7, torch.bfloat16, "abs", True, 2),
    "k-equals-n": (5, 64, 16, 64, torch.float32, "pre", False, 1),
    "k128-fp16-remainder-split": (9, 300, 40, 128, torch.float16, "pre", False, 3),
}


@pytest.mark.parametrize("case", CASES, ids=list(CASES))
def test_fused_topk_equals_dense_reference(tk, case):
    B, n, d, k, dtype, key, use_columns, splits = CASES[case]
    x, W, b = integer_problem(B, n, d, dtype)
    columns = torch.randperm(n, generator=torch.Generator().manual_seed(1))[: n * 2 // 3].to(DEV) \
        if use_columns else None
    got_v, got_i = tk.fused_topk(x, W, b, k, key, columns, splits=splits)
    pre = dense_pre(x, W, b, columns)
    want_v, want_i = reference(pre, k, key)
    assert got_i.dtype == torch.long and got_v.dtype == dtype
    assert torch.equal(got_i, want_i)
    assert torch.equal(got_v, want_v)
    # and torch.topk of the whole matrix picks the same keys (its indices may differ only among tied keys)
    keys = KEY_FNS[key](pre.double())
    top = keys.topk(k, dim=1).values
    assert torch.equal(KEY_FNS[key](got_v.double()), top)
    s = keys.sort(dim=1, descending=True).values
    untied = s[:, k - 1] > s[:, k] if k < s.shape[1] else torch.ones(B, dtype=torch.bool, device=s.device)
    assert int(untied.sum()) > 0 and int((~untied).sum()) > 0 or k == s.shape[1]  # both kinds of row are tested
    assert torch.equal(keys.topk(k, dim=1).indices.sort(1).values[untied], got_i.sort(1).values[untied])


def test_ties_go_to_the_lowest_index(tk):
    """Rows whose pre-activations are all equal (zero tokens, one bias) or have equal latents across splits."""
    x, W, b = integer_problem(33, 200, 24, torch.float32)
    b = torch.full_like(b, 2.0)
    x[:4] = 0  # every latent of these rows ties at 2
    v, i = tk.fused_topk(x, W, b, 9, splits=4)
    assert i[:4].tolist() == [list(range(9))] * 4 and bool((v[:4] == 2).all())
    want_v, want_i = reference(dense_pre(x, W, b), 9)
    assert torch.equal(i, want_i) and torch.equal(v, want_v)


def test_row_major_weights_and_nan(tk):
    x, W, b = integer_problem(21, 150, 18, torch.float32, row_major=True)
    v, i = tk.fused_topk(x, W, b, 6, splits=2)
    want_v, want_i = reference(dense_pre(x, W, b), 6)
    assert torch.equal(i, want_i) and torch.equal(v, want_v)
    b[77] = float("nan")  # ranks first in every row, as torch.topk ranks NaN; its value comes back as +inf
    v, i = tk.fused_topk(x, W, b, 6, splits=2)
    assert bool((i[:, 0] == 77).all()) and bool((v[:, 0] == float("inf")).all())
    assert torch.equal(i[:, 1:], want_i[:, :5])


def test_random_floats_to_gemm_rounding(tk):
    """Real-valued inputs: the kernel's GEMM sums in its own order, so values equal the dense ones to float
    tolerance, and the selection equals torch.topk's wherever the k-th and (k+1)-th keys are apart."""
    g = torch.Generator().manual_seed(3)
    B, n, d, k = 29, 200, 50, 12
    x, W, b = torch.randn(B, d, generator=g), torch.randn(n, d, generator=g).T, torch.randn(n, generator=g)
    v, i = tk.fused_topk(x.to(DEV), W.to(DEV), b.to(DEV), k, splits=3)
    pre = torch.addmm(b.double(), x.double(), W.double())
    torch.testing.assert_close(v.double().cpu(), pre.gather(1, i.cpu()), rtol=1e-5, atol=1e-5)
    s = pre.sort(dim=1, descending=True).values
    assert bool((s[:, k - 1] - s[:, k] > 1e-4).all())  # no near-ties in this draw
    assert torch.equal(i.cpu(), pre.topk(k, dim=1).indices)


def test_streaming_topk_dispatches_to_the_fused_kernel(tk, monkeypatch):
    """SAELAB_KERNELS=triton: streaming_topk without a key (and with AuxK's columns), and with the abs and relu keys
    (AbsTopK, signed AuxK, relu_before_topk), runs the fused kernel with that key; any other key (g-SAE's gradient)
    keeps the blocked torch path. Every answer equals the dense reference."""
    monkeypatch.setenv(kb.ENV_VAR, "triton")
    calls = []
    real = tk.fused_topk
    monkeypatch.setattr(tk, "fused_topk", lambda *a, **kw: calls.append(a[4:]) or real(*a, **kw))
    x, W, b = integer_problem(23, 190, 20, torch.float32)
    v, i = streaming_topk(x, W, b, 4, 64)
    assert calls == [("pre", None)]
    want_v, want_i = reference(dense_pre(x, W, b), 4)
    assert torch.equal(i, want_i) and torch.equal(v, want_v)
    cols = torch.arange(0, 190, 3, device=DEV)
    v, i = streaming_topk(x, W, b, 4, 64, columns=cols)
    assert len(calls) == 2 and calls[1][1] is cols
    want_v, want_i = reference(dense_pre(x, W, b, cols), 4)
    assert torch.equal(i, want_i) and torch.equal(v, want_v)
    for key_fn, name in ((abs_key, "abs"), (relu_key, "relu")):
        v, i = streaming_topk(x, W, b, 4, 64, key=key_fn)
        assert calls[-1] == (name, None)
        want_v, want_i = reference(dense_pre(x, W, b), 4, name)
        assert torch.equal(i, want_i) and torch.equal(v, want_v)
    v, i = streaming_topk(x, W, b, 4, 64, key=lambda pre, s, e: pre.abs())
    assert len(calls) == 4
    assert torch.equal(v.abs().sort(1).values, dense_pre(x, W, b).abs().topk(4, dim=1).values.sort(1).values)


def test_auto_checks_the_kernel_and_falls_back_when_it_raises(tk, monkeypatch):
    """SAELAB_KERNELS unset (the Triton path eligible on this device): the kernel's own check runs once, and a
    kernel that raises warns once and leaves the answer to the blocked torch path."""
    monkeypatch.delenv(kb.ENV_VAR, raising=False)
    monkeypatch.setattr(kb, "AUTO_DEVICE_TYPES", ("cuda", "cpu"))
    monkeypatch.setattr(kb, "_VERDICTS", {(str(torch.device(DEV)), torch.float32):
                                          kb.SelfTest("triton", DEV, "float32", True)})
    monkeypatch.setattr(kb, "_WARNED", set())
    monkeypatch.setattr(tk, "_CHECKED", set())
    x, W, b = integer_problem(23, 190, 20, torch.float32)
    want_v, want_i = reference(dense_pre(x, W, b), 4)
    v, i = streaming_topk(x, W, b, 4, 64)
    assert tk._CHECKED == {(str(torch.device(DEV)), torch.float32)}
    assert torch.equal(i, want_i) and torch.equal(v, want_v)

    def broken(*args, **kwargs):
        raise RuntimeError("no kernel image")

    monkeypatch.setattr(tk, "fused_topk", broken)
    with pytest.warns(kb.KernelFallbackWarning, match="streaming_topk raised RuntimeError: no kernel image"):
        v, i = streaming_topk(x, W, b, 4, 64)
    assert torch.equal(v.sort(1).values, want_v.sort(1).values)  # the torch path: the same values
    assert not kb.self_test(DEV, torch.float32).ok  # the failure is the verdict for this device and dtype


def test_wrong_kernel_fails_its_check(tk, monkeypatch):
    monkeypatch.setattr(tk, "_CHECKED", set())
    real = tk.fused_topk
    monkeypatch.setattr(tk, "fused_topk", lambda x, W, b, k, *a, **kw: real(x, W, -b, k, *a, **kw))
    with pytest.raises(RuntimeError, match="wrong answer on its check case"):
        tk.checked(torch.device(DEV), torch.float32)


def test_bad_arguments(tk):
    x, W, b = integer_problem(4, 40, 8, torch.float32)
    with pytest.raises(ValueError, match="key must be one of"):
        tk.fused_topk(x, W, b, 3, "square")
    with pytest.raises(ValueError, match=r"k must be in \[1, 40\]"):
        tk.fused_topk(x, W, b, 41)
    with pytest.raises(ValueError, match="share a dtype"):
        tk.fused_topk(x, W.double(), b, 3)


@pytest.mark.slow
def test_gpu_check_script_dry_run(tk, tmp_path, monkeypatch):
    """bench/gpu_topk_stream.py (the GPU check's step) at its tiny sizes: passes with the kernel, and fails when the
    kernel's answer is wrong in one row."""
    import json
    from pathlib import Path

    bench = str(Path(__file__).resolve().parents[1] / "bench")
    monkeypatch.syspath_prepend(bench)
    import gpu_topk_stream as g

    out = tmp_path / "topk.json"
    assert g.main(["--device", DEV, "--tiny", "--dtypes", "float32", "--repeats", "1", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert [c["kind"] for c in result["cases"]] == ["exact", "exact", "timed"]
    assert all(c["ok"] for c in result["cases"]) and result["cases"][0]["fused_equals_stable_sort"]

    def off_by_one(x, W, b, k):  # the right answer, but one row's last index moved to a worse latent
        v, i = g.dense(x, W, b, k)
        order = v.sort(1, descending=True).indices
        v, i = v.gather(1, order), i.gather(1, order)
        i[0, -1] = (i[0, -1] + 1) % W.shape[1]
        return v, i

    monkeypatch.setattr(g, "fused", off_by_one)
    assert g.main(["--device", DEV, "--tiny", "--dtypes", "float32", "--repeats", "1"]) == 1
