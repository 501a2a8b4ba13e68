"""`saelab.patch`: activation patching against attribution patching, RelP and integrated gradients on a contrast
task, with SAE nodes and the feature circuit when SAEs are given (`saelab patch`), a `PatchingReport`."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from saelab.api.run import Run
from saelab.config import ModelSpec
from saelab.display import table_html
from saelab.eval.patching_report import PatchSettings


@dataclass
class PatchingReport:
    """`saelab.patch`'s report: `report` is the dict `saelab patch` writes as JSON (task, solve rate, per-method
    effects, `correlation` = Pearson r against activation patching per component type; with SAEs, `sae` with the
    node correlations and the circuit's faithfulness/completeness curve); `figures` the Plotly figures of its
    HTML page (scatter, heatmap; with SAEs faithfulness and sae_scatter); `paths` the files written, if any."""

    report: dict
    figures: dict
    paths: tuple = ()

    @property
    def correlation(self) -> dict[str, dict[str, float | None]]:
        """method → component type → Pearson r against activation patching (empty without 'activation')."""
        return self.report.get("correlation", {})

    @property
    def solve_rate(self) -> dict:
        return self.report["solve_rate"]

    @property
    def circuit(self) -> dict | None:
        """The feature circuit (with SAEs): ranked_by, sizes, faithfulness, completeness, top_nodes."""
        return self.report.get("sae", {}).get("circuit")

    def to_dict(self) -> dict:
        """The report as plain JSON types (what patching-<task>.json holds)."""
        from saelab.eval.patching_report import jsonable

        return jsonable(self.report)

    def __str__(self) -> str:  # what `saelab patch` prints
        from saelab.eval.patching_report import format_report

        return format_report(self.report)

    def _repr_html_(self) -> str:
        from saelab.display import grid_html

        r, s = self.report, self.solve_rate
        parts = [table_html([("pairs × tokens", f"{r['n_pairs']} × {r['length']}"),
                             ("solved (clean and corrupted)", s["both_accuracy"]),
                             ("logit diff clean", s["logit_diff_clean"]),
                             ("logit diff corrupted", s["logit_diff_corrupted"])],
                            title=f"patching · task {r['task']}")]
        corr = self.correlation
        if corr:
            kinds = list(next(iter(corr.values())))
            sae_r = r.get("sae", {}).get("correlation", {})
            extra = ["SAE nodes"] if sae_r else []
            rows = [[m] + [row.get(k) for k in kinds] + [sae_r.get(m, {}).get("sae_latents")] * len(extra)
                    for m, row in corr.items()]
            parts.append(grid_html(["method"] + kinds + extra, rows,
                                   title="Pearson r against activation patching, per component type"))
        c = self.circuit
        if c:
            parts.append(grid_html(["circuit size", "faithfulness", "completeness"],
                                   list(zip(c["sizes"], c["faithfulness"], c["completeness"])),
                                   title=f"feature circuit, nodes ranked by |{c['ranked_by']}|"))
        return "".join(parts)

    def __repr__(self) -> str:
        return f"PatchingReport(task={self.report['task']!r}, methods={list(self.report['seconds'])})"


def patch(model=ModelSpec.name, task: str = PatchSettings.task, saes=(), pairs: int = PatchSettings.pairs,
          methods: str | Sequence[str] = PatchSettings.methods,
          components: str | Sequence[str] = PatchSettings.components, relp_rules: str = PatchSettings.relp_rules,
          ig_steps: int = PatchSettings.ig_steps, circuit_method: str = PatchSettings.circuit_method,
          seed: int = PatchSettings.seed, max_ap_nodes: int = PatchSettings.max_ap_nodes,
          out: str | Path | bool | None = None, progress: bool = True, device: str = ModelSpec.device,
          model_dtype: str = ModelSpec.dtype) -> PatchingReport:
    """Activation patching vs attribution patching, RelP and integrated gradients on a contrast task, as
    `saelab patch` does; with `saes` (Runs, run/SAE directories or SparseAutoencoders, frozen here) also every
    SAE latent and error node, and the feature circuit's faithfulness/completeness curve. `model`: a name (loaded
    on `device` in `model_dtype`) or a loaded model. The settings are `saelab.eval.patching_report.PatchSettings`'s,
    checked before anything loads. Writes patching-<task>.json and .html only when `out` is given (True:
    RUN/eval/patching of the first SAE run, else eval/patching).

    >>> rep = saelab.patch("reference", task="bracket", pairs=16)                  # doctest: +SKIP
    >>> rep.correlation["relp"]["resid"]; rep.figures["scatter"]                   # doctest: +SKIP
    >>> saelab.patch(saes=[run]).figures["faithfulness"]                           # doctest: +SKIP
    """
    from saelab.eval.patching_report import load_saes, run_patching, sae_sources, write_report

    st = PatchSettings(task=task, pairs=pairs, methods=methods, components=components, relp_rules=relp_rules,
                       ig_steps=ig_steps, circuit_method=circuit_method, max_ap_nodes=max_ap_nodes, seed=seed)
    if isinstance(saes, (str, Path, Run)) or hasattr(saes, "encode"):  # one SAE given bare
        saes = [saes]
    sources, default_out = sae_sources(saes)
    if isinstance(model, (str, Path)):
        from saelab.models import load_model

        model = load_model(str(model), device=device, dtype=model_dtype)
    report = run_patching(model, st.task, st.pairs, st.method_names, st.kinds, st.rules, st.ig_steps,
                          load_saes(model, sources), st.circuit_method, st.seed, progress=progress,
                          max_ap_nodes=st.max_ap_nodes)
    paths = () if out is None or out is False else write_report(report, default_out if out is True else out)
    return PatchingReport(report, report.pop("_figures", {}), paths)
