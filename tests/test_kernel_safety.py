"""The kernels' safety net: the Triton path's self-test and its fallback, launches under the tensors' device, index
bounds, float64 routing, non-finite rows on both paths, and `saelab doctor`.

Without a GPU the Triton kernels run under the Triton interpreter on CPU tensors (TRITON_INTERPRET=1, set below
before anything imports triton's kernels), with `auto` allowed to pick them on the CPU where a test needs it.
"""

import importlib.util
import json
import os
import sys
import types
import warnings

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # must precede the first import of saelab.kernels.triton_kernels

import pytest  # noqa: E402

import saelab.kernels as K  # noqa: E402
from saelab.cli import main  # noqa: E402
from saelab.errors import ConfigError  # noqa: E402
from saelab.kernels import backend as kb  # noqa: E402
from saelab.kernels import selftest, torch_ops  # noqa: E402
from saelab.sae.code import SparseCode  # noqa: E402
from test_kernels import decode_reference, random_code, triton_ready  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"
FALLBACK = kb.KernelFallbackWarning


@pytest.fixture
def fresh(monkeypatch):
    """A process that has judged no device and dtype yet and warned about none."""
    monkeypatch.setattr(kb, "_VERDICTS", {})
    monkeypatch.setattr(kb, "_WARNED", set())


@pytest.fixture
def auto_triton(fresh, monkeypatch):
    """SAELAB_KERNELS unset, with the Triton path eligible on DEV (on a CPU: the interpreter); gives triton_ops."""
    if why := triton_ready():
        pytest.skip(why)
    from saelab.kernels import triton_ops

    monkeypatch.delenv(kb.ENV_VAR, raising=False)
    monkeypatch.setattr(kb, "AUTO_DEVICE_TYPES", ("cuda", "cpu"))
    return triton_ops


def _paths() -> list[str]:
    return ["torch"] + ([] if triton_ready() else ["triton"])


def _passed(device: torch.device, dtype=torch.float32) -> None:
    """Record a passed self-test for (device, dtype), as if the process had run it."""
    kb._VERDICTS[(str(device), dtype)] = selftest.SelfTest("triton", str(device), str(dtype)[6:], True)


# ------------------------------------------------------------------------------------------------ self-test
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_torch_path_passes_its_self_test(dtype):
    result = selftest.run(torch_ops, "torch", "cpu", dtype)
    assert result.ok, result.failure
    assert (result.backend, result.device, result.dtype) == ("torch", "cpu", str(dtype)[6:])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_triton_path_passes_its_self_test(fresh, dtype):
    if why := triton_ready():
        pytest.skip(why)
    result = K.self_test(DEV, dtype)
    assert result.ok, result.failure
    assert K.self_test(DEV, dtype) is result  # once per process


def test_self_test_names_what_is_wrong():
    """Against a fake ops module (the PyTorch ops with one wrong): a wrong value, a NaN, a wrong shape, an error."""
    def with_op(name, fn):
        ops = types.SimpleNamespace(**{op: getattr(torch_ops, op) for op in
                                       ("gather_sum", "gather_dot", "transpose_matmul", "decoder_backward")})
        setattr(ops, name, fn)
        return selftest.run(ops, "fake", "cpu", torch.float32)

    def swap_rows(i, d, t):
        return torch_ops.gather_dot(i, d, t).flip(0)

    def nan_out(i, w, t):
        return torch_ops.gather_sum(i, w, t) * float("nan")

    def short(i, w, d, n):
        return torch_ops.transpose_matmul(i, w, d, n)[:-1]

    def nudged(i, v, g, W, need_v, need_w):
        d_values, dW = torch_ops.decoder_backward(i, v, g, W, need_v, need_w)
        return d_values, dW + 1e-3 * dW.abs().max()

    def no_compiler(*args):
        raise RuntimeError("Failed to find C compiler. Please specify via CC environment variable.\nmore text")

    cases = [("gather_dot", swap_rows, "gather_dot: output 0 is wrong"),
             ("gather_sum", nan_out, "gather_sum: output 0 is wrong: max error nan"),
             ("transpose_matmul", short, "transpose_matmul: output 0 has shape (18, 40), expected (19, 40)"),
             ("decoder_backward", nudged, "decoder_backward: output 1 is wrong"),
             ("gather_sum", no_compiler, "gather_sum raised RuntimeError: Failed to find C compiler. Please "
                                         "specify via CC environment variable.")]
    for op, fn, failure in cases:
        result = with_op(op, fn)
        assert not result.ok and result.failure.startswith(failure), (op, result.failure)


