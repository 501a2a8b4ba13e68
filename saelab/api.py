"""The notebook API: what the CLI commands do, returned as objects instead of printed.

    import saelab
    run = saelab.train(tokens="2M")                  # `saelab train --tokens 2M`; a Run (a table in Jupyter)
    run.core                                          # its held-out core metrics (CoreMetrics)
    saelab.top_activations(run, 12)                   # latent 12's top examples as highlighted tokens
    ev = saelab.evaluate(run, suites=["probing"])     # `saelab eval RUN --suite probing`

Each function calls the code its command calls (`saelab.training.pipeline`, `saelab.eval.run`, the dashboard
reader); nothing here computes a result another way.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, Sequence

from saelab.display import table_html, tokens_html
from saelab.errors import ConfigError
from saelab.rundir import RunDir

SUITES = ("core", "probing", "steering")


# ================================================================================================ a run
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
        from saelab.sae.saelens import load_sae

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


def _as_run(run) -> Run:
    return run if isinstance(run, Run) else Run(run)


def load_sae(path: str | Path, device: str = "cpu"):
    """A `SparseAutoencoder` from an SAE directory (saelab's or one SAELens saved) or a run directory (its sae/).

    >>> sae = saelab.load_sae("runs/demo")                 # doctest: +SKIP
    >>> code = sae.encode(x); x_hat = sae.decode(code)     # doctest: +SKIP
    """
    from saelab.sae.saelens import load_sae as load

    return load(Run(path).dir.sae, device=device)


# ================================================================================================ train
def train(config: str | Path | None = None, *, progress: bool = True, sweep: str | Path | None = None,
          **settings) -> Run | list[Run] | None:
    """Train an SAE as `saelab train` does and return its `Run` (with core metrics, unless eval_tokens=0).

    Keywords are the command's flags with underscores: tokens ("2M" or 2_000_000), k, n_latents, arch, hook,
    cache, out, lr, batch_size, eval_tokens, model, device, dataset, resume, wandb ("project": log the config,
    metrics and closing core metrics to Weights & Biases), … and any architecture option (e.g.
    group_fractions=[...] for matryoshka); `config` is a YAML/JSON TrainConfig (or a `TrainConfig`) they override.
    With `sweep=` (a sweep file, as `saelab train --sweep`), several SAEs train on the same batches and a list of
    their `Run`s comes back; the keywords then set the shared settings. Under `torchrun` (`torchrun … -m saelab.cli
    train`) every process trains its part of each batch in one process group; rank 0 evaluates and returns the
    Run(s), the other ranks return None.

    >>> run = saelab.train(tokens="1M", k=32, arch="batchtopk", out="runs/demo")   # doctest: +SKIP
    >>> runs = saelab.train(sweep="sweep.yaml", resume=True)                     # doctest: +SKIP
    """
    from saelab import distributed
    from saelab.config import TrainConfig, load_config
    from saelab.eval.run import evaluate_run
    from saelab.sae.architectures import option_fields, registry
    from saelab.settings import overrides_from_kwargs
    from saelab.training.pipeline import run_training

    arch_options = {f.name for name in registry() for f in option_fields(name)}
    options = dict(settings.pop("options", None) or {})
    options.update({k: settings.pop(k) for k in list(settings) if k in arch_options})
    overrides = overrides_from_kwargs(TrainConfig, settings, "saelab.train")
    if options:
        overrides["sae.options"] = options
    if sweep is not None:
        from saelab.training.sweep import load_sweep, run_sweep

        cfgs = load_sweep(sweep, overrides, config=config)
    else:
        cfgs = [load_config(TrainConfig, config, overrides)]
    with distributed.process_group(cfgs[0].model.resolved_device()):
        results = run_sweep(cfgs, progress=progress) if sweep is not None else \
            [run_training(cfgs[0], progress=progress)]
    if not distributed.is_main():
        return None
    for cfg, result in zip(cfgs, results):
        metrics = evaluate_run(result.run_dir, cfg.eval_tokens)[0] if cfg.eval_tokens else None
        result.close_tracking(metrics.to_dict(per_latent=False) if metrics else None)  # → the wandb run, if any
    runs = [Run(result.run_dir) for result in results]
    return runs if sweep is not None else runs[0]


def cache(config: str | Path | None = None, *, progress: bool = True, **settings) -> Path:
    """Write (or resume, or extend) an activation cache as `saelab cache` does; returns its directory.
    Keywords are the command's flags with underscores: hooks (a list or "a,b"), tokens ("1M"), out, with_grads,
    exclude_bos, dtype, context_size, dataset, model, device, …; `config` is a YAML/JSON CacheConfig (or a
    `CacheConfig`) they override.

    >>> path = saelab.cache(hooks=["blocks.2.hook_resid_pre"], tokens="500k", out="cache/ref")   # doctest: +SKIP
    """
    from saelab.activations import write_cache
    from saelab.config import CacheConfig, load_config
    from saelab.settings import overrides_from_kwargs

    overrides = overrides_from_kwargs(CacheConfig, settings, "saelab.cache")
    return Path(write_cache(load_config(CacheConfig, config, overrides), progress=progress))


# ================================================================================================ evaluate
@dataclass
class Evaluation:
    """Results of `saelab.evaluate`: `core` (CoreMetrics), `probing` (ProbingResult), `steering` (SteeringScores),
    each None unless its suite ran; `paths` are the files written under RUN/eval."""

    run: Run
    core: Any = None
    probing: Any = None
    steering: Any = None
    paths: dict[str, Path] = field(default_factory=dict)

    def _repr_html_(self) -> str:
        parts = [getattr(self, s)._repr_html_() for s in SUITES if getattr(self, s) is not None]
        return "".join(parts) or "<i>no suite ran</i>"

    def __repr__(self) -> str:
        ran = [s for s in SUITES if getattr(self, s) is not None]
        return f"Evaluation({self.run!r}, suites={ran})"


def evaluate(run, suites: str | Sequence[str] = ("core",), tokens: int | str | None = None,
             **probing) -> Evaluation:
    """Score a run as `saelab eval RUN --suite …` does, for each suite in `suites` (core, probing, steering),
    loading the model once. `probing` keywords: selection, data, level ("sequence" or "token": see
    `saelab.eval.probing`), text_field, label_field, pooling.

    >>> ev = saelab.evaluate(run, suites=["core", "probing"])      # doctest: +SKIP
    >>> ev.core.explained_variance                                 # doctest: +SKIP
    """
    from saelab.eval.run import evaluate_run, load_run, probe_run, score_run
    from saelab.settings import as_count

    run = _as_run(run)
    suites = [suites] if isinstance(suites, str) else list(suites)
    bad = [s for s in suites if s not in SUITES]
    if bad or not suites:
        raise ConfigError(f"suites: {bad or suites!r}; use any of {', '.join(SUITES)}")
    n = None if tokens is None else as_count(tokens, "tokens")
    loaded = load_run(run.path)
    ev = Evaluation(run)
    if "core" in suites:
        ev.core, ev.paths["core"] = evaluate_run(run.path, n or 65_536, loaded=loaded)
    if "probing" in suites:
        ev.probing, ev.paths["probing"] = probe_run(run.path, n or 80_000, loaded=loaded, **probing)
    if "steering" in suites:
        ev.steering, ev.paths["steering"] = score_run(run.path, n or 65_536, loaded=loaded)
    return ev


def calibrate(run, dataset: str, target_l0: float | None = None, tokens: int | str = 65_536, split: str = "all",
              out: str | Path | None = None, model=None, progress: bool = True) -> tuple[Path, dict]:
    """Re-fit a thresholded SAE's inference threshold(s) (BatchTopK, Matryoshka, mutual or feature choice) on
    activations of your own text for mean L0 = `target_l0` (default k), as `saelab calibrate` does; the weights stay
    as they were. Writes the re-calibrated SAE to `out` (default RUN/calibrated-<dataset name>) and returns
    (that folder, the record: tokens, L0 before and after, the new threshold). See `saelab.training.calibrate`.

    >>> path, info = saelab.calibrate(run, dataset="path/to/my/code", target_l0=32)   # doctest: +SKIP
    """
    from saelab.activations import stream_activations
    from saelab.data.corpus import CorpusSpec, check_source
    from saelab.eval.run import load_run
    from saelab.settings import as_count
    from saelab.training.calibrate import check_target, recalibrate

    run = _as_run(run)
    n = as_count(tokens, "tokens")
    corpus = CorpusSpec(source=dataset)
    check_source(corpus, split)
    check_target(run.sae, target_l0)  # before the model is loaded
    target = Path(out) if out is not None else run.path / f"calibrated-{Path(dataset.rstrip('/')).name or 'text'}"
    from saelab.activations.writer import check_writable

    check_writable(target, ConfigError)
    sae, loaded_model, cfg, _ = load_run(run.path) if model is None else (run.sae, model, run.config, None)
    context = cfg.context_size if cfg is not None else 128
    stream = stream_activations(loaded_model, sae.cfg.hook_name, corpus=corpus, context_size=context, split=split,
                                batch_size=min(4096, n))
    info = recalibrate(sae, (b.acts for b in stream), target_l0=target_l0, tokens=n)
    info["dataset"], info["split"] = dataset, split
    sae.save(target, extra={"calibration": info})
    return target, info


def dashboard(run, tokens: int | str = 1_000_000, out: str | Path | None = None, progress: bool = True, **kw):
    """Build the run's dashboard bundle as `saelab dashboard RUN` does and open it (`saelab.dashboard.open`):
    every latent's statistics, examples, logit effects and neighbours; what the explorer and `top_activations`
    read. Other keywords (split, dataset, context_size, device, force) are `build_run_bundle`'s.

    >>> bundle = saelab.dashboard(run, tokens="200k"); bundle.table().sort_values("density")   # doctest: +SKIP
    """
    from saelab.dashboard.reader import open as open_bundle
    from saelab.dashboard.run import build_run_bundle
    from saelab.settings import as_count

    run = _as_run(run)
    return open_bundle(build_run_bundle(run.path, out=out, tokens=as_count(tokens, "tokens"),
                                        progress=progress, **kw))


# ================================================================================================ latents
@dataclass
class TopActivations:
    """A latent's strongest contexts: `examples` (the dashboard reader's `Example`s, strongest first) with the
    token strings to show them; `stats` when they come from a bundle. Highlighted tokens in Jupyter."""

    latent: int
    examples: list
    token_text: Any  # callable: token ids → display strings
    source: str  # "bundle" or "model"
    stats: Any = None
    context: int = 12  # tokens shown each side of the peak

    def texts(self) -> list[str]:
        """Each example's window around its peak as plain text."""
        out = []
        for e in self.examples:
            s, t = e.window(self.context)
            out.append("".join(self.token_text(e.tokens[s:t])))
        return out

    def _repr_html_(self) -> str:
        scale = max((float(e.act) for e in self.examples), default=0.0)
        head = f"latent {self.latent} · top {len(self.examples)} contexts (from the {self.source})"
        parts = [f"<div style='font-weight:600;margin:4px 0'>{head}</div>"]
        if self.stats is not None:
            st = self.stats
            parts.append(f"<div style='font-size:12px'>density {st.density:.3g} · max {st.max:.3g} · "
                         f"mean {st.mean:.3g}{' · dead' if st.dead else ''}{' · dense' if st.dense else ''}</div>")
        for e in self.examples:
            s, t = e.window(self.context)
            parts.append(tokens_html(self.token_text(e.tokens[s:t]), e.acts[s:t], scale, peak=e.pos - s))
        return "".join(parts)

    def __repr__(self) -> str:
        return f"TopActivations(latent={self.latent}, {len(self.examples)} examples from the {self.source})"


