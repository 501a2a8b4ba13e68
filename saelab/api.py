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

from saelab.config import ModelSpec
from saelab.data.corpus import SPLITS, CorpusSpec
from saelab.display import table_html, tokens_html
from saelab.errors import ConfigError
from saelab.eval.patching_report import PatchSettings
from saelab.eval.run import SteerSettings
from saelab.rundir import RunDir
from saelab.settings import as_count, check, parse_count, setting
from saelab.synthetic.runner import PlantedBenchSettings

SUITES = {"core": 65_536, "probing": 80_000, "steering": 65_536}  # `saelab eval --suite`s: their default tokens


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


def _as_run(run) -> Run:
    return run if isinstance(run, Run) else Run(run)


def load_sae(path: str | Path, device: str = "cpu"):
    """A `SparseAutoencoder` from an SAE directory (saelab's or one SAELens saved) or a run directory (its sae/).

    >>> sae = saelab.load_sae("runs/demo")                 # doctest: +SKIP
    >>> code = sae.encode(x); x_hat = sae.decode(code)     # doctest: +SKIP
    """
    from saelab.sae.sae import load_sae as load

    return load(Run(path).dir.sae, device=device)


# ================================================================================================ models
@dataclass
class ModelInfo:
    """`saelab.info`'s report: a model's shape, its hook names and its held-out loss on a corpus's validation
    split (`tokens` scored)."""

    name: str
    n_layers: int
    d_model: int
    d_vocab: int
    n_ctx: int
    hooks: list[str]
    nats_per_token: float
    bits_per_byte: float
    tokens: int

    @property
    def residual_hooks(self) -> list[str]:
        return [h for h in self.hooks if h.endswith(("hook_resid_pre", "hook_resid_post", "hook_resid_mid"))]

    def __str__(self) -> str:  # what `saelab info` prints
        resid, mid = self.residual_hooks, self.n_layers // 2
        return "\n".join([
            f"model      {self.name}: {self.n_layers} layers, d_model {self.d_model}, vocab {self.d_vocab}, "
            f"context {self.n_ctx}",
            f"hooks      {len(self.hooks)} in all; residual stream: {', '.join(resid[:6])}"
            f"{' …' if len(resid) > 6 else ''}",
            f"           middle residual stream: blocks.{mid}.hook_resid_pre (= blocks.{mid - 1}.hook_resid_post)",
            f"held-out   {self.nats_per_token:.4f} nats/token, {self.bits_per_byte:.4f} bits/byte over "
            f"{self.tokens:,} tokens of the validation split"])

    def _repr_html_(self) -> str:
        return table_html({"model": self.name, "layers": self.n_layers, "d_model": self.d_model,
                           "vocab": self.d_vocab, "context": self.n_ctx, "hooks": len(self.hooks),
                           "nats/token (held-out)": self.nats_per_token, "bits/byte (held-out)": self.bits_per_byte,
                           "tokens scored": self.tokens}, title="saelab model")


@dataclass
class InfoSettings:
    """`saelab info`'s settings beside the model's (`saelab.info`'s keywords), checked when built."""

    dataset: str = setting(CorpusSpec.source, "corpus: 'stdlib', an HF dataset or a local path")
    rows: int = setting(32, "validation rows to score")
    context_size: int = setting(128, "tokens per row")

    def __post_init__(self):
        check(self.rows > 0, "--rows", f"must be > 0, got {self.rows}")
        check(self.context_size >= 2, "--context-size", f"must be >= 2, got {self.context_size}")


def info(model: str = ModelSpec.name, device: str = ModelSpec.device, model_dtype: str = ModelSpec.dtype,
         dataset: str = InfoSettings.dataset, rows: int = InfoSettings.rows,
         context_size: int = InfoSettings.context_size) -> ModelInfo:
    """Load a model as `saelab info` does and report its shape, hook names and held-out loss over `rows` rows
    of `context_size` tokens of `dataset`'s validation split.

    >>> saelab.info("reference").bits_per_byte                # doctest: +SKIP
    """
    from saelab.data.corpus import check_source
    from saelab.errors import DataError
    from saelab.models import load_model, quality
    from saelab.models.loading import hook_names

    spec = ModelSpec(name=model, device=device, dtype=model_dtype)
    st = InfoSettings(dataset, rows, context_size)
    corpus = CorpusSpec(st.dataset)
    check_source(corpus, "validation")
    loaded = load_model(spec.name, device=spec.resolved_device(), dtype=spec.dtype)
    cfg = loaded.cfg
    check(context_size <= cfg.n_ctx, "--context-size",
          f"must be <= the model's context ({cfg.n_ctx}), got {context_size}")
    r = quality.bits_per_byte(loaded, loaded.tokenizer, corpus, "validation", context_size=context_size,
                              max_rows=rows)
    if not r["tokens"]:
        raise DataError(f"dataset {dataset!r}: its validation split holds less than one row of {context_size} "
                        f"tokens", hint="use a larger dataset or a smaller --context-size")
    return ModelInfo(model, cfg.n_layers, cfg.d_model, cfg.d_vocab, cfg.n_ctx, hook_names(loaded),
                     r["nats_per_token"], r["bits_per_byte"], r["tokens"])