def test_self_test_leaves_the_random_streams_alone():
    state = torch.random.get_rng_state()
    selftest.run(torch_ops, "torch", "cpu", torch.float32)
    assert torch.equal(state, torch.random.get_rng_state())


# ------------------------------------------------------------------------------------------------ fallback
def test_failing_self_test_falls_back_with_one_warning(auto_triton, monkeypatch):
    """A Triton op that raises (no C compiler for the launcher): one warning that says what failed and how to
    silence it, the right numbers from the PyTorch path, and the PyTorch path from then on."""
    def no_compiler(*args):
        raise RuntimeError("Failed to find C compiler. Please specify via CC environment variable.")

    monkeypatch.setattr(auto_triton, "gather_sum", no_compiler)
    idx, val = random_code(8, 4, 30, torch.float32, DEV)
    val.requires_grad_()
    W = torch.randn(30, 12, device=DEV, requires_grad=True)
    g = torch.randn(8, 12, device=DEV)
    with pytest.warns(FALLBACK) as caught:
        out = K.sparse_decode(idx, val, W)
    assert len(caught) == 1
    message = str(caught[0].message)
    for part in (f"{W.device} float32", "gather_sum raised RuntimeError: Failed to find C compiler",
                 "SAELAB_KERNELS=torch", "PyTorch path"):
        assert part in message, message
    out.backward(g)
    ref, ref_dv, ref_dW = decode_reference(idx, val, W, g)
    torch.testing.assert_close(out.double().cpu(), ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(val.grad.double().cpu(), ref_dv, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(W.grad.double().cpu(), ref_dW, rtol=1e-5, atol=1e-5)
    with warnings.catch_warnings():
        warnings.simplefilter("error", FALLBACK)  # no second warning
        assert K.backend_for(idx, val, W) == "torch"
        assert K.ops_for(idx, val, W) is torch_ops
        K.sparse_decode(idx, val, W)


def test_wrong_result_falls_back_for_that_dtype_only(auto_triton, monkeypatch):
    """A Triton op that is 1 % off in float32 only: float32 goes to the PyTorch path (right numbers), bfloat16,
    which passes its own self-test, stays on Triton."""
    real = auto_triton.transpose_matmul

    def off_in_float32(indices, weights, dense, n):
        out = real(indices, weights, dense, n)
        return out * 1.01 if dense.dtype == torch.float32 else out

    monkeypatch.setattr(auto_triton, "transpose_matmul", off_in_float32)
    idx, w = random_code(10, 4, 16, torch.float32, DEV)
    dense = torch.randn(10, 9, device=DEV)
    with pytest.warns(FALLBACK, match=r"transpose_matmul: output 0 is wrong: max error 0\.01"):
        out = K.sparse_transpose_matmul(idx, w, dense, 16)
    want = SparseCode(idx.cpu(), w.cpu().double()).to_dense(16).T @ dense.cpu().double()
    torch.testing.assert_close(out.double().cpu(), want, rtol=1e-6, atol=1e-6)
    assert K.backend_for(idx, w, dense) == "torch"
    assert K.backend_for(idx, w.bfloat16(), dense.bfloat16()) == "triton"


def test_a_later_launch_failure_is_redone_on_the_torch_path(auto_triton, monkeypatch):
    """The self-test passed, then a launch fails (a variant it did not build): the call is redone on the PyTorch
    path, with one warning, and the PyTorch path serves that device and dtype from then on."""
    idx, val = random_code(8, 4, 30, torch.float32, DEV)
    val.requires_grad_()
    W = torch.randn(30, 12, device=DEV, requires_grad=True)
    g = torch.randn(8, 12, device=DEV)
    _passed(W.device)
    out = K.sparse_decode(idx, val, W)  # the forward on Triton

    def too_old(*args):
        raise RuntimeError("CUDA error: the provided PTX was compiled with an unsupported toolchain.")

    monkeypatch.setattr(auto_triton, "decoder_backward", too_old)
    with pytest.warns(FALLBACK, match="decoder_backward raised RuntimeError: CUDA error: the provided PTX"):
        out.backward(g)
    _, ref_dv, ref_dW = decode_reference(idx, val, W, g)
    torch.testing.assert_close(val.grad.double().cpu(), ref_dv, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(W.grad.double().cpu(), ref_dW, rtol=1e-5, atol=1e-5)
    assert K.backend_for(idx, val, W) == "torch"
    assert not kb._VERDICTS[(str(W.device), torch.float32)].ok


def test_forced_triton_raises_instead_of_falling_back(fresh, monkeypatch):
    if why := triton_ready():
        pytest.skip(why)
    from saelab.kernels import triton_ops

    monkeypatch.setenv(kb.ENV_VAR, "triton")
    idx, val = random_code(6, 3, 20, torch.float32, DEV)
    W = torch.randn(20, 8, device=DEV)

    def broken(*args):
        raise RuntimeError("ptxas fatal: Unsupported gpu architecture")

    monkeypatch.setattr(triton_ops, "gather_dot", broken)
    with warnings.catch_warnings():
        warnings.simplefilter("error", FALLBACK)  # an error, not a warning
        with pytest.raises(ConfigError, match=r"SAELAB_KERNELS=triton, but the Triton kernels fail on .* float32: "
                                              r"gather_dot raised RuntimeError: ptxas fatal") as e:
            K.sparse_decode(idx, val, W)
    assert "SAELAB_KERNELS=torch" in e.value.hint and "saelab doctor" in e.value.hint
    # after a passed self-test, a failing launch is not hidden either
    monkeypatch.setattr(kb, "_VERDICTS", {})
    _passed(W.device)
    monkeypatch.setattr(triton_ops, "gather_sum", broken)
    with pytest.raises(RuntimeError, match="ptxas fatal"):
        K.sparse_decode(idx, val, W)


def test_forced_torch_runs_no_self_test(fresh, monkeypatch):
    monkeypatch.setenv(kb.ENV_VAR, "torch")
    monkeypatch.setattr(kb, "AUTO_DEVICE_TYPES", ("cuda", "cpu"))
    idx, val = random_code(6, 3, 20, torch.float32, DEV)
    K.sparse_decode(idx, val, torch.randn(20, 8, device=DEV))
    assert kb._VERDICTS == {}


# ------------------------------------------------------------------------------------------------ devices, dtypes
def test_triton_ops_launch_under_the_tensors_device(monkeypatch):
    if why := triton_ready():
        pytest.skip(why)
    from saelab.kernels import triton_ops

    entered = []
    real_guard = triton_ops.device_guard

    def recording(device):
        entered.append(device)
        return real_guard(device)

    monkeypatch.setattr(triton_ops, "device_guard", recording)
    idx, val = random_code(6, 3, 20, torch.float32, DEV)
    W = torch.randn(20, 8, device=DEV)
    g = torch.randn(6, 8, device=DEV)
    triton_ops.gather_sum(idx, val, W)
    triton_ops.gather_dot(idx, g, W)
    triton_ops.transpose_matmul(idx, val, g, 20)
    triton_ops.decoder_backward(idx, val, g, W, True, True)
    assert len(entered) >= 4 and all(d == idx.device for d in entered)


def test_device_guard_makes_the_tensors_cuda_device_current(monkeypatch):
    if why := triton_ready():
        pytest.skip(why)
    from saelab.kernels import triton_ops

    made = []

    class FakeCudaDevice:  # records what torch.cuda.device was asked to switch to
        def __init__(self, device):
            made.append(device)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

    monkeypatch.setattr(torch.cuda, "device", FakeCudaDevice)
    with triton_ops.device_guard(torch.device("cuda", 1)):
        pass
    assert made == [torch.device("cuda", 1)]
    with triton_ops.device_guard(torch.device("cpu")):  # the interpreter: nothing to switch
        pass
    assert made == [torch.device("cuda", 1)]


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_decode_on_the_second_gpu(monkeypatch):
    monkeypatch.delenv(kb.ENV_VAR, raising=False)
    idx, val = random_code(16, 8, 64, torch.float32, "cuda:1")
    val.requires_grad_()
    W = torch.randn(64, 40, device="cuda:1", requires_grad=True)
    g = torch.randn(16, 40, device="cuda:1")
    assert K.backend_for(idx, val, W) == "triton"
    out = K.sparse_decode(idx, val, W)
    out.backward(g)
    ref, ref_dv, ref_dW = decode_reference(idx, val, W, g)
    torch.testing.assert_close(out.double().cpu(), ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(W.grad.double().cpu(), ref_dW, rtol=1e-5, atol=1e-5)


def test_float64_takes_the_exact_path(auto_triton, monkeypatch):
    """float64 never reaches the kernels (they would compute it in float32), forced or not, and runs no self-test."""
    B, k, n, d = 7, 4, 25, 11
    idx, _ = random_code(B, k, n, torch.float64, DEV)
    g = torch.Generator().manual_seed(3)
    val = (1 + 1e-12 * torch.randn(B, k, generator=g, dtype=torch.float64)).to(DEV)  # differences below float32's
    W = (1 + 1e-12 * torch.randn(n, d, generator=g, dtype=torch.float64)).to(DEV)
    want = SparseCode(idx.cpu(), val.cpu()).to_dense(n) @ W.cpu()
    for forced in ("auto", "triton"):
        monkeypatch.setenv(kb.ENV_VAR, forced)
        assert K.backend_for(idx, val, W) == "torch"
        assert K.backend_for(idx, val.float(), W) == "torch"  # any float64 tensor decides
        assert K.ops_for(idx, val, W) is torch_ops
        out = K.sparse_decode(idx, val, W)
        assert out.dtype == torch.float64
        assert (out.cpu() - want).abs().max().item() < 1e-12
    assert kb._VERDICTS == {}


def test_tensors_on_two_devices_are_refused(monkeypatch):
    monkeypatch.delenv(kb.ENV_VAR, raising=False)
    with pytest.raises(ValueError, match=r"different devices \(cpu, meta\)"):
        K.backend_for(torch.zeros(2, 2), torch.zeros(2, 2, device="meta"))


def test_interpreter_detected_without_triton_knobs(monkeypatch):
    """triton.knobs exists only from triton 3.4: the kernels module imports without it, and tells the interpreter
    from the kernel objects (or, failing that, TRITON_INTERPRET)."""
    if why := triton_ready():
        pytest.skip(why)
    import triton

    from saelab.kernels import triton_kernels

    assert triton_kernels.INTERPRETED is (not torch.cuda.is_available())
    path = triton_kernels.__file__
    monkeypatch.setitem(sys.modules, "triton.knobs", None)  # as on triton 3.0-3.3
    monkeypatch.delattr(triton, "knobs", raising=False)
    spec = importlib.util.spec_from_file_location("triton_kernels_without_knobs", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.INTERPRETED is triton_kernels.INTERPRETED
    monkeypatch.setitem(sys.modules, "triton.runtime.interpreter", None)  # a layout the module does not know
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert module._interpreted(module.gather_sum_kernel) is True
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert module._interpreted(module.gather_sum_kernel) is False


# ------------------------------------------------------------------------------------------------ bounds
def _each_op(idx, n):
    """Every public entry point, called with these indices against n latents."""
    B, k = idx.shape
    vals = torch.ones(B, k, device=idx.device)
    W = torch.randn(n, 6, device=idx.device)
    x = torch.randn(B, 6, device=idx.device)
    return {"sparse_decode": lambda: K.sparse_decode(idx, vals, W),
            "grouped_decode": lambda: K.grouped_decode(idx, vals, W, torch.zeros_like(idx), 1),
            "encoder_values": lambda: K.encoder_values(x, W.T, None, idx, vals),
            "sparse_transpose_matmul": lambda: K.sparse_transpose_matmul(idx, vals, x, n)}


@pytest.mark.parametrize("bad", [-1, 30])
def test_out_of_range_indices_same_error_on_both_paths(bad, fresh, monkeypatch):
    idx = torch.tensor([[0, 3, 5], [29, bad, 1]], device=DEV)
    messages = {}
    for path in _paths():
        monkeypatch.setenv(kb.ENV_VAR, path)
        for name, call in _each_op(idx, 30).items():
            with pytest.raises(IndexError) as e:
                call()
            messages[path, name] = str(e.value)
            assert f"{name}: indices must lie in [0, 30)" in str(e.value) and f"found {bad}" in str(e.value)
    for (path, name), message in messages.items():
        assert message == messages["torch", name]  # the same words on both paths
    monkeypatch.setenv(kb.ENV_VAR, "torch")
    for call in _each_op(idx.clamp(0, 29), 30).values():  # in range: no error
        call()


def test_bounds_check_remembers_only_unchanged_indices(monkeypatch):
    """The indices last found in range are not checked again, unless changed in place or used with a smaller n;
    inference tensors (no version counter) are checked every time."""
    monkeypatch.setenv(kb.ENV_VAR, "torch")
    idx = torch.tensor([[0, 3], [7, 1]])
    vals = torch.ones(2, 2)
    K.sparse_decode(idx, vals, torch.randn(8, 3))
    with pytest.raises(IndexError, match=r"\[0, 6\).*found 7"):
        K.sparse_decode(idx, vals, torch.randn(6, 3))
    idx[0, 0] = 8  # in place: a new version
    with pytest.raises(IndexError, match=r"\[0, 8\).*found 8"):
        K.sparse_decode(idx, vals, torch.randn(8, 3))
    with torch.inference_mode():
        frozen = torch.tensor([[0, 9]])
        with pytest.raises(IndexError, match="found 9"):
            K.sparse_decode(frozen, torch.ones(1, 2), torch.randn(8, 3))
        assert K.sparse_decode(frozen, torch.ones(1, 2), torch.randn(10, 3)).shape == (1, 3)


# ------------------------------------------------------------------------------------------------ non-finite rows
def _nonfinite_case():
    """A code whose padding slots (value 0) point at a NaN and an inf decoder row, and a gradient with a NaN row at
    a token with no live slot (CPU tensors)."""
    B, k, n, d = 6, 4, 12, 7
    g0 = torch.Generator().manual_seed(5)
    idx = torch.randint(0, 10, (B, k), generator=g0)
    val = torch.randn(B, k, generator=g0).abs() + 0.1
    idx[:, -1], val[:, -1] = 10, 0.0  # padding slots on latent 10 (a NaN row)
    idx[2, -2], val[2, -2] = 11, 0.0  # and one on latent 11 (an inf row)
    val[4] = 0.0  # token 4 has no live slot
    W = torch.randn(n, d, generator=g0)
    W[10], W[11] = float("nan"), float("inf")
    grad = torch.randn(B, d, generator=g0)
    grad[4] = float("nan")
    return idx, val, W, grad


def _nonfinite_results() -> dict[str, torch.Tensor]:
    """Every output and gradient of decode, grouped decode and the weight-gradient op on `_nonfinite_case`, on the
    path SAELAB_KERNELS selects."""
    idx, val, W, grad = (t.to(DEV) for t in _nonfinite_case())
    (B, k), (n, d) = idx.shape, W.shape
    v, w = val.clone().requires_grad_(), W.clone().requires_grad_()
    out = K.sparse_decode(idx, v, w)
    out.backward(grad)
    groups = (torch.arange(k, device=DEV) >= 2).long().expand(B, k)
    gv, gw = val.clone().requires_grad_(), W.clone().requires_grad_()
    grouped = K.grouped_decode(idx, gv, gw, groups, 2)
    grouped.backward(grad.unsqueeze(1).expand(B, 2, d))
    found = {"out": out, "d_values": v.grad, "dW": w.grad, "grouped": grouped, "grouped d_values": gv.grad,
             "grouped dW": gw.grad, "transpose_matmul": K.sparse_transpose_matmul(idx, val, grad, n)}
    return {name: t.detach().double().cpu() for name, t in found.items()}


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # the interpreter's numpy on NaN
def test_zero_values_read_no_row_on_both_paths(fresh, monkeypatch):
    """0 · (a NaN or inf row) adds 0 on both paths, in the forward and in the weight gradients (fused or not); a
    zero value's own gradient, <grad, row>, is still computed (NaN for a NaN row), the same on both paths."""
    results = {}
    for path in _paths():
        monkeypatch.setenv(kb.ENV_VAR, path)
        results[path] = _nonfinite_results()
    got = results["torch"]
    # the finite parts against dense arithmetic in which the bad rows (reached only by zero values) and the NaN
    # gradient row (a token without live slots) are zeros
    idx, val, W, grad = _nonfinite_case()
    W, grad = W.double().nan_to_num(0.0, 0.0, 0.0), grad.double().nan_to_num(0.0)
    S = SparseCode(idx, val.double()).to_dense(W.shape[0])
    for name, want in (("out", S @ W), ("grouped", None), ("dW", S.T @ grad), ("grouped dW", S.T @ grad),
                       ("transpose_matmul", S.T @ grad)):
        assert torch.isfinite(got[name]).all(), name
        if want is not None:
            torch.testing.assert_close(got[name], want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got["grouped"].sum(1), S @ W, rtol=1e-5, atol=1e-5)
    assert got["d_values"][:, -1].isnan().all() and got["d_values"][4].isnan().all()
    assert torch.isfinite(got["d_values"][[0, 1, 3, 5], :-1]).all()
    for path, found in results.items():
        for name, t in found.items():
            torch.testing.assert_close(t, got[name], rtol=1e-5, atol=1e-5, equal_nan=True,
                                       msg=lambda m, path=path, name=name: f"{path} {name}: {m}")


# ------------------------------------------------------------------------------------------------ saelab doctor
def test_doctor_reports_and_exits_0(capsys, tmp_path, monkeypatch):
    monkeypatch.delenv(kb.ENV_VAR, raising=False)
    out = tmp_path / "doctor.json"
    assert main(["doctor", "--json", str(out)]) == 0
    text = capsys.readouterr().out
    heads = [line for line in text.splitlines() if line and not line.startswith(" ")]
    assert heads[0] == "versions" and heads[1] == "devices" and heads[2].startswith("kernels (SAELAB_KERNELS=")
    assert heads[3] == "models" and heads[4].startswith("checks: all") and heads[5] == f"wrote {out}"
    assert f"torch              {torch.__version__}" in text
    assert "reference model    present" in text
    report = json.loads(out.read_text())
    assert report["ok"] is True and report["versions"]["torch"] == torch.__version__
    assert report["versions"]["python"] == ".".join(map(str, sys.version_info[:3]))
    rows = {(r["device"], r["dtype"]): r for r in report["kernels"]["rows"]}
    assert {("cpu", "float32"), ("cpu", "bfloat16"), ("cpu", "float64")} <= set(rows)
    assert all(r["torch"]["ok"] for r in rows.values())
    assert rows["cpu", "float64"]["backend"] == "torch" and rows["cpu", "float64"]["triton"] is None
    for i in range(torch.cuda.device_count()):
        assert rows[f"cuda:{i}", "float32"]["backend"] == "triton" and rows[f"cuda:{i}", "float32"]["triton"]["ok"]
    assert report["models"]["reference_present"] is True
    assert report["checks"] and all(c["ok"] for c in report["checks"])
    assert [p.name for p in tmp_path.iterdir()] == ["doctor.json"]


def test_doctor_exits_1_when_a_check_fails(capsys, tmp_path, monkeypatch):
    """A wrong kernel and a missing reference model: each is a failed check, listed at the end; exit status 1."""
    from saelab.models import loading

    monkeypatch.delenv(kb.ENV_VAR, raising=False)

    real = torch_ops.gather_dot

    def swapped(i, d, t):
        return real(i, d, t).flip(0)

    monkeypatch.setattr(torch_ops, "gather_dot", swapped)
    monkeypatch.setattr(loading, "reference_dir", lambda: tmp_path / "no-reference")
    out = tmp_path / "doctor.json"
    assert main(["doctor", "--json", str(out)]) == 1
    text = capsys.readouterr().out
    assert "FAILED torch kernels on cpu float32: gather_dot: output 0 is wrong" in text
    assert "FAILED embedded reference model" in text and "no-reference" in text
    report = json.loads(out.read_text())
    assert report["ok"] is False
    failed = {c["name"] for c in report["checks"] if not c["ok"]}
    assert {"torch kernels on cpu float32", "embedded reference model"} <= failed


def test_doctor_reports_a_bad_kernels_setting(capsys, monkeypatch):
    monkeypatch.setenv(kb.ENV_VAR, "cuda-please")
    assert main(["doctor"]) == 1
    assert "FAILED SAELAB_KERNELS: SAELAB_KERNELS='cuda-please'" in capsys.readouterr().out


def test_doctor_help(capsys):
    with pytest.raises(SystemExit) as e:
        main(["doctor", "--help"])
    assert e.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    for part in ("--json FILE", "self-test of both paths", "Exits 0 when every check passes, 1 when one fails"):
        assert part in text