def top_activations(run, latent: int, n: int = 10, model=None, corpus=None, tokens: int = 65_536,
                    context: int = 12) -> TopActivations:
    """The n contexts where `latent` fires most. From the run's dashboard bundle when it has one (no model
    needed); otherwise one pass of `tokens` held-out tokens through the model (given, or the run's own).

    >>> saelab.top_activations(run, 12)                     # doctest: +SKIP
    """
    from saelab.dashboard.examples import top_examples

    run = run if not isinstance(run, (str, Path)) else Run(run)
    if isinstance(run, Run) and run.bundle is not None and model is None and corpus is None:
        b = run.bundle
        lat = b.latent(latent)
        return TopActivations(lat.index, lat.top[:n], b.token_text, "bundle", lat.stats, context)
    sae = run.sae if isinstance(run, Run) else run
    if not 0 <= int(latent) < sae.cfg.n_latents:
        raise ConfigError(f"latent {latent} is out of range: the SAE has {sae.cfg.n_latents} latents")
    cfg = run.config if isinstance(run, Run) else None
    if model is None:
        from saelab.models import load_model

        model = load_model(sae.cfg.model_name or (cfg.model.name if cfg else "reference"))
    if corpus is None and cfg is not None:
        corpus = cfg.corpus
    examples = top_examples(model, sae, int(latent), n=n, corpus=corpus, tokens=tokens,
                            context_size=cfg.context_size if cfg else 128)
    from saelab.dashboard.vocab import display_vocab

    shown = display_vocab(model.tokenizer, model.cfg.d_vocab)
    return TopActivations(int(latent), examples, lambda ids: [shown[int(t)] for t in ids], "model", None, context)


