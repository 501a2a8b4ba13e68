"""SAE width: a TopK training step (forward, backward, Adam) with the streaming encoder (`encoder_chunk`) against
today's dense encoder (one [B, n] GEMM), in the same run: step time and peak RSS per width.

    python bench/width.py                          # d 256, k 32, n 4k-1M (B 4096; 1024 from n 262k)
    python bench/width.py --widths 4k,16k,65k      # a subset
    python bench/width.py --chunk 8192             # another block width
    python bench/width.py --widths 262k --encoders streaming --steps 1     # one row, merged into the results
    python bench/width.py --widths 4k,16k --interleave 5                   # step times, dense and streaming alternated
    python bench/width.py --widths 262k --encoders latent-parallel --steps 2   # 2 gloo ranks, each half the latents
    python bench/width.py --table                  # the README's table, from the results file

Each (width, encoder) runs in a fresh subprocess, so its peak RSS (resource.getrusage's ru_maxrss) is its own. A
dense run whose [B, n] pre-activations and top-k buffers, with the parameters, gradients and Adam state, would not
fit in this machine's available memory is not started: it is recorded as refused with the message `saelab train`
gives there (`saelab/training/memory.py`). Rows are merged
into bench/results/width.json (a row of the same n and encoder is replaced; the file is rewritten after every run,
so a run cut short keeps what it measured), each with the load average when it ran: this machine is shared, and
times taken under load are not comparable between rows. `--interleave R` compares step times fairly instead: one
process holds a dense and a streaming SAE with the same weights and alternates their steps R times each (the order
flipped every repeat), so both see the same load; the medians and their ratio go to the file's "interleaved" list.
No AuxK (no dead latents), synthetic Gaussian inputs: the step's cost does not depend on the data.

`latent-parallel` runs the streaming step of `saelab.training.latent_parallel` (the trainer's own step) on
`--shard-latents` gloo processes (torchrun, one thread each), each holding n/shards latents: its row has each rank's
peak RSS and step time beside the whole SAE's parameter + gradient + Adam memory (`state_mb`), which one process
holds alone.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

OUT = Path(__file__).resolve().parent / "results" / "width.json"
WIDTHS = "4k,16k,65k,262k,1M"


def parse_width(text: str) -> int:
    """'4k', '65k', '262k', '1M': the power of two nearest that many thousand (million); a plain integer as is."""
    text = text.strip().lower()
    scale = {"k": 1000, "m": 1000 ** 2}.get(text[-1:])
    if scale is None:
        return int(text)
    return 2 ** round(math.log2(float(text[:-1]) * scale))


def make_step(d: int, n: int, k: int, batch: int, chunk: int):
    """A TopK SAE (seed 0) and one training step of it on a fixed Gaussian batch: (sae, step)."""
    import torch

    from saelab.config import SAEConfig, TrainConfig
    from saelab.sae.sae import SparseAutoencoder
    from saelab.training.trainer import make_optimizer

    torch.manual_seed(0)
    sae = SparseAutoencoder(SAEConfig(d_in=d, n_latents=n, k=k, encoder_chunk=chunk))
    opt = make_optimizer(sae, 1e-4, TrainConfig())  # the trainer's Adam (foreach on CPU, as `saelab train` steps)
    x = torch.randn(batch, d, generator=torch.Generator().manual_seed(1))

    def step():
        out = sae(x)
        opt.zero_grad(set_to_none=True)
        out.losses["loss"].backward()
        sae.remove_parallel_grad_()
        opt.step()
        sae.normalize_decoder_()
    return sae, step


def timed(step) -> float:
    t = time.perf_counter()
    step()
    return time.perf_counter() - t


def run_one(d: int, n: int, k: int, batch: int, chunk: int, steps: int) -> dict:
    import torch

    sae, step = make_step(d, n, k, batch, chunk)
    step()  # warm-up: Adam's state exists from here on
    times = [timed(step) for _ in range(steps)]
    return {"step_s": statistics.median(times), "steps": steps,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "params_mb": sum(p.numel() * p.element_size() for p in sae.parameters()) / 2 ** 20,
            "threads": torch.get_num_threads()}


def run_interleaved(d: int, n: int, k: int, batch: int, chunk: int, repeats: int) -> dict:
    """Median step times of a dense and a streaming SAE (same weights) stepped alternately in this process."""
    import torch

    steps = {"dense": make_step(d, n, k, batch, 0)[1], "streaming": make_step(d, n, k, batch, chunk)[1]}
    for step in steps.values():
        step()  # warm-up
    times: dict[str, list[float]] = {name: [] for name in steps}
    load = os.getloadavg()[0]
    for r in range(repeats):
        for name in (("dense", "streaming") if r % 2 == 0 else ("streaming", "dense")):
            times[name].append(timed(steps[name]))
    dense, streaming = (statistics.median(times[name]) for name in ("dense", "streaming"))
    return {"n": n, "batch": batch, "chunk": chunk, "repeats": repeats, "dense_s": dense, "streaming_s": streaming,
            "ratio": streaming / dense, "dense_times": times["dense"], "streaming_times": times["streaming"],
            "load_avg": [load, os.getloadavg()[0]], "threads": torch.get_num_threads()}


def run_sharded(d: int, n: int, k: int, batch: int, chunk: int, steps: int, shards: int) -> dict | None:
    """One latent-parallel run under torchrun: the trainer's step (`SAERun`) on this rank's shard; rank 0 returns
    every rank's peak RSS and step time."""
    import tempfile

    import torch
    import torch.distributed as dist

    from saelab.config import SAEConfig, TrainConfig
    from saelab.training.trainer import SAERun

    dist.init_process_group("gloo")
    cfg = TrainConfig(sae=SAEConfig(n_latents=n, k=k, encoder_chunk=chunk), batch_size=batch, shard_latents=shards,
                      tokens=batch * (steps + 1), dead_tokens=10 ** 12, lr=1e-4, eval_tokens=0)
    x = torch.randn(batch, d, generator=torch.Generator().manual_seed(1))
    with tempfile.TemporaryDirectory() as tmp:
        run = SAERun(cfg, Path(tmp), "cpu")
        run.init(x, None)
        run.step(0, x, None)  # warm-up: Adam's state exists from here on
        times = [timed(lambda i=i: run.step(i, x, None)) for i in range(1, steps + 1)]
    shard_mb = sum(p.numel() * p.element_size() for p in run.sae.parameters()) / 2 ** 20
    mine = {"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "step_s": statistics.median(times), "params_mb": shard_mb}
    ranks: list = [None] * dist.get_world_size()
    dist.all_gather_object(ranks, mine)
    rank = dist.get_rank()
    dist.destroy_process_group()
    whole_mb = (2 * n * d + n + d) * 4 / 2 ** 20
    return None if rank else {"shards": shards, "ranks": ranks, "step_s": max(r["step_s"] for r in ranks),
                              "peak_rss_mb": max(r["peak_rss_mb"] for r in ranks), "steps": steps,
                              "params_mb": whole_mb, "state_mb": 4 * whole_mb, "threads": torch.get_num_threads()}


def load_results(path: Path, args) -> dict:
    """The results file's rows measured with the same d, k and chunk (to merge into), or a fresh one."""
    header = {"date": datetime.datetime.now().isoformat(timespec="seconds"), "machine": platform.platform(),
              "processor": platform.processor(), "memory_gb": os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1e9,
              "d": args.d, "k": args.k, "chunk": args.chunk}
    old = json.loads(path.read_text()) if path.exists() else {}
    same = all(old.get(key) == header[key] for key in ("d", "k", "chunk"))
    return {**header, "runs": old.get("runs", []) if same else [],
            "interleaved": old.get("interleaved", []) if same else [],
            **({"note": old["note"]} if same and "note" in old else {})}


def save(results: dict, path: Path, key: str, row: dict, same: tuple) -> None:
    """Put `row` in results[key] in place of one with the same values of `same`, and rewrite the file."""
    rows = results[key]
    at = next((i for i, r in enumerate(rows) if all(r.get(f) == row.get(f) for f in same)), None)
    if at is None:
        rows.append(row)
        rows.sort(key=lambda r: (r["n"], r.get("encoder", "")))
    else:
        rows[at] = row
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=2) + "\n")


