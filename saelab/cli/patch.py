"""`saelab patch`: activation patching against its approximations on a contrast task."""

from __future__ import annotations

import argparse

from saelab.settings import add_flags


# ---- patch
def add_patch(sub) -> None:
    p = sub.add_parser(
        "patch", help="activation patching vs attribution patching, RelP and IG on a contrast task → eval/patching",
        description="Patch every component (residual stream, attention and MLP output per layer x position, each "
                    "head; with --sae also every SAE latent and error node) from clean into corrupted prompts, "
                    "estimate the same effects with attribution patching, RelP and integrated gradients, and report "
                    "their Pearson r against activation patching per component type, plus a sparse feature "
                    "circuit's faithfulness/completeness curve. Writes patching-<task>.json and .html (Plotly).",
        epilog="examples:\n  saelab patch --task bracket\n  saelab patch --task copy --sae runs/x --method all\n"
               "  saelab patch --task pairs.jsonl --method activation,relp --relp-rules ln,identity",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    from saelab.config import ModelSpec
    from saelab.eval.patching_report import PatchSettings

    add_flags(p, ModelSpec, defaults=True)
    add_flags(p, PatchSettings, defaults=True)
    p.add_argument("--sae", action="append", default=[],
                   help="a run directory or SAE directory to splice in (repeat for several hooks)")
    p.add_argument("--out", help="output directory (default: RUN/eval/patching of the first --sae run, else "
                                 "eval/patching)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def run_patch(args) -> int:
    from saelab.api import patch

    rep = patch(args.model, task=args.task, saes=args.sae, pairs=args.pairs, methods=args.method,
                components=args.components, relp_rules=args.relp_rules, ig_steps=args.ig_steps,
                circuit_method=args.circuit_method, seed=args.seed, max_ap_nodes=args.max_ap_nodes,
                out=args.out or True, progress=not args.no_progress, device=args.device, model_dtype=args.model_dtype)
    print(rep)
    print(f"wrote {rep.paths[0]} and {rep.paths[1]}")
    return 0