# ================================================================================================ steer
@dataclass
class Steering:
    """`saelab.steer`'s generations: the `steered` and `unsteered` continuations of `prompt` (same seed), with
    the settings that made them (`alphas` per latent, `strength_scale` what they multiply: "position", the largest
    latent activation at each position, or "corpus", each latent's `max_activation`)."""

    run: Run
    prompt: str
    latents: list[int]
    alphas: list[float]
    strength_scale: str
    max_activation: list[float] | None
    mode: str
    seed: int
    temperature: float
    max_new_tokens: int
    unsteered: str
    steered: str

    def __str__(self) -> str:  # what `saelab steer` prints
        from dataclasses import fields

        from saelab.eval.run import format_steer

        return format_steer({f.name: getattr(self, f.name) for f in fields(self) if f.name != "run"})

    def _repr_html_(self) -> str:
        import html

        scale = "the largest latent activation at each position" if self.strength_scale == "position" else \
            f"max activation {self.max_activation}"
        head = (f"prompt {self.prompt!r} · latents {self.latents} · α {self.alphas} × {scale} · {self.mode} · "
                f"seed {self.seed}, temperature {self.temperature}")
        cell = "vertical-align:top;padding:2px 12px 2px 0;width:50%"
        text = "font-family:monospace;font-size:12px;white-space:pre-wrap;margin:0"
        cols = "".join(f"<td style='{cell}'><div style='font-weight:600'>{name}</div><pre style='{text}'>"
                       f"{html.escape(self.prompt)}<b>{html.escape(out)}</b></pre></td>"
                       for name, out in (("unsteered", self.unsteered), ("steered", self.steered)))
        return (f"<div><div style='font-weight:600;margin:4px 0'>{html.escape(head)}</div>"
                f"<table style='border-collapse:collapse;width:100%'><tr>{cols}</tr></table></div>")


