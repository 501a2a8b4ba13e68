"""The GPU check's own logic on the CPU, at tiny sizes, so it cannot rot before a GPU runs it: bench/gpu_kernels.py's
float64 reference against autograd through dense matrices, its comparison catching wrong kernels (a scaled output,
a lost hot latent row, an op that raises), and bench/gpu_report.py's assembly of the final JSON."""

import json

import pytest
import torch


@pytest.fixture(scope="module")
def gk(bench_module):
    return bench_module("gpu_kernels")


@pytest.fixture
def torch_backend(monkeypatch):
    from saelab.kernels.backend import ENV_VAR

    monkeypatch.setenv(ENV_VAR, "torch")


def _dense_autograd(gk, c):
    """Every op's outputs from dense float64 matrices and autograd: z = the dense code, out = z @ W_dec, ..."""
    f = {k: v.detach().double() for k, v in c.items() if v.is_floating_point()}
    idx, (batch, k), n = c["idx"], c["idx"].shape, c["W_dec"].shape[0]

    def dense(values):
        return torch.zeros(batch, n, dtype=torch.float64).scatter_add(1, idx, values)

    v, W = f["vals"].clone().requires_grad_(), f["W_dec"].clone().requires_grad_()
    out = dense(v) @ W
    out.backward(f["g_out"])
    decode = {"out": out.detach(), "d_values": v.grad, "dW_dec": W.grad}
    x, We, b = (f[name].clone().requires_grad_() for name in ("x", "W_enc", "b_enc"))
    (x @ We + b).gather(1, idx).backward(f["g_enc"])
    encoder = {"grad_x": x.grad, "grad_W_enc": We.grad, "grad_b_enc": b.grad}
    v, W = f["vals"].clone().requires_grad_(), f["W_dec"].clone().requires_grad_()
    out = torch.stack([dense(v * (c["groups"] == g)) @ W for g in range(gk.N_GROUPS)], dim=1)
    out.backward(f["g_grouped"])
    grouped = {"out": out.detach(), "d_values": v.grad, "dW_dec": W.grad}
    return {"decode": decode, "encoder": encoder, "grouped": grouped, "gather_dot": {"out": decode["d_values"]}}


