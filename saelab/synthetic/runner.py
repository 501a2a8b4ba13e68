"""Train several architectures on the same planted data (same rows, same batches) and score each against the
truth, on one hierarchy (`BenchSpec.tree.parents`: the paper's exclusive top level, or independent co-firing
parents); optionally write a Plotly figure of one or both."""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from saelab.settings import setting
from saelab.synthetic.generator import PARENT_MODES, TreeSpec, generate
from saelab.synthetic.metrics import score


def planted_archs() -> tuple[str, ...]:
    """The architectures this benchmark trains by default: every registered trainable one that selects without the
    LM-loss gradient (planted data has no language model)."""
    from saelab.sae.architectures import registry

    return tuple(name for name, arch in registry().items() if arch.trainable and not arch.needs_grads)


# The benchmark's own choices on top of each architecture's option defaults (its Options dataclass). Matryoshka on
# 20 latents: the parents' share first. MP as in the paper's synthetic runs (App. B.1, the authors' toy code):
# pursue each token until its residual is ≤ 0.05 or it re-selects an atom (at most n_latents steps, not k).
# `BenchSpec.mp_steps` > 0 runs the library's own pursuit instead: that many steps, no early stop (mp_steps = k is
# MP's default); with fewer steps than some rows have features, MP absorbs (README, planted features)
BENCH_OPTIONS = {"matryoshka": {"group_fractions": [0.25, 0.75]},
                 "mp": {"tol": 0.05, "stop_on_duplicate_support": True}}


@dataclass
class BenchSpec:
    tree: TreeSpec = field(default_factory=TreeSpec)
    rows: int = 20000
    k: int = 2
    width: int = 0  # 0 = as many latents as true features
    batch: int = 200
    steps: int = 1500
    lr: float = 3e-2  # the paper's optimizer for every SAE (App. B.1): Adam(0.5, 0.9375), lr 3e-2, clip 1
    adam_betas: tuple[float, float] = (0.5, 0.9375)
    seed: int = 0
    mp_steps: int = 0  # 0: MP pursues to convergence (the paper's); N: N steps, no early stop (the library's T)


@dataclass
class PlantedBenchSettings:
    """`saelab bench synthetic`'s settings (`saelab.bench_synthetic`'s keywords), checked when built; the defaults are
    `BenchSpec`'s and `TreeSpec`'s. parents "both": the exclusive tree, then the independent one."""

    archs: str | Sequence[str] | None = setting(None, "comma list of architectures",
                                                default_text="every trainable one that selects without LM gradients")
    k: int = setting(BenchSpec.k, "k of every SAE; MP pursues each row until its residual is <= "
                     f"{BENCH_OPTIONS['mp']['tol']:g} or an atom repeats")
    mp_steps: int = setting(BenchSpec.mp_steps, "0: MP pursues each row to convergence, as the paper's synthetic "
                            "runs; N: exactly N steps, no early stop, as MP trains by default with N = k (it absorbs "
                            "when N is below the number of features some rows hold)")
    steps: int = setting(BenchSpec.steps, "training steps per SAE")
    batch: int = setting(BenchSpec.batch, "batch size, the paper's")
    corr: float = setting(TreeSpec.corr, "intra-level correlation ε of the features")
    noise: float = setting(TreeSpec.noise, "Gaussian noise std added to the activations")
    parents: str = setting("both", "how the tree's parents fire: exclusive (one per row, the paper's tree), "
                           "independent (each on its own, so parents co-fire), or both, one table after the other",
                           choices=(*PARENT_MODES, "both"))
    seed: int = setting(BenchSpec.seed, "data and training seed")
    out: str = setting("runs/bench-synthetic", "output folder")

    def __post_init__(self):
        from saelab.settings import check

        names = self.archs.split(",") if isinstance(self.archs, str) else self.archs or planted_archs()
        self.archs = [a.strip() for a in names if a.strip()]
        allowed = planted_archs()
        for a in self.archs:
            check(a in allowed, "--archs", f"{a!r} is not an architecture this benchmark can train; choose from "
                                           f"{sorted(allowed)}")
        check(self.k >= 1, "--k", f"must be >= 1, got {self.k}")
        check(self.mp_steps >= 0, "--mp-steps", f"must be >= 0, got {self.mp_steps}")
        check(self.steps >= 1, "--steps", f"must be >= 1, got {self.steps}")
        check(self.batch >= 1, "--batch", f"must be >= 1, got {self.batch}")
        check(0 <= self.corr < 1, "--corr", f"must be in [0, 1), got {self.corr}")
        check(self.noise >= 0, "--noise", f"must be >= 0, got {self.noise}")
        check(self.parents in (*PARENT_MODES, "both"), "--parents", f"{self.parents!r}; use exclusive, independent "
                                                                    f"or both")


