"""Architecture comparison on the reference model: TopK, BatchTopK, Matryoshka and g-SAE trained on the same
activation cache (with LM-loss gradients, for g-SAE), same width, k, tokens and seed, through the CLI a user runs.

    python bench/architectures.py                                   # 2M cached tokens, 20M training tokens each
    python bench/architectures.py --train-tokens 1M --cache-tokens 200k --eval-tokens 16k   # a smoke run

For each architecture: held-out explained variance, ΔCE, KL, loss recovered (zero / mean ablation), dead latents
(training and held-out), mean L0 at inference and training tokens/s; and for Matryoshka the per-prefix FVU of the
last logged step. Inference is each architecture's own rule: BatchTopK/Matryoshka by their learned threshold, g-SAE
without gradients (its documented TopK fallback; core metrics see no gradients). Writes
bench/results/architectures.json.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

HOOK = "blocks.2.hook_resid_pre"
ARCHS = ["topk", "batchtopk", "matryoshka", "gtopk"]


def sh(cmd: list[str]) -> float:
    print("$", " ".join(cmd), flush=True)
    t0 = time.time()
    subprocess.run([sys.executable, "-m", "saelab.cli", *cmd[1:]], check=True)
    return time.time() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cache-tokens", default="2M")
    ap.add_argument("--train-tokens", default="20M")
    ap.add_argument("--eval-tokens", default="262144")
    ap.add_argument("--k", default="32")
    ap.add_argument("--seed", default="0")
    ap.add_argument("--threads", default="2")
    ap.add_argument("--archs", default=",".join(ARCHS))
    ap.add_argument("--workdir", default="", help="keep CACHE and runs here (default: a temporary directory); an "
                                                  "existing CACHE there is reused")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "architectures.json"))
    args = ap.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.workdir or tmp)
        cache = work / "CACHE"
        cache_cmd = ["saelab", "cache", "--model", "reference", "--hooks", HOOK, "--tokens", args.cache_tokens,
                     "--with-grads", "--out", str(cache)]
        cache_s = sh(cache_cmd)  # resumes (or does nothing) when the workdir already holds it
        rows = {}
        for arch in args.archs.split(","):
            run = work / f"RUN-{arch}"
            cmd = ["saelab", "train", "--cache", str(cache), "--arch", arch, "--k", args.k, "--tokens",
                   args.train_tokens, "--seed", args.seed, "--out", str(run), "--eval-tokens", args.eval_tokens,
                   "--threads", args.threads, "--no-progress"]
            wall = sh(cmd)
            info = json.loads((run / "sae" / "saelab.json").read_text())
            log = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line]
            core = json.loads((run / "eval" / "core.json").read_text())
            rows[arch] = {
                "command": " ".join(cmd).replace(str(cache), "CACHE").replace(str(run), "RUN"),
                "train_wall_s": round(wall, 1),
                "median_tokens_per_s": statistics.median(r["tokens_per_s"] for r in log),
                "dead_latents_training": info["training"]["dead_latents"],
                "last_logged": log[-1],
                "core_eval_heldout": core,
            }
    result = {
        "bench": "architectures: TopK vs BatchTopK vs Matryoshka vs g-SAE, 16x, same cache/tokens/seed",
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "device": f"cpu ({torch.get_num_threads()} torch threads available, {platform.processor() or platform.machine()})",
        "cache": {"command": " ".join(cache_cmd).replace(str(cache), "CACHE"), "wall_s": round(cache_s, 1)},
        "train_tokens": args.train_tokens, "k": int(args.k), "seed": int(args.seed),
        "runs": rows,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    cols = [("EV", "explained_variance"), ("dCE", "delta_ce"), ("KL", "kl_sae"), ("LR zero", "loss_recovered_zero"),
            ("LR mean", "loss_recovered_mean"), ("dead %", "frac_dead"), ("L0", "l0")]
    print(f"\n{'arch':<12}" + "".join(f"{c:>9}" for c, _ in cols) + f"{'tok/s':>9}")
    for arch, r in rows.items():
        core = r["core_eval_heldout"]
        vals = [core.get(key, float("nan")) * (100 if key == "frac_dead" else 1) for _, key in cols]
        print(f"{arch:<12}" + "".join(f"{v:>9.4g}" for v in vals) + f"{r['median_tokens_per_s']:>9.0f}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
