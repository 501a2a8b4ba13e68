"""`saelab.info`, `saelab.hooks` and `saelab.train_reference`: a model's shape, hook names and held-out loss, and
the embedded reference model's rebuild (`saelab info`, `saelab hooks`, `saelab reference train`)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from saelab.config import ModelSpec
from saelab.data.corpus import CorpusSpec
from saelab.display import table_html
from saelab.settings import check, setting


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
    default_hook: str  # the middle residual stream, what `saelab train`/`cache` use without --hook
    nats_per_token: float
    bits_per_byte: float
    tokens: int

    @property
    def residual_hooks(self) -> list[str]:
        return [h for h in self.hooks if h.endswith(("hook_resid_pre", "hook_resid_post", "hook_resid_mid"))]

    def __str__(self) -> str:  # what `saelab info` prints
        from saelab.models.loading import hook_layer

        resid, mid = self.residual_hooks, hook_layer(self.default_hook)
        return "\n".join([
            f"model      {self.name}: {self.n_layers} layers, d_model {self.d_model}, vocab {self.d_vocab}, "
            f"context {self.n_ctx}",
            f"hooks      {len(self.hooks)} in all; residual stream: {', '.join(resid[:6])}"
            f"{' …' if len(resid) > 6 else ''}",
            f"           middle residual stream: {self.default_hook} (= blocks.{mid - 1}.hook_resid_post)",
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
    from saelab.models.loading import default_hook_name, hook_names

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
                     default_hook_name(loaded), r["nats_per_token"], r["bits_per_byte"], r["tokens"])


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
