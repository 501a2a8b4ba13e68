"""`saelab bench synthetic`: every architecture on planted features."""

from __future__ import annotations

import argparse

from saelab.settings import add_flags, flag_values


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
    from saelab.synthetic.runner import PlantedBenchSettings

    add_flags(p, PlantedBenchSettings, defaults=True)


def run_bench(args) -> int:
    from saelab.api import bench_synthetic
    from saelab.synthetic.runner import PlantedBenchSettings

    result = bench_synthetic(**flag_values(args, PlantedBenchSettings))
    print(result)
    print(f"wrote {result.paths[0]} and {result.paths[1]}")
    return 0
