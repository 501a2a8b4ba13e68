"""Every sparse op of `saelab.kernels` at real SAE sizes: the Triton path and the PyTorch path, each against a
float64 dense reference, and against each other.

    python bench/gpu_kernels.py --out FILE.json   # CUDA: d {768, 2304} × n {24k, 131k} × k {32, 64} × fp32, bf16
    python bench/gpu_kernels.py --device cpu --tiny # the dry run: tiny sizes, Triton under its interpreter

Each case is one code of B = 4096 tokens, k random latents each, one of which is the same latent for every token
(a latent that fires on every token: one owner program then sums 4096 rows); every 8th token's last slot is a
value-0 padding slot. Once per backend (SAELAB_KERNELS=triton, then torch; both on the same device) it runs:

* decode      `sparse_decode` forward and backward: out [B, d], d_values [B, k], dW_dec [n, d] (and, timed
              alone, the forward: decode_forward)
* encoder     `encoder_values` backward: grad_x [B, d], grad_W_enc [d, n] (column-major, as the SAE stores it),
              grad_b_enc [n]
* grouped     `grouped_decode` (Matryoshka's 5 nested groups) forward and backward
* gather_dot  the ops module's `gather_dot` (backend.py's fourth op; training takes it only when d > 4096)

Errors are max |got − ref| / max |ref| (relative to the reference's largest entry): against a float64 dense
reference on a subsample of token rows (a padded token included) and latent rows (the hot latent and up to 4
unused ones, whose gradient rows must be exactly 0, included), and Triton
against PyTorch on the whole tensors. Times are medians of --repeats CUDA-synchronised runs after a warm-up; every
run gets a fresh copy of the indices, so the Triton path's counting sort is counted. An op that raises is recorded
with its error and the rest go on. Exit status 1 when any op raised or any error passes its tolerance.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import traceback
from pathlib import Path

from sparse_kernels import device_name, median_ms  # bench/sparse_kernels.py (this folder is on sys.path)

B = 4096
REAL = [(d, n, k) for d in (768, 2304) for n in (24576, 131072) for k in (32, 64)]
TINY = [(37, 96, 4)]  # an odd width; with --tiny (B 16): the Triton interpreter is slow
DTYPES = ("float32", "bfloat16")
TOL = {"float32": 1e-4, "bfloat16": 3e-2}  # against float64; Triton against PyTorch may differ by twice this
N_GROUPS = 5
SAMPLE = 64  # token rows and latent rows checked against the float64 reference
LATENT_ROWS = ("dW_dec", "grad_b_enc")  # outputs indexed by latent (rows); grad_W_enc by latent (columns)


def make_case(d: int, n: int, k: int, dtype, device, batch: int = B, seed: int = 0) -> dict:
    """The inputs of every op: a code with a hot latent and padding, decoder and encoder weights, gradients."""
    import torch

    torch.manual_seed(seed)
    idx = torch.randint(0, n, (batch, k), device=device)
    idx[:, 0] = n // 3  # fires on every token
    idx = idx.sort(dim=1).values  # grouped_decode wants each token's groups non-decreasing
    vals = torch.randn(batch, k, device=device).abs()
    vals[::8, -1] = 0.0  # padding slot of a variable-k code
    bounds = torch.tensor([n // 16, n // 8, n // 4, n // 2], device=device)
    return {"idx": idx, "vals": vals.to(dtype), "groups": torch.bucketize(idx, bounds, right=True),
            "W_dec": (torch.randn(n, d, device=device) / d ** 0.5).to(dtype),
            "g_out": torch.randn(batch, d, device=device).to(dtype),
            "x": torch.randn(batch, d, device=device).to(dtype),
            "W_enc": (torch.randn(n, d, device=device) / d ** 0.5).to(dtype).T,  # [d, n], column-major
            "b_enc": (0.1 * torch.randn(n, device=device)).to(dtype),
            "g_enc": torch.randn(batch, k, device=device).to(dtype),
            "g_grouped": torch.randn(batch, N_GROUPS, d, device=device).to(dtype)}


# ------------------------------------------------------------------------------------------------ the ops
def _leaf(t):
    return t.detach().requires_grad_()


def op_decode_forward(c: dict) -> dict:
    import torch

    from saelab.kernels import sparse_decode

    with torch.no_grad():
        return {"out": sparse_decode(c["idx"].clone(), c["vals"], c["W_dec"])}


def op_decode(c: dict) -> dict:
    from saelab.kernels import sparse_decode

    v, W = _leaf(c["vals"]), _leaf(c["W_dec"])
    out = sparse_decode(c["idx"].clone(), v, W)
    out.backward(c["g_out"])
    return {"out": out.detach(), "d_values": v.grad, "dW_dec": W.grad}


def op_encoder(c: dict) -> dict:
    from saelab.kernels import encoder_values

    x, W, b = _leaf(c["x"]), _leaf(c["W_enc"]), _leaf(c["b_enc"])
    encoder_values(x, W, b, c["idx"].clone(), c["vals"]).backward(c["g_enc"])  # values: any [B, k] tensor
    return {"grad_x": x.grad, "grad_W_enc": W.grad, "grad_b_enc": b.grad}


def op_grouped(c: dict) -> dict:
    from saelab.kernels import grouped_decode

    v, W = _leaf(c["vals"]), _leaf(c["W_dec"])
    out = grouped_decode(c["idx"].clone(), v, W, c["groups"], N_GROUPS)
    out.backward(c["g_grouped"])
    return {"out": out.detach(), "d_values": v.grad, "dW_dec": W.grad}


def op_gather_dot(c: dict) -> dict:
    from saelab.kernels import ops_for

    return {"out": ops_for(c["idx"], c["g_out"], c["W_dec"]).gather_dot(c["idx"], c["g_out"], c["W_dec"])}


OPS = {"decode_forward": op_decode_forward, "decode": op_decode, "encoder": op_encoder, "grouped": op_grouped,
       "gather_dot": op_gather_dot}


# ------------------------------------------------------------------------------------------------ the reference
def sample(c: dict, seed: int = 1, size: int = SAMPLE) -> tuple:
    """(token rows, latent rows) checked against the reference: random ones, plus token 0 (padded), the hot
    latent and up to 4 latents no token uses."""
    import torch

    idx = c["idx"]
    batch, n = idx.shape[0], c["W_dec"].shape[0]
    g = torch.Generator().manual_seed(seed)
    rows = torch.cat([torch.tensor([0]), torch.randperm(batch, generator=g)[: size - 1]]).unique()
    unused = (torch.bincount(idx.reshape(-1), minlength=n) == 0).nonzero().reshape(-1)[:4].cpu()
    cols = torch.cat([torch.tensor([n // 3]), unused, torch.randperm(n, generator=g)[: size - 5]]).unique()
    return rows.to(idx.device), cols.to(idx.device)


def reference(c: dict, rows, cols) -> dict:
    """Every op's outputs on the sampled rows, in float64, from dense formulas: the decoder as z @ W_dec over the
    dense code z (only z's sampled columns are built for the weight gradients), the encoder as x @ W_enc[:, idx]."""
    import torch

    f = {name: c[name].double() for name in ("vals", "g_out", "x", "g_enc", "g_grouped")}  # the per-token tensors
    idx, idx_r = c["idx"], c["idx"][rows]

    def z(weights):  # the dense code's sampled columns: z[b, j] = Σ_s weights[b, s] · [idx[b, s] = j]  -> [B, c]
        return ((idx[..., None] == cols).double() * weights[..., None]).sum(1)

    W_r = c["W_dec"][idx_r].double()  # [r, k, d]
    d_values = (W_r * f["g_out"][rows][:, None, :]).sum(-1)
    decode = {"out": (f["vals"][rows][..., None] * W_r).sum(1), "d_values": d_values,
              "dW_dec": z(f["vals"]).T @ f["g_out"]}
    g_enc = f["g_enc"]
    encoder = {"grad_x": (g_enc[rows][..., None] * c["W_enc"].T[idx_r].double()).sum(1),
               "grad_W_enc": z(g_enc).T @ f["x"],  # [c, d]: the sampled columns of grad_W_enc, transposed
               "grad_b_enc": z(g_enc).sum(0)}
    member = c["groups"][..., None] == torch.arange(N_GROUPS, device=idx.device)  # [B, k, G]
    gg = f["g_grouped"]
    grouped = {"out": torch.einsum("rk,rkg,rkd->rgd", f["vals"][rows], member[rows].double(), W_r),
               "d_values": (W_r * gg[rows].gather(1, c["groups"][rows][..., None].expand(-1, -1, W_r.shape[-1])))
               .sum(-1),
               "dW_dec": sum(z(f["vals"] * member[..., g]).T @ gg[:, g] for g in range(N_GROUPS))}
    return {"decode_forward": {"out": decode["out"]}, "decode": decode, "encoder": encoder, "grouped": grouped,
            "gather_dot": {"out": d_values}}


def pick(name: str, t, rows, cols):
    """The sampled rows of an op's output, laid out as the reference has them."""
    if name in LATENT_ROWS:
        return t[cols]
    if name == "grad_W_enc":
        return t[:, cols].T
    return t[rows]


def rel_err(got, want) -> float:
    """max |got − want| / max |want| (relative to the largest reference entry; 0/0 counts as 0)."""
    import torch

    if want.numel() == 0:
        return 0.0
    dtype = torch.promote_types(torch.promote_types(got.dtype, want.dtype), torch.float32)  # float64 vs the reference
    got, want = got.to(dtype), want.to(dtype)
    scale = want.abs().max().item()
    err = (got - want).abs().max().item()
    return err / scale if scale > 0 else err  # a NaN anywhere gives NaN, which passes no tolerance


# ------------------------------------------------------------------------------------------------ one case
def run_case(d: int, n: int, k: int, dtype_name: str, device: str, backends: list[str], batch: int = B,
             repeats: int = 5, warmup: int = 1, time_it: bool = True) -> dict:
    """Every op on every backend for one shape: errors against float64 (sampled rows), Triton against PyTorch
    (whole tensors), median ms. Returns a JSON-ready dict; `ok` is False if anything raised or passed TOL."""
    import torch

    from saelab.kernels.backend import ENV_VAR

    dtype = getattr(torch, dtype_name)
    tol = TOL[dtype_name]
    c = make_case(d, n, k, dtype, device, batch)
    rows, cols = sample(c)
    ref = reference(c, rows, cols)
    case = {"d": d, "n": n, "k": k, "B": batch, "dtype": dtype_name, "tolerance": tol, "ops": {}, "ok": True}
    saved = os.environ.get(ENV_VAR)
    try:
        for op_name, op in OPS.items():
            results, row = {}, {}
            for backend in backends:
                os.environ[ENV_VAR] = backend
                entry = row[backend] = {}
                try:
                    out = results[backend] = op(c)
                    entry["vs_float64"] = {name: rel_err(pick(name, t, rows, cols), ref[op_name][name])
                                           for name, t in out.items()}
                    if time_it:
                        entry["ms"] = median_ms(lambda: op(c), device, repeats, warmup)
                except Exception as e:  # noqa: BLE001 - recorded, and the other ops and backends still run
                    entry["error"] = "".join(traceback.format_exception_only(type(e), e)).strip()[-1000:]
            if "triton" in results and "torch" in results:
                row["triton"]["vs_torch"] = {name: rel_err(results["triton"][name], results["torch"][name])
                                             for name in results["torch"]}
            for entry in row.values():
                entry["ok"] = "error" not in entry and all(e <= tol for e in entry.get("vs_float64", {}).values()) \
                    and all(e <= 2 * tol for e in entry.get("vs_torch", {}).values())
                case["ok"] &= entry["ok"]
            case["ops"][op_name] = row
            del results
    finally:
        if saved is None:
            os.environ.pop(ENV_VAR, None)
        else:
            os.environ[ENV_VAR] = saved
    del c
    if str(device).startswith("cuda"):
        torch.cuda.empty_cache()
    return case


def _line(case: dict) -> str:
    parts = []
    for op_name, row in case["ops"].items():
        for backend, e in row.items():
            if "error" in e:
                parts.append(f"{op_name}/{backend} ERROR")
                continue
            worst = max(e["vs_float64"].values(), default=0.0)
            ms = f" {e['ms']:.2f} ms" if "ms" in e else ""
            parts.append(f"{op_name}/{backend} {worst:.1e}{ms}")
    return (f"d {case['d']:5d} n {case['n']:7d} k {case['k']:3d} {case['dtype']:8s} "
            f"{'ok  ' if case['ok'] else 'FAIL'} " + ", ".join(parts))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda", help="cuda (default) or cpu (the Triton path then runs under the "
                                                    "Triton interpreter: only sensible with --tiny)")
    p.add_argument("--tiny", action="store_true", help=f"tiny shapes {TINY} with B 16 (the dry run)")
    p.add_argument("--dtypes", default=",".join(DTYPES), help="comma list (default float32,bfloat16)")
    p.add_argument("--backends", default="triton,torch", help="comma list of triton, torch (default both)")
    p.add_argument("--repeats", type=int, default=5, help="timed runs per op (median; default 5; 0: no timing)")
    p.add_argument("--out", default=None, help="JSON path (default: print only)")
    args = p.parse_args(argv)
    backends = [b for b in args.backends.split(",") if b]
    if args.device == "cpu" and "triton" in backends:
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is first imported
    import torch

    from saelab.kernels import triton_available

    if "triton" in backends and not triton_available():
        print("triton is not importable here: the Triton path is skipped", file=sys.stderr)
        backends.remove("triton")
    result = {"bench": "gpu_kernels", "device": args.device, "device_name": device_name(args.device),
              "torch": torch.__version__, "date": datetime.datetime.now(datetime.timezone.utc).isoformat(
                  timespec="seconds"), "backends": backends, "tiny": args.tiny, "repeats": args.repeats,
              "sample_rows": SAMPLE, "tolerance": TOL, "cases": []}
    try:
        import triton

        result["triton"] = triton.__version__
    except Exception:  # noqa: BLE001
        result["triton"] = None
    shapes, batch = (TINY, 16) if args.tiny else (REAL, B)
    for dtype_name in args.dtypes.split(","):
        for d, n, k in shapes:
            try:
                case = run_case(d, n, k, dtype_name, args.device, backends, batch, args.repeats,
                                time_it=args.repeats > 0)
            except Exception as e:  # noqa: BLE001 - a case that cannot even be built (out of memory, ...)
                case = {"d": d, "n": n, "k": k, "dtype": dtype_name, "ok": False, "ops": {},
                        "error": "".join(traceback.format_exception_only(type(e), e)).strip()[-1000:]}
                print(f"d {d} n {n} k {k} {dtype_name}: ERROR {case['error']}", flush=True)
            else:
                print(_line(case), flush=True)
            result["cases"].append(case)
            if args.out:
                Path(args.out).write_text(json.dumps(result, indent=2))
    result["ok"] = all(case["ok"] for case in result["cases"])
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2))
        print(f"wrote {args.out}")
    print("all ops within tolerance" if result["ok"] else "SOME OPS FAILED (see the JSON)")
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
