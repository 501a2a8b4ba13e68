"""`saelab dashboard RUN`: the bundle of a run's SAE, over held-out rows of the corpus it was trained on."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from saelab.dashboard.build import DashboardSettings, build_bundle, sae_sha256
from saelab.rundir import RunDir


def _open_run(run) -> RunDir:
    return RunDir.open(run, hint="pass the folder `saelab train` wrote, e.g. runs/<name>")


HELDOUT = "heldout"  # the validation split, then the train-split rows past those the run's training read


@dataclass
class RunPass:
    """What a pass over a run's held-out rows needs: the SAE, the model's hook capture and the rows."""

    sae: object
    run_dir: RunDir
    model: object
    model_name: str
    capture: Callable  # tokens [B, T] → activations [B·(T−1), d_in] at the SAE's hook (positions 1..T−1)
    rows: Iterator[np.ndarray]
    n_rows: int
    context_size: int
    corpus_info: dict  # source, split, requested tokens, where the rows come from


def train_rows_read(run: Path, config: dict, corpus, context_size: int) -> int | None:
    """How many leading rows of the train split the run's training read: the rows of the cache it trained from,
    when that cache (its manifest) is still there and holds the train split of this corpus at this row length;
    None when that cannot be told (a stream, a missing or different cache)."""
    import dataclasses

    from saelab.activations.format import read_manifest
    from saelab.errors import CacheError

    if config.get("source", "auto") == "stream":
        return None
    cache = Path(config["cache"]) if config.get("cache") else RunDir(run).cache
    try:
        m = read_manifest(cache)
    except (CacheError, OSError):  # gone, or not a cache: unknown
        return None
    spec = m.get("spec", {})
    if (spec.get("split") != "train" or spec.get("context_size") != context_size
            or spec.get("corpus") != dataclasses.asdict(corpus)):
        return None
    return int(m.get("n_sequences", 0))


def heldout_rows(corpus, tokenizer, context_size: int, train_rows_skipped: int | None) -> Iterator[np.ndarray]:
    """The validation split's packed rows, then (when known) the train split's rows after the first
    `train_rows_skipped`, which the run's training never read."""
    from itertools import islice

    from saelab.data.packing import iter_packed_rows

    yield from iter_packed_rows(corpus, tokenizer, context_size, "validation")
    if train_rows_skipped is not None:
        yield from islice(iter_packed_rows(corpus, tokenizer, context_size, "train"), train_rows_skipped, None)


def open_pass(run: str | Path, tokens: int, split: str = HELDOUT, dataset: str | None = None,
              context_size: int | None = None, device: str | None = None) -> RunPass:
    """Load a run's SAE and model and lay out the rows a pass reads: the first ceil(tokens / (T − 1)) rows of
    `split` (HELDOUT: `heldout_rows` past the train rows `train_rows_read` finds)."""
    from saelab.activations.capture import HookCapture
    from saelab.config import ModelSpec, TrainConfig, from_dict, read_file
    from saelab.data.corpus import SPLITS, CorpusSpec
    from saelab.data.packing import iter_packed_rows
    from saelab.errors import ConfigError
    from saelab.models import load_model
    from saelab.sae import SparseAutoencoder

    if tokens < 1:
        raise ConfigError(f"--tokens: must be >= 1, got {tokens}")
    if split not in (HELDOUT, *SPLITS):
        raise ConfigError(f"--split: must be one of {', '.join((HELDOUT, *SPLITS))}, got {split!r}")
    rd = _open_run(run)
    # only the corpus, row length and model of the run's config matter here: read just those, so a run written by
    # an older saelab (other SAE fields) still gets its dashboard
    data = read_file(rd.config) if rd.config.exists() else {}
    corpus = CorpusSpec(dataset) if dataset else from_dict(CorpusSpec, data.get("corpus") or {}, "corpus")
    model_spec = from_dict(ModelSpec, data.get("model") or {}, "model")
    T = int(context_size or data.get("context_size") or TrainConfig.context_size)
    if T < 2:
        raise ConfigError(f"--context-size: must be >= 2, got {T}")
    sae = SparseAutoencoder.load(rd.sae)
    model_name = sae.cfg.model_name or model_spec.name
    model = load_model(model_name, device=device or model_spec.resolved_device(), dtype=model_spec.dtype)
    hook = sae.cfg.hook_name
    capture = HookCapture(model, [hook], kept_from=1)
    sae = sae.to(capture.device)

    def run_model(batch):
        acts, _ = capture(batch)
        return acts[hook]

    info = {**corpus.to_dict(), "split": split, "requested_tokens": int(tokens)}
    if split == HELDOUT:
        skip = train_rows_read(rd.path, data, corpus, T)
        rows = heldout_rows(corpus, model.tokenizer, T, skip)
        info["train_rows_skipped"] = skip
        info["rows_from"] = ("the validation split" if skip is None else
                             f"the validation split, then the train split from row {skip:,} (the rows before it "
                             f"are the run's training data)")
    else:
        rows = iter_packed_rows(corpus, model.tokenizer, T, split)
        info["rows_from"] = f"the {split} split"
    return RunPass(sae, rd, model, model_name, run_model, rows, math.ceil(tokens / (T - 1)), T, info)


