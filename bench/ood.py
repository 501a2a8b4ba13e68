"""SAEs on text unlike their training corpus: core metrics on the standard-library validation split (in
distribution) and on a package's own source that is not in the stdlib corpus (default: pip's, installed with every
Python), under several inference rules:

- `own`: each architecture's own inference rule (global θ for BatchTopK / Matryoshka / mutual, per-latent θ for
  feature choice, pursuit for MP, TopK for TopK, gradient-informed TopK for g-SAE);
- `topk`: the thresholded SAEs decoded with per-token TopK at their k (θ unset), the rule TopK uses everywhere;
- `recalibrated`: θ re-fitted on the other text's own activations for mean L0 = k (`saelab calibrate`, which
  calls the architecture's `calibrate` on activations of `--calibrate-split`), scored on the held-out split.

The other text is split in two by saelab's deterministic document split (validation_per_mille 500): θ is
re-calibrated on one half and every number is measured on the other.

    python bench/ood.py --runs /work/ood/runs/topk /work/ood/runs/batchtopk ...  # runs trained on the stdlib
    python bench/ood.py --runs ... --text /path/to/other/source --tokens 65536

Writes bench/results/ood.json and prints a table.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import platform
import time
from pathlib import Path

import torch

THRESHOLDED = ("batchtopk", "matryoshka", "mutual", "feature_choice")


def pip_source() -> str:
    import pip

    return str(Path(pip.__file__).resolve().parent)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", nargs="+", required=True, help="run directories (trained on the stdlib corpus)")
    ap.add_argument("--text", default=None, help="a directory or file of other text (default: pip's source)")
    ap.add_argument("--tokens", type=int, default=65_536, help="tokens scored per text (default 65,536)")
    ap.add_argument("--calibration-tokens", type=int, default=65_536, help="tokens to re-calibrate θ on")
    ap.add_argument("--out", default="bench/results/ood.json")
    args = ap.parse_args()

    import saelab
    from saelab.data.corpus import CorpusSpec
    from saelab.eval.core import evaluate_core
    from saelab.activations import stream_activations
    from saelab.training.calibrate import recalibrate

    text = args.text or pip_source()
    other = CorpusSpec(source=text, validation_per_mille=500)
    model = saelab.load_model("reference")
    rows, t0 = {}, time.time()
    for run in args.runs:
        sae = saelab.load_sae(run)
        arch = sae.cfg.architecture
        variants = {"own": sae}
        if arch in THRESHOLDED:
            fallback = copy.deepcopy(sae)
            fallback.threshold.fill_(-1.0)  # θ unset: `encode` takes each token's k largest, as TopK does
            variants["topk"] = fallback
            refit = copy.deepcopy(sae)
            stream = stream_activations(model, sae.cfg.hook_name, corpus=other, split="train", batch_size=4096)
            info = recalibrate(refit, (b.acts for b in stream), tokens=args.calibration_tokens)
            print(f"{Path(run).name}: θ re-fitted on the other text's train half: L0 {info['l0_before']:.1f} → "
                  f"{info['l0_after']:.1f}", flush=True)
            variants["recalibrated"] = refit
        for rule, s in variants.items():
            for where, corpus, split in (("stdlib", CorpusSpec(), "validation"), ("other", other, "validation")):
                if where == "stdlib" and rule == "recalibrated":
                    continue
                m = evaluate_core(model, s, corpus=corpus, split=split, n_tokens=args.tokens)
                key = f"{Path(run).name}/{rule}/{where}"
                rows[key] = {"run": str(run), "arch": arch, "k": sae.cfg.k, "rule": rule, "text": where,
                             "explained_variance": m.explained_variance, "l0": m.l0, "delta_ce": m.delta_ce,
                             "frac_dead": m.frac_dead, "gradient_rule": getattr(m, "fallback", None) is not None}
                print(f"{key:40s} EV {m.explained_variance:.3f}  L0 {m.l0:6.1f}  ΔCE {m.delta_ce:+.3f}", flush=True)
    out = {"date": datetime.date.today().isoformat(), "machine": platform.processor() or platform.machine(),
           "threads": torch.get_num_threads(), "other_text": text, "tokens": args.tokens,
           "calibration_tokens": args.calibration_tokens, "seconds": round(time.time() - t0, 1), "rows": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