@dataclass
class SteeringSweep:
    """`saelab.steer(..., sweep=True)`: concept success@k (generated tokens among the latent's top logit-lens
    tokens), its per-token rate and fluency (the unsteered model's nats/token on the steered text) per latent ×
    α; `result` is the dict written to `paths` (RUN/eval/steer_sweep_<latents>.json and .html)."""

    run: Run
    result: dict
    paths: list[Path]

    @property
    def alphas(self) -> list[float]:
        return self.result["alphas"]

    @property
    def success(self) -> dict[int, list[float]]:
        """latent → success@k per α."""
        return dict(zip(self.result["latents"], self.result["success"]))

    @property
    def fluency(self) -> dict[int, list[float]]:
        """latent → nats/token per α (lower is more fluent)."""
        return dict(zip(self.result["latents"], self.result["fluency_nats"]))

    def figure(self):
        """Plotly: success and fluency against α, a line per latent (the sweep's HTML page)."""
        from saelab.eval.run import _sweep_figure

        return _sweep_figure(self.result)

    def __str__(self) -> str:  # what `saelab steer --sweep` prints
        from saelab.eval.run import format_steer

        return format_steer(self.result)

    def _repr_html_(self) -> str:
        from saelab.display import grid_html

        r = self.result
        rows = [[f, a, r["success"][i][j], r["rate"][i][j], r["fluency_nats"][i][j]]
                for i, f in enumerate(r["latents"]) for j, a in enumerate(r["alphas"])]
        return grid_html(["latent", "α", f"success@{r['k']}", "rate", "fluency (nats)"], rows,
                         title=f"steering sweep · {r['n_prompts']} prompt(s) × {r['max_new_tokens']} new tokens")