def hooks(model: str = ModelSpec.name, device: str = ModelSpec.device, model_dtype: str = ModelSpec.dtype,
          grep: str = "") -> list[str]:
    """Every hook name of a model (those containing `grep`), as `saelab hooks` lists them.

    >>> saelab.hooks("gpt2", grep="resid_post")               # doctest: +SKIP
    """
    from saelab.models import load_model
    from saelab.models.loading import hook_names

    spec = ModelSpec(name=model, device=device, dtype=model_dtype)
    return [h for h in hook_names(load_model(spec.name, device=spec.resolved_device(), dtype=spec.dtype))
            if grep in h]


def train_reference(out: str | Path, dataset: str = CorpusSpec.source, **recipe) -> dict:
    """Rebuild the embedded reference model as `saelab reference train` does: the byte-level BPE tokenizer and
    the GPT-2-architecture model trained on `dataset`'s train split into `out`, measured, with its MODEL_CARD.md.
    Keywords are `saelab.models.train_reference.ReferenceRecipe`'s fields; returns the training report."""
    from saelab.models.train_reference import ReferenceRecipe, train_reference as train

    return train(ReferenceRecipe(out=str(out), **recipe), CorpusSpec(dataset))


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

    def __str__(self) -> str:  # what `saelab eval` prints
        from saelab.eval.core import format_core
        from saelab.eval.probing import format_probing
        from saelab.eval.steering import format_scores

        formats = {"core": format_core, "probing": format_probing, "steering": format_scores}
        return "\n".join(formats[s](getattr(self, s)) for s in SUITES if getattr(self, s) is not None)


def evaluate(run, suites: str | Sequence[str] = ("core",), tokens: int | str | None = None,
             **probing) -> Evaluation:
    """Score a run as `saelab eval RUN --suite …` does, for each suite in `suites` (core, probing, steering),
    loading the model once; `tokens` held-out tokens (default: each suite's, `SUITES`). `probing` keywords:
    `saelab.eval.probing.ProbingSettings`'s (selection, max_density, ks, data, level, text_field, label_field,
    pooling), checked, and the data read, before the model loads.

    >>> ev = saelab.evaluate(run, suites=["core", "probing"])      # doctest: +SKIP
    >>> ev.core.explained_variance                                 # doctest: +SKIP
    """
    from saelab.eval.run import evaluate_run, load_run, probe_run, score_run

    suites = [suites] if isinstance(suites, str) else list(suites)
    bad = [s for s in suites if s not in SUITES]
    if bad or not suites:
        raise ConfigError(f"suites: {bad or suites!r}; use any of {', '.join(SUITES)}")
    n = None if tokens is None else as_count(tokens, "tokens")
    check(n is None or n > 0, "--tokens", f"must be > 0, got {n}")
    budget = {s: n or SUITES[s] for s in suites}
    if "probing" in suites:
        from saelab.eval.probing import ProbingSettings

        probe = ProbingSettings(**probing)
        probe.labelled  # noqa: B018  (read and checked before the model loads: a bad line fails at once)
    path = run.path if isinstance(run, Run) else Path(run)
    loaded = load_run(path)
    ev = Evaluation(_as_run(run))
    if "core" in suites:
        ev.core, ev.paths["core"] = evaluate_run(path, budget["core"], loaded=loaded)
    if "probing" in suites:
        ev.probing, ev.paths["probing"] = probe_run(path, budget["probing"], loaded=loaded, settings=probe)
    if "steering" in suites:
        ev.steering, ev.paths["steering"] = score_run(path, budget["steering"], loaded=loaded)
    return ev


