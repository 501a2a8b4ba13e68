"""`saelab.Run`: a run directory (or a bare SAE directory) as an object, its SAE, settings, training curve,
evaluation results and dashboard bundle read when first used; `saelab.load_sae`."""

from __future__ import annotations

import json
from functools import cached_property
from pathlib import Path
from typing import Any, Sequence

from saelab.display import table_html
from saelab.rundir import RunDir


class Run:
    """A run directory made by `saelab train` (or a bare SAE directory): its SAE, settings, training curve,
    evaluation results and dashboard bundle, each read when first used. `run.dir` is its `RunDir` (the paths).

    >>> run = saelab.Run("runs/reference-blocks.2.hook_resid_pre-topk-k32")    # doctest: +SKIP
    >>> run.sae.encode(x)                                                       # doctest: +SKIP
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.dir = RunDir.open(self.path, missing="no such directory",
                               hint="give a run directory made by `saelab train` / saelab.train(...), or an SAE "
                                    "directory")

    @cached_property
    def sae(self):
        """The trained `SparseAutoencoder` (saelab or SAELens layout)."""
        from saelab.sae.sae import load_sae

        return load_sae(self.dir.sae)

    @cached_property
    def config(self):
        """The run's `TrainConfig` (its config.yaml), or None for a bare SAE directory."""
        from saelab.config import TrainConfig, load_config

        file = self.dir.config
        return load_config(TrainConfig, file) if file.exists() else None

    @property
    def history(self) -> list[dict]:
        """The training log (metrics.jsonl): one dict per logged step (fvu, l0, dead_pct, lr, tokens_per_s of the
        whole run or sweep, sae_tokens_per_s of this SAE's own steps …)."""
        file = self.dir.metrics
        if not file.exists():
            return []
        return [json.loads(line) for line in file.read_text().splitlines() if line.strip()]

    @property
    def core(self):
        """`CoreMetrics` of the last `saelab eval` / `saelab.evaluate` (RUN/eval/core.json), or None."""
        from saelab.eval.core import CoreMetrics

        file = self.dir.core
        return CoreMetrics.from_dict(json.loads(file.read_text())) if file.exists() else None

    @property
    def bundle(self):
        """The dashboard bundle (`saelab dashboard RUN`) through `saelab.dashboard.open`, or None."""
        from saelab.dashboard.reader import open as open_bundle

        for where in (self.dir.dashboard, self.dir.sae / "dashboard"):
            if (where / "manifest.json").exists():
                return open_bundle(where)
        return None

    def plot_history(self, metrics: Sequence[str] = ("fvu", "l0", "dead_pct")):
        """Plotly figure of the training curve, one panel per metric, against tokens."""
        import plotly.graph_objects as go
        from plotly.subplots import make_subplots

        h = self.history
        fig = make_subplots(rows=1, cols=len(metrics), subplot_titles=list(metrics))
        for j, m in enumerate(metrics):
            fig.add_trace(go.Scatter(x=[r["tokens"] for r in h if m in r], y=[r[m] for r in h if m in r],
                                     mode="lines", name=m, showlegend=False), row=1, col=j + 1)
            fig.update_xaxes(title_text="tokens", row=1, col=j + 1)
        fig.update_layout(height=300, margin=dict(t=40, b=40, l=40, r=10))
        return fig

    def summary(self) -> dict[str, Any]:
        c = self.sae.cfg
        rows: dict[str, Any] = {"run": str(self.path), "architecture": c.architecture, "hook": c.hook_name,
                                "model": c.model_name, "d_in": c.d_in, "latents": c.n_latents, "k": c.k}
        h = self.history
        if h:
            last = h[-1]
            rows.update({"trained tokens": last.get("tokens"), "train FVU (last)": last.get("fvu"),
                         "train L0 (last)": last.get("l0"), "dead % (train)": last.get("dead_pct")})
        core = self.core
        if core is not None:
            rows.update({"held-out EV": core.explained_variance, "held-out L0": core.l0, "ΔCE (nats)": core.delta_ce,
                         "loss recovered (zero abl.)": core.loss_recovered_zero, "dead latents": core.n_dead})
        return rows

    def _repr_html_(self) -> str:
        return table_html(self.summary(), title="saelab run")

    def __repr__(self) -> str:
        return f"Run({str(self.path)!r})"

    def __fspath__(self) -> str:  # a Run goes wherever a run path does
        return str(self.path)


def as_run(run) -> Run:
    return run if isinstance(run, Run) else Run(run)


def load_sae(path: str | Path, device: str = "cpu"):
    """A `SparseAutoencoder` from an SAE directory (saelab's or one SAELens saved) or a run directory (its sae/).

    >>> sae = saelab.load_sae("runs/demo")                 # doctest: +SKIP
    >>> code = sae.encode(x); x_hat = sae.decode(code)     # doctest: +SKIP
    """
    from saelab.sae.sae import load_sae as load

    return load(Run(path).dir.sae, device=device)
