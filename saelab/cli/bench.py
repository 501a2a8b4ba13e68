"""`saelab bench synthetic`: every architecture on planted features."""

from __future__ import annotations

import argparse


# ---- bench
def add_bench(sub) -> None:
    p = sub.add_parser(
        "bench", help="benchmarks with known answers: `bench synthetic` trains every architecture on planted features",
        description="synthetic: activations built from planted unit features with a hierarchy (the MP-SAE paper's "
                    "toy tree: parents that always fire with their mutually exclusive children), on two top levels: "
                    "the paper's, one parent per row, and independent parents that co-fire; trains each "
                    "architecture on the same rows and batches and scores it against the truth: decoder recovery "
                    "(mean max cosine, fraction ≥ 0.9), absorption (mean cosine of child latents with the true "
                    "parent), code F1, dead latents, FVU. Writes OUT/synthetic.json and OUT/synthetic.html.",
        epilog="example:\n  saelab bench synthetic --steps 1500 --out runs/bench-synthetic",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("which", choices=["synthetic"], help="the benchmark")
    p.add_argument("--archs", default="topk,batchtopk,matryoshka,mp,mutual,feature_choice",
                   help="comma list of architectures (default: all trainable ones but gtopk, which needs LM gradients)")
    p.add_argument("--k", type=int, default=2,
                   help="k of every SAE (2); MP pursues each row until its residual is <= 0.05 or an atom repeats")
    p.add_argument("--mp-steps", type=int, default=0,
                   help="0 (default): MP pursues each row to convergence, as the paper's synthetic runs; N: exactly "
                        "N steps, no early stop, as MP trains by default with N = k (it absorbs when N is below the "
                        "number of features some rows hold)")
    p.add_argument("--steps", type=int, default=1500, help="training steps per SAE (1500)")
    p.add_argument("--batch", type=int, default=200, help="batch size (200, the paper's)")
    p.add_argument("--corr", type=float, default=0.0, help="intra-level correlation ε of the features (0)")
    p.add_argument("--noise", type=float, default=0.0, help="Gaussian noise std added to the activations (0)")
    p.add_argument("--parents", choices=["exclusive", "independent", "both"], default="both",
                   help="how the tree's parents fire: exclusive (one per row, the paper's tree), independent (each "
                        "on its own, so parents co-fire), or both, one table after the other (default)")
    p.add_argument("--seed", type=int, default=0, help="data and training seed (0)")
    p.add_argument("--out", default="runs/bench-synthetic", help="output folder (runs/bench-synthetic)")


def run_bench(args) -> int:
    import json
    from pathlib import Path

    from saelab.config import check
    from saelab.sae import ARCHITECTURES
    from saelab.synthetic.generator import PARENT_MODES, TreeSpec
    from saelab.synthetic.runner import BenchSpec, figure, run_benchmark

    archs = [a.strip() for a in args.archs.split(",") if a.strip()]
    for a in archs:
        check(a in ARCHITECTURES and ARCHITECTURES[a].trainable and not ARCHITECTURES[a].needs_grads, "--archs",
              f"{a!r} is not an architecture this benchmark can train; choose from "
              f"{sorted(n for n, c in ARCHITECTURES.items() if c.trainable and not c.needs_grads)}")
    check(args.k >= 1, "--k", f"must be >= 1, got {args.k}")
    check(args.mp_steps >= 0, "--mp-steps", f"must be >= 0, got {args.mp_steps}")
    check(args.steps >= 1, "--steps", f"must be >= 1, got {args.steps}")
    check(args.batch >= 1, "--batch", f"must be >= 1, got {args.batch}")
    check(0 <= args.corr < 1, "--corr", f"must be in [0, 1), got {args.corr}")
    check(args.noise >= 0, "--noise", f"must be >= 0, got {args.noise}")
    out = Path(args.out)
    rows = []
    for parents in (PARENT_MODES if args.parents == "both" else [args.parents]):
        spec = BenchSpec(tree=TreeSpec(corr=args.corr, noise=args.noise, parents=parents), k=args.k,
                         steps=args.steps, batch=args.batch, seed=args.seed, mp_steps=args.mp_steps)
        rows += run_benchmark(spec, archs, out / "runs" / parents)
    cols = ["absorption", "recovered", "mean_max_cos", "code_f1", "dead", "l0", "fvu"]
    print(f"{'arch':15}{'parents':>13}" + "".join(f"{c:>13}" for c in cols))
    for r in rows:
        print(f"{r['arch']:15}{r['parents']:>13}" + "".join(f"{r[c]:13.4f}" for c in cols))
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / "synthetic.json.tmp"
    tmp.write_text(json.dumps({"spec": {"k": args.k, "steps": args.steps, "batch": args.batch, "corr": args.corr,
                                        "noise": args.noise, "parents": args.parents, "mp_steps": args.mp_steps,
                                        "seed": args.seed},
                               "rows": rows}, indent=2))
    tmp.replace(out / "synthetic.json")
    figure(rows).write_html(str(out / "synthetic.html"))
    print(f"wrote {out / 'synthetic.json'} and {out / 'synthetic.html'}")
    return 0