@dataclass
class CalibrateSettings:
    """`saelab calibrate`'s settings beside the run and the dataset (`saelab.calibrate`'s keywords), checked when
    built; `tokens` may be text ("64k")."""

    target_l0: float | None = setting(None, "mean active latents per token", default_text="the SAE's k", parse=float)
    tokens: int = setting(65_536, "tokens of --dataset to fit on", parse=parse_count)
    split: str = setting("all", "which part of --dataset by saelab's document split", choices=SPLITS)
    out: str | None = setting(None, "where to write the SAE", default_text="RUN/calibrated-<dataset name>")

    def __post_init__(self):
        self.tokens = as_count(self.tokens, "tokens")
        check(self.tokens > 0, "--tokens", f"must be > 0, got {self.tokens}")


def calibrate(run, dataset: str, target_l0: float | None = CalibrateSettings.target_l0,
              tokens: int | str = CalibrateSettings.tokens, split: str = CalibrateSettings.split,
              out: str | Path | None = CalibrateSettings.out, model=None, progress: bool = True) -> tuple[Path, dict]:
    """Re-fit a thresholded SAE's inference threshold(s) (BatchTopK, Matryoshka, mutual or feature choice) on
    activations of your own text for mean L0 = `target_l0` (default k), as `saelab calibrate` does; the weights stay
    as they were. Writes the re-calibrated SAE to `out` (default RUN/calibrated-<dataset name>) and returns
    (that folder, the record: tokens, L0 before and after, the new threshold). See `saelab.training.calibrate`.

    >>> path, info = saelab.calibrate(run, dataset="path/to/my/code", target_l0=32)   # doctest: +SKIP
    """
    from saelab.activations import stream_activations
    from saelab.activations.writer import check_writable
    from saelab.data.corpus import check_source
    from saelab.eval.run import load_run
    from saelab.training.calibrate import check_target, recalibrate

    st = CalibrateSettings(target_l0, tokens, split, out)
    n, target_l0, split = st.tokens, st.target_l0, st.split
    run = _as_run(run)
    corpus = CorpusSpec(source=dataset)
    check_source(corpus, split)
    check_target(run.sae, target_l0)  # before the model is loaded
    target = Path(st.out) if st.out is not None else \
        run.path / f"calibrated-{Path(dataset.rstrip('/')).name or 'text'}"
    check_writable(target, ConfigError)
    sae, loaded_model, cfg, _ = load_run(run.path) if model is None else (run.sae, model, run.config, None)
    context = cfg.context_size if cfg is not None else 128
    stream = stream_activations(loaded_model, sae.cfg.hook_name, corpus=corpus, context_size=context, split=split,
                                batch_size=min(4096, n))
    info = recalibrate(sae, (b.acts for b in stream), target_l0=target_l0, tokens=n)
    info["dataset"], info["split"] = dataset, split
    from saelab.training.trainer import saelens_run_metadata

    sae.save(target, extra={"calibration": info}, metadata=saelens_run_metadata(cfg, sae))
    return target, info


@dataclass
class DashboardRunSettings:
    """`saelab dashboard RUN`'s settings (`saelab.dashboard`'s keywords); None: the run's own (its corpus, context
    size, device), or for split and map `build_run_bundle`'s and `DashboardSettings`'s defaults. (Nothing from
    `saelab.dashboard` is imported here: the package would shadow `saelab.dashboard`, this module's function.)"""

    tokens: int = setting(1_000_000, "held-out tokens to scan, fewer if the split is shorter", parse=parse_count)
    out: str | None = setting(None, "bundle directory", default_text="RUN/dashboard")
    split: str | None = setting(None, "rows to scan: heldout (the validation split, then the train split's rows past "
                                "those the run's training cache holds: fresh rows for >= 1M tokens, the dead-latent "
                                "count's window), validation, train or all", default_text="heldout")
    dataset: str | None = setting(None, "another corpus: 'stdlib', an HF dataset name or a local path",
                                  default_text="the run's training corpus")
    context_size: int | None = setting(None, "tokens per row, BOS included", default_text="the run's, 128", parse=int)
    map: str | None = setting(None, "decoder map: UMAP when umap-learn is installed (auto), else PCA",
                              choices=("auto", "umap", "pca"), default_text="auto")
    device: str | None = setting(None, "cpu, cuda[:N] or auto", default_text="the run's")
    force: bool = setting(False, "rebuild even if OUT already holds a finished bundle")


