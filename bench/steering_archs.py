"""Output-score distributions per architecture (Arad et al.; issue 11): is one architecture's dictionary better
at steering than another's? g-SAE's paper claims better steering vectors.

    python bench/architectures.py --ks 32 --workdir W      # one sweep: W/runs/topk-k32, W/runs/batchtopk-k32, ...
    python bench/steering_archs.py W/runs/*-k32

For each run: input and output scores of every latent (`saelab eval RUN --suite steering`'s code, the same
prompt, amplification and corpus rows for every run), then the output-score distribution (quantiles, mean, the share
of latents above 0.1 and 0.5, the paper's filter region) and the input score's. Writes
bench/results/steering_archs.json (date, machine, torch version).
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import time
from pathlib import Path

import numpy as np
import torch

QUANTILES = (0.1, 0.25, 0.5, 0.75, 0.9, 0.99)


def distribution(x: np.ndarray) -> dict:
    x = x[np.isfinite(x)]
    if not len(x):
        return {"n": 0}
    return {"n": int(len(x)), "mean": float(x.mean()), **{f"p{int(100 * q)}": float(np.quantile(x, q))
                                                         for q in QUANTILES},
            "share_above_0.1": float((x > 0.1).mean()), "share_above_0.5": float((x > 0.5).mean())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+", help="run directories (one per architecture)")
    ap.add_argument("--tokens", type=int, default=32_768, help="corpus tokens for the input scores")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "steering_archs.json"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from saelab.eval.run import load_run, score_run

    rows = {}
    for run in args.runs:
        loaded = load_run(Path(run))
        sae = loaded[0]
        t0 = time.perf_counter()
        scores, _ = score_run(Path(run), args.tokens, progress=False, loaded=loaded)
        rows[Path(run).name] = {
            "architecture": sae.cfg.architecture, "n_latents": sae.cfg.n_latents, "k": sae.cfg.k,
            "seconds": round(time.perf_counter() - t0, 1),
            "output_score": distribution(np.asarray(scores.output_score, dtype=np.float64)),
            "input_score": distribution(np.asarray(scores.input_score, dtype=np.float64)),
        }
        print(json.dumps({run: rows[Path(run).name]}), flush=True)
    doc = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "machine": platform.processor() or platform.machine(), "torch": torch.__version__,
           "tokens": args.tokens, "runs": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(doc, indent=1))
    print(f"\n{'run':<18}{'arch':<12}{'out mean':>9}{'p50':>8}{'p90':>8}{'>0.1':>8}{'>0.5':>8}{'in mean':>9}")
    for name, r in rows.items():
        o, i = r["output_score"], r["input_score"]
        print(f"{name:<18}{r['architecture']:<12}{o.get('mean', float('nan')):>9.4f}{o.get('p50', float('nan')):>8.4f}"
              f"{o.get('p90', float('nan')):>8.4f}{o.get('share_above_0.1', float('nan')):>8.3f}"
              f"{o.get('share_above_0.5', float('nan')):>8.3f}{i.get('mean', float('nan')):>9.4f}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
