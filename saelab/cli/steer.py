"""`saelab steer`: steered vs unsteered generation, or a strength sweep."""

from __future__ import annotations

import argparse

from saelab.settings import add_flags, flag_values


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
    from saelab.eval.run import SteerSettings

    add_flags(p, SteerSettings, defaults=True)


def run_steer(args) -> int:
    from saelab.api import steer
    from saelab.eval.run import SteerSettings

    result = steer(args.run, args.latent, **flag_values(args, SteerSettings))
    print(result)
    for path in result.paths if args.sweep else ():
        print(f"wrote {path}")
    return 0
