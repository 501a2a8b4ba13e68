"""Many SAEs from one pass: `saelab train --sweep sweep.yaml` trains several SAEs (architectures, k, widths) on the
same batches, reading and shuffling the activations once; each SAE has its own optimizer, run folder, checkpoints
and resume, and ends bit-identical to the same SAE trained alone on those batches (`trainer.train_many`).

A sweep file holds the shared settings (any `TrainConfig` field) and `saes`, a list of per-SAE overrides:

    cache: cache/ref          # shared: what decides the batches (cache, hook, tokens, batch_size, seed, ...)
    tokens: 2000000
    out: runs/sweep           # each SAE's run folder is <out>/<name>
    saes:
      - {name: topk-k32, sae: {architecture: topk, k: 32}}
      - {name: batchtopk-k64, sae: {architecture: batchtopk, k: 64}, lr: 0.001}

Everything that decides the batches, the step count or when checkpoints are written must be the same for every
SAE (`SHARED`); a sweep reads one hook, since the cache reader yields one hook per batch.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from saelab.config import TrainConfig, flatten, from_dict, merge, migrate, read_file, to_dict
from saelab.distributed import rank_device
from saelab.errors import ConfigError
from saelab.training.pipeline import prepare
from saelab.training.trainer import TrainResult, train_many

# what every SAE of a sweep shares: the batches (source, hook, sizes, seed), the steps and the checkpoint schedule
SHARED = ("model.name", "model.dtype", "model.device", "corpus", "sae.hook_name", "sae.target_hook", "source", "cache",
          "cache_tokens",
          "context_size", "tokens", "batch_size", "seed", "checkpoint_every", "keep_checkpoints", "resume", "threads",
          "shard_latents")
FILE_HINT = "a sweep file holds shared TrainConfig fields and `saes`, a list of per-SAE overrides (each with a name)"


def _hinted(e: ConfigError, path) -> ConfigError:
    e.hint = e.hint or f"the value comes from {path} or from a flag; {FILE_HINT}"
    return e


def load_sweep(path: str | Path, overrides: dict | None = None, config: str | Path | None = None) -> list[TrainConfig]:
    """One `TrainConfig` per SAE of the sweep file at `path`: the shared settings, then `overrides` (flags), then
    the SAE's own entry. Each SAE's `out` is `<out>/<name>` (`out` defaults to runs/<sweep file name>). A `config`
    file as well is refused: the shared settings have one place."""
    if config:
        raise ConfigError("--config and --sweep: a sweep's shared settings live in the sweep file",
                          hint=f"move the settings of {config} to the top of {path}")
    data = read_file(path)
    saes = data.pop("saes", None)
    data = migrate(TrainConfig, data)  # older keys renamed, so the flags and each SAE's entry override the new ones
    if not isinstance(saes, list) or not saes:
        what = "has no `saes` list" if saes is None else f"`saes` must be a non-empty list, got {saes!r}"
        raise ConfigError(f"{path}: {what}", hint=FILE_HINT)
    shared = merge(data, overrides or {})
    try:
        base = from_dict(TrainConfig, shared)
    except ConfigError as e:
        raise _hinted(e, path) from None
    root = Path(base.out or Path("runs") / Path(path).stem)
    cfgs: list[TrainConfig] = []
    for i, entry in enumerate(saes):
        if not isinstance(entry, dict):
            raise ConfigError(f"{path}: saes[{i}] must be a mapping of TrainConfig fields, got {entry!r}",
                              hint=FILE_HINT)
        if "out" in entry:
            raise ConfigError(f"{path}: saes[{i}].out: an SAE of a sweep has its run folder at <out>/<name>",
                              hint="give the SAE a `name`, and `out` once at the top of the sweep file")
        try:
            cfg = from_dict(TrainConfig, merge(shared, migrate(TrainConfig, entry)), f"saes[{i}]")
        except ConfigError as e:
            raise _hinted(e, path) from None
        name = entry.get("name") or f"{cfg.sae.architecture}-k{cfg.sae.k}"
        if "/" in str(name) or str(name).startswith("."):
            raise ConfigError(f"{path}: saes[{i}].name: {name!r} is not a folder name (no '/', no leading '.')")
        cfgs.append(dataclasses.replace(cfg, name=str(name), out=str(root / str(name))))
    names = [c.name for c in cfgs]
    for i, name in enumerate(names):
        if name in names[:i]:
            raise ConfigError(f"{path}: two SAEs are named {name!r} (saes[{names.index(name)}] and saes[{i}])",
                              hint="give each SAE its own `name`: its run folder is <out>/<name>")
    return cfgs


def check_shared(cfgs: list[TrainConfig]) -> None:
    """Every SAE reads the same batches for the same steps and checkpoints together; name the first field that
    differs."""
    first = flatten(to_dict(cfgs[0]))
    for i, cfg in enumerate(cfgs[1:], 1):
        mine = flatten(to_dict(cfg))
        for key in sorted(first):
            if not any(key == s or key.startswith(s + ".") for s in SHARED) or mine[key] == first[key]:
                continue
            if key == "sae.hook_name":
                raise ConfigError(f"saes[{i}] ({cfg.name}): hook_name is {mine[key]!r}, but saes[0] "
                                  f"({cfgs[0].name}) trains on {first[key]!r}; a sweep trains on one hook (the "
                                  f"cache reader yields one hook per batch)", hint="run one sweep per hook")
            raise ConfigError(f"saes[{i}] ({cfg.name}): {key} is {mine[key]!r}, but saes[0] ({cfgs[0].name}) has "
                              f"{first[key]!r}; every SAE of a sweep trains on the same batches and steps",
                              hint=f"set {key} once, at the top of the sweep file")


def run_sweep(cfgs: list[TrainConfig], progress: bool = True) -> list[TrainResult]:
    """Check every SAE's settings, make the one batch source, train them all; what `saelab train --sweep` calls."""
    from saelab.sae.architectures import get_architecture

    def source_cfg(cfgs: list[TrainConfig]) -> TrainConfig:
        # the batches carry LM-loss gradients when an SAE selects with them (g-SAE); the others ignore them
        src = next((c for c in cfgs if get_architecture(c.sae.architecture).needs_grads), cfgs[0])
        return dataclasses.replace(src, out=str(Path(cfgs[0].out).parent))  # a cache it makes: in the sweep's root

    cfgs, source = prepare(cfgs, source_cfg, check=check_shared, progress=progress)
    return train_many(cfgs, [c.out for c in cfgs], source, progress=progress,
                      device=rank_device(cfgs[0].model.resolved_device()),
                      labels=[f" (SAE {c.name!r})" for c in cfgs])
