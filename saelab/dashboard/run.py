"""`saelab dashboard RUN`: the bundle of a run's SAE, over held-out rows of the corpus it was trained on."""

from __future__ import annotations

import math
from pathlib import Path

from saelab.dashboard.build import DashboardSettings, build_bundle, sae_sha256


def _sae_dir(run: Path) -> Path:
    from saelab.errors import SAEFileError

    sae_dir = run / "sae" if (run / "sae").is_dir() else run
    if not (sae_dir / "cfg.json").exists():
        raise SAEFileError(f"{run}: neither a run directory (with sae/) nor an SAE directory (with cfg.json)",
                           hint="pass the folder `saelab train` wrote, e.g. runs/<name>")
    return sae_dir


def build_run_bundle(run: str | Path, out: str | Path | None = None, tokens: int = 1_000_000,
                     split: str = "validation", dataset: str | None = None, context_size: int | None = None,
                     settings: DashboardSettings | None = None, device: str | None = None,
                     progress: bool = True, force: bool = False) -> Path:
    """Build RUN/dashboard (or `out`) for the SAE of a run directory (or a bare SAE directory)."""
    import torch

    from saelab.activations.capture import HookCapture
    from saelab.config import ModelSpec, TrainConfig, from_dict, read_file
    from saelab.data.corpus import SPLITS, CorpusSpec
    from saelab.data.packing import iter_packed_rows
    from saelab.dashboard.vocab import display_vocab
    from saelab.dashboard.weights import decoder_rows, unembed_of
    from saelab.errors import ConfigError
    from saelab.models import load_model
    from saelab.sae import SparseAutoencoder

    run = Path(run)
    if tokens < 1:
        raise ConfigError(f"--tokens: must be >= 1, got {tokens}")
    if split not in SPLITS:
        raise ConfigError(f"--split: must be one of {', '.join(SPLITS)}, got {split!r}")
    sae_dir = _sae_dir(run)
    is_run = sae_dir != run
    # only the corpus, row length and model of the run's config matter here: read just those, so a run written by
    # an older saelab (other SAE fields) still gets its dashboard
    data = read_file(run / "config.yaml") if (run / "config.yaml").exists() else {}
    corpus = CorpusSpec(dataset) if dataset else from_dict(CorpusSpec, data.get("corpus") or {}, "corpus")
    model_spec = from_dict(ModelSpec, data.get("model") or {}, "model")
    T = int(context_size or data.get("context_size") or TrainConfig.context_size)
    if T < 2:
        raise ConfigError(f"--context-size: must be >= 2, got {T}")
    sae = SparseAutoencoder.load(sae_dir)
    model_name = sae.cfg.model_name or model_spec.name
    model = load_model(model_name, device=device or model_spec.resolved_device(), dtype=model_spec.dtype)
    hook = sae.cfg.hook_name
    capture = HookCapture(model, [hook], kept_from=1)
    dev = capture.device
    sae = sae.to(dev)

    def run_model(batch):
        acts, _ = capture(batch)
        return acts[hook]

    n_rows = math.ceil(tokens / (T - 1))
    rows = iter_packed_rows(corpus, model.tokenizer, T, split)
    unembed = None
    # the logit lens needs directions in the residual stream (or written straight into it)
    if sae.cfg.d_in == model.cfg.d_model and any(part in hook for part in ("resid", "mlp_out", "attn_out")):
        unembed = unembed_of(model)
    sha = sae_sha256(sae)
    sae_info = {"n_latents": sae.cfg.n_latents, "d_in": sae.cfg.d_in, "k": sae.cfg.k,
                "architecture": sae.cfg.architecture, "hook_name": hook, "path": str(sae_dir), "sha256": sha}
    from saelab.models.loading import model_fingerprint

    model_info = {"name": model_name, "fingerprint": model_fingerprint(model_name), "n_layers": model.cfg.n_layers,
                  "d_model": model.cfg.d_model, "vocab": model.cfg.d_vocab}
    corpus_info = {**corpus.to_dict(), "split": split, "requested_tokens": int(tokens)}
    meta = {"model": model_info, "corpus": corpus_info,
            "spec": {"model": model_info["fingerprint"], "hook": hook, "corpus": corpus_info, "context_size": T}}
    out = Path(out) if out else (run if is_run else sae_dir) / "dashboard"
    with torch.no_grad():
        return build_bundle(out, rows, n_rows, run_model, sae.encode, sae_info, decoder_rows(sae).cpu(), unembed,
                            display_vocab(model.tokenizer, model.cfg.d_vocab), meta, settings=settings,
                            run=run if is_run else None, progress=progress, force=force)


def summary(path: Path) -> str:
    """A few lines about a finished bundle, for the CLI."""
    from saelab.dashboard.reader import open as open_bundle

    b = open_bundle(path)
    t = b.table()
    m = b.manifest
    c = m["corpus"]
    return "\n".join([
        f"bundle     {path}: {b.n_latents:,} latents of {m['sae']['hook_name']} on {m['model']['name']}",
        f"tokens     {c['tokens']:,} scored tokens ({c['rows']:,} rows of {c['tokens_per_row']}) from the "
        f"{c['split']} split of {c['source']}"
        + (f" (asked for {c['requested_tokens']:,}; the split has no more)"
           if c['tokens'] < c['requested_tokens'] else ""),
        f"latents    {int(t['dead'].sum()):,} dead, {int(t['dense'].sum()):,} dense; {m['n_examples']:,} examples; "
        f"decoder map by {m['settings']['map_method']}",
        f"scores     {', '.join(m['scores']['joined']) or 'none found in the run'}",
        f"time       pass {m['timings']['pass_s']:.1f} s, views {m['timings']['views_s']:.1f} s, "
        f"weights {m['timings']['weights_s']:.1f} s",
    ])
