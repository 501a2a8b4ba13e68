"""Whole TopK training step: tokens/s and peak memory, saelab (sparse kernels) vs a plain PyTorch loop (dense
decoder), with a breakdown of where saelab's step goes (encoder GEMM, top-k, sparse decode, sparse backward, Adam);
the AuxK overhead (10 % of latents dead vs none); and each architecture's step against the one it builds on, in the
same run: BatchTopK / TopK, Matryoshka (5 prefixes) / BatchTopK, g-SAE (cached gradients) / TopK.

    python bench/train_step.py                 # shapes a and b of research/peer_numbers.md, 2 threads
    python bench/train_step.py --quick         # shape a only, fewer repeats

Prints a table and writes bench/results/train_step-<device>.json. Each variant runs in its own subprocess so
its peak RSS is its own.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

SHAPES = {"a": (256, 4096), "b": (768, 24576)}


def _sync(device):
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _time(fn, device, steps, repeats, warmup=3):
    for _ in range(warmup):
        fn()
    _sync(device)
    runs = []
    for _ in range(repeats):
        t = time.perf_counter()
        for _ in range(steps):
            fn()
        _sync(device)
        runs.append((time.perf_counter() - t) / steps)
    return statistics.median(runs)


def run_variant(variant: str, d: int, n: int, k: int, B: int, dead_frac: float, device: str, threads: int,
                steps: int, repeats: int, arch: str = "topk", options: dict | None = None) -> dict:
    import torch

    from saelab.config import SAEConfig
    from saelab.kernels import encoder_values, sparse_decode
    from saelab.sae import SparseAutoencoder

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    x = torch.randn(B, d, device=device)
    dead = torch.zeros(n, dtype=torch.bool, device=device)
    dead[torch.randperm(n)[: int(dead_frac * n)]] = True
    out: dict = {"variant": variant, "arch": arch, "options": options or {}, "d": d, "n": n, "k": k, "B": B,
                 "dead_frac": dead_frac}

    if variant == "saelab":
        from saelab.config import TrainConfig
        from saelab.training.trainer import make_optimizer

        sae = SparseAutoencoder(SAEConfig(d_in=d, n_latents=n, k=k, normalize="none", architecture=arch,
                                          options=options or {}), device=device)
        sae.init_from_data_(x)
        opt = make_optimizer(sae, 1e-4, TrainConfig())  # the trainer's optimizer (foreach / fused Adam)
        mask = dead if dead_frac > 0 else None
        grad = torch.randn(B, d, device=device) if sae.arch.needs_grads else None  # as read from a cache

        def step():
            loss = sae(x, grad=grad, dead_mask=mask).losses["loss"]
            opt.zero_grad(set_to_none=True)
            loss.backward()
            sae.remove_parallel_grad_()
            torch.nn.utils.clip_grad_norm_(sae.parameters(), 1.0)
            opt.step()
            sae.normalize_decoder_()

        out["step_s"] = _time(step, device, steps, repeats)
        # breakdown, each part timed alone on the same tensors
        x_c = (x - sae.b_dec).detach()
        with torch.no_grad():
            pre = torch.addmm(sae.b_enc, x_c, sae.W_enc)
        idx = pre.topk(k, dim=-1, sorted=False).indices
        vals = pre.gather(1, idx)
        g = torch.randn(B, d, device=device)
        parts = {}
        with torch.no_grad():
            parts["encoder_gemm"] = _time(lambda: torch.addmm(sae.b_enc, x_c, sae.W_enc), device, steps, repeats)
            parts["topk"] = _time(lambda: pre.topk(k, dim=-1, sorted=False), device, steps, repeats)

        def dec():
            v = vals.detach().requires_grad_()
            y = sparse_decode(idx, v, sae.W_dec)
            y.backward(g)

        def enc_bwd():
            v = encoder_values(x_c, sae.W_enc, sae.b_enc, idx, vals.detach())
            v.backward(torch.ones_like(v))

        parts["sparse_decode_fwd_bwd"] = _time(dec, device, steps, repeats)
        parts["sparse_encoder_bwd"] = _time(enc_bwd, device, steps, repeats)
        sae.zero_grad()
        for p in sae.parameters():
            p.grad = torch.zeros_like(p)
        parts["adam_and_hygiene"] = _time(lambda: (sae.remove_parallel_grad_(), opt.step(), sae.normalize_decoder_()),
                                          device, steps, repeats)
        out["breakdown_s"] = parts
        out["encoder_gemm_fraction"] = parts["encoder_gemm"] / out["step_s"]
    else:  # the plain PyTorch TopK loop a user would write: dense decoder (and dense AuxK)
        W_enc = torch.nn.Parameter(torch.randn(d, n, device=device) / d ** 0.5)
        b_enc = torch.nn.Parameter(torch.zeros(n, device=device))
        W_dec = torch.nn.Parameter(W_enc.detach().T.clone())
        b_dec = torch.nn.Parameter(torch.zeros(d, device=device))
        params = [W_enc, b_enc, W_dec, b_dec]
        opt = torch.optim.Adam(params, lr=1e-4)

        def step():
            pre = torch.relu((x - b_dec) @ W_enc + b_enc)
            v, i = pre.topk(k, dim=-1, sorted=False)
            z = torch.zeros_like(pre).scatter(1, i, v)
            e = x - (z @ W_dec + b_dec)
            loss = e.pow(2).sum(-1).mean()
            if dead_frac > 0:
                av, ai = pre.masked_fill(~dead, 0).topk(d // 2, dim=-1, sorted=False)
                za = torch.zeros_like(pre).scatter(1, ai, av)
                ed = e.detach()
                loss = loss + (ed - za @ W_dec).pow(2).sum(-1).mean() / ed.var(0).sum() / 32
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            with torch.no_grad():
                W_dec.div_(W_dec.norm(dim=1, keepdim=True))

        out["step_s"] = _time(step, device, steps, repeats)
    out["tokens_per_s"] = B / out["step_s"]
    out["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if device.startswith("cuda"):
        out["peak_cuda_mb"] = torch.cuda.max_memory_allocated() / 2 ** 20
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", default="a,b", help="comma list of a (d 256, n 4096) and b (d 768, n 24576)")
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--batch", type=int, default=4096)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cpu")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--quick", action="store_true", help="shape a only, 5 steps × 2 repeats")
    p.add_argument("--no-archs", action="store_true", help="TopK only (skip the architecture comparison)")
    p.add_argument("--out", default="bench/results")
    p.add_argument("--_one", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args._one:  # child process: one variant
        print(json.dumps(run_variant(**json.loads(args._one))))
        return 0
    if args.quick:
        args.shapes, args.steps, args.repeats = "a", 5, 2
    rows = []
    for shape in args.shapes.split(","):
        d, n = SHAPES[shape]
        variants = [("plain_dense", 0.0, "topk", {}), ("saelab", 0.0, "topk", {}), ("plain_dense", 0.1, "topk", {}),
                    ("saelab", 0.1, "topk", {})]
        if not args.no_archs:
            variants += [("saelab", 0.0, "batchtopk", {}), ("saelab", 0.0, "matryoshka", {}),
                         ("saelab", 0.0, "gtopk", {}), ("saelab", 0.0, "gtopk", {"candidates": 4})]
        for variant, dead, arch, options in variants:
            spec = dict(variant=variant, d=d, n=n, k=args.k, B=args.batch, dead_frac=dead, device=args.device,
                        threads=args.threads, steps=args.steps, repeats=args.repeats, arch=arch, options=options)
            res = subprocess.run([sys.executable, __file__, "--_one", json.dumps(spec)], capture_output=True, text=True)
            if res.returncode:
                print(res.stderr, file=sys.stderr)
                return 1
            row = json.loads(res.stdout.strip().splitlines()[-1])
            row["shape"] = shape
            rows.append(row)
            print(f"shape {shape} {variant:11s} {arch:10s} {json.dumps(options) if options else '':18s} "
                  f"dead {dead:.0%}: {row['tokens_per_s']:9,.0f} tok/s  "
                  f"peak RSS {row['peak_rss_mb']:7.0f} MB", flush=True)
    print()
    print(f"{'shape':5} {'dead':>5} {'plain dense tok/s':>18} {'saelab tok/s':>13} {'speed-up':>9} {'GEMM share':>11}")
    for shape in args.shapes.split(","):
        for dead in (0.0, 0.1):
            base = next(r for r in rows if r["shape"] == shape and r["variant"] == "plain_dense" and r["dead_frac"] == dead)
            ours = next(r for r in rows if r["shape"] == shape and r["variant"] == "saelab" and r["dead_frac"] == dead
                        and r["arch"] == "topk")
            print(f"{shape:5} {dead:5.0%} {base['tokens_per_s']:18,.0f} {ours['tokens_per_s']:13,.0f} "
                  f"{ours['tokens_per_s'] / base['tokens_per_s']:8.2f}× {ours['encoder_gemm_fraction']:10.0%}")
    ratios = {}
    for shape in args.shapes.split(","):
        def step_s(arch, dead=0.0, **opts):
            return next(r["step_s"] for r in rows if r["shape"] == shape and r["variant"] == "saelab"
                        and r["arch"] == arch and r["dead_frac"] == dead and r["options"] == opts)
        ratios[shape] = {"auxk_10pct_dead / topk": step_s("topk", 0.1) / step_s("topk")}
        if not args.no_archs:
            ratios[shape].update({
                "batchtopk / topk": step_s("batchtopk") / step_s("topk"),
                "matryoshka(5 prefixes) / batchtopk": step_s("matryoshka") / step_s("batchtopk"),
                "gtopk(exact) / topk": step_s("gtopk") / step_s("topk"),
                "gtopk(candidates=4) / topk": step_s("gtopk", candidates=4) / step_s("topk")})
        print("step-time ratios, shape " + shape + ": " + ", ".join(f"{k} {v:.2f}×" for k, v in ratios[shape].items()))
    for r in rows:
        if r["variant"] == "saelab" and r["arch"] == "topk":
            parts = ", ".join(f"{k} {v * 1e3:.1f} ms" for k, v in r["breakdown_s"].items())
            print(f"breakdown shape {r['shape']} dead {r['dead_frac']:.0%}: step {r['step_s'] * 1e3:.1f} ms = {parts}")
    import torch

    result = {"bench": "train_step", "date": datetime.datetime.now().isoformat(timespec="seconds"),
              "device": args.device if args.device != "cpu" else f"cpu ({platform.processor() or platform.machine()})",
              "threads": args.threads, "torch": torch.__version__, "k": args.k, "batch": args.batch, "ratios": ratios,
              "rows": rows}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"train_step-{args.device.split(':')[0]}.json"
    path.write_text(json.dumps(result, indent=2))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