def run_benchmark(spec: BenchSpec, archs=None, out: str | Path | None = None, progress: bool = True) -> list[dict]:
    """One row per architecture of `archs` (default `planted_archs()`): its scores against the planted truth."""
    import torch

    from saelab.activations.in_memory import InMemoryActivations
    from saelab.config import SAEConfig, TrainConfig
    from saelab.training import train

    data = generate(spec.tree, spec.rows, seed=spec.seed)
    held = generate(spec.tree, 4096, seed=spec.seed, sample_seed=spec.seed + 1)  # same features, new rows
    width = spec.width or spec.tree.n_features
    rows = []
    root = Path(out or tempfile.mkdtemp(prefix="saelab-synthetic-"))
    for arch in archs or planted_archs():
        options = dict(BENCH_OPTIONS.get(arch, {}), **({"steps": width} if arch == "mp" else {}))
        if arch == "mp" and spec.mp_steps:
            options = {"steps": spec.mp_steps}
        cfg = TrainConfig(sae=SAEConfig(architecture=arch, n_latents=width, k=spec.k, normalize="none",
                                        options=options),
                          tokens=spec.steps * spec.batch, batch_size=spec.batch, lr=spec.lr, lr_warmup_steps=20,
                          adam_betas=spec.adam_betas,
                          log_every=max(1, spec.steps // 10), checkpoint_every=spec.steps, eval_tokens=0,
                          seed=spec.seed, dead_tokens=spec.batch * 50)
        torch.manual_seed(spec.seed)
        res = train(cfg, InMemoryActivations(data.x, spec.batch, seed=spec.seed), root / arch, progress=progress)
        row = {"arch": arch, "parents": spec.tree.parents, **score(res.sae, held)}
        x_hat = res.sae.decode(res.sae.encode(held.x)).detach()
        row["fvu"] = float((held.x - x_hat).pow(2).sum(-1).mean() / (held.x - held.x.mean(0)).pow(2).sum(-1).mean())
        rows.append(row)
    return rows


def figure(rows: list[dict]):
    import plotly.graph_objects as go

    metrics = ["absorption", "recovered", "mean_max_cos", "code_f1", "dead"]
    both = len({r.get("parents") for r in rows}) > 1
    x = [f"{r['arch']}<br>{r['parents']} parents" if both else r["arch"] for r in rows]
    fig = go.Figure([go.Bar(name=m, x=x, y=[r[m] for r in rows]) for m in metrics])
    fig.update_layout(barmode="group", title="Planted-feature benchmark (toy tree): lower absorption is better",
                      yaxis_title="value")
    return fig


def run_planted_bench(settings: PlantedBenchSettings, progress: bool = True) -> tuple[list[dict], list[Path]]:
    """`saelab bench synthetic`: every architecture of `settings` on each tree (`parents`), one row per (architecture,
    tree), written to OUT/synthetic.json (settings and rows) and OUT/synthetic.html (a Plotly bar chart); returns the
    rows and those two files."""
    import json

    from saelab.files import write_text_atomic

    st, out, rows = settings, Path(settings.out), []
    for parents in (PARENT_MODES if st.parents == "both" else [st.parents]):
        spec = BenchSpec(tree=TreeSpec(corr=st.corr, noise=st.noise, parents=parents), k=st.k, steps=st.steps,
                         batch=st.batch, seed=st.seed, mp_steps=st.mp_steps)
        rows += run_benchmark(spec, st.archs, out / "runs" / parents, progress=progress)
    out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out / "synthetic.json", json.dumps(
        {"spec": {"k": st.k, "steps": st.steps, "batch": st.batch, "corr": st.corr, "noise": st.noise,
                  "parents": st.parents, "mp_steps": st.mp_steps, "seed": st.seed},
         "rows": rows}, indent=2))
    figure(rows).write_html(str(out / "synthetic.html"))
    return rows, [out / "synthetic.json", out / "synthetic.html"]


TABLE_COLUMNS = ("absorption", "recovered", "mean_max_cos", "code_f1", "dead", "l0", "fvu")


def format_rows(rows: list[dict]) -> str:
    """The rows as `saelab bench synthetic` prints them: one line per (architecture, tree)."""
    lines = [f"{'arch':15}{'parents':>13}" + "".join(f"{c:>13}" for c in TABLE_COLUMNS)]
    lines += [f"{r['arch']:15}{r['parents']:>13}" + "".join(f"{r[c]:13.4f}" for c in TABLE_COLUMNS) for r in rows]
    return "\n".join(lines)
