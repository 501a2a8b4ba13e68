"""The fused Triton streaming encoder top-k (saelab/kernels/triton_topk_stream.py) at real SAE widths: its answer
against the dense path, and its time against dense GEMM + topk and the blocked torch path.

    python bench/gpu_topk_stream.py --out FILE.json      # CUDA: B 4096, k 32, d {2048, 4096} × n {65536, 262144},
                                                         # bf16 and fp32 (TF32 off)
    python bench/gpu_topk_stream.py --device cpu --tiny  # the dry run: tiny sizes, Triton under its interpreter

Two kinds of case, all with W_enc column-major as the SAE stores it:

* exact (d 2048, n 65536, fp32 and bf16): integer inputs (x, W in [-2, 2], b in [-8, 8]), so every summation order
  gives the same pre-activations and ties abound. The kernel's (values, indices) must equal a stable sort of the
  dense pre-activations (the tie rule: among equal values the lowest index) exactly, and the blocked torch path
  (SAELAB_KERNELS=torch, chunk 8192) must select the same sets. Also recorded: on rows whose k-th and (k+1)-th
  values tie, how often CUDA's dense topk keeps the lowest indices (the torch path's tie rule on CUDA is its rule).
* timed (every shape): x ~ N(0, 1), W ~ N(0, 1/d), b ~ N(0, 0.01). Median ms over --repeats and peak CUDA memory
  beyond the inputs for dense (addmm + topk: the [B, n] matrix), fused and blocked; the fused answer against the
  dense one: the sorted top-k values (max error relative to the largest), the fused values against the dense
  pre-activations at the fused indices, and the rows whose index sets differ among the rows whose dense k-th and
  (k+1)-th values are more than MARGIN (relative) apart: must be none (closer rows may flip by GEMM rounding).

Exit status 1 when a check fails or a method raised.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import traceback
import warnings
from pathlib import Path

from sparse_kernels import device_name, median_ms  # bench/sparse_kernels.py (this folder is on sys.path)

B, K, CHUNK = 4096, 32, 8192
REAL = [(d, n) for d in (2048, 4096) for n in (65536, 262144)]
EXACT = (2048, 65536)
TINY = dict(B=37, K=5, CHUNK=64, shapes=[(40, 300)], exact=(40, 300))
DTYPES = ("bfloat16", "float32")
TOL = {"float32": 1e-4, "bfloat16": 1e-2}  # values: max error relative to the largest
MARGIN = {"float32": 1e-5, "bfloat16": 2e-2}  # a row's k-th and (k+1)-th values this far apart must not flip


def make_inputs(batch: int, d: int, n: int, dtype, device: str, integer: bool, seed: int = 0):
    import torch

    g = torch.Generator(device=device).manual_seed(seed)
    if integer:
        x = torch.randint(-2, 3, (batch, d), generator=g, device=device)
        W = torch.randint(-2, 3, (n, d), generator=g, device=device)
        b = torch.randint(-8, 9, (n,), generator=g, device=device)
    else:
        x = torch.randn(batch, d, generator=g, device=device)
        W = torch.randn(n, d, generator=g, device=device) / d ** 0.5
        b = 0.1 * torch.randn(n, generator=g, device=device)
    return x.to(dtype), W.to(dtype).T, b.to(dtype)  # W_enc [d, n], column-major


def dense(x, W, b, k):
    import torch

    pre = torch.addmm(b, x, W)
    top = pre.topk(k, dim=1, sorted=False)
    return top.values, top.indices


def fused(x, W, b, k):
    from saelab.kernels.triton_topk_stream import fused_topk

    return fused_topk(x, W, b, k)


def blocked(x, W, b, k, chunk):
    """The torch streaming path (block GEMMs by cuBLAS and a topk merge), forced with SAELAB_KERNELS=torch."""
    from saelab.kernels.backend import ENV_VAR
    from saelab.kernels.topk_stream import streaming_topk

    saved = os.environ.get(ENV_VAR)
    os.environ[ENV_VAR] = "torch"
    try:
        return streaming_topk(x, W, b, k, chunk)
    finally:
        if saved is None:
            os.environ.pop(ENV_VAR, None)
        else:
            os.environ[ENV_VAR] = saved


def rel_err(got, want) -> float:
    scale = want.double().abs().max().item()
    err = (got.double() - want.double()).abs().max().item()
    return err / scale if scale > 0 else err


def same_sets(a, b):
    """[B] bool: the rows whose index sets are equal."""
    return (a.sort(1).values == b.sort(1).values).all(1)


def peak_mb(fn, device: str):
    """(result, peak CUDA memory in MB beyond what was allocated before; None off CUDA)."""
    import torch

    if not device.startswith("cuda"):
        return fn(), None
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    out = fn()
    torch.cuda.synchronize(device)
    return out, round((torch.cuda.max_memory_allocated(device) - base) / 2 ** 20, 1)


def exact_case(d: int, n: int, dtype_name: str, device: str, batch: int, k: int, chunk: int) -> dict:
    import torch

    x, W, b = make_inputs(batch, d, n, getattr(torch, dtype_name), device, integer=True, seed=1)
    pre = torch.addmm(b, x, W)  # exact integers, then the dtype's one rounding, whatever the summation order
    order = pre.float().sort(dim=1, descending=True, stable=True).indices
    ref_i = order[:, :k]
    kth, next_ = pre.gather(1, order[:, k - 1:k]).squeeze(1), pre.gather(1, order[:, k:k + 1]).squeeze(1)
    del order
    fv, fi = fused(x, W, b, k)
    bv, bi = blocked(x, W, b, k, chunk)
    dv, di = dense(x, W, b, k)
    tied = kth == next_
    case = {"kind": "exact", "d": d, "n": n, "B": batch, "k": k, "dtype": dtype_name,
            "fused_equals_stable_sort": bool(torch.equal(fi, ref_i) and torch.equal(fv, pre.gather(1, ref_i))),
            "fused_rows_differing": int((~(fi == ref_i).all(1)).sum()),
            "blocked_same_sets": bool(same_sets(bi, ref_i).all()),
            "blocked_rows_differing": int((~same_sets(bi, ref_i)).sum()),
            "blocked_same_sets_as_dense_topk": bool(same_sets(bi, di).all()),
            "rows_with_boundary_ties": int(tied.sum()),
            "dense_topk_lowest_index_on_tied_rows": int(same_sets(di, ref_i)[tied].sum())}
    # on CUDA the torch path's ties follow CUDA's topk, which should keep the lowest indices; on a CPU they follow
    # ATen's heap (the torch path equals the dense CPU topk there instead, tests/test_streaming_topk.py)
    case["ok"] = case["fused_equals_stable_sort"] and (case["blocked_same_sets"] or not device.startswith("cuda"))
    return case


def timed_case(d: int, n: int, dtype_name: str, device: str, batch: int, k: int, chunk: int, repeats: int) -> dict:
    import torch

    x, W, b = make_inputs(batch, d, n, getattr(torch, dtype_name), device, integer=False)
    case = {"kind": "timed", "d": d, "n": n, "B": batch, "k": k, "dtype": dtype_name, "chunk": chunk,
            "tolerance": TOL[dtype_name], "margin": MARGIN[dtype_name], "ms": {}, "peak_mb": {}, "errors": {}}
    answers = {}
    for name, fn in (("dense", lambda: dense(x, W, b, k)), ("fused", lambda: fused(x, W, b, k)),
                     ("blocked", lambda: blocked(x, W, b, k, chunk))):
        try:
            answers[name], case["peak_mb"][name] = peak_mb(fn, device)
            case["ms"][name] = round(median_ms(fn, device, repeats, 1), 3)
        except Exception as e:  # noqa: BLE001 - recorded; the other methods still run
            case["errors"][name] = "".join(traceback.format_exception_only(type(e), e)).strip()[-1000:]
            if device.startswith("cuda"):
                torch.cuda.empty_cache()
    if "dense" in answers and "fused" in answers:
        (dv, di), (fv, fi) = answers["dense"], answers["fused"]
        pre = torch.addmm(b, x, W)
        s = pre.topk(k + 1, dim=1).values.float()
        clear = (s[:, k - 1] - s[:, k]) > MARGIN[dtype_name] * s[:, 0].abs()
        case["fused_values_vs_dense_preacts"] = rel_err(fv, pre.gather(1, fi))
        del pre
        case["fused_vs_dense_sorted_values"] = rel_err(fv.float().sort(1).values, dv.float().sort(1).values)
        case["clear_rows"] = int(clear.sum())
        case["clear_rows_differing"] = int((~same_sets(fi, di) & clear).sum())
        case["rows_same_set"] = int(same_sets(fi, di).sum())
        if "blocked" in answers:
            case["blocked_rows_same_set_as_dense"] = int(same_sets(answers["blocked"][1], di).sum())
    case["ok"] = not case["errors"] and case.get("clear_rows_differing", 1) == 0 \
        and case.get("fused_vs_dense_sorted_values", 1.0) <= TOL[dtype_name] \
        and case.get("fused_values_vs_dense_preacts", 1.0) <= TOL[dtype_name]
    for name in ("dense", "fused", "blocked"):
        if name in case["ms"] and "dense" in case["ms"]:
            case.setdefault("speedup_vs_dense", {})[name] = round(case["ms"]["dense"] / case["ms"][name], 2)
    return case


def auto_path(device: str) -> dict:
    """Which path `streaming_topk` takes with SAELAB_KERNELS unset on this device (training's choice)."""
    import torch

    from saelab.kernels import triton_topk_stream
    from saelab.kernels.backend import ENV_VAR
    from saelab.kernels.topk_stream import streaming_topk

    if os.environ.get(ENV_VAR):
        return {"skipped": f"{ENV_VAR} is set"}
    x, W, b = make_inputs(64, 256, 4096, torch.float32, device, integer=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        streaming_topk(x, W, b, 8, 1024)
    return {"fused": bool(triton_topk_stream._CHECKED), "warnings": [str(w.message)[:500] for w in caught]}


def _line(case: dict) -> str:
    head = f"{case['kind']:5s} d {case['d']:5d} n {case['n']:7d} {case['dtype']:8s} {'ok  ' if case['ok'] else 'FAIL'}"
    if case["kind"] == "exact":
        return (f"{head} fused = stable sort: {case['fused_equals_stable_sort']} "
                f"({case['fused_rows_differing']} rows differ), blocked same sets: {case['blocked_same_sets']}; "
                f"dense topk keeps the lowest index on {case['dense_topk_lowest_index_on_tied_rows']}/"
                f"{case['rows_with_boundary_ties']} tied rows")
    times = ", ".join(f"{m} {case['ms'][m]:.2f} ms ({case['peak_mb'][m]} MB)" for m in case["ms"])
    errs = "; ".join(f"{m} ERROR" for m in case["errors"])
    check = (f"; values {case['fused_vs_dense_sorted_values']:.1e}, clear rows differing "
             f"{case['clear_rows_differing']}/{case['clear_rows']}") if "clear_rows" in case else ""
    return f"{head} {times}{check}{'; ' + errs if errs else ''}"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda", help="cuda (default) or cpu (Triton under its interpreter: only "
                                                    "sensible with --tiny)")
    p.add_argument("--tiny", action="store_true", help="tiny shapes (B 37, d 40, n 300, k 5): the dry run")
    p.add_argument("--dtypes", default=",".join(DTYPES), help="comma list (default bfloat16,float32)")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per method (median; default 3)")
    p.add_argument("--out", default=None, help="JSON path (default: print only)")
    args = p.parse_args(argv)
    if args.device == "cpu":
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is first imported
    import torch

    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 GEMMs in full fp32 on both sides of the comparison
    batch, k, chunk = (TINY["B"], TINY["K"], TINY["CHUNK"]) if args.tiny else (B, K, CHUNK)
    shapes, exact = (TINY["shapes"], TINY["exact"]) if args.tiny else (REAL, EXACT)
    result = {"bench": "gpu_topk_stream", "device": args.device, "device_name": device_name(args.device),
              "torch": torch.__version__, "date": datetime.datetime.now(datetime.timezone.utc).isoformat(
                  timespec="seconds"), "tiny": args.tiny, "B": batch, "k": k, "chunk": chunk, "tf32": False,
              "repeats": args.repeats, "cases": []}
    try:
        import triton

        result["triton"] = triton.__version__
    except Exception:  # noqa: BLE001
        result["triton"] = None
    plan = [("exact", exact, dt) for dt in ("float32", "bfloat16")] + \
        [("timed", shape, dt) for dt in args.dtypes.split(",") for shape in shapes]
    for kind, (d, n), dtype_name in plan:
        try:
            case = exact_case(d, n, dtype_name, args.device, batch, k, chunk) if kind == "exact" else \
                timed_case(d, n, dtype_name, args.device, batch, k, chunk, args.repeats)
        except Exception as e:  # noqa: BLE001 - a case that cannot even be built (out of memory, ...)
            case = {"kind": kind, "d": d, "n": n, "dtype": dtype_name, "ok": False,
                    "error": "".join(traceback.format_exception_only(type(e), e)).strip()[-1000:]}
            print(f"{kind} d {d} n {n} {dtype_name}: ERROR {case['error']}", flush=True)
        else:
            print(_line(case), flush=True)
        if args.device.startswith("cuda"):
            torch.cuda.empty_cache()
        result["cases"].append(case)
        if args.out:
            Path(args.out).write_text(json.dumps(result, indent=2))
    result["auto"] = auto_path(args.device)
    print(f"streaming_topk with {'the fused kernel' if result['auto'].get('fused') else 'the torch path'} "
          f"in auto mode {result['auto']}")
    result["ok"] = all(case["ok"] for case in result["cases"])
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2))
        print(f"wrote {args.out}")
    print("fused top-k matches" if result["ok"] else "SOME CHECKS FAILED (see the JSON)")
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