def test_sampled_reference_matches_dense_autograd(gk):
    c = gk.make_case(37, 96, 4, torch.float32, "cpu", batch=16)
    assert (c["idx"] == 96 // 3).any(dim=1).all()  # the hot latent fires on every token
    rows, cols = gk.sample(c, size=8)
    used = set(c["idx"].reshape(-1).tolist())
    assert 96 // 3 in cols.tolist() and 0 in rows.tolist() and len(set(cols.tolist()) - used) >= 4
    ref = gk.reference(c, rows, cols)
    for op, outputs in _dense_autograd(gk, c).items():
        for name, full in outputs.items():
            torch.testing.assert_close(ref[op][name], gk.pick(name, full, rows, cols), rtol=1e-10, atol=1e-12,
                                       msg=f"{op}/{name}")


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_torch_path_within_tolerance(gk, torch_backend, dtype):
    case = gk.run_case(37, 96, 4, dtype, "cpu", ["torch"], batch=16, time_it=False)
    assert case["ok"], json.dumps(case, indent=1)
    assert set(case["ops"]) == set(gk.OPS)
    errs = [e for row in case["ops"].values() for e in row["torch"]["vs_float64"].values()]
    assert len(errs) == 11 and max(errs) <= gk.TOL[dtype]


def test_timings_are_recorded(gk, torch_backend):
    case = gk.run_case(37, 96, 4, "float32", "cpu", ["torch"], batch=16, repeats=1, warmup=0)
    assert all(row["torch"]["ms"] > 0 for row in case["ops"].values())


def test_wrong_kernels_are_caught(gk, torch_backend, monkeypatch):
    from saelab.kernels import torch_ops

    gather_sum, transpose_matmul = torch_ops.gather_sum, torch_ops.transpose_matmul
    monkeypatch.setattr(torch_ops, "gather_sum", lambda *a: gather_sum(*a) * 1.01)  # 1 % off everywhere

    def lose_hot_row(indices, weights, dense, n):  # the latent every token uses gets no gradient
        out = transpose_matmul(indices, weights, dense, n)
        out[n // 3] = 0
        return out

    monkeypatch.setattr(torch_ops, "transpose_matmul", lose_hot_row)
    case = gk.run_case(37, 96, 4, "float32", "cpu", ["torch"], batch=16, time_it=False)
    assert not case["ok"]
    decode = case["ops"]["decode"]["torch"]
    assert not decode["ok"] and decode["vs_float64"]["out"] == pytest.approx(0.01, rel=1e-3)
    assert decode["vs_float64"]["dW_dec"] > 0.5
    assert case["ops"]["encoder"]["torch"]["vs_float64"]["grad_W_enc"] > 0.5
    assert case["ops"]["gather_dot"]["torch"]["ok"]  # an op that uses neither stays clean


def test_an_op_that_raises_is_recorded_and_the_rest_run(gk, torch_backend, monkeypatch):
    def broken(c):
        raise RuntimeError("no kernel image is available for execution on the device")

    monkeypatch.setitem(gk.OPS, "encoder", broken)
    case = gk.run_case(37, 96, 4, "float32", "cpu", ["torch"], batch=16, time_it=False)
    assert not case["ok"] and "no kernel image" in case["ops"]["encoder"]["torch"]["error"]
    assert case["ops"]["decode"]["torch"]["ok"] and case["ops"]["grouped"]["torch"]["ok"]


def test_report_assembles_steps(tmp_path, bench_module):
    gpu_report = bench_module("gpu_report")
    (tmp_path / "k.json").write_text(json.dumps({"ok": True, "cases": []}))
    run = tmp_path / "run"
    (run / "eval").mkdir(parents=True)
    (run / "metrics.jsonl").write_text('{"step": 10, "tokens_per_s": 5.0}\n{"step": 20, "tokens_per_s": 7.0}\n')
    (run / "eval" / "core.json").write_text('{"explained_variance": 0.9}')
    (tmp_path / "k.log").write_text("progress 10%\rprogress 100%\nall ops within tolerance\n")
    (tmp_path / "t.log").write_text("Traceback ...\nRuntimeError: CUDA out of memory\n")
    rows = [["gpu_kernels", "ok", "0", "12.5", "100", str(tmp_path / "k.log"), str(tmp_path / "k.json"), "", "x"],
            ["train", "timeout", "124", "200.0", "200", str(tmp_path / "t.log"), str(run), "stopped", "y"],
            ["doctor", "absent", "", "0", "0", "", "", "no doctor command yet", "z"]]
    (tmp_path / "steps.tsv").write_text("".join("\t".join(r) + "\n" for r in rows))
    (tmp_path / "env.json").write_text(json.dumps({"device_name": "NVIDIA H100 80GB HBM3"}))
    out = tmp_path / "results"
    out.mkdir()
    path, report = gpu_report.assemble(tmp_path / "steps.tsv", tmp_path / "env.json", str(out), dry_run=False)
    assert path.name == f"gpu-h100-80gb-hbm3-{__import__('datetime').date.today()}.json"
    assert json.loads(path.read_text()) == report
    assert not report["ok"] and report["summary"] == {"gpu_kernels": "ok", "train": "timeout", "doctor": "absent"}
    steps = report["steps"]
    assert steps["gpu_kernels"]["result"] == {"ok": True, "cases": []}
    assert steps["gpu_kernels"]["output_tail"] == "progress 100%\nall ops within tolerance"  # bar redraws collapsed
    assert steps["train"]["exit_code"] == 124 and "out of memory" in steps["train"]["output_tail"]
    assert steps["train"]["result"]["last_metrics"]["tokens_per_s"] == 7.0
    assert steps["train"]["result"]["core"] == {"explained_variance": 0.9}
    assert "result" not in steps["doctor"] and steps["doctor"]["note"] == "no doctor command yet"
    again, _ = gpu_report.assemble(tmp_path / "steps.tsv", tmp_path / "env.json", str(out), dry_run=True)
    assert again.name.startswith("gpu-dryrun-h100-") and path.exists()  # a new file, the first one kept