def build_run_bundle(run: str | Path, out: str | Path | None = None, tokens: int = 1_000_000,
                     split: str = HELDOUT, dataset: str | None = None, context_size: int | None = None,
                     settings: DashboardSettings | None = None, device: str | None = None,
                     progress: bool = True, force: bool = False) -> Path:
    """Build RUN/dashboard (or `out`) for the SAE of a run directory (or a bare SAE directory), over `tokens`
    tokens of `split` (default HELDOUT: validation, then train rows the run never trained on)."""
    import torch

    from saelab.dashboard.stats import group_ends
    from saelab.dashboard.vocab import display_vocab
    from saelab.dashboard.weights import unembed_of

    rp = open_pass(run, tokens, split, dataset, context_size, device)
    sae, model, hook = rp.sae, rp.model, rp.sae.cfg.hook_name
    # the latents are read at `hook`; their decoder writes `written` (a transcoder's target hook, d_out wide)
    target = sae.cfg.target_hook or None
    written, d_out = target or hook, sae.cfg.d_out or sae.cfg.d_in
    unembed = None
    # the logit lens needs directions in the residual stream (or written straight into it)
    if d_out == model.cfg.d_model and any(part in written for part in ("resid", "mlp_out", "attn_out")):
        unembed = unembed_of(model)
    sha = sae_sha256(sae)
    sae_info = {"n_latents": sae.cfg.n_latents, "d_in": sae.cfg.d_in, "k": sae.cfg.k,
                "architecture": sae.cfg.architecture, "signed_codes": bool(sae.arch.signed_codes), "hook_name": hook,
                **({"target_hook": target, "d_out": d_out, "skip": bool(sae.cfg.skip)} if target else {}),
                "path": str(rp.run_dir.sae), "sha256": sha, "group_ends": group_ends(sae)}
    from saelab.models.loading import model_fingerprint

    model_info = {"name": rp.model_name, "fingerprint": model_fingerprint(rp.model_name),
                  "n_layers": model.cfg.n_layers, "d_model": model.cfg.d_model, "vocab": model.cfg.d_vocab}
    meta = {"model": model_info, "corpus": rp.corpus_info,
            "spec": {"model": model_info["fingerprint"], "hook": hook, **({"target_hook": target} if target else {}),
                     "corpus": rp.corpus_info, "context_size": rp.context_size}}
    out = Path(out) if out else rp.run_dir.dashboard
    with torch.no_grad():
        return build_bundle(out, rp.rows, rp.n_rows, rp.capture, sae.encode, sae_info, sae.decoder_rows().float().cpu(),
                            unembed, display_vocab(model.tokenizer, model.cfg.d_vocab), meta, settings=settings,
                            run=None if rp.run_dir.bare else rp.run_dir.path, progress=progress, force=force)