def steer(run, latents: int | Sequence[int], alpha: float | Sequence[float] = 4.0, prompt: str = "def ",
          max_new_tokens: int = 30, temperature: float = 0.7, seed: int = 0, mode: str = "add",
          sweep: bool = False, alphas: Sequence[float] | None = None, tokens: int | str = 16_384,
          strength_scale: str = "position"):
    """Steer generation with SAE latents as `saelab steer` does: add α × (the largest latent activation at the
    position, the paper's rule) × the latent's decoder direction at every position (mode="clamp": set the one
    latent to that value instead) → `Steering` (steered vs unsteered text). sweep=True → `SteeringSweep` over the
    grid `alphas` (default: the paper's 13 strengths, 0 to 20; prompt "" for the eight neutral code prefixes).
    strength_scale="corpus": α × each latent's max activation instead, from RUN/eval/steering_scores.parquet
    (`saelab.evaluate(run, suites=["steering"])`) or else a pass over `tokens` held-out tokens.

    >>> saelab.steer(run, [12], alpha=4, prompt="def f(")                          # doctest: +SKIP
    >>> saelab.steer(run, [12, 40], sweep=True, prompt="").figure()                # doctest: +SKIP
    """
    from numbers import Number

    from saelab.eval.run import steer_run
    from saelab.settings import as_count

    run = _as_run(run)
    latents = [int(latents)] if isinstance(latents, Number) else [int(f) for f in latents]
    if sweep:
        grid = [float(a) for a in (alphas or ())]
        if len(grid) == 1:
            raise ConfigError(f"alphas: a sweep needs at least two strengths, got {grid}")
    else:
        grid = [float(alpha)] if isinstance(alpha, Number) else [float(a) for a in alpha]
    result, paths = steer_run(run.path, latents, grid, prompt or "", max_new_tokens, temperature, seed, sweep, mode,
                              as_count(tokens, "tokens"), strength_scale)
    return SteeringSweep(run, result, paths) if sweep else Steering(run, **result)


# ================================================================================================ patch
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
        from saelab.eval.patching_report import _jsonable

        return json.loads(json.dumps(self.report, default=_jsonable))

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


def patch(model="reference", task: str = "bracket", saes=(), pairs: int = 32,
          methods: str | Sequence[str] = "all", components: str | Sequence[str] = "resid,attn,mlp,head",
          relp_rules: str = "ln,identity,half", ig_steps: int = 10, circuit_method: str = "ig", seed: int = 0,
          max_ap_nodes: int = 2000, out: str | Path | None = None, progress: bool = True) -> PatchingReport:
    """Activation patching vs attribution patching, RelP and integrated gradients on a contrast task, as
    `saelab patch` does; with `saes` (Runs, run/SAE directories or SparseAutoencoders, frozen here) also every
    SAE latent and error node, and the feature circuit's faithfulness/completeness curve. `model`: a name or a
    loaded model. Writes patching-<task>.json and .html only when `out` is given.

    >>> rep = saelab.patch("reference", task="bracket", pairs=16)                  # doctest: +SKIP
    >>> rep.correlation["relp"]["resid"]; rep.figures["scatter"]                   # doctest: +SKIP
    >>> saelab.patch(saes=[run]).figures["faithfulness"]                           # doctest: +SKIP
    """
    from saelab.eval.patching_report import load_saes, patch_settings, run_patching, write_report

    if isinstance(saes, (str, Path, Run)) or hasattr(saes, "encode"):  # one SAE given bare
        saes = [saes]
    st = patch_settings(methods, components, relp_rules, pairs, ig_steps, circuit_method, list(saes), task)
    if isinstance(model, (str, Path)):
        from saelab.models import load_model

        model = load_model(str(model))
    report = run_patching(model, task, pairs, st.methods, st.kinds, st.rules, ig_steps, load_saes(model, st.saes),
                          circuit_method, seed, progress=progress, max_ap_nodes=max_ap_nodes)
    paths = write_report(report, out) if out is not None else ()
    return PatchingReport(report, report.pop("_figures", {}), paths)
