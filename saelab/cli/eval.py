"""`saelab eval` (core, probing, steering suites) and `saelab calibrate`."""

from __future__ import annotations

import argparse

from saelab.cli.flags import _int_list
from saelab.settings import parse_count


# ---- eval
def add_eval(sub) -> None:
    p = sub.add_parser("eval", help="core metrics of a trained SAE → RUN/eval/core.json",
                       description="Score a trained SAE on held-out text: explained variance, FVU, MSE, L0, dead "
                                   "and dense latents, CE and KL with the SAE spliced in, loss recovered (zero and "
                                   "mean ablation), ΔCE. Writes RUN/eval/core.json. A g-SAE (gtopk) is scored "
                                   "twice on the same tokens: with the LM-loss gradient at the hook (its own "
                                   "selection; one backward per batch) and by its TopK fallback, side by side.")
    p.add_argument("run", help="a run directory (with sae/ and config.yaml) or an SAE directory (cfg.json)")
    p.add_argument("--tokens", type=parse_count, default=None,
                   help="held-out tokens (default 64k; probing: 80k of labelled code)")
    p.add_argument("--suite", default="core", choices=["core", "probing", "steering"],
                   help="core (default): RUN/eval/core.json; probing: k-sparse probes on the reference code tasks "
                        "(or --data) vs neuron, random-rotation and dense baselines → RUN/eval/probing.json; "
                        "steering: input and output scores of every latent → RUN/eval/steering_scores.parquet")
    from saelab.eval.probing import DENSE_DENSITY, KS, LEVELS, SELECTIONS

    p.add_argument("--selection", default=SELECTIONS[0], choices=SELECTIONS,
                   help="probing: how the k features are ranked on the probe-train examples: mean_diff (default; "
                        "|mean_pos - mean_neg|, SAEBench), f_stat (ANOVA F: the std-normalised mean difference), "
                        "probe_loss (the loss of a 1-D probe on each feature alone, Gao et al. 2024)")
    p.add_argument("--max-density", type=float, default=None,
                   help="probing: leave out of the selection SAE latents active on more than this share of the "
                        f"probe-train tokens, e.g. {DENSE_DENSITY:g} (default: none left out)")
    p.add_argument("--ks", type=_int_list, default=list(KS),
                   help=f"probing: comma-separated probe sizes k (default {','.join(map(str, KS))})")
    p.add_argument("--data", default=None,
                   help="probing: your labelled data instead of the code tasks: a .jsonl/.csv file or an HF dataset "
                        "with a text and a label column (--level sequence), or a .jsonl file with the text and "
                        "positive character spans per task (--level token), each line like "
                        '{"text": "x = foo(1)", "spans": {"call": [[4, 10]], "number": [[8, 9]]}}')
    p.add_argument("--level", default=LEVELS[0], choices=LEVELS,
                   help="probing --data: sequence (default): one example per text, label per text; token: one "
                        "example per BPE token, positive inside a task's [start, end) character spans (a line "
                        "without a task's key is unlabelled for it)")
    p.add_argument("--text-field", default="text", help="probing --data: the text column (text)")
    p.add_argument("--label-field", default=None,
                   help="probing --data: the label column (label), or at --level token the spans column (spans)")
    p.add_argument("--pooling", default="mean", choices=["mean", "last"],
                   help="probing --data at --level sequence: pool token activations by mean (default) or take the "
                        "last token")



def run_eval(args) -> int:
    from pathlib import Path

    from saelab.config import check

    check(args.tokens is None or args.tokens > 0, "--tokens", f"must be > 0, got {args.tokens}")
    if args.suite == "core":
        _evaluate(args.run, args.tokens or 65_536)
        return 0
    from saelab.eval.probing import format_probing
    from saelab.eval.run import probe_run, score_run
    from saelab.eval.steering import format_scores

    if args.suite == "probing":
        result, path = probe_run(Path(args.run), args.tokens or 80_000, args.selection, args.data, args.text_field,
                                 args.label_field, args.pooling, level=args.level, max_density=args.max_density,
                                 ks=args.ks)
        print(format_probing(result))
    else:
        scores, path = score_run(Path(args.run), args.tokens or 65_536)
        print(format_scores(scores))
    print(f"wrote {path}")
    return 0


def _evaluate(run, tokens: int):
    """Core metrics of a run's SAE, printed and written to RUN/eval/core.json; returns them."""
    from pathlib import Path

    from saelab.eval.core import format_core
    from saelab.eval.run import evaluate_run

    metrics, path = evaluate_run(Path(run), tokens)
    print(format_core(metrics))
    print(f"wrote {path}")
    return metrics


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
    p.add_argument("--target-l0", type=float, default=None, help="mean active latents per token (default: the SAE's k)")
    p.add_argument("--tokens", type=parse_count, default=65_536, help="tokens of --dataset to fit on (default 64k)")
    p.add_argument("--split", default="all", choices=["train", "validation", "all"],
                   help="which part of --dataset by saelab's document split (default all)")
    p.add_argument("--out", default=None, help="where to write the SAE (default RUN/calibrated-<dataset name>)")


def run_calibrate(args) -> int:
    from saelab.api import calibrate
    from saelab.config import check

    check(args.tokens > 0, "--tokens", f"must be > 0, got {args.tokens}")
    path, info = calibrate(args.run, args.dataset, target_l0=args.target_l0, tokens=args.tokens, split=args.split,
                           out=args.out)
    print(f"calibrated on {info['tokens']:,} tokens of {args.dataset}: mean L0 {info['l0_before']:.1f} → "
          f"{info['l0_after']:.1f} (target {info['target_l0']:g})")
    print(f"wrote {path}")
    return 0
