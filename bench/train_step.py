"""Whole TopK training step: tokens/s and peak memory, saelab (sparse kernels) vs a plain PyTorch loop (dense
decoder), with a breakdown of where saelab's step goes (encoder GEMM, top-k, sparse decode, sparse backward, Adam);
the AuxK overhead (10 % of latents dead vs none); and each architecture's step against the one it builds on, in the
same run: BatchTopK / TopK, Matryoshka (5 prefixes) / BatchTopK, g-SAE (cached gradients) / TopK, ReLU and Gated
(at a mean L0 of k) / TopK, JumpReLU (thresholds placed at a mean L0 of k by its init) and AbsTopK / TopK.

    python bench/train_step.py                 # shapes a and b of research/peer_numbers.md, 2 threads
    python bench/train_step.py --quick         # shape a only, fewer repeats
    python bench/train_step.py --device cuda --shapes b --archs all    # every trainable architecture on a GPU
    python bench/train_step.py --shapes 64x512 --batch 256             # any d×n (bench/gpu.sh --dry-run)
    python bench/train_step.py --quick --archs relu,gated,jumprelu --interleave 9    # ratios on a shared machine

Inputs (--inputs): the reference model's activations at its default hook (the middle residual stream, scaled to
E‖x‖² = d_in as the trainer's normalisation does) for a shape whose d is the model's width (shape a), Gaussian
otherwise; --inputs gaussian everywhere. The variable-k architectures (ReLU, Gated, JumpReLU) need real inputs: their
active latents per token are heavy-tailed there (JumpReLU's support at init: mean 53, widest 348 of 4,096 latents at
B 4,096; Gaussian inputs: 42 and 101), which is what their packing (saelab.sae.code.PackedRows) is built for.
--interleave R: the architectures' steps (TopK's included) are built in one process and timed round-robin for R
rounds, so a shared machine's load moves them together; the ratio is the median of the per-round ratios, and the
load average (os.getloadavg) before and after is recorded.

Prints a table and writes bench/results/train_step-<device>.json (rewritten after every variant, so a run cut
short keeps what it measured). Each variant runs in its own subprocess so its peak RSS (and peak CUDA memory) is
its own; a variant that fails is recorded with its error and the others still run (exit status 1 at the end).
On CUDA every timing is synchronised.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

from sparse_kernels import device_name, median_ms  # bench/sparse_kernels.py (this folder is on sys.path)

SHAPES = {"a": (256, 4096), "b": (768, 24576)}
# the default: each against the one it builds on
COMPARED = ["batchtopk", "matryoshka", "gtopk", "relu", "gated", "jumprelu", "abstopk"]
# no fixed k (a penalty sets the sparsity): b_enc is shifted so that k latents per token are active on average, the
# sparsity of a trained SAE (at init about half of them are, and the step runs dense: relu.DENSE_FRACTION)
AT_MEAN_L0_K = ("relu", "gated")


def _time(fn, device, steps, repeats):
    """Median seconds per call of `fn`, timed as `repeats` runs of `steps` calls after one untimed run."""
    return median_ms(lambda: [fn() for _ in range(steps)], device, repeats, warmup=1) / steps / 1e3


def _shape(name: str) -> tuple[int, int]:
    if name in SHAPES:
        return SHAPES[name]
    try:
        d, n = (int(v) for v in name.lower().split("x"))
    except ValueError:
        raise SystemExit(f"train_step.py: error: shape {name!r}: expected a, b or DxN (e.g. 64x512)") from None
    return d, n


def _archs(text: str) -> list[str]:
    from saelab.sae.architectures import registry

    trainable = [name for name, arch in registry().items() if arch.trainable and name != "topk"]
    if text == "all":
        return trainable
    names = [a for a in text.split(",") if a]
    if bad := [a for a in names if a not in trainable and a != "topk"]:
        raise SystemExit(f"train_step.py: error: --archs: unknown {bad}; choose from topk, {', '.join(trainable)}")
    return [a for a in names if a != "topk"]  # TopK always runs: it is every ratio's baseline


def reference_inputs(B: int, path: Path) -> int:
    """B activations of the reference model at its default hook (training rows: no BOS), scaled to E‖x‖² = d_in,
    saved to `path`; returns their width."""
    import torch

    from saelab.activations.stream import stream_activations
    from saelab.models.loading import default_hook_name, load_model

    model = load_model()
    x = next(iter(stream_activations(model, default_hook_name(model), batch_size=B))).acts.float()
    torch.save(x * (x.shape[1] / x.pow(2).sum(-1).mean()).sqrt(), path)
    return x.shape[1]


def _inputs(B: int, d: int, device: str, inputs: str | None):
    import torch

    torch.manual_seed(0)
    return torch.load(inputs).to(device) if inputs else torch.randn(B, d, device=device)


def saelab_step(x, n: int, k: int, dead_frac: float, arch: str, options: dict | None):
    """(sae, optimizer, one training step) of a saelab SAE on the batch x, as the trainer runs it."""
    import torch

    from saelab.config import SAEConfig, TrainConfig
    from saelab.sae import SparseAutoencoder
    from saelab.training.trainer import make_optimizer

    B, d = x.shape
    torch.manual_seed(0)
    dead = torch.zeros(n, dtype=torch.bool, device=x.device)
    dead[torch.randperm(n)[: int(dead_frac * n)]] = True
    sae = SparseAutoencoder(SAEConfig(d_in=d, n_latents=n, k=k, normalize="none", architecture=arch,
                                      options=options or {}), device=x.device)
    sae.init_from_data_(x)
    if arch in AT_MEAN_L0_K:
        with torch.no_grad():
            pre = sae.preacts(x)
            sae.b_enc -= pre.flatten().topk(k * B, sorted=False).values.min()
    # the trainer's optimizer (foreach / fused Adam) at learning rate 0: the same work per step, and every timed step
    # runs on the state set up here (at 1e-4 a ReLU SAE's active fraction on the reference model's activations grew
    # from 0.8 % to 4.6 % in 11 steps, and past DENSE_FRACTION its step runs dense)
    opt = make_optimizer(sae, 0.0, TrainConfig())
    mask = dead if dead_frac > 0 else None
    grad = torch.randn(B, d, device=x.device) if sae.arch.needs_grads else None  # as read from a cache

    def step():
        loss = sae(x, grad=grad, dead_mask=mask).losses["loss"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        sae.remove_parallel_grad_()
        torch.nn.utils.clip_grad_norm_(sae.parameters(), 1.0)
        opt.step()
        sae.normalize_decoder_()

    return sae, opt, step


def run_interleaved(archs: list[str], d: int, n: int, k: int, B: int, device: str, threads: int, steps: int,
                    rounds: int, inputs: str | None = None) -> dict:
    """Each architecture's step (TopK's first) built in this one process, timed round-robin: `rounds` rounds of
    `steps` steps each (after one untimed step each); ratios are medians of the per-round ratios to TopK."""
    import statistics

    import torch

    torch.set_num_threads(threads)
    x = _inputs(B, d, device, inputs)
    names = ["topk", *archs]
    fns = {a: saelab_step(x, n, k, 0.0, a, None)[2] for a in names}
    for fn in fns.values():
        fn()
    load = os.getloadavg()
    times: dict[str, list[float]] = {a: [] for a in names}
    for _ in range(rounds):
        for a in names:
            times[a].append(median_ms(lambda: [fns[a]() for _ in range(steps)], device, 1, warmup=0) / steps / 1e3)
    return {"d": d, "n": n, "k": k, "B": B, "inputs": "reference" if inputs else "gaussian", "rounds": rounds,
            "steps": steps, "loadavg_before": load, "loadavg_after": os.getloadavg(),
            "step_s": {a: statistics.median(t) for a, t in times.items()},
            "ratios": {f"{a} / topk": statistics.median(t / b for t, b in zip(times[a], times["topk"]))
                       for a in archs}}


def run_variant(variant: str, d: int, n: int, k: int, B: int, dead_frac: float, device: str, threads: int,
                steps: int, repeats: int, arch: str = "topk", options: dict | None = None,
                inputs: str | None = None) -> dict:
    import torch

    from saelab.kernels import encoder_values, sparse_decode

    torch.set_num_threads(threads)
    x = _inputs(B, d, device, inputs)
    out: dict = {"variant": variant, "arch": arch, "options": options or {}, "d": d, "n": n, "k": k, "B": B,
                 "dead_frac": dead_frac, "inputs": "reference" if inputs else "gaussian"}

    if variant == "saelab":
        sae, opt, step = saelab_step(x, n, k, dead_frac, arch, options)
        out["step_s"] = _time(step, device, steps, repeats)
        if arch != "topk":
            return _finish(out, B, device)
        # TopK's breakdown, each part timed alone on the same tensors
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
        torch.manual_seed(0)
        dead = torch.zeros(n, dtype=torch.bool, device=device)
        dead[torch.randperm(n)[: int(dead_frac * n)]] = True
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
    return _finish(out, B, device)


def _finish(out: dict, B: int, device: str) -> dict:
    import torch

    out["tokens_per_s"] = B / out["step_s"]
    out["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if device.startswith("cuda"):
        out["peak_cuda_mb"] = torch.cuda.max_memory_allocated() / 2 ** 20
    return out


BASE = {"matryoshka": "batchtopk", "mutual": "batchtopk"}  # the architecture each one builds on (else TopK)


def _variants(archs: list[str]) -> list[tuple[str, float, str, dict]]:
    """(variant, dead fraction, architecture, options): TopK against the plain loop, with and without AuxK, then
    each further architecture (g-SAE also with its candidates approximation)."""
    out = [("plain_dense", 0.0, "topk", {}), ("saelab", 0.0, "topk", {}), ("plain_dense", 0.1, "topk", {}),
           ("saelab", 0.1, "topk", {})]
    for arch in archs:
        out.append(("saelab", 0.0, arch, {}))
        if arch == "gtopk":
            out.append(("saelab", 0.0, arch, {"candidates": 4}))
    return out


def _ratios(rows: list[dict], shape: str) -> dict:
    """Step-time ratios of one shape: AuxK's overhead, and each architecture against the one it builds on."""
    def step_s(arch, dead=0.0, opts=None):
        return next((r["step_s"] for r in rows if r["shape"] == shape and r["variant"] == "saelab" and "step_s" in r
                     and r["arch"] == arch and r["dead_frac"] == dead and r["options"] == (opts or {})), None)

    pairs = {"auxk_10pct_dead / topk": (step_s("topk", 0.1), step_s("topk"))}
    for r in rows:
        if r["shape"] == shape and r["variant"] == "saelab" and r["arch"] != "topk":
            label = r["arch"] + (f"({json.dumps(r['options'])})" if r["options"] else "")
            base = BASE.get(r["arch"], "topk")
            pairs[f"{label} / {base}"] = (r.get("step_s"), step_s(base))
    return {label: a / b for label, (a, b) in pairs.items() if a and b}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", default="a,b", help="comma list of a (d 256, n 4096), b (d 768, n 24576) or DxN")
    p.add_argument("--k", type=int, default=32, help="active latents per token (32)")
    p.add_argument("--batch", type=int, default=4096, help="tokens per step (4096)")
    p.add_argument("--threads", type=int, default=2, help="CPU threads (torch.set_num_threads; 2)")
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    p.add_argument("--steps", type=int, default=10, help="steps per timed run (10)")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per variant, median (3)")
    p.add_argument("--quick", action="store_true", help="shape a only, 5 steps × 2 repeats")
    p.add_argument("--archs", default=",".join(COMPARED),
                   help=f"architectures compared with TopK, comma list or 'all' (default {','.join(COMPARED)})")
    p.add_argument("--no-archs", action="store_true", help="TopK only (skip the architecture comparison)")
    p.add_argument("--inputs", choices=("reference", "gaussian"), default="reference",
                   help="the reference model's activations where a shape's d is its width (else Gaussian), or "
                        "Gaussian everywhere (default reference)")
    p.add_argument("--interleave", type=int, default=0, metavar="R",
                   help="time the architectures against TopK in one process, round-robin over R rounds (0: each "
                        "in its own process, one after another; default 0)")
    p.add_argument("--out", default="bench/results", help="folder of the JSON (default bench/results)")
    p.add_argument("--_one", help=argparse.SUPPRESS)
    p.add_argument("--_interleave", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args._one:  # child process: one variant
        print(json.dumps(run_variant(**json.loads(args._one))))
        return 0
    if args._interleave:  # child process: the architectures interleaved
        print(json.dumps(run_interleaved(**json.loads(args._interleave))))
        return 0
    if args.quick:
        args.shapes, args.steps, args.repeats = "a", 5, 2
    shapes = args.shapes.split(",")
    archs = [] if args.no_archs else _archs(args.archs)
    import torch

    result = {"bench": "train_step", "date": datetime.datetime.now().isoformat(timespec="seconds"),
              "device": f"cpu ({platform.processor() or platform.machine()})" if args.device == "cpu" else args.device,
              "device_name": device_name(args.device), "threads": args.threads, "torch": torch.__version__,
              "k": args.k, "batch": args.batch, "complete": False, "loadavg_start": os.getloadavg(), "ratios": {}, "rows": [],
              "interleaved": {}}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"train_step-{args.device.split(':')[0]}.json"
    rows = result["rows"]
    tmp = tempfile.TemporaryDirectory()
    ref_path = Path(tmp.name) / "reference.pt"
    ref_d = reference_inputs(args.batch, ref_path) if args.inputs == "reference" else None
    for shape in shapes:
        d, n = _shape(shape)
        inputs = str(ref_path) if d == ref_d else None
        if args.interleave and archs:
            spec = dict(archs=archs, d=d, n=n, k=args.k, B=args.batch, device=args.device, threads=args.threads,
                        steps=args.steps, rounds=args.interleave, inputs=inputs)
            res = subprocess.run([sys.executable, __file__, "--_interleave", json.dumps(spec)], capture_output=True,
                                 text=True)
            if res.returncode:
                result["interleaved"][shape] = {**spec, "error": res.stderr.strip()[-2000:]}
                print(f"shape {shape} interleaved: FAILED\n{res.stderr.strip()[-2000:]}", flush=True)
            else:
                result["interleaved"][shape] = inter = json.loads(res.stdout.strip().splitlines()[-1])
                print(f"shape {shape} interleaved ({inter['inputs']} inputs, {args.interleave} rounds, load "
                      f"{inter['loadavg_before'][0]:.1f} -> {inter['loadavg_after'][0]:.1f}): "
                      + ", ".join(f"{a} {r:.2f}×" for a, r in inter["ratios"].items()), flush=True)
            path.write_text(json.dumps(result, indent=2))
        for variant, dead, arch, options in _variants([] if args.interleave else archs):
            spec = dict(variant=variant, d=d, n=n, k=args.k, B=args.batch, dead_frac=dead, device=args.device,
                        threads=args.threads, steps=args.steps, repeats=args.repeats, arch=arch, options=options,
                        inputs=inputs)
            res = subprocess.run([sys.executable, __file__, "--_one", json.dumps(spec)], capture_output=True, text=True)
            opts = json.dumps(options) if options else ""
            label = f"shape {shape} {variant:11s} {arch:14s} {opts:18s} dead {dead:.0%}"
            if res.returncode:
                row = {**spec, "error": res.stderr.strip()[-2000:]}
                print(f"{label}: FAILED\n{row['error']}", flush=True)
            else:
                row = json.loads(res.stdout.strip().splitlines()[-1])
                print(f"{label}: {row['tokens_per_s']:11,.0f} tok/s  peak RSS {row['peak_rss_mb']:7.0f} MB"
                      + (f"  peak CUDA {row['peak_cuda_mb']:7.0f} MB" if "peak_cuda_mb" in row else ""), flush=True)
            row["shape"] = shape
            rows.append(row)
            path.write_text(json.dumps(result, indent=2))  # after every variant: a run cut short keeps its rows
    print()
    print(f"{'shape':5} {'dead':>5} {'plain dense tok/s':>18} {'saelab tok/s':>13} {'speed-up':>9} {'GEMM share':>11}")
    for shape in shapes:
        for dead in (0.0, 0.1):
            base, ours = (next((r for r in rows if r["shape"] == shape and r["variant"] == v and r["arch"] == "topk"
                                and r["dead_frac"] == dead and "error" not in r), None)
                          for v in ("plain_dense", "saelab"))
            if base and ours:
                print(f"{shape:5} {dead:5.0%} {base['tokens_per_s']:18,.0f} {ours['tokens_per_s']:13,.0f} "
                      f"{ours['tokens_per_s'] / base['tokens_per_s']:8.2f}× {ours['encoder_gemm_fraction']:10.0%}")
    for shape in shapes:
        result["ratios"][shape] = ratios = _ratios(rows, shape)
        print("step-time ratios, shape " + shape + ": " + ", ".join(f"{k} {v:.2f}×" for k, v in ratios.items()))
    for r in rows:
        if "breakdown_s" in r:
            parts = ", ".join(f"{k} {v * 1e3:.1f} ms" for k, v in r["breakdown_s"].items())
            print(f"breakdown shape {r['shape']} dead {r['dead_frac']:.0%}: step {r['step_s'] * 1e3:.1f} ms = {parts}")
    result["complete"] = True
    result["loadavg_end"] = os.getloadavg()
    path.write_text(json.dumps(result, indent=2))
    print(f"wrote {path}")
    failed = sum("error" in r for r in rows)
    if failed:
        print(f"{failed} variant(s) failed", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
