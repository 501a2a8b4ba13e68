"""Sparse decode (forward + backward) vs the dense decoder `z_dense @ W_dec` with autograd.

    python bench/sparse_kernels.py                      # full grid: d {256, 768, 2304} × n {4k, 32k, 131k} × k {32, 128}
    python bench/sparse_kernels.py --quick              # shape a, shape b and d=768 n=32k k=32
    python bench/sparse_kernels.py --device cuda --dtype bfloat16
    python bench/sparse_kernels.py --candidates         # CPU candidates for sparse_transpose_matmul (shapes a and b)
    python bench/sparse_kernels.py --cases 64x512x8     # only these d×n×k cases (bench/gpu.sh --dry-run uses tiny ones)

B = 4096 tokens. Each case: warm-up, then the median of --repeats timed runs (CUDA-synchronised on a GPU). Each
sparse run decodes a fresh copy of the indices, so the Triton path's counting sort (kept per indices tensor, to be
shared by the decoder and encoder backward of one step) is counted every run. The dense side is the pure GEMM path
(z is a leaf [B, n] tensor that requires grad; building it from the code is not counted), so the speed-up is
conservative. Dense cases whose memory or estimated time would be absurd on this device are skipped and marked.
Prints a table and writes bench/results/kernels-<device>.json (device name, torch/triton versions, threads, date).

Bars (from the issue): CPU torch path ≥ 3× dense at n=32k, k=32; GPU Triton path ≥ 5× at n=131k, k=32 in bf16.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

B = 4096
GRID = [(d, n, k) for d in (256, 768, 2304) for n in (4096, 32768, 131072) for k in (32, 128)]
QUICK = [(256, 4096, 32), (768, 24576, 32), (768, 32768, 32)]  # shape a, shape b, the CPU bar's case
CANDIDATE_SHAPES = {"a": (256, 4096, 32), "b": (768, 24576, 32)}


def sync(device: str) -> None:
    """Wait for the device's queued work (CUDA runs asynchronously; a timer must not stop before it ends)."""
    import torch

    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def median_ms(fn, device: str, repeats: int, warmup: int) -> float:
    """Median wall time of `fn` in ms over `repeats` runs after `warmup` untimed ones, synchronised on CUDA."""
    for _ in range(warmup):
        fn()
    sync(device)
    runs = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        sync(device)
        runs.append(time.perf_counter() - t)
    return statistics.median(runs) * 1e3


def device_name(device: str) -> str:
    import torch

    if device.startswith("cuda"):
        return torch.cuda.get_device_name(device)
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _free_bytes(device: str) -> int:
    import torch

    if device.startswith("cuda"):
        return torch.cuda.mem_get_info(device)[0]
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):
        return 8 << 30


def _gemm_flops(device: str, dtype) -> float:
    """Measured dense GEMM throughput (FLOP/s), to predict the dense decoder's time before running it."""
    import torch

    a = torch.randn(1024, 1024, device=device, dtype=dtype)
    ms = median_ms(lambda: a @ a, device, repeats=3, warmup=1)
    return 2 * 1024 ** 3 / (ms / 1e3)


def bench_case(d: int, n: int, k: int, device: str, dtype, repeats: int, warmup: int, flops: float,
               max_dense_s: float) -> dict:
    import torch

    from saelab.kernels import backend_for, sparse_decode

    torch.manual_seed(0)
    el = torch.tensor([], dtype=dtype).element_size()
    W = torch.randn(n, d, device=device, dtype=dtype) / d ** 0.5
    W.requires_grad_()
    pre = torch.randn(B, n, device=device, dtype=dtype) if B * n * el < _free_bytes(device) // 4 else None
    if pre is not None:  # realistic TopK indices (distinct per token)
        vals, idx = pre.topk(k, dim=-1, sorted=False)
        del pre
    else:
        idx = torch.randint(0, n, (B, k), device=device)
        vals = torch.randn(B, k, device=device, dtype=dtype)
    vals = vals.relu().detach().requires_grad_()
    g = torch.randn(B, d, device=device, dtype=dtype)
    row = {"d": d, "n": n, "k": k, "B": B, "backend": backend_for(idx, vals, W)}

    def sparse():
        W.grad = vals.grad = None
        sparse_decode(idx.clone(), vals, W).backward(g)  # a fresh indices tensor: the sort is not reused

    row["sparse_ms"] = median_ms(sparse, device, repeats, warmup)

    dense_bytes = (2 * B * n + 2 * n * d + 2 * B * d) * el  # z, dz, W, dW, out, grad
    dense_s = 3 * 2 * B * n * d / flops  # forward GEMM + two backward GEMMs
    if dense_bytes > _free_bytes(device) * 0.6:
        row["dense_skipped"] = f"needs ~{dense_bytes / 2**30:.1f} GiB"
    elif dense_s > max_dense_s:
        row["dense_skipped"] = f"~{dense_s:.0f} s per run"
    else:
        z = torch.zeros(B, n, device=device, dtype=dtype).scatter_(1, idx, vals.detach()).requires_grad_()

        def dense():
            W.grad = z.grad = None
            (z @ W).backward(g)

        row["dense_ms"] = median_ms(dense, device, repeats, warmup)
        row["speedup"] = row["dense_ms"] / row["sparse_ms"]
        del z
    del W, idx, vals, g
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    return row


