"""SAE width: a TopK training step (forward, backward, Adam) with the streaming encoder (`encoder_chunk`) against
today's dense encoder (one [B, n] GEMM), in the same run: step time and peak RSS per width.

    python bench/width.py                          # d 256, k 32, n 4k-1M (B 4096; 1024 from n 262k)
    python bench/width.py --widths 4k,16k,65k      # a subset
    python bench/width.py --chunk 8192             # another block width

Each (width, encoder) runs in a fresh subprocess, so its peak RSS (resource.getrusage's ru_maxrss) is its own. A
dense run whose [B, n] pre-activations and top-k buffers, with the parameters, gradients and Adam state, would not
fit in this machine's available memory is not started: it is recorded as refused with the estimate. Writes
bench/results/width.json (rewritten after every run, so a run cut short keeps what it measured). No AuxK (no dead
latents), synthetic Gaussian inputs: the step's cost does not depend on the data.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
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


def mem_available() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return 0


def dense_estimate(d: int, n: int, batch: int) -> int:
    """Bytes of a dense step: parameters + gradients + Adam's two moments (fp32), the [B, n] pre-activations and
    the top-k's working copy of a row block (ATen's topk copies each row into a (value, index) queue: 16 bytes per
    entry per thread; counted for the whole matrix as a bound on its temporaries)."""
    params = 2 * n * d + n + d
    return 4 * 4 * params + 4 * batch * n + 4 * batch * n


def run_one(d: int, n: int, k: int, batch: int, chunk: int, steps: int) -> dict:
    import torch

    from saelab.config import SAEConfig
    from saelab.sae.sae import SparseAutoencoder

    torch.manual_seed(0)
    sae = SparseAutoencoder(SAEConfig(d_in=d, n_latents=n, k=k, encoder_chunk=chunk))
    opt = torch.optim.Adam(sae.parameters(), lr=1e-4)
    x = torch.randn(batch, d)

    def step():
        out = sae(x)
        opt.zero_grad(set_to_none=True)
        out.losses["loss"].backward()
        sae.remove_parallel_grad_()
        opt.step()
        sae.normalize_decoder_()

    step()  # warm-up: Adam's state exists from here on
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        step()
        times.append(time.perf_counter() - t)
    return {"step_s": statistics.median(times), "steps": steps,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "params_mb": sum(p.numel() * p.element_size() for p in sae.parameters()) / 2 ** 20,
            "threads": torch.get_num_threads()}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--widths", default=WIDTHS, help=f"comma-separated n: 4k, 65k, 1M name the nearest power of two (default {WIDTHS})")
    ap.add_argument("--d", type=int, default=256, help="d_in (default 256)")
    ap.add_argument("--k", type=int, default=32, help="k (default 32)")
    ap.add_argument("--chunk", type=int, default=4096, help="streaming block width (default 4096)")
    ap.add_argument("--steps", type=int, default=3, help="timed steps per run, after one warm-up (default 3)")
    ap.add_argument("--out", type=Path, default=OUT, help=f"results file (default {OUT})")
    ap.add_argument("--one", help=argparse.SUPPRESS)  # internal: one run in this process, as JSON on stdout
    args = ap.parse_args()
    if args.one:
        print(json.dumps(run_one(**json.loads(args.one))))
        return 0

    widths = [parse_width(w) for w in args.widths.split(",")]
    results = {"date": datetime.datetime.now().isoformat(timespec="seconds"), "machine": platform.platform(),
               "processor": platform.processor(), "d": args.d, "k": args.k, "chunk": args.chunk, "runs": []}
    failed = False
    for n in widths:
        batch = 4096 if n < 262_144 else 1024
        for encoder in ("dense", "streaming"):
            row = {"n": n, "batch": batch, "encoder": encoder}
            if encoder == "dense":
                need, avail = dense_estimate(args.d, n, batch), mem_available()
                row["dense_estimate_mb"] = need / 2 ** 20
                if need > 0.9 * avail:
                    row["refused"] = (f"the dense step needs ~{need / 2 ** 30:.1f} GiB ([{batch}, {n}] pre-activations "
                                      f"and top-k buffers, parameters, gradients, Adam), {avail / 2 ** 30:.1f} GiB "
                                      f"available")
            if "refused" not in row:
                spec = {"d": args.d, "n": n, "k": args.k, "batch": batch, "steps": args.steps,
                        "chunk": 0 if encoder == "dense" else min(args.chunk, n)}
                proc = subprocess.run([sys.executable, __file__, "--one", json.dumps(spec)], capture_output=True,
                                      text=True)
                if proc.returncode == 0:
                    row.update(json.loads(proc.stdout.strip().splitlines()[-1]))
                else:
                    failed = True
                    row["error"] = (proc.stderr.strip().splitlines() or [f"exit status {proc.returncode}"])[-1]
            results["runs"].append(row)
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(results, indent=2) + "\n")
            shown = row.get("refused") or row.get("error") or (f"{row['step_s'] * 1e3:8.0f} ms/step  "
                                                                f"peak RSS {row['peak_rss_mb']:7.0f} MB")
            print(f"n {n:>9,}  B {batch:>5}  {encoder:>9}: {shown}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
