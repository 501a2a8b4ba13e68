"""Patching benchmark on the reference model: cost of each estimator over all components, and how well each agrees
with activation patching.

Timing (one task, same run, ratios against attribution patching and against the batched activation patching):
activation patching batched vs the one-component-at-a-time loop, attribution patching, RelP, IG (10 steps), over
all components (resid / attn out / MLP out per layer × position, every head). Targets: RelP within 3× of
attribution patching; batched activation patching at least 3× faster than the loop. The batched path skips the
components equal in the clean and corrupted runs (exact zeros) and starts each forward's patched copies at their
layer; the loop runs every component in a full forward (the reference it is checked against in the tests).

Agreement: Pearson r of attribution patching, RelP (and its rule ablations) and IG against activation patching per
component type on every reference task, and on SAE latents + error nodes when an SAE is given (--sae), with the
circuit's faithfulness/completeness. The RelP paper's GPT-2-small IOI numbers (MLP out: AtP 0.195 vs RelP 0.992)
are the direction to compare with.

    python bench/patching.py [--task copy] [--pairs 32] [--sae runs/ref-topk-4096] [--threads 1] [--timing-only]

Prints a table and writes bench/results/patching.json (date, machine, torch version, numbers).
"""

from __future__ import annotations

import argparse
import datetime
import json
import time
from pathlib import Path

import torch

from cache import device_name  # bench/cache.py: the CPU model and core count


def timed(fn, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--task", default="copy", help="task timed (default copy: 15 tokens)")
    ap.add_argument("--pairs", type=int, default=32)
    ap.add_argument("--few-pairs", type=int, default=2, help="pairs of the second, overhead-bound timing (2)")
    ap.add_argument("--ig-steps", type=int, default=10)
    ap.add_argument("--sae", default="runs/ref-topk-4096", help="run or SAE directory for the SAE-node agreement "
                                                                "('' to skip)")
    ap.add_argument("--sae-task", default="bracket", help="task the SAE nodes are patched on (bracket)")
    ap.add_argument("--max-ap-nodes", type=int, default=300, help="SAE nodes patched one by one (seeded sample)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--timing-only", action="store_true", help="skip the agreement part (minutes)")
    ap.add_argument("--out", default="bench/results/patching.json")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from saelab.eval import patching
    from saelab.eval.patching_report import format_report, run_patching
    from saelab.eval.tasks import make_task
    from saelab.models import load_model
    from saelab.sae import SparseAutoencoder

    model = load_model("reference")
    for p in model.parameters():
        p.requires_grad_(False)

    # ---------------------------------------------------------------------------------------- timing
    batch = make_task(model, args.task, args.pairs)
    sites = patching.model_sites(model)
    base = patching.baseline(model, batch)
    n_comp = sum(s.n_components(batch.length, model.cfg.n_heads) for s in sites)
    runs = {
        "attribution": (lambda: patching.attribution_patching(model, batch, sites, base), 3),
        "relp": (lambda: patching.relp(model, batch, sites, base), 3),
        "ig": (lambda: patching.integrated_gradients(model, batch, sites, base, steps=args.ig_steps), 1),
        "activation_batched": (lambda: patching.activation_patching(model, batch, sites, base), 1),
        "activation_loop": (lambda: patching.activation_patching(model, batch, sites, base, batched=False), 1),
    }
    seconds = {name: timed(fn, reps) for name, (fn, reps) in runs.items()}
    # batching pays where per-forward overhead dominates (few rows per forward): the same comparison on a few pairs
    few = make_task(model, args.task, args.few_pairs)
    few_base = patching.baseline(model, few)
    seconds[f"activation_batched_{args.few_pairs}_pairs"] = timed(
        lambda: patching.activation_patching(model, few, sites, few_base), 1)
    seconds[f"activation_loop_{args.few_pairs}_pairs"] = timed(
        lambda: patching.activation_patching(model, few, sites, few_base, batched=False), 1)
    ratios = {"relp_over_attribution": seconds["relp"] / seconds["attribution"],
              "ig_over_attribution": seconds["ig"] / seconds["attribution"],
              "activation_batched_over_attribution": seconds["activation_batched"] / seconds["attribution"],
              "loop_over_batched_activation": seconds["activation_loop"] / seconds["activation_batched"],
              f"loop_over_batched_activation_{args.few_pairs}_pairs":
                  seconds[f"activation_loop_{args.few_pairs}_pairs"]
                  / seconds[f"activation_batched_{args.few_pairs}_pairs"]}
    print(f"timing: task {args.task}, {batch.n_pairs} pairs x {batch.length} tokens, {n_comp} components, "
          f"{torch.get_num_threads()} threads")
    for name, t in seconds.items():
        print(f"  {name:<22} {t:8.3f} s   {t / seconds['attribution']:8.2f}x attribution")
    print(f"  RelP / AtP = {ratios['relp_over_attribution']:.2f} (target <= 3); activation loop / batched = "
          f"{ratios['loop_over_batched_activation']:.2f} at {args.pairs} pairs, "
          f"{ratios[f'loop_over_batched_activation_{args.few_pairs}_pairs']:.2f} at {args.few_pairs} pairs "
          f"(target >= 3)")

    # ---------------------------------------------------------------------------------------- agreement
    agreement = {}
    saes = []
    if args.sae and not args.timing_only:
        d = Path(args.sae)
        saes = [SparseAutoencoder.load(d / "sae" if (d / "sae").is_dir() else d)]
        for p in saes[0].parameters():
            p.requires_grad_(False)
    for task in () if args.timing_only else ("bracket", "copy", "quote"):
        rep = run_patching(model, task, args.pairs, ig_steps=args.ig_steps, max_ap_nodes=args.max_ap_nodes,
                           saes=saes if task == args.sae_task else ())
        rep.pop("_figures")
        print(format_report(rep))
        agreement[task] = {"solve_rate": rep["solve_rate"], "correlation": rep["correlation"],
                           "seconds": rep["seconds"]}
        if "sae" in rep:
            s = rep["sae"]
            agreement[task]["sae"] = {"hooks": s["hooks"], "sae_dir": args.sae, "correlation": s["correlation"],
                                      "n_nodes_patched": s.get("n_nodes_patched"),
                                      "circuit": {k: s["circuit"][k] for k in ("ranked_by", "sizes", "faithfulness",
                                                                               "completeness", "n_nonzero")}}

    result = {"benchmark": "patching", "date": datetime.datetime.now(datetime.timezone.utc).isoformat(),
              "machine": device_name("cpu"), "torch": torch.__version__, "threads": torch.get_num_threads(),
              "model": "reference", "timing": {"task": args.task, "n_pairs": batch.n_pairs, "length": batch.length,
                                               "n_components": n_comp, "ig_steps": args.ig_steps,
                                               "seconds": seconds, "ratios": ratios},
              "agreement": agreement,
              "paper_reference": {"source": "RelP (arXiv 2508.21258), GPT-2 small IOI, Pearson r vs activation "
                                            "patching", "mlp_out": {"attribution": 0.195, "relp": 0.992},
                                  "resid": {"attribution": 0.753, "relp": 0.968},
                                  "attn_out": {"attribution": 0.979, "relp": 0.962}}}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
