"""`saelab patch`: activation patching against its approximations on a contrast task."""

from __future__ import annotations

import argparse

from saelab.cli.flags import _add_model_flags


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
    _add_model_flags(p)
    p.add_argument("--task", default="bracket",
                   help="bracket (default), copy, quote, ioi (GPT-2-style English models), or a .jsonl file of "
                        "{clean, corrupted, answer, wrong} pairs")
    p.add_argument("--pairs", type=int, default=32, help="prompt pairs (default 32)")
    p.add_argument("--method", default="all",
                   help="comma list of activation, attribution, relp, ig, or all (default)")
    p.add_argument("--components", default="resid,attn,mlp,head", help="comma list of resid, attn, mlp, head")
    p.add_argument("--relp-rules", default="ln,identity,half",
                   help="RelP rules: comma list of ln, attn, identity, half, or none (default ln,identity,half)")
    p.add_argument("--ig-steps", type=int, default=10, help="integrated-gradients steps (default 10)")
    p.add_argument("--sae", action="append", default=[],
                   help="a run directory or SAE directory to splice in (repeat for several hooks)")
    p.add_argument("--circuit-method", default="ig", help="estimator that ranks circuit nodes (default ig)")
    p.add_argument("--max-ap-nodes", type=int, default=2000,
                   help="SAE nodes patched one by one for the ground truth (a seeded sample when more change)")
    p.add_argument("--seed", type=int, default=0, help="task sampling seed (0)")
    p.add_argument("--out", help="output directory (default: RUN/eval/patching of the first --sae run, else "
                                 "eval/patching)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def run_patch(args) -> int:
    from saelab.eval.patching_report import format_report, load_saes, patch_settings, run_patching, write_report
    from saelab.models import load_model

    st = patch_settings(args.method, args.components, args.relp_rules, args.pairs, args.ig_steps,
                        args.circuit_method, args.sae, args.task)
    model = load_model(args.model, device=args.device, dtype=args.model_dtype)
    report = run_patching(model, args.task, args.pairs, st.methods, st.kinds, st.rules, args.ig_steps,
                          load_saes(model, st.saes), args.circuit_method, args.seed, progress=not args.no_progress,
                          max_ap_nodes=args.max_ap_nodes)
    jpath, hpath = write_report(report, args.out or st.default_out or "eval/patching")
    print(format_report(report))
    print(f"wrote {jpath} and {hpath}")
    return 0
