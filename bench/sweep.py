"""Many SAEs from one pass: a sweep of 4 SAEs (`saelab train --sweep`) against the same 4 trained by 4 separate
`saelab train` runs, on one activation cache of the reference model, through the CLI a user runs.

    python bench/sweep.py                                              # 2M cached tokens, 2M training tokens each
    python bench/sweep.py --cache-tokens 65536 --train-tokens 65536   # a smoke run

The 4 SAEs: TopK k=16, TopK k=32, BatchTopK k=32, Matryoshka k=32 (16x, seed 0, no closing evaluation: it costs the
same either way). Reports each command's wall time (process start to exit, as a user waits), the steady-state
throughput from metrics.jsonl (training steps only: no start-up, calibration or final save), the time one pass of
the cache reader takes alone (reading and shuffling, the part a sweep does once), and whether each SAE of the sweep
is bit-identical to its separate run. Writes bench/results/sweep.json.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch

from architectures import sh  # bench/architectures.py: run a `saelab` command, return its wall time

HOOK = "blocks.2.hook_resid_pre"
SAES = {  # name → `saelab train` flags
    "topk-k16": ["--arch", "topk", "--k", "16"],
    "topk-k32": ["--arch", "topk", "--k", "32"],
    "batchtopk-k32": ["--arch", "batchtopk", "--k", "32"],
    "matryoshka-k32": ["--arch", "matryoshka", "--k", "32"],
}


def sweep_entry(name: str, flags: list[str]) -> dict:
    opts = dict(zip(flags[::2], flags[1::2]))
    return {"name": name, "sae": {"architecture": opts["--arch"], "k": int(opts["--k"])}}


def steady_tokens_per_s(run: Path) -> float:
    log = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line]
    return statistics.median(r["tokens_per_s"] for r in log[1:] or log)  # the first interval holds the start-up


def read_pass_s(cache: Path, tokens: int, batch_size: int, seed: int) -> float:
    """One pass of the shuffled cache reader over the training tokens, nothing else: what a sweep reads once."""
    from saelab.activations import ActivationCache

    source = ActivationCache(cache, hook_name=HOOK, batch_size=batch_size, seed=seed)
    it = iter(source)
    t0 = time.time()
    for _ in range(max(1, tokens // batch_size)):
        next(it)
    return time.time() - t0


def same_weights(a: Path, b: Path) -> bool:
    from safetensors.torch import load_file

    wa, wb = (load_file(str(d / "sae" / "sae_weights.safetensors")) for d in (a, b))
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cache-tokens", default="2M")
    ap.add_argument("--train-tokens", default="2M")
    ap.add_argument("--batch-size", default="4096")
    ap.add_argument("--seed", default="0")
    ap.add_argument("--threads", default="2")
    ap.add_argument("--workdir", default="", help="keep CACHE and runs here (default: a temporary directory); an "
                                                  "existing CACHE there is reused")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "sweep.json"))
    args = ap.parse_args()

    import yaml

    from saelab.settings import parse_count

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.workdir or tmp)
        cache = work / "CACHE"
        cache_cmd = ["saelab", "cache", "--model", "reference", "--hooks", HOOK, "--tokens", args.cache_tokens,
                     "--out", str(cache)]
        cache_s = sh(cache_cmd)  # resumes (or does nothing) when the workdir already holds it
        common = ["--tokens", args.train_tokens, "--batch-size", args.batch_size, "--seed", args.seed,
                  "--eval-tokens", "0", "--threads", args.threads, "--no-progress"]
        separate = {}
        for name, flags in SAES.items():
            run = work / "separate" / name
            separate[name] = {"wall_s": round(sh(["saelab", "train", "--cache", str(cache), *flags, *common,
                                                  "--out", str(run)]), 1),
                              "tokens_per_s": round(steady_tokens_per_s(run))}
        sweep_file = work / "sweep.yaml"
        sweep_file.write_text(yaml.safe_dump({"cache": str(cache), "out": str(work / "sweep"),
                                              "saes": [sweep_entry(n, f) for n, f in SAES.items()]}, sort_keys=False))
        sweep_cmd = ["saelab", "train", "--sweep", str(sweep_file), *common]
        sweep_s = sh(sweep_cmd)
        sweep_tps = statistics.median(steady_tokens_per_s(work / "sweep" / n) for n in SAES)
        identical = {n: same_weights(work / "sweep" / n, work / "separate" / n) for n in SAES}
        read_s = read_pass_s(cache, parse_count(args.train_tokens), int(args.batch_size), int(args.seed))

    separate_s = sum(r["wall_s"] for r in separate.values())
    # steady state: the separate runs take sum(tokens / tps_i) for the tokens the sweep trains all SAEs on at once
    separate_tps = 1 / sum(1 / r["tokens_per_s"] for r in separate.values())
    result = {
        "bench": f"sweep of {len(SAES)} SAEs (one pass) vs {len(SAES)} separate `saelab train` runs, one cache",
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip() + f", {os.cpu_count()} cores, "
                   f"--threads {args.threads}",
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cache": {"command": " ".join(cache_cmd).replace(str(cache), "CACHE"), "wall_s": round(cache_s, 1),
                  "tokens": args.cache_tokens},
        "train_tokens": args.train_tokens, "batch_size": int(args.batch_size), "seed": int(args.seed),
        "saes": {n: " ".join(f) for n, f in SAES.items()},
        "separate": separate,
        "separate_wall_s": round(separate_s, 1),
        "sweep": {"command": " ".join(sweep_cmd).replace(str(sweep_file), "SWEEP.yaml"), "wall_s": round(sweep_s, 1),
                  "tokens_per_s": round(sweep_tps)},
        "wall_ratio_sweep_over_separate": round(sweep_s / separate_s, 3),
        "steady_ratio_sweep_over_separate": round(separate_tps / sweep_tps, 3),
        "read_pass_s": round(read_s, 2),
        "bit_identical": identical,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))

    print(f"\n{'run':<18}{'wall s':>9}{'tok/s':>10}{'identical':>11}")
    for name, r in separate.items():
        print(f"{name:<18}{r['wall_s']:>9.1f}{r['tokens_per_s']:>10,}{str(identical[name]):>11}")
    print(f"{'4 separate':<18}{separate_s:>9.1f}{round(separate_tps):>10,}")
    print(f"{'sweep of 4':<18}{sweep_s:>9.1f}{round(sweep_tps):>10,}")
    print(f"sweep / separate: wall {result['wall_ratio_sweep_over_separate']:.3f}, steady state "
          f"{result['steady_ratio_sweep_over_separate']:.3f}; one read pass alone {read_s:.2f} s")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
