"""`saelab steer`: steered vs unsteered generation, or a strength sweep."""

from __future__ import annotations

import argparse


# ---- steer
def add_steer(sub) -> None:
    p = sub.add_parser(
        "steer", help="steer generation with SAE latents: steered vs unsteered text, or a strength sweep",
        description="Add α × (the largest latent activation at that position, as Arad et al. 2025) × the "
                    "latent's decoder direction at the SAE's hook on every position while generating, and print "
                    "the steered and unsteered continuations of --prompt. "
                    "--sweep measures concept success (generated tokens among the latent's top logit-lens tokens) "
                    "and fluency (the unsteered model's loss on the steered text) over a strength grid and writes "
                    "RUN/eval/steer_sweep_<latents>.json and .html.",
        epilog="examples:\n  saelab steer runs/NAME --latent 123 --alpha 4 --prompt 'def '\n"
               "  saelab steer runs/NAME --latent 123 --latent 7 --alpha 2 --prompt 'import '\n"
               "  saelab steer runs/NAME --latent 123 --sweep",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", help="a run directory (with sae/) or an SAE directory")
    p.add_argument("--latent", type=int, action="append", required=True,
                   help="latent index; repeat to steer several at once")
    p.add_argument("--alpha", type=float, action="append", default=None,
                   help="strength in units of --strength-scale (default 4); one, or one per --latent; with "
                        "--sweep, several give the grid (default: the paper's 0, 0.2, 0.4, 0.8, 1.2, 1.6, 2, 3, 4, "
                        "6, 8, 10, 20)")
    p.add_argument("--strength-scale", default="position", choices=["position", "corpus"],
                   help="what α multiplies: position (default, the paper's rule): the largest latent activation "
                        "of the SAE at each steered position; corpus: the latent's own largest activation over "
                        "held-out text (RUN/eval/steering_scores.parquet, else a 16k-token pass)")
    p.add_argument("--prompt", default="", help="text to continue (default: a newline; --sweep: 8 neutral code "
                                                "prefixes)")
    p.add_argument("--max-new-tokens", type=int, default=30, help="tokens to generate (30)")
    p.add_argument("--temperature", type=float, default=0.7, help="sampling temperature; 0 = greedy (0.7)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (0)")
    p.add_argument("--mode", default="add", choices=["add", "clamp"],
                   help="add (default): add α·scale·d_f; clamp: set the latent to α·scale, SAE error term kept")
    p.add_argument("--sweep", action="store_true", help="concept success and fluency over a strength grid")


def run_steer(args) -> int:
    from pathlib import Path

    from saelab.eval.run import format_steer, steer_run

    result, paths = steer_run(Path(args.run), args.latent, args.alpha or [4.0], args.prompt, args.max_new_tokens,
                              args.temperature, args.seed, args.sweep, args.mode,
                              strength_scale=args.strength_scale)
    print(format_steer(result))
    for path in paths:
        print(f"wrote {path}")
    return 0