def figure(results: dict):
    """Step time and peak RSS against width, one trace per encoder; a refused dense run is drawn at its estimate."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    fig = make_subplots(rows=1, cols=2, subplot_titles=("training step (s; each row's load in its hover text)",
                                                        "peak RSS (GB)"))
    colours = {"dense": "#d62728", "streaming": "#1f77b4", "latent-parallel": "#2ca02c"}
    for encoder, colour in colours.items():
        rows = [r for r in results["runs"] if r["encoder"] == encoder and "step_s" in r]
        label = encoder + (" (per rank)" if encoder == "latent-parallel" else "")
        text = [f"n {r['n']:,}, B {r['batch']:,}, load {r.get('load_avg', float('nan')):.1f}" for r in rows]
        for col, key, scale in ((1, "step_s", 1.0), (2, "peak_rss_mb", 2 ** 20 / 1e9)):
            fig.add_trace(go.Scatter(x=[r["n"] for r in rows], y=[r[key] * scale for r in rows], text=text,
                                     mode="lines+markers", name=label, legendgroup=encoder, showlegend=col == 1,
                                     line={"color": colour}), row=1, col=col)
        refused = [r for r in results["runs"] if r["encoder"] == encoder and "refused" in r]
        if refused:
            fig.add_trace(go.Scatter(x=[r["n"] for r in refused],
                                     y=[r["dense_estimate_mb"] * 2 ** 20 / 1e9 for r in refused],
                                     text=[r["refused"] for r in refused], mode="markers", name=f"{encoder}: refused "
                                     "(its lower bound)", marker={"symbol": "x", "size": 12, "color": colour}),
                          row=1, col=2)
    state = sorted({r["n"]: 4 * r["params_mb"] for r in results["runs"]
                    if "params_mb" in r and r["encoder"] != "latent-parallel"}.items())
    fig.add_trace(go.Scatter(x=[n for n, _ in state], y=[mb * 2 ** 20 / 1e9 for _, mb in state], mode="lines",
                             name="parameters + gradients + Adam (one process)", line={"color": "grey", "dash": "dash"}),
                  row=1, col=2)
    memory = results.get("memory_gb")
    if memory:  # a trace, not add_hline: a shape's y on a log axis would be read as log10(y)
        ns = [r["n"] for r in results["runs"]]
        fig.add_trace(go.Scatter(x=[min(ns), max(ns)], y=[memory, memory], mode="lines", name=f"this machine: "
                                 f"{memory:.0f} GB", line={"color": "black", "dash": "dot"}), row=1, col=2)
    fig.update_xaxes(type="log", title_text="latents n (d 256, k 32; B 4,096, 1,024 from n 262k)")
    fig.update_yaxes(type="log")
    fig.update_layout(template="plotly_white", width=1100, height=460,
                      title="Width: the streaming encoder's memory grows with B·chunk, the dense one's with B·n")
    return fig


def table(results: dict) -> str:
    """The README's table: per width, each encoder's step time and peak RSS (GB), beside the whole SAE's state."""
    from saelab.training.memory import state_bytes

    cell = {}
    for r in results["runs"]:
        if "refused" in r:
            cell[r["n"], r["encoder"]] = f"refused (needs ≥ {r['dense_estimate_mb'] * 2 ** 20 / 1e9:.1f} GB)"
        elif "step_s" in r:
            rss = r["peak_rss_mb"] * 2 ** 20 / 1e9
            cell[r["n"], r["encoder"]] = f"{r['step_s']:.2f} s, {rss:.2f} GB" + (
                f" per rank ({r['shards']})" if r["encoder"] == "latent-parallel" else "")
    lines = ["| n | B | parameters + gradients + Adam | dense: step, peak RSS | streaming | latent-parallel | load |",
             "|---|---|---|---|---|---|---|"]
    for n in sorted({r["n"] for r in results["runs"]}):
        rows = [r for r in results["runs"] if r["n"] == n]
        state = state_bytes(results["d"], 0, n, False) / 1e9
        loads = [r["load_avg"] for r in rows if "load_avg" in r and "step_s" in r]
        load = f"{min(loads):.1f}–{max(loads):.1f}" if loads else "not recorded"
        lines.append(f"| {n:,} | {rows[0]['batch']:,} | {state:.2f} GB | "
                     + " | ".join(cell.get((n, e), "") for e in ("dense", "streaming", "latent-parallel"))
                     + f" | {load} |")
    return "\n".join(lines)


