"""From a `TrainConfig` to a trained SAE: choose the hook, get a batch source (an existing cache, a cache made
for this run, or a live stream), and run the training loop. What `saelab train` calls."""

from __future__ import annotations

from pathlib import Path

from saelab.config import TrainConfig
from saelab.train.trainer import TrainResult, _world, default_run_name, train


def default_hook_name(model_name: str) -> str:
    """The middle residual stream: `blocks.{n_layers // 2}.hook_resid_pre`."""
    from transformers import AutoConfig

    from saelab.models.loading import _check_hub, resolve_model_path

    path = resolve_model_path(model_name)
    if not Path(path).exists():
        _check_hub(path)
    hf = AutoConfig.from_pretrained(path)
    n_layers = getattr(hf, "num_hidden_layers", None) or getattr(hf, "n_layer")
    return f"blocks.{n_layers // 2}.hook_resid_pre"


def resolve(cfg: TrainConfig) -> TrainConfig:
    """Fill the defaults that depend on the model or the cache: hook name, run name, output directory."""
    import json

    from saelab.config import from_dict, to_dict

    data = to_dict(cfg)
    if not cfg.hook_name:
        if cfg.cache:
            hooks = json.loads((Path(cfg.cache) / "manifest.json").read_text())["hooks"]
            data["hook_name"] = hooks[0] if len(hooks) == 1 else default_hook_name(cfg.model.name)
        else:
            data["hook_name"] = default_hook_name(cfg.model.name)
    data["sae"]["hook_name"] = data["hook_name"]
    data["sae"]["model_name"] = cfg.model.name
    if not cfg.name:
        data["name"] = default_run_name(from_dict(TrainConfig, data))
    if not cfg.out:
        data["out"] = str(Path("runs") / data["name"])
    return from_dict(TrainConfig, data)


def make_source(cfg: TrainConfig, rank: int = 0, world: int = 1):
    """An `ActivationCache` (given, or written into the run directory and resumed if half-written) or a stream."""
    from saelab.activations import ActivationCache, stream_activations, write_cache
    from saelab.config import CacheConfig

    if cfg.source != "stream":
        cache_dir = Path(cfg.cache) if cfg.cache else Path(cfg.out) / "cache"
        if not cfg.cache and rank == 0:
            write_cache(CacheConfig(model=cfg.model, corpus=cfg.corpus, hooks=[cfg.hook_name], out=str(cache_dir),
                                    tokens=cfg.cache_tokens, context_size=cfg.context_size))
        if world > 1:
            import torch.distributed as dist

            dist.barrier()
        return ActivationCache(cache_dir, hook_name=cfg.hook_name, batch_size=cfg.batch_size, seed=cfg.seed,
                               rank=rank, world_size=world)
    from saelab.models import load_model

    model = load_model(cfg.model.name, device=cfg.model.resolved_device(), dtype=cfg.model.dtype)
    return stream_activations(model, cfg.hook_name, corpus=cfg.corpus, context_size=cfg.context_size,
                              batch_size=cfg.batch_size, seed=cfg.seed, rank=rank, world_size=world)


def run_training(cfg: TrainConfig, progress: bool = True) -> TrainResult:
    cfg = resolve(cfg)
    rank, world = _world()
    source = make_source(cfg, rank, world)
    return train(cfg, source, run_dir=cfg.out, progress=progress, device=cfg.model.resolved_device())