def dashboard(run, tokens: int | str = DashboardRunSettings.tokens, out: str | Path | None = DashboardRunSettings.out,
              split: str = DashboardRunSettings.split, dataset: str | None = DashboardRunSettings.dataset,
              context_size: int | None = DashboardRunSettings.context_size, map: str = DashboardRunSettings.map,
              device: str | None = DashboardRunSettings.device, force: bool = DashboardRunSettings.force,
              progress: bool = True):
    """Build the run's dashboard bundle as `saelab dashboard RUN` does and open it (`saelab.dashboard.open`):
    every latent's statistics, examples, logit effects and neighbours; what the explorer and `top_activations`
    read. The settings are `DashboardRunSettings`'s (map: the decoder map's method); see `build_run_bundle`.

    >>> bundle = saelab.dashboard(run, tokens="200k"); bundle.table().sort_values("density")   # doctest: +SKIP
    """
    from saelab.dashboard.build import DashboardSettings
    from saelab.dashboard.reader import open as open_bundle
    from saelab.dashboard.run import HELDOUT, build_run_bundle

    settings = DashboardSettings(map_method=map) if map is not None else DashboardSettings()
    return open_bundle(build_run_bundle(Path(run), out=out, tokens=as_count(tokens, "tokens"), split=split or HELDOUT,
                                        dataset=dataset, context_size=context_size, settings=settings, device=device,
                                        progress=progress, force=force))


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
        from saelab.eval.run import sweep_figure

        return sweep_figure(self.result)

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


def steer(run, latents: int | Sequence[int], alpha: float | Sequence[float] = SteerSettings.alpha,
          prompt: str = SteerSettings.prompt, max_new_tokens: int = SteerSettings.max_new_tokens,
          temperature: float = SteerSettings.temperature, seed: int = SteerSettings.seed,
          mode: str = SteerSettings.mode,
          sweep: bool = False, alphas: Sequence[float] | None = None, tokens: int | str = SteerSettings.tokens,
          strength_scale: str = SteerSettings.strength_scale):
    """Steer generation with SAE latents as `saelab steer` does: add α × (the largest latent activation at the
    position, the paper's rule) × the latent's decoder direction at every position (mode="clamp": set the one
    latent to that value instead) → `Steering` (steered vs unsteered text); `alpha`: one strength, or one per
    latent. sweep=True → `SteeringSweep` over the grid `alphas`, or several `alpha`s (default: the paper's 13
    strengths, 0 to 20). prompt "": a newline, or for a sweep the eight neutral code prefixes.
    strength_scale="corpus": α × each latent's max activation instead, from RUN/eval/steering_scores.parquet
    (`saelab.evaluate(run, suites=["steering"])`) or else a pass over `tokens` held-out tokens. The settings are
    `saelab.eval.run.SteerSettings`'s, checked before the model loads.

    >>> saelab.steer(run, [12], alpha=4, prompt="def f(")                          # doctest: +SKIP
    >>> saelab.steer(run, [12, 40], sweep=True).figure()                           # doctest: +SKIP
    """
    from numbers import Number

    from saelab.eval.run import steer_run

    latents = [int(latents)] if isinstance(latents, Number) else [int(f) for f in latents]
    strengths = [alpha] if isinstance(alpha, Number) else list(alpha)
    if sweep and alphas is not None:
        if len(alphas) == 1:
            raise ConfigError(f"alphas: a sweep needs at least two strengths, got {[float(a) for a in alphas]}")
        strengths = list(alphas)
    st = SteerSettings(alpha=strengths, strength_scale=strength_scale, prompt=prompt or "",
                       max_new_tokens=max_new_tokens, temperature=temperature, seed=seed, mode=mode, sweep=sweep,
                       tokens=as_count(tokens, "tokens"))
    path = run.path if isinstance(run, Run) else Path(run)
    result, paths = steer_run(path, latents, st)
    run = _as_run(run)
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


# ================================================================================================ benchmarks
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


# ================================================================================================ environment
def doctor_report(json_path: str | Path | None = None) -> tuple[dict, Path | None]:
    """The environment a bug report needs and the sparse kernels' self-tests on every device, as `saelab doctor`
    runs them (see `saelab.doctor`): (the report, its JSON file when `json_path` is given; the path is checked before
    the self-tests run). report["ok"]: every check passed; `saelab.doctor.format_report` gives its text.

    >>> report, _ = saelab.doctor_report(); report["ok"]                       # doctest: +SKIP
    """
    from saelab.doctor import check_json_path, collect, write_json

    if json_path is not None:
        check_json_path(json_path)  # before the self-tests, so a bad path fails at once
    report = collect()
    return report, write_json(report, json_path) if json_path is not None else None
