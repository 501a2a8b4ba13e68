"""`saelab.bench_synthetic`: every architecture trained on planted features and scored against the truth
(`saelab bench synthetic`), a `PlantedBench`."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from saelab.synthetic.runner import PlantedBenchSettings


@dataclass
class PlantedBench:
    """`saelab.bench_synthetic`'s result: one row per (architecture, tree) with its scores against the planted
    truth (absorption, recovered, mean_max_cos, code_f1, dead, l0, fvu, …); `paths` the JSON and HTML written."""

    rows: list[dict]
    paths: list[Path]

    def figure(self):
        """Plotly: the scores per architecture (the HTML page's chart)."""
        from saelab.synthetic.runner import figure

        return figure(self.rows)

    def __str__(self) -> str:  # what `saelab bench synthetic` prints
        from saelab.synthetic.runner import format_rows

        return format_rows(self.rows)

    def _repr_html_(self) -> str:
        from saelab.display import grid_html
        from saelab.synthetic.runner import TABLE_COLUMNS

        return grid_html(["arch", "parents", *TABLE_COLUMNS],
                         [[r["arch"], r["parents"], *(r[c] for c in TABLE_COLUMNS)] for r in self.rows],
                         title="planted-feature benchmark")


def bench_synthetic(archs: str | Sequence[str] | None = PlantedBenchSettings.archs,
                    k: int = PlantedBenchSettings.k,
                    mp_steps: int = PlantedBenchSettings.mp_steps,
                    steps: int = PlantedBenchSettings.steps,
                    batch: int = PlantedBenchSettings.batch,
                    corr: float = PlantedBenchSettings.corr,
                    noise: float = PlantedBenchSettings.noise,
                    parents: str = PlantedBenchSettings.parents,
                    seed: int = PlantedBenchSettings.seed,
                    out: str | Path = PlantedBenchSettings.out, progress: bool = True) -> PlantedBench:
    """Train every architecture on planted hierarchical features and score it against the truth, as `saelab bench
    synthetic` does; writes OUT/synthetic.json and .html. The settings are
    `saelab.synthetic.runner.PlantedBenchSettings`'s, checked before any training.

    >>> saelab.bench_synthetic(archs="topk,mp", steps=300).figure()             # doctest: +SKIP
    """
    from saelab.synthetic.runner import run_planted_bench

    st = PlantedBenchSettings(archs=archs, k=k, mp_steps=mp_steps, steps=steps, batch=batch, corr=corr, noise=noise,
                              parents=parents, seed=seed, out=str(out))
    return PlantedBench(*run_planted_bench(st, progress=progress))
