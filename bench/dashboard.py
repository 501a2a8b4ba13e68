"""Dashboard bundle build: wall time, tokens/s against the bare model forward + SAE encode, peak RSS, bundle size.

    python bench/dashboard.py --run runs/x --run runs/y --tokens 1M           # each run's SAE over 1M tokens
    python bench/dashboard.py --run runs/x --run runs/y:131k                  # the second over 131k tokens
    python bench/dashboard.py --run runs/x --tokens 1M --rss-tokens 250k      # also: does peak RSS grow with tokens?

Every measurement runs in its own child process (so its peak RSS is its own) on the same rows: the baseline child
runs the model to the SAE's hook and `sae.encode` over the tokens and nothing else; the build child runs
`saelab.dashboard.build_run_bundle` into a fresh folder. The ratio compares the build's own clock (pass + views +
weights + writing, `manifest["timings"]["total_s"]`) with the baseline loop; "wall" adds loading the model.
Results: a table on stdout and bench/results/dashboard.json (date, machine, torch version, load average).
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from cache import device_name, parse_count  # bench/cache.py, next to this script


def _load(run: str):
    from saelab.activations.capture import HookCapture
    from saelab.config import CorpusSpec, ModelSpec, from_dict, read_file
    from saelab.models import load_model
    from saelab.sae import SparseAutoencoder

    run = Path(run)
    data = read_file(run / "config.yaml") if (run / "config.yaml").exists() else {}
    sae = SparseAutoencoder.load(run / "sae")
    model = load_model(sae.cfg.model_name or from_dict(ModelSpec, data.get("model") or {}).name)
    corpus = from_dict(CorpusSpec, data.get("corpus") or {})
    return sae, model, corpus, int(data.get("context_size") or 128), HookCapture(model, [sae.cfg.hook_name])


def child_baseline(run: str, tokens: int, split: str) -> dict:
    """The bare model forward to the hook + SAE encode over the same rows the build reads."""
    import torch

    from saelab.data.packing import batched_rows, iter_packed_rows

    sae, model, corpus, T, capture = _load(run)
    n_rows = math.ceil(tokens / (T - 1))
    t0 = time.perf_counter()
    done = 0
    with torch.no_grad():
        rows = (r for _, r in zip(range(n_rows), iter_packed_rows(corpus, model.tokenizer, T, split)))
        for batch in batched_rows(rows, 32):
            acts, _ = capture(torch.from_numpy(batch))
            sae.encode(acts[sae.cfg.hook_name])
            done += batch.shape[0] * (T - 1)
    return {"wall_s": time.perf_counter() - t0, "tokens": done}


def child_build(run: str, tokens: int, split: str, out: str) -> dict:
    from saelab.dashboard.run import build_run_bundle

    _load(run)  # warm the imports and the model files like the baseline does (the build loads its own copies)
    t0 = time.perf_counter()
    path = build_run_bundle(run, out=out, tokens=tokens, split=split, progress=False)
    wall = time.perf_counter() - t0
    m = json.loads((Path(path) / "manifest.json").read_text())
    size = sum(p.stat().st_size for p in Path(path).iterdir() if p.is_file())
    return {"wall_s": wall, "tokens": m["corpus"]["tokens"], "timings": m["timings"], "bundle_bytes": size,
            "n_examples": m["n_examples"], "map_method": m["settings"]["map_method"]}


def run_child(args: list[str]) -> dict:
    out = subprocess.run([sys.executable, __file__, "--child", *args], check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def machine() -> dict:
    import torch

    return {"cpu": device_name("cpu"), "torch": torch.__version__, "threads": torch.get_num_threads(),
            "python": platform.python_version()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", action="append", help="a run directory, optionally RUN:TOKENS to override --tokens for "
                                                   "it (repeatable)")
    ap.add_argument("--tokens", default="1M")
    ap.add_argument("--rss-tokens", default="", help="also build the first run's bundle over this many tokens, to "
                                                   "compare peak RSS against the full build")
    ap.add_argument("--split", default="all", help="corpus split (default all: the stdlib validation split has "
                                                   "only ~586k tokens)")
    ap.add_argument("--child", nargs="*", help=argparse.SUPPRESS)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "dashboard.json"))
    args = ap.parse_args()
    if args.child is not None:
        kind, run, tokens, split, *rest = args.child
        res = child_baseline(run, int(tokens), split) if kind == "baseline" else \
            child_build(run, int(tokens), split, rest[0])
        res["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(json.dumps(res))
        return

    results = []
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        for spec in args.run:
            from saelab.sae import SparseAutoencoder

            run, _, n = spec.partition(":")
            tokens = parse_count(n or args.tokens)
            n_lat = SparseAutoencoder.load(Path(run) / "sae").cfg.n_latents
            base = run_child(["baseline", run, str(tokens), args.split])
            out = str(Path(tmp) / f"bundle-{n_lat}")
            build = run_child(["build", run, str(tokens), args.split, out])
            shutil.rmtree(out, ignore_errors=True)
            row = {"run": run, "n_latents": n_lat, "tokens": build["tokens"], "baseline": base, "build": build,
                   "ratio_to_forward_encode": build["timings"]["total_s"] / base["wall_s"],
                   "build_tokens_per_s": build["tokens"] / build["timings"]["total_s"],
                   "baseline_tokens_per_s": base["tokens"] / base["wall_s"]}
            if args.rss_tokens and spec == args.run[0]:
                small = parse_count(args.rss_tokens)
                out2 = str(Path(tmp) / f"bundle-{n_lat}-small")
                row["build_small"] = run_child(["build", run, str(small), args.split, out2])
                shutil.rmtree(out2, ignore_errors=True)
            results.append(row)
            print(json.dumps(row), flush=True)
    load_after = os.getloadavg()

    print(f"\n{'latents':>8} {'tokens':>9} {'fwd+enc s':>10} {'build s':>8} {'ratio':>6} {'pass s':>7} "
          f"{'views s':>8} {'weights s':>9} {'tok/s':>8} {'peak RSS MB':>11} {'bundle MB':>9}")
    for r in results:
        b = r["build"]
        print(f"{r['n_latents']:>8,} {r['tokens']:>9,} {r['baseline']['wall_s']:>10.1f} {b['timings']['total_s']:>8.1f} "
              f"{r['ratio_to_forward_encode']:>6.2f} {b['timings']['pass_s']:>7.1f} {b['timings']['views_s']:>8.1f} "
              f"{b['timings']['weights_s']:>9.1f} {r['build_tokens_per_s']:>8,.0f} {b['peak_rss_mb']:>11,.0f} "
              f"{b['bundle_bytes'] / 2**20:>9.1f}")
        if "build_small" in r:
            s = r["build_small"]
            print(f"{'':>8} {s['tokens']:>9,} {'':>10} {s['timings']['total_s']:>8.1f} {'':>6} {s['timings']['pass_s']:>7.1f} "
                  f"{s['timings']['views_s']:>8.1f} {s['timings']['weights_s']:>9.1f} "
                  f"{s['tokens'] / s['timings']['total_s']:>8,.0f} {s['peak_rss_mb']:>11,.0f} {s['bundle_bytes'] / 2**20:>9.1f}")
    doc = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "machine": machine(), "split": args.split, "load_average_before": load_before,
           "load_average_after": load_after, "results": results,
           "note": "each measurement is its own child process; ratio = dashboard build wall time / (model forward "
                   "to the hook + sae.encode) wall time over the same rows"}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(doc, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
