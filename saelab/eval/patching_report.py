"""`saelab patch` end to end: a task, every estimator over every component (and SAE node), the agreement report
(Pearson r against activation patching per component type), the feature circuit's faithfulness/completeness curve;
written as one JSON and one HTML page of Plotly figures (scatter plots, layer × position heatmaps, curves)."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Sequence

import torch

from saelab.eval import circuits, patching
from saelab.eval.relp import RelPRules
from saelab.eval.tasks import check_task, make_task, solve_rate
from saelab.files import write_text_atomic
from saelab.rundir import RunDir
from saelab.settings import setting

# RelP rule ablations reported beside the main configuration: what each rule contributes
RULE_VARIANTS = {"no_ln": {"layernorm": False}, "no_identity": {"identity": False}, "with_attn": {"attention": True}}
CIRCUIT_METHODS = ("attribution", "relp", "ig")  # estimators that can rank a circuit's nodes


@dataclass
class PatchSettings:
    """`saelab patch`'s settings (`saelab.patch`'s keywords), checked when built, before anything loads: the task (a
    built-in name or a well-formed pairs file) included. methods, components: comma text or lists; relp_rules: text
    or `RelPRules`. `method_names`, `kinds` and `rules` are their parsed forms."""

    task: str = setting("bracket", "bracket, copy, quote, ioi (GPT-2-style English models), or a .jsonl file of "
                        "{clean, corrupted, answer, wrong} pairs")
    pairs: int = setting(32, "prompt pairs")
    methods: str | Sequence[str] = setting("all", f"comma list of {', '.join(patching.METHODS)}, or all",
                                           flag="--method")
    components: str | Sequence[str] = setting(",".join(patching.KINDS),
                                              f"comma list of {', '.join(patching.KINDS)}")
    relp_rules: str | RelPRules = setting(RelPRules().label, "RelP rules: comma list of ln, attn, identity, half, "
                                          "or none")
    ig_steps: int = setting(10, "integrated-gradients steps")
    circuit_method: str = setting(CIRCUIT_METHODS[-1], "estimator that ranks circuit nodes")
    max_ap_nodes: int = setting(2000, "SAE nodes patched one by one for the ground truth (a seeded sample when more "
                                "change)")
    seed: int = setting(0, "task sampling seed")

    def __post_init__(self):
        from saelab.errors import ConfigError

        for name, got, allowed in (("method", self.method_names, patching.METHODS),
                                   ("components", self.kinds, patching.KINDS)):
            bad = [m for m in got if m not in allowed]
            if bad or not got:
                raise ConfigError(f"--{name}: {bad or got!r} not allowed; use a comma list of {', '.join(allowed)}")
        for flag, v in (("--pairs", self.pairs), ("--ig-steps", self.ig_steps)):
            if v < 1:
                raise ConfigError(f"{flag}: must be >= 1, got {v}")
        if self.circuit_method not in CIRCUIT_METHODS:
            raise ConfigError(f"--circuit-method: {self.circuit_method!r}; use attribution, relp or ig")
        self.rules  # noqa: B018  (parsed here: a bad rule fails before anything loads)
        check_task(self.task)

    @property
    def method_names(self) -> list[str]:
        return list(patching.METHODS) if self.methods == "all" else _names(self.methods)

    @property
    def kinds(self) -> list[str]:
        return _names(self.components)

    @property
    def rules(self) -> RelPRules:
        return RelPRules.parse(self.relp_rules) if isinstance(self.relp_rules, str) else self.relp_rules



def run_patching(model, task: str = PatchSettings.task, n_pairs: int = PatchSettings.pairs,
                 methods=patching.METHODS, kinds=patching.KINDS, rules: RelPRules = RelPRules(),
                 ig_steps: int = PatchSettings.ig_steps, saes=(), circuit_method: str = PatchSettings.circuit_method,
                 seed: int = PatchSettings.seed, rule_variants: bool = True,
                 max_ap_nodes: int = PatchSettings.max_ap_nodes, progress: bool = False) -> dict:
    """All estimators on one task; returns a JSON-ready dict (tensors as nested lists) plus '_figures'."""
    batch = make_task(model, task, n_pairs, seed)
    solved = solve_rate(model, batch)
    base = patching.baseline(model, batch)
    sites = patching.model_sites(model, kinds)
    from tqdm.auto import tqdm

    bar = tqdm(unit="fwd-copy", desc=f"patch {batch.name}", disable=not progress)
    results, seconds = {}, {}
    for method in methods:
        t0 = time.perf_counter()
        if method == "activation":
            results[method] = patching.activation_patching(model, batch, sites, base, progress=bar.update)
        elif method == "relp":
            results[method] = patching.relp(model, batch, sites, base, rules)
        else:
            results[method] = patching.gradient_attribution(model, batch, sites, base, method, steps=ig_steps)
        seconds[method] = time.perf_counter() - t0
    variants = {}
    if rule_variants and "relp" in methods:
        for name, change in RULE_VARIANTS.items():
            variants[f"relp_{name}"] = patching.relp(model, batch, sites, base, replace(rules, **change))
    truth = results.get("activation")
    agree = patching.agreement({**results, **variants}) if truth is not None else {}
    report = {
        "task": batch.name, "n_pairs": batch.n_pairs, "length": batch.length, "solve_rate": solved,
        "tokens": model.to_str_tokens(batch.clean[0]), "baseline": {"ld_clean": base.ld_clean,
                                                                  "ld_corrupted": base.ld_corrupted},
        "metric": "normalised logit difference (LD - LD_corrupted) / (LD_clean - LD_corrupted); denoising",
        "relp_rules": rules.label, "ig_steps": ig_steps, "seconds": seconds,
        "components": {k: SITE_DOC[k] for k in kinds},
        "effects": {m: {k: v.tolist() for k, v in r.items()} for m, r in {**results, **variants}.items()},
        "correlation": agree,
    }
    figures = {"scatter": scatter_figure(results, truth)} if truth is not None else {}
    figures["heatmap"] = heatmap_figure(results, report["tokens"])
    if saes:
        report["sae"], sae_figs = _sae_report(model, batch, base, list(saes), methods, rules, ig_steps,
                                              circuit_method, seed, max_ap_nodes, bar)
        figures.update(sae_figs)
    bar.close()
    report["_figures"] = figures
    return report


SITE_DOC = {"resid": "blocks.L.hook_resid_pre per (layer, position)", "attn": "blocks.L.hook_attn_out per (layer, "
            "position)", "mlp": "blocks.L.hook_mlp_out per (layer, position)",
            "head": "blocks.L.attn.hook_z per (layer, head), all positions"}


def _sae_report(model, batch, base, saes, methods, rules, ig_steps, circuit_method, seed, max_ap_nodes, bar):
    methods = [m for m in methods if m in ("activation", "attribution", "relp", "ig")]
    fa = circuits.feature_attribution(model, batch, saes, methods, rules, ig_steps, max_ap_nodes, base, seed,
                                      progress=bar.update)
    out = {"hooks": fa["hooks"], "correlation": fa.get("correlation", {})}
    est = fa["estimates"]
    rank = circuit_method if circuit_method in est else next(iter(est), None)
    figs = {}
    if rank is not None:
        curve = circuits.faithfulness_curve(model, batch, fa["nodes"], est[rank])
        out["circuit"] = {"ranked_by": rank, **curve, "top_nodes": _top_nodes(fa, est[rank], 20)}
        figs["faithfulness"] = curve_figure(curve, rank)
        if len(fa["nodes"]) >= 2 and rank in ("attribution", "relp"):
            out["edges"] = _edges(model, batch, base, fa, est[rank], rank, rules)
    if fa["truth"] is not None:
        pts = {}
        for method, per_sae in est.items():
            xs, ys = [], []
            for (lat, err), t in zip(per_sae, fa["truth"]):
                xs += lat[t["latents"][:, 0], t["latents"][:, 1]].tolist() + err[t["errors"]].tolist()
                ys += t["ap_latents"].tolist() + t["ap_errors"].tolist()
            pts[method] = (xs, ys)
        out["n_nodes_patched"] = len(next(iter(pts.values()))[1]) if pts else 0
        figs["sae_scatter"] = sae_scatter_figure(pts)
    return out, figs


def _top_nodes(fa, scores, n):
    rows = []
    for nd, (lat, err) in zip(fa["nodes"], scores):
        L, n_lat = lat.shape
        for p in range(L):
            rows.append((abs(float(err[p])), nd.hook, p, "error", float(err[p])))
        vals, idx = lat.flatten().abs().topk(min(n, lat.numel()))
        for v, i in zip(vals.tolist(), idx.tolist()):
            rows.append((v, nd.hook, i // n_lat, i % n_lat, float(lat.flatten()[i])))
    rows.sort(key=lambda r: -r[0])
    return [{"hook": h, "position": p, "latent": i, "effect": e} for _, h, p, i, e in rows[:n]]


def _edges(model, batch, base, fa, scores, method, rules, per_layer: int = 8):
    """Edges between the top nodes of successive spliced hooks."""
    out = []
    for a in range(len(fa["nodes"]) - 1):
        up, down = fa["nodes"][a], fa["nodes"][a + 1]
        tops = []
        for (lat, err) in (scores[a], scores[a + 1]):
            L, n_lat = lat.shape
            cand = [(abs(float(lat.flatten()[i])), (i // n_lat, i % n_lat))
                    for i in lat.flatten().abs().topk(min(per_layer, lat.numel())).indices.tolist()]
            cand += [(abs(float(err[p])), (p, -1)) for p in range(L)]
            cand.sort(key=lambda r: -r[0])
            tops.append([node for _, node in cand[:per_layer]])
        E = circuits.edges(model, batch, up, down, tops[1], tops[0], base, method, rules)
        out.append({"upstream": up.hook, "downstream": down.hook, "upstream_nodes": tops[0],
                    "downstream_nodes": tops[1], "effects": E.tolist()})
    return out


def sae_sources(saes) -> tuple[list, Path]:
    """The SAEs to splice in (SAE directories or SparseAutoencoder objects; a run directory is found as its SAE's,
    else an SAEFileError before anything loads) and the default output folder: RUN/eval/patching of the first SAE
    given as a run directory, else eval/patching."""
    sources, out = [], None
    for sae in saes:
        if isinstance(sae, torch.nn.Module):
            sources.append(sae)
            continue
        run = RunDir.open(sae)  # a path or anything path-like (a saelab.Run)
        sources.append(run.sae)
        out = out or run.patching
    return sources, out or Path("eval/patching")


def _names(value) -> list[str]:
    items = value.split(",") if isinstance(value, str) else value
    return [m.strip() for m in items if m.strip()]


def load_saes(model, sources) -> list:
    """The SAEs of `sae_sources` on the model's device, checked against it (another model's SAE: one
    clear line before any work), frozen (gradients flow through them, not into them), in hook order."""
    from saelab.sae import SparseAutoencoder

    device = next(model.parameters()).device
    saes = [SparseAutoencoder.load(s, device=device) if isinstance(s, Path) else s.to(device) for s in sources]
    for sae in saes:
        circuits.check_sae(model, sae)
        for p in sae.parameters():
            p.requires_grad_(False)
    return sorted(saes, key=lambda s: _hook_order(model, s.cfg.hook_name))


def _hook_order(model, hook: str) -> tuple:
    from saelab.models.loading import hook_layer

    layer = hook_layer(hook)
    return (-1 if layer is None else layer, hook)


# ================================================================================================ figures
def scatter_figure(results, truth):
    from plotly.subplots import make_subplots

    kinds = list(truth)
    methods = [m for m in results if m != "activation"]
    fig = make_subplots(rows=1, cols=len(kinds), subplot_titles=kinds)
    for c, kind in enumerate(kinds, 1):
        for method in methods:
            fig.add_scatter(x=truth[kind].flatten().tolist(), y=results[method][kind].flatten().tolist(),
                            mode="markers", name=method, legendgroup=method, showlegend=c == 1, row=1, col=c)
        fig.update_xaxes(title_text="activation patching", row=1, col=c)
    fig.update_yaxes(title_text="estimate", row=1, col=1)
    fig.update_layout(title="Estimated vs true (activation patching) effects, normalised metric")
    return fig


def heatmap_figure(results, tokens):
    from plotly.subplots import make_subplots

    kinds = [k for k in ("resid", "attn", "mlp") if k in next(iter(results.values()))]
    methods = list(results)
    fig = make_subplots(rows=len(kinds), cols=len(methods), subplot_titles=[f"{k}: {m}" for k in kinds
                                                                               for m in methods])
    labels = [f"{i}:{t}" for i, t in enumerate(tokens)]
    for r, kind in enumerate(kinds, 1):
        for c, method in enumerate(methods, 1):
            z = results[method][kind]
            fig.add_heatmap(z=z.tolist(), x=labels[:z.shape[1]], y=[f"L{i}" for i in range(z.shape[0])],
                            coloraxis="coloraxis", row=r, col=c)
    fig.update_layout(title="Layer × position effects", coloraxis={"colorscale": "RdBu", "cmid": 0},
                      height=300 * len(kinds))
    return fig


def curve_figure(curve, ranked_by):
    import plotly.graph_objects as go

    x = [max(s, 0.5) for s in curve["sizes"]]
    fig = go.Figure()
    fig.add_scatter(x=x, y=curve["faithfulness"], mode="lines+markers", name="faithfulness F(C)")
    fig.add_scatter(x=x, y=curve["completeness"], mode="lines+markers", name="completeness F(M \\ C)")
    fig.update_layout(title=f"Feature circuit (top nodes by |{ranked_by}|), rest mean-ablated",
                      xaxis={"type": "log", "title": "circuit size (nodes)"}, yaxis={"title": "F"})
    return fig


def sae_scatter_figure(points):
    import plotly.graph_objects as go

    fig = go.Figure()
    for method, (xs, ys) in points.items():
        fig.add_scatter(x=ys, y=xs, mode="markers", name=method)
    fig.update_layout(title="SAE nodes: estimate vs activation patching",
                      xaxis={"title": "activation patching"}, yaxis={"title": "estimate"})
    return fig


# ================================================================================================ writing
def write_report(report: dict, out_dir: str | Path) -> tuple[Path, Path]:
    """<out>/patching-<task>.json and <out>/patching-<task>.html, each written to a temporary name and renamed."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    figures = report.pop("_figures", {})
    stem = f"patching-{report['task']}"
    jpath, hpath = out / f"{stem}.json", out / f"{stem}.html"
    write_text_atomic(jpath, json.dumps(report, indent=1, default=_jsonable))
    parts = [f"<h1>saelab patch: {report['task']}</h1>"]
    for i, fig in enumerate(figures.values()):
        parts.append(fig.to_html(full_html=False, include_plotlyjs=(i == 0)))
    write_text_atomic(hpath, "<html><head><meta charset='utf-8'></head><body>" + "\n".join(parts) + "</body></html>")
    report["_figures"] = figures
    return jpath, hpath


