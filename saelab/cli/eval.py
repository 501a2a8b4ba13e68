"""`saelab eval` (core, probing, steering suites) and `saelab calibrate`."""

from __future__ import annotations

import argparse

from saelab.settings import add_flags, flag_values, format_count, parse_count


# ---- eval
def add_eval(sub) -> None:
    p = sub.add_parser("eval", help="core metrics of a trained SAE → RUN/eval/core.json",
                       description="Score a trained SAE on held-out text: explained variance, FVU, MSE, L0, dead "
                                   "and dense latents, CE and KL with the SAE spliced in, loss recovered (zero and "
                                   "mean ablation), ΔCE. Writes RUN/eval/core.json. A g-SAE (gtopk) is scored "
                                   "twice on the same tokens: with the LM-loss gradient at the hook (its own "
                                   "selection; one backward per batch) and by its TopK fallback, side by side.")
    p.add_argument("run", help="a run directory (with sae/ and config.yaml) or an SAE directory (cfg.json)")
    from saelab.api import SUITES
    from saelab.eval.probing import ProbingSettings

    budgets = ", ".join(f"{suite} {format_count(n)}" for suite, n in SUITES.items())
    p.add_argument("--tokens", type=parse_count, default=None,
                   help=f"held-out tokens, for probing of labelled code (default {budgets})")
    first = next(iter(SUITES))  # core, as saelab.evaluate's default
    p.add_argument("--suite", default=first, choices=list(SUITES),
                   help="core: RUN/eval/core.json; probing: k-sparse probes on the reference code tasks (or --data) "
                        "vs neuron, random-rotation and dense baselines → RUN/eval/probing.json; steering: input and "
                        f"output scores of every latent → RUN/eval/steering_scores.parquet (default {first})")
    add_flags(p, ProbingSettings, defaults=True)


def run_eval(args) -> int:
    from saelab.api import evaluate
    from saelab.eval.probing import ProbingSettings

    ev = evaluate(args.run, suites=[args.suite], tokens=args.tokens, **flag_values(args, ProbingSettings))
    print(ev)
    print(f"wrote {ev.paths[args.suite]}")
    return 0


# ---- calibrate
def add_calibrate(sub) -> None:
    p = sub.add_parser(
        "calibrate", help="re-fit a thresholded SAE's inference threshold on your own text (for a target L0)",
        description="BatchTopK, Matryoshka, mutual and feature choice SAEs infer with thresholds calibrated for "
                    "mean L0 = k on their training corpus; on text unlike it the L0 drifts. This re-runs the "
                    "architecture's calibration on activations of --dataset for mean L0 = --target-l0 and writes "
                    "the SAE (weights unchanged, new threshold) to --out. It prints the L0 before and after.",
        epilog="example:\n  saelab calibrate runs/batchtopk --dataset path/to/my/code --target-l0 32",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", help="a run directory (with sae/ and config.yaml) or an SAE directory (cfg.json)")
    p.add_argument("--dataset", required=True,
                   help="your text: a local file or directory (.txt/.py/.md/.jsonl/.parquet) or an HF dataset name")
    from saelab.api import CalibrateSettings

    add_flags(p, CalibrateSettings, defaults=True)


def run_calibrate(args) -> int:
    from saelab.api import calibrate

    from saelab.api import CalibrateSettings

    path, info = calibrate(args.run, args.dataset, **flag_values(args, CalibrateSettings))
    print(f"calibrated on {info['tokens']:,} tokens of {args.dataset}: mean L0 {info['l0_before']:.1f} → "
          f"{info['l0_after']:.1f} (target {info['target_l0']:g})")
    print(f"wrote {path}")
    return 0
