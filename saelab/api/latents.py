"""What a run's latents do: `saelab.dashboard` builds the run's dashboard bundle (every latent's statistics,
examples, logit effects, neighbours; `saelab dashboard RUN`) and `saelab.top_activations` shows one latent's
strongest contexts, from that bundle or a pass through the model."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from saelab.api.run import Run
from saelab.display import tokens_html
from saelab.errors import ConfigError
from saelab.settings import as_count, parse_count, setting


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
    negative: bool = False  # the most negative contexts (signed codes), most negative first

    def texts(self) -> list[str]:
        """Each example's window around its peak as plain text."""
        out = []
        for e in self.examples:
            s, t = e.window(self.context)
            out.append("".join(self.token_text(e.tokens[s:t])))
        return out

    def _repr_html_(self) -> str:
        scale = max((abs(float(e.act)) for e in self.examples), default=0.0)
        which = "most negative" if self.negative else "top"
        head = f"latent {self.latent} · {which} {len(self.examples)} contexts (from the {self.source})"
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
                    context: int = 12, negative: bool = False) -> TopActivations:
    """The n contexts where `latent` fires most (`negative`: where it is most negative, for signed codes such as
    AbsTopK's). From the run's dashboard bundle when it has one (no model needed); otherwise one pass of `tokens`
    held-out tokens through the model (given, or the run's own).

    >>> saelab.top_activations(run, 12)                     # doctest: +SKIP
    """
    from saelab.dashboard.examples import top_examples

    run = run if not isinstance(run, (str, Path)) else Run(run)
    if isinstance(run, Run) and run.bundle is not None and model is None and corpus is None:
        b = run.bundle
        lat = b.latent(latent)
        return TopActivations(lat.index, (lat.bottom if negative else lat.top)[:n], b.token_text, "bundle",
                              lat.stats, context, negative)
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
                            context_size=cfg.context_size if cfg else 128, negative=negative)
    from saelab.dashboard.vocab import display_vocab

    shown = display_vocab(model.tokenizer, model.cfg.d_vocab)
    return TopActivations(int(latent), examples, lambda ids: [shown[int(t)] for t in ids], "model", None, context,
                          negative)
