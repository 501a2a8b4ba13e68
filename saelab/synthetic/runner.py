"""Train several architectures on the same planted data (same rows, same batches) and score each against the
truth, on one hierarchy (`BenchSpec.tree.parents`: the paper's exclusive top level, or independent co-firing
parents); optionally write a Plotly figure of one or both."""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from saelab.synthetic.generator import TreeSpec, generate
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
