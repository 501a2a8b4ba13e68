"""Acceptance run: the README's headline SAE, end to end through the CLI, on the shipped reference model.

    python bench/acceptance.py                         # 2M cached tokens, 20M training tokens (~15-30 min, 2 cores)
    python bench/acceptance.py --train-tokens 1M --cache-tokens 200k --eval-tokens 16k    # a smoke run

Runs exactly the commands a user would (`saelab cache`, then `saelab train --cache`), times them, and collects the
training summary (`sae/saelab.json`), the metrics log (`metrics.jsonl`) and the held-out core metrics
(`eval/core.json`) into bench/results/acceptance-topk-reference.json, with device and date.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import torch

HOOK = "blocks.2.hook_resid_pre"


def sh(cmd: list[str]) -> float:
    print("$", " ".join(cmd), flush=True)
    t0 = time.time()
    subprocess.run(cmd, check=True)
    return time.time() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cache-tokens", default="2M")
    ap.add_argument("--train-tokens", default="20M")
    ap.add_argument("--eval-tokens", default="262144")
    ap.add_argument("--threads", default="2")
    ap.add_argument("--workdir", default="", help="keep CACHE and RUN here (default: a temporary directory)")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "acceptance-topk-reference.json"))
    args = ap.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.workdir or tmp)
        cache, run = work / "CACHE", work / "RUN"
        cache_cmd = ["saelab", "cache", "--model", "reference", "--hooks", HOOK, "--tokens", args.cache_tokens,
                     "--out", str(cache)]
        train_cmd = ["saelab", "train", "--cache", str(cache), "--tokens", args.train_tokens, "--out", str(run),
                     "--eval-tokens", args.eval_tokens, "--threads", args.threads]
        cache_s = sh(cache_cmd)
        train_s = sh(train_cmd)
        manifest = json.loads((cache / "manifest.json").read_text())
        info = json.loads((run / "sae" / "saelab.json").read_text())
        rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line]
        core = json.loads((run / "eval" / "core.json").read_text())

    training = dict(info["training"])
    training["wall_s"] = round(train_s, 1)
    training["first_logged"], training["last_logged"] = rows[0], rows[-1]
    training["median_tokens_per_s"] = statistics.median(r["tokens_per_s"] for r in rows)
    result = {
        "bench": "acceptance: TopK 16x k=32 on the reference model's middle residual stream",
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "device": f"cpu ({torch.get_num_threads()} torch threads available, {platform.processor() or platform.machine()})",
        "commands": [" ".join(c).replace(str(cache), "CACHE").replace(str(run), "RUN") for c in (cache_cmd, train_cmd)],
        "cache": {"tokens": manifest.get("n_tokens", manifest.get("tokens")), "wall_s": round(cache_s, 1)},
        "training": training,
        "core_eval_heldout": core,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(f"\n{'measure':<34}{'value':>12}")
    for name, value in [("cache wall s", cache_s), ("train wall s", train_s),
                        ("median train tokens/s", training["median_tokens_per_s"]),
                        ("dead latents (training)", training["dead_latents"]),
                        ("held-out explained variance", core["explained_variance"]),
                        ("held-out frac dead", core["frac_dead"]),
                        ("loss recovered (zero abl.)", core["loss_recovered_zero"]),
                        ("loss recovered (mean abl.)", core["loss_recovered_mean"]),
                        ("delta CE (nats)", core["delta_ce"])]:
        print(f"{name:<34}{value:>12.4g}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
