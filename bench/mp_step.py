"""Training step of MP-SAE and Feature Choice side by side with TopK (and BatchTopK = Mutual Choice) at shape a
(d 256, n 4096, B 4096, k = T = 32), plus where MP's step goes and the crossover of its two correlation updates
(Gram rows c ← c − v·G[j] vs one r·Dᵀ GEMM per step) over the width n.

    python bench/mp_step.py            # 2 threads, shape a
    python bench/mp_step.py --quick    # fewer repeats

Prints a table and writes bench/results/mp_step.json. Each variant runs in its own subprocess. Times are the median
of repeats, as wall-clock and as this process's CPU time (the dev box is shared: CPU time is the steadier of the
two); ratios are against TopK measured in the same run.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

VARIANTS = ("topk", "batchtopk", "mp", "feature_choice")


def _time(fn, steps, repeats, warmup=1):
    for _ in range(warmup):
        fn()
    wall, cpu = [], []
    for _ in range(repeats):
        w, c = time.perf_counter(), time.process_time()
        for _ in range(steps):
            fn()
        wall.append((time.perf_counter() - w) / steps)
        cpu.append((time.process_time() - c) / steps)
    return statistics.median(wall), statistics.median(cpu)


def run_variant(arch: str, d: int, n: int, k: int, B: int, threads: int, steps: int, repeats: int) -> dict:
    import torch

    from saelab.config import SAEConfig
    from saelab.sae import SparseAutoencoder

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    x = torch.randn(B, d)
    sae = SparseAutoencoder(SAEConfig(architecture=arch, d_in=d, n_latents=n, k=k, normalize="none"))
    sae.init_from_data_(x)
    opt = torch.optim.Adam(sae.parameters(), lr=1e-4, eps=6.25e-10)
    state = {"step": 0}

    def step():
        out = sae(x)
        opt.zero_grad(set_to_none=True)
        out.losses["loss"].backward()
        sae.remove_parallel_grad_()
        torch.nn.utils.clip_grad_norm_(sae.parameters(), 1.0)
        opt.step()
        sae.normalize_decoder_()
        sae.after_step(out, state["step"])
        state["step"] += 1

    wall, cpu = _time(step, steps, repeats)
    row = {"arch": arch, "d": d, "n": n, "k": k, "B": B, "step_s": wall, "step_cpu_s": cpu, "tokens_per_s": B / wall}
    if arch == "mp":
        from saelab.sae.matching_pursuit import pursuit_code, pursuit_indices

        U = sae.W_dec.detach()
        x_c = (x - sae.b_dec).detach()
        parts = {}
        parts["select_gram"] = _time(lambda: pursuit_indices(x_c, U, k, "relu", gram=True), 1, repeats)
        parts["select_gemm_per_step"] = _time(lambda: pursuit_indices(x_c, U, k, "relu", gram=False), 1, repeats)
        idx, keep = pursuit_indices(x_c, U, k, "relu")

        def values():
            xr, Ur = x_c.clone().requires_grad_(), U.clone().requires_grad_()
            code = pursuit_code(xr, Ur, idx, keep)
            code.values.sum().backward()

        parts["values_fwd_bwd"] = _time(values, 1, repeats)
        row["breakdown"] = {name: {"wall_s": w, "cpu_s": c} for name, (w, c) in parts.items()}
    return row


def run_crossover(d: int, B: int, T: int, widths: list[int], threads: int, repeats: int) -> list[dict]:
    """MP selection alone: Gram-row updates vs a GEMM per step, over n."""
    import torch

    from saelab.sae.matching_pursuit import pursuit_indices

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    rows = []
    for n in widths:
        D = torch.nn.functional.normalize(torch.randn(n, d), dim=1)
        x = torch.randn(B, d)
        g = _time(lambda: pursuit_indices(x, D, T, "relu", gram=True), 1, repeats)
        m = _time(lambda: pursuit_indices(x, D, T, "relu", gram=False), 1, repeats)
        rows.append({"n": n, "d": d, "B": B, "T": T, "gram_wall_s": g[0], "gram_cpu_s": g[1], "gemm_wall_s": m[0],
                     "gemm_cpu_s": m[1], "gram_speedup_cpu": m[1] / g[1]})
    return rows


def _child(spec: dict) -> dict:
    res = subprocess.run([sys.executable, __file__, "--_one", json.dumps(spec)], capture_output=True, text=True)
    if res.returncode:
        print(res.stderr, file=sys.stderr)
        raise SystemExit(1)
    return json.loads(res.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--d", type=int, default=256)
    p.add_argument("--n", type=int, default=4096)
    p.add_argument("--k", type=int, default=32, help="k of TopK/BatchTopK/feature choice and T of MP")
    p.add_argument("--batch", type=int, default=4096)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--widths", default="1024,4096,16384", help="n of the Gram-vs-GEMM crossover (B 1024)")
    p.add_argument("--quick", action="store_true", help="2 steps × 2 repeats")
    p.add_argument("--out", default="bench/results")
    p.add_argument("--_one", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args._one:
        spec = json.loads(args._one)
        if spec.pop("crossover", False):
            print(json.dumps(run_crossover(**spec)))
        else:
            print(json.dumps(run_variant(**spec)))
        return 0
    if args.quick:
        args.steps, args.repeats = 2, 2
    rows = []
    for arch in VARIANTS:
        row = _child(dict(arch=arch, d=args.d, n=args.n, k=args.k, B=args.batch, threads=args.threads,
                          steps=args.steps, repeats=args.repeats))
        rows.append(row)
        print(f"{arch:15s} step {row['step_s'] * 1e3:8.1f} ms wall, {row['step_cpu_s'] * 1e3:8.1f} ms CPU", flush=True)
    cross = _child(dict(crossover=True, d=args.d, B=1024, T=args.k, widths=[int(w) for w in args.widths.split(",")],
                        threads=args.threads, repeats=args.repeats))
    base = rows[0]
    print()
    print(f"shape d {args.d}, n {args.n}, B {args.batch}, k = T = {args.k}, {args.threads} threads")
    print(f"{'arch':15} {'wall ms':>9} {'CPU ms':>9} {'× TopK (wall)':>14} {'× TopK (CPU)':>13}")
    for r in rows:
        r["vs_topk_wall"] = r["step_s"] / base["step_s"]
        r["vs_topk_cpu"] = r["step_cpu_s"] / base["step_cpu_s"]
        print(f"{r['arch']:15} {r['step_s'] * 1e3:9.1f} {r['step_cpu_s'] * 1e3:9.1f} {r['vs_topk_wall']:13.2f}× "
              f"{r['vs_topk_cpu']:12.2f}×")
    mp = next(r for r in rows if r["arch"] == "mp")
    print("MP breakdown (CPU ms): " + ", ".join(f"{k} {v['cpu_s'] * 1e3:.0f}" for k, v in mp["breakdown"].items()))
    print(f"\nMP selection alone, B 1024, T {args.k}: Gram rows vs a GEMM per step")
    print(f"{'n':>7} {'Gram CPU ms':>12} {'GEMM CPU ms':>12} {'Gram speed-up':>14}")
    for c in cross:
        print(f"{c['n']:7d} {c['gram_cpu_s'] * 1e3:12.1f} {c['gemm_cpu_s'] * 1e3:12.1f} {c['gram_speedup_cpu']:13.2f}×")
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    result = {"bench": "mp_step", "date": datetime.datetime.now().isoformat(timespec="seconds"),
              "machine": {"cpu": cpu, "cores": __import__("os").cpu_count(), "threads": args.threads},
              "torch": torch.__version__, "shape": {"d": args.d, "n": args.n, "B": args.batch, "k": args.k},
              "rows": rows, "crossover": cross}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "mp_step.json"
    path.write_text(json.dumps(result, indent=2))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