def plot(results: dict, out: Path) -> None:
    from architectures import write_figure  # bench/architectures.py: HTML, and a PNG by kaleido or Chromium

    html, png = out.with_suffix(".html"), out.with_suffix(".png")
    drawn = write_figure(figure(results), html, png)
    print(f"wrote {html}" + (f" and {png} ({drawn})" if drawn else ""))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--widths", default=WIDTHS, help=f"comma-separated n: 4k, 65k, 1M name the nearest power of two (default {WIDTHS})")
    ap.add_argument("--d", type=int, default=256, help="d_in (default 256)")
    ap.add_argument("--k", type=int, default=32, help="k (default 32)")
    ap.add_argument("--chunk", type=int, default=4096, help="streaming block width (default 4096)")
    ap.add_argument("--steps", type=int, default=3, help="timed steps per run, after one warm-up (default 3)")
    ap.add_argument("--encoders", default="dense,streaming", help="which encoders to run (default dense,streaming)")
    ap.add_argument("--interleave", type=int, default=0, metavar="R",
                    help="time R dense and R streaming steps alternately in one process instead (no RSS)")
    ap.add_argument("--out", type=Path, default=OUT, help=f"results file, rows merged in (default {OUT})")
    ap.add_argument("--shard-latents", type=int, default=2, help="latent-parallel: processes (default 2)")
    ap.add_argument("--replot", action="store_true", help="only redraw the figure (width.html/.png) from --out")
    ap.add_argument("--table", action="store_true", help="only print --out's rows as the README's markdown table")
    ap.add_argument("--one", help=argparse.SUPPRESS)  # internal: one run in this process, as JSON on stdout
    ap.add_argument("--one-sharded", help=argparse.SUPPRESS)  # internal: this rank of a latent-parallel run
    args = ap.parse_args()
    if args.one_sharded:
        row = run_sharded(**json.loads(args.one_sharded))
        if row is not None:
            print(json.dumps(row))
        return 0
    if args.one:
        print(json.dumps(run_one(**json.loads(args.one))))
        return 0

    if args.replot:
        plot(json.loads(args.out.read_text()), args.out)
        return 0
    if args.table:
        print(table(json.loads(args.out.read_text())))
        return 0
    widths = [parse_width(w) for w in args.widths.split(",")]
    encoders = [e.strip() for e in args.encoders.split(",")]
    if not set(encoders) <= {"dense", "streaming", "latent-parallel"}:
        ap.error(f"--encoders: dense, streaming and/or latent-parallel, got {args.encoders!r}")
    results = load_results(args.out, args)
    failed = False
    from saelab.config import SAEConfig
    from saelab.errors import ConfigError
    from saelab.training.memory import check_step_fits, step_bytes

    for n in widths:
        batch = 4096 if n < 262_144 else 1024
        if args.interleave:
            row = run_interleaved(args.d, n, args.k, batch, min(args.chunk, n), args.interleave)
            save(results, args.out, "interleaved", row, ("n", "batch", "chunk", "threads"))
            print(f"n {n:>9,}  B {batch:>5}  dense {row['dense_s'] * 1e3:8.0f} ms  streaming "
                  f"{row['streaming_s'] * 1e3:8.0f} ms  ratio {row['ratio']:.3f}  (load {row['load_avg'][0]:.1f}"
                  f"-{row['load_avg'][1]:.1f})", flush=True)
            continue
        for encoder in encoders:
            row = {"n": n, "batch": batch, "encoder": encoder, "load_avg": os.getloadavg()[0]}
            if encoder == "dense":  # refused as `saelab train` refuses it, before the step is tried
                row["dense_estimate_mb"] = step_bytes(args.d, 0, n, batch, 0) / 2 ** 20
                try:
                    check_step_fits(SAEConfig(d_in=args.d, n_latents=n, k=args.k, encoder_chunk=0), batch, 1, "cpu")
                except ConfigError as e:
                    row["refused"] = e.message
            if "refused" not in row:
                spec = {"d": args.d, "n": n, "k": args.k, "batch": batch, "steps": args.steps,
                        "chunk": 0 if encoder == "dense" else min(args.chunk, n)}
                one = [__file__, "--one", json.dumps(spec)]
                if encoder == "latent-parallel":  # `shards` gloo processes of one thread each
                    spec["shards"] = args.shard_latents
                    one = ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={args.shard_latents}",
                           __file__, "--one-sharded", json.dumps(spec)]
                proc = subprocess.run([sys.executable, *one], capture_output=True, text=True,
                                      env={**os.environ, **({"OMP_NUM_THREADS": "1"} if spec.get("shards") else {})})
                if proc.returncode == 0:
                    row.update(json.loads(proc.stdout.strip().splitlines()[-1]))
                else:
                    failed = True
                    row["error"] = (proc.stderr.strip().splitlines() or [f"exit status {proc.returncode}"])[-1]
            save(results, args.out, "runs", row, ("n", "batch", "encoder"))
            shown = row.get("refused") or row.get("error") or (f"{row['step_s'] * 1e3:8.0f} ms/step  "
                                                                f"peak RSS {row['peak_rss_mb']:7.0f} MB")
            print(f"n {n:>9,}  B {batch:>5}  {encoder:>9}: {shown}", flush=True)
    plot(results, args.out)
    print(table(results))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