def summary(path: Path) -> str:
    """A few lines about a finished bundle, for the CLI."""
    from saelab.dashboard.reader import open as open_bundle
    from saelab.dashboard.stats import format_dead

    b = open_bundle(path)
    t = b.table()
    m = b.manifest
    c = m["corpus"]
    dead = (format_dead(m["dead_latents"]) if "dead_latents" in m  # (bundles before the per-group report)
            else f"{int(t['dead'].sum()):,} dead in the dashboard's {c['tokens']:,} tokens")
    return "\n".join([
        f"bundle     {path}: {b.n_latents:,} latents of {b.hooks} on {m['model']['name']}",
        f"tokens     {c['tokens']:,} scored tokens ({c['rows']:,} rows of {c['tokens_per_row']}) of {c['source']}: "
        f"{c.get('rows_from', 'the ' + c['split'] + ' split')}"
        + (f" (asked for {c['requested_tokens']:,}; the split has no more)"
           if c['tokens'] < c['requested_tokens'] else ""),
        f"dead       {dead}",
        f"latents    {int(t['dense'].sum()):,} dense; {m['n_examples']:,} examples; "
        f"decoder map by {m['settings']['map_method']}",
        f"scores     {', '.join(m['scores']['joined']) or 'none found in the run'}",
        f"time       pass {m['timings']['pass_s']:.1f} s, views {m['timings']['views_s']:.1f} s, "
        f"weights {m['timings']['weights_s']:.1f} s",
    ])


def count_dead(runs: list[str | Path], tokens: int = 1_000_000, split: str = HELDOUT, device: str | None = None,
               batch_rows: int = 32, progress: bool = True) -> dict[str, dict]:
    """Dead latents of several runs' SAEs over the rows a dashboard of each would read (`open_pass`), in one model
    pass (`stats.firing_counts`), without building bundles: {run: `dead_latents` report, per Matryoshka group too}.
    The SAEs must share the model, hook, corpus and the training rows they skip (a sweep's do)."""
    import torch

    from saelab.dashboard.stats import dashboard_window, dead_latents, firing_counts, group_ends
    from saelab.errors import ConfigError
    from saelab.sae import SparseAutoencoder

    if not runs:
        raise ConfigError("count_dead: no runs given")
    rp = open_pass(runs[0], tokens, split, device=device)
    saes = [rp.sae]
    for r in runs[1:]:
        other = _open_run(r)
        sae = SparseAutoencoder.load(other.sae).to(rp.sae.W_dec.device)
        if sae.cfg.hook_name != rp.sae.cfg.hook_name or (sae.cfg.model_name or rp.model_name) != rp.model_name:
            raise ConfigError(f"{r}: its SAE reads {sae.cfg.hook_name} of {sae.cfg.model_name}, not "
                              f"{rp.sae.cfg.hook_name} of {rp.model_name} as {runs[0]}'s does",
                              hint="count runs of one model and hook together")
        if split == HELDOUT:
            from saelab.config import from_dict, read_file
            from saelab.data.corpus import CorpusSpec

            data = read_file(other.config) if other.config.exists() else {}
            corpus = from_dict(CorpusSpec, data.get("corpus") or {}, "corpus")
            if corpus.to_dict() != {k: rp.corpus_info[k] for k in corpus.to_dict()} or \
                    train_rows_read(other.path, data, corpus, rp.context_size) != rp.corpus_info["train_rows_skipped"]:
                raise ConfigError(f"{r}: trained on other rows than {runs[0]} (another corpus or cache), so their "
                                  f"held-out rows differ", hint="count them separately")
        saes.append(sae)
    with torch.no_grad():
        counts, n_tok = firing_counts(rp.rows, rp.n_rows, rp.capture, [s.encode for s in saes],
                                      [s.cfg.n_latents for s in saes], batch_rows=batch_rows, progress=progress)
    window = dashboard_window(n_tok, rp.corpus_info["rows_from"])
    return {str(r): dead_latents(c, n_tok, window, group_ends(s)) for r, c, s in zip(runs, counts, saes)}