def jsonable(report: dict) -> dict:
    """The report as plain JSON types (tensors as lists), as patching-<task>.json holds it."""
    return json.loads(json.dumps({k: v for k, v in report.items() if k != "_figures"}, default=_jsonable))


def _jsonable(v):
    if torch.is_tensor(v):
        return v.tolist()
    return str(v)


def format_report(report: dict) -> str:
    s = report["solve_rate"]
    lines = [f"task {report['task']}: {report['n_pairs']} pairs of {report['length']} tokens; solved "
             f"{100 * s['both_accuracy']:.1f} % (clean {100 * s['clean_accuracy']:.1f} %, corrupted "
             f"{100 * s['corrupted_accuracy']:.1f} %); LD clean {s['logit_diff_clean']:.3f}, corrupted "
             f"{s['logit_diff_corrupted']:.3f}"]
    corr = report.get("correlation", {})
    if corr:
        kinds = list(next(iter(corr.values())))
        lines.append("Pearson r vs activation patching  " + "  ".join(f"{k:>7}" for k in kinds))
        for method, row in corr.items():
            lines.append(f"  {method:<30} " + "  ".join("    n/a" if row.get(k) is None else f"{row[k]:7.3f}"
                                                        for k in kinds))
    lines.append("seconds: " + ", ".join(f"{m} {t:.2f}" for m, t in report["seconds"].items()))
    sae = report.get("sae")
    if sae:
        for method, row in sae.get("correlation", {}).items():
            r = row.get("sae_latents")
            lines.append(f"  SAE nodes {method:<20} r = {'n/a' if r is None else f'{r:.3f}'}")
        c = sae.get("circuit")
        if c:
            pts = ", ".join(f"{n}: {f:.2f}/{q:.2f}" for n, f, q in zip(c["sizes"], c["faithfulness"],
                                                                      c["completeness"]) if f is not None)
            lines.append(f"  circuit (by |{c['ranked_by']}|) size: faithfulness/completeness  {pts}")
    return "\n".join(lines)


__all__ = ["run_patching", "write_report", "format_report", "sae_sources", "load_saes", "PatchSettings", "jsonable",
           "RULE_VARIANTS", "CIRCUIT_METHODS"]
