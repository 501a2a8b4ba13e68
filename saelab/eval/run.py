"""`saelab eval RUN`: core metrics of a trained SAE on held-out text, written to RUN/eval/core.json."""

from __future__ import annotations

import json
from pathlib import Path


def evaluate_run(run: Path, tokens: int = 65_536) -> tuple[Path, str]:
    """Score the SAE of a run directory (or a bare SAE directory) with the model and corpus it was trained on."""
    from saelab.config import TrainConfig, load_config
    from saelab.data.corpus import check_source
    from saelab.errors import SAEFileError
    from saelab.eval.core import evaluate_core, format_core
    from saelab.models import check_hook_names, load_model
    from saelab.sae import SparseAutoencoder

    run = Path(run)
    sae_dir = run / "sae" if (run / "sae").is_dir() else run
    if not (sae_dir / "cfg.json").exists():
        what = "no such file or directory" if not run.exists() else "a file" if not run.is_dir() else \
            "neither a run directory (with sae/) nor an SAE directory (with cfg.json)"
        raise SAEFileError(f"{run}: {what}", hint="give a run directory made by `saelab train` or an SAE directory "
                                                  "(cfg.json + sae_weights.safetensors)")
    out_dir = (run if sae_dir != run else sae_dir) / "eval"
    cfg = load_config(TrainConfig, run / "config.yaml") if (run / "config.yaml").exists() else TrainConfig()
    sae = SparseAutoencoder.load(sae_dir)
    check_source(cfg.corpus, "validation")
    model_name = sae.cfg.model_name or cfg.model.name
    model = load_model(model_name, device=cfg.model.resolved_device(), dtype=cfg.model.dtype)
    check_hook_names(model, sae.cfg.hook_name)  # an SAE of another model: one clear line, not a failed forward
    metrics = evaluate_core(model, sae, corpus=cfg.corpus, split="validation", n_tokens=tokens,
                            context_size=cfg.context_size)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "core.json"
    path.write_text(json.dumps(metrics.to_dict(), indent=2))
    return path, format_core(metrics)
