"""Does a high output score predict steering success on our model (Arad et al.'s finding), under each steering
strength rule? Issue 24, item 3.

    saelab train --tokens 300k --out W/run && python bench/steering_scale.py W/run

For one run: input and output scores of every latent (`saelab eval RUN --suite steering`'s code), then `--latents`
live latents spread evenly over the output-score ranking, each steered at every α of `--alphas` from `--prompts` of
the neutral code prefixes (`steering_success`, sampling at T 0.7, success@20 = generated tokens among the latent's
top-20 logit-lens tokens), once per strength rule: "position" (α × the largest latent activation at each position,
the paper's) and "corpus" (α × the latent's largest activation over the corpus sample). Reports Spearman's ρ
between output score and success at each latent's best α, at each α alone, and with the gain over α = 0 (what
steering adds: latents whose lens tokens are common hit them unsteered too), and the top and bottom halves by
output score. Writes bench/results/steering_scale.json (date, machine, torch version, wall
times).
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import time
from pathlib import Path

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", help="a run directory (saelab train --out)")
    ap.add_argument("--tokens", type=int, default=16_384, help="corpus tokens for the scores and max activations")
    ap.add_argument("--latents", type=int, default=64, help="latents steered, spread over the output-score ranking")
    ap.add_argument("--alphas", default="0,2,4,8", help="comma-separated strengths (α = 0 is the no-steering control)")
    ap.add_argument("--prompts", type=int, default=4, help="how many of the neutral code prefixes")
    ap.add_argument("--max-new-tokens", type=int, default=12)
    ap.add_argument("--scales", default="position,corpus")
    ap.add_argument("--reuse-scores", action="store_true",
                    help="read RUN/eval/steering_scores.parquet when it is there instead of scoring again")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "steering_scale.json"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from saelab.eval.run import load_run, score_run
    from saelab.eval.steering import STEER_PROMPTS, SteeringScores, output_score_correlation

    loaded = load_run(Path(args.run))
    sae, model, run_dir = loaded[0], loaded[1], loaded[3]
    t0 = time.perf_counter()
    saved = run_dir.steering_scores
    if args.reuse_scores and saved.exists():
        import numpy as np
        import pandas as pd

        df = pd.read_parquet(saved).sort_values("latent")
        scores = SteeringScores(df["latent"].to_numpy(), df["output_score"].to_numpy(), df["input_score"].to_numpy(),
                                df["max_activation"].to_numpy(), df["n_examples"].to_numpy(),
                                np.stack(df["lens_tokens"].to_numpy()), {})
    else:
        scores, _ = score_run(Path(args.run), args.tokens, progress=False, loaded=loaded)
    t_scores = time.perf_counter() - t0
    alphas = [float(a) for a in args.alphas.split(",")]
    results = {}
    for scale in args.scales.split(","):
        t0 = time.perf_counter()
        res = output_score_correlation(model, sae, scores, n=args.latents, alphas=alphas, strength_scale=scale,
                                       prompts=STEER_PROMPTS[:args.prompts], max_new_tokens=args.max_new_tokens)
        res["seconds"] = round(time.perf_counter() - t0, 1)
        res.pop("detail")
        results[scale] = res
        gain = (f"; ρ with the gain over α = 0 {res['spearman_gain']:+.3f} (top half {res['gain_top_half']:.2f} vs "
                f"bottom half {res['gain_bottom_half']:.2f})") if "spearman_gain" in res else ""
        print(f"{scale:>8}: Spearman ρ(output score, best success@20) = {res['spearman_best']:+.3f} over "
              f"{res['n']} latents; per α {dict(zip(alphas, [round(r, 3) for r in res['spearman_per_alpha']]))}; "
              f"best success top half {res['success_top_half']:.2f} vs bottom half {res['success_bottom_half']:.2f}"
              f"{gain} ({res['seconds']:.0f} s)", flush=True)
    doc = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "machine": platform.processor() or platform.machine(), "torch": torch.__version__,
           "run": str(args.run), "architecture": sae.cfg.architecture, "n_latents": sae.cfg.n_latents,
           "k": sae.cfg.k, "hook_name": sae.cfg.hook_name, "tokens": args.tokens,
           "prompts": list(STEER_PROMPTS[:args.prompts]), "max_new_tokens": args.max_new_tokens,
           "scores_seconds": round(t_scores, 1), "results": results}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(doc, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