def _cases(text: str) -> list[tuple[int, int, int]]:
    try:
        cases = [tuple(int(v) for v in case.lower().split("x")) for case in text.split(",")]
    except ValueError:
        cases = []
    if not cases or any(len(c) != 3 or min(c) < 1 for c in cases):
        raise argparse.ArgumentTypeError(f"--cases {text!r}: expected DxNxK[,DxNxK...], e.g. 768x32768x32")
    return cases


# ------------------------------------------------------------------------------------------------ CPU candidates
def candidates(threads: int, rounds: int) -> list[dict]:
    """Ways to compute Sᵀ @ dense (the weight gradients) on the CPU, timed interleaved: wall min and median, and
    the median process CPU time (all threads; the steadier number on a shared machine)."""
    import warnings

    import torch

    from saelab.kernels import torch_ops

    warnings.filterwarnings("ignore", message=".*[Ss]parse.*")
    out = []
    for name, (d, n, k) in CANDIDATE_SHAPES.items():
        torch.manual_seed(0)
        idx = torch.randint(0, n, (B, k))
        w = torch.randn(B, k)
        G = torch.randn(B, d)
        flat, wf = idx.reshape(-1), w.reshape(-1)
        bag = torch.arange(B).repeat_interleave(k)

        def index_add():  # sparsify's encoder backward: materialises [B·k, d]
            return torch.zeros(n, d).index_add_(0, flat, (w[..., None] * G[:, None, :]).reshape(-1, d))

        def csr_sorted():  # sort once (argsort + bincount → CSR [n, B]), then CSR @ dense (MKL)
            order = torch.argsort(flat)
            crow = torch.zeros(n + 1, dtype=torch.long)
            crow[1:] = torch.bincount(flat, minlength=n).cumsum(0)
            return torch.sparse_csr_tensor(crow, bag[order], wf[order], size=(n, B)) @ G

        def csr_transposed():  # CSR [B, n] needs no sort; torch transposes it for the product
            return torch.sparse_csr_tensor(torch.arange(0, B * k + 1, k), flat, wf, size=(B, n)).t() @ G

        def coo():  # COO [n, B] → coalesce (sort) → sparse.mm
            return torch.sparse.mm(torch.sparse_coo_tensor(torch.stack([flat, bag]), wf, size=(n, B)), G)

        def embedding_bag_backward():  # sort, then one thread per latent row (axpy per occurrence)
            e = torch.empty(0, dtype=torch.long)
            return torch.ops.aten._embedding_bag_dense_backward(G, flat, bag, e, e, n, False, 0, wf)

        def chosen():  # what saelab's torch path runs at this width
            return torch_ops.transpose_matmul(idx, w, G, n)

        def dense_gemm():
            return torch.zeros(B, n).scatter_add_(1, idx, w).T @ G

        fns = {"index_add [B·k,d]": index_add, "csr_sorted": csr_sorted, "csr_transposed": csr_transposed,
               "coo": coo, "embedding_bag_backward": embedding_bag_backward, "saelab torch path": chosen,
               "dense_gemm": dense_gemm}
        ref = chosen()
        runs = {key: [] for key in fns}
        cpu = {key: [] for key in fns}
        for f in fns.values():
            f()
        for _ in range(rounds):
            for key, f in fns.items():
                t, c = time.perf_counter(), time.process_time()
                res = f()
                runs[key].append((time.perf_counter() - t) * 1e3)
                cpu[key].append((time.process_time() - c) * 1e3)
                assert torch.allclose(res, ref, atol=1e-3, rtol=1e-4), key
        for key, r in runs.items():
            out.append({"shape": name, "d": d, "n": n, "k": k, "B": B, "threads": threads, "candidate": key,
                        "min_ms": min(r), "median_ms": statistics.median(r),
                        "cpu_median_ms": statistics.median(cpu[key])})
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default=None, help="cuda if available, else cpu")
    p.add_argument("--dtype", default=None, help="float32 (default on cpu) | bfloat16 (default on cuda) | float16")
    p.add_argument("--threads", type=int, default=2, help="CPU threads (torch.set_num_threads)")
    p.add_argument("--repeats", type=int, default=5, help="timed runs per case (median; default 5)")
    p.add_argument("--warmup", type=int, default=1, help="untimed runs first (default 1)")
    p.add_argument("--quick", action="store_true", help="shape a, shape b and d=768 n=32k k=32 only")
    p.add_argument("--cases", type=_cases, default=None, metavar="DxNxK,...",
                   help="only these cases, e.g. 768x131072x32,2304x131072x64 (default: the full grid)")
    p.add_argument("--max-dense-s", type=float, default=None,
                   help="skip dense cases predicted to take longer per run (default 30 on cpu, 60 on cuda)")
    p.add_argument("--backend", choices=["auto", "torch", "triton"], default=None, help="sets SAELAB_KERNELS")
    p.add_argument("--candidates", action="store_true", help="also time the CPU sparse_transpose_matmul candidates")
    p.add_argument("--rounds", type=int, default=9, help="interleaved rounds for --candidates")
    p.add_argument("--out", default=None, help="JSON path (default bench/results/kernels-<device>.json)")
    args = p.parse_args(argv)
    if args.backend:
        os.environ["SAELAB_KERNELS"] = args.backend

    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = getattr(torch, args.dtype or ("bfloat16" if device.startswith("cuda") else "float32"))
    if device == "cpu":
        torch.set_num_threads(args.threads)
    max_dense_s = args.max_dense_s if args.max_dense_s is not None else (30.0 if device == "cpu" else 60.0)
    try:
        import triton

        triton_version = triton.__version__
    except Exception:
        triton_version = None

    result = {"device": device, "device_name": device_name(device), "dtype": str(dtype).replace("torch.", ""),
              "torch": torch.__version__, "triton": triton_version, "threads": torch.get_num_threads(),
              "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "B": B, "repeats": args.repeats, "warmup": args.warmup, "quick": args.quick,
              "python": platform.python_version(), "argv": sys.argv[1:]}

    if args.candidates:
        result["transpose_matmul_candidates"] = cands = candidates(torch.get_num_threads(), args.rounds)
        print(f"sparse_transpose_matmul candidates (B={B}, threads={torch.get_num_threads()}, ms)")
        print(f"{'shape':>5} {'candidate':>24} {'min':>9} {'median':>9} {'cpu time':>9}")
        for c in cands:
            print(f"{c['shape']:>5} {c['candidate']:>24} {c['min_ms']:9.1f} {c['median_ms']:9.1f} "
                  f"{c['cpu_median_ms']:9.1f}")

    flops = _gemm_flops(device, dtype)
    result["gemm_gflops"] = flops / 1e9
    rows = []
    print(f"\nsparse decode fwd+bwd vs dense, {result['device_name']}, {result['dtype']}, B={B}, "
          f"threads={result['threads']}, median of {args.repeats}")
    print(f"{'d':>5} {'n':>7} {'k':>4} {'dense ms':>10} {'sparse ms':>10} {'speed-up':>9}  backend / note")
    for d, n, k in args.cases or (QUICK if args.quick else GRID):
        row = bench_case(d, n, k, device, dtype, args.repeats, args.warmup, flops, max_dense_s)
        rows.append(row)
        dense = f"{row['dense_ms']:10.1f}" if "dense_ms" in row else f"{'skipped':>10}"
        speed = f"{row['speedup']:8.1f}x" if "speedup" in row else f"{'-':>9}"
        note = row["backend"] + (f"; dense skipped ({row['dense_skipped']})" if "dense_skipped" in row else "")
        print(f"{d:5d} {n:7d} {k:4d} {dense} {row['sparse_ms']:10.1f} {speed}  {note}", flush=True)
    result["rows"] = rows

    out = Path(args.out) if args.out else Path(__file__).parent / "results" / f"kernels-{device.split(':')[0]}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
