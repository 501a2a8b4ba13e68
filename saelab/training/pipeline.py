"""From a `TrainConfig` to a trained SAE: check the inputs, choose the hook, get a batch source (an existing cache,
a cache made for this run, or a live stream), and run the training loop. What `saelab train` calls.

Everything that can be checked without the model is checked in `resolve`, before anything is loaded or written:
a bad path, a cache that does not hold the hook or whose width, model or corpus disagree with the run, an empty
dataset, an output directory that cannot hold a run. A run that fails before training starts leaves no folder.

Under torchrun every rank takes these steps; each is `all_or_none`: a bad input stops every rank with one error
(printed by rank 0), and rank 0 alone writes the run's cache while the others wait for it.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

from saelab.config import ModelSpec, TrainConfig
from saelab.distributed import all_or_none, rank_device, rank_world
from saelab.errors import CacheError, ConfigError, DataError, SaelabError
from saelab.models.loading import default_hook_name, locate_model, model_id
from saelab.rundir import RunDir
from saelab.training.latent_parallel import check_layout, data_position
from saelab.training.memory import check_step_fits
from saelab.training.trainer import TrainResult, default_run_name, train



def _take_from_cache(data: dict, key: str, cache_value, default, flag: str, cache: str) -> None:
    """A run trained from a cache takes `key` (a dotted config key) from the cache, unless the config names
    another value: that is a contradiction, refused."""
    *parents, leaf = key.split(".")
    node = data
    for p in parents:
        node = node[p]
    if node[leaf] == cache_value:
        return
    if node[leaf] != default:
        raise ConfigError(f"{key}: {node[leaf]!r}, but the cache at {cache} was made with {cache_value!r}",
                          hint=f"drop {flag} (a run trained from a cache takes it from the cache), or use a cache "
                               f"made with it")
    node[leaf] = cache_value


def _check_cache(cfg: TrainConfig, data: dict) -> int:
    """The cache exists, has shards, and agrees with the run: hook, width, model, corpus, context (the last three
    are taken from the cache when the config leaves them at their defaults). Returns the hook's width."""
    from saelab.activations.format import read_manifest
    from saelab.config import SAEConfig, from_dict
    from saelab.data.corpus import CorpusSpec

    manifest = read_manifest(cfg.cache)
    spec = manifest["spec"]
    hooks = spec["hooks"]
    defaults = TrainConfig()
    _take_from_cache(data, "model.name", spec["model"]["name"], ModelSpec().name, "--model", cfg.cache)
    _take_from_cache(data, "model.dtype", spec["model"]["dtype"], ModelSpec().dtype, "--model-dtype", cfg.cache)
    _take_from_cache(data, "corpus", spec["corpus"], dataclasses.asdict(CorpusSpec()), "--dataset", cfg.cache)
    _take_from_cache(data, "context_size", spec["context_size"], defaults.context_size, "--context-size", cfg.cache)

    hook = data["sae"]["hook_name"]
    if not hook:
        if len(hooks) == 1:
            hook = hooks[0]
        else:
            middle = default_hook_name(data["model"]["name"])
            if middle not in hooks:
                raise CacheError(f"the cache at {cfg.cache} holds {len(hooks)} hooks ({', '.join(hooks)}) and not "
                                 f"the default {middle}", hint="pass --hook with one of them")
            hook = middle
    if hook not in hooks:
        raise CacheError(f"the cache at {cfg.cache} has no hook {hook!r}; it holds {', '.join(hooks)}",
                         hint=f"pass --hook with one of them, or write a cache of that hook with "
                              f"`saelab cache --hooks {hook} --out DIR`")
    target = cfg.sae.target_hook
    if target and target not in hooks:
        raise CacheError(f"--target-hook {target}: the cache at {cfg.cache} has no hook {target!r}; it holds "
                         f"{', '.join(hooks)}",
                         hint=f"a transcoder reads both hooks from one cache: write one with `saelab cache --hooks "
                              f"{hook},{target} --out DIR`")
    data["sae"]["hook_name"] = hook
    d_in = int(spec["d_in"][hook])
    if cfg.sae.d_in and cfg.sae.d_in != d_in:
        raise ConfigError(f"sae.d_in: {cfg.sae.d_in}, but {hook} in the cache at {cfg.cache} is {d_in} wide",
                          hint="drop sae.d_in from the config (it is taken from the activations)")
    d_out = {"d_out": int(spec["d_in"][target])} if target else {}
    sae = from_dict(SAEConfig, {**data["sae"], "d_in": d_in, **d_out})  # k <= n_latents and the like, now that the width is known
    check_step_fits(sae, cfg.batch_size, cfg.shard_latents, rank_device(cfg.model.resolved_device()))
    if not manifest["shards"]:
        raise CacheError(f"the cache at {cfg.cache} has no complete shard yet",
                         hint="finish writing it: rerun the `saelab cache` command that made it")
    return d_in


def _check_resume_width(run_dir: Path, hook: str, d_in: int, cache: str, target: str = "",
                        d_out: int = 0) -> None:
    from saelab.training import checkpoint as ckpt

    last = ckpt.latest_checkpoint(run_dir)
    if last is None:
        return
    sae = json.loads((last / ckpt.STATE_JSON).read_text()).get("sae", {})
    if sae.get("d_in") not in (None, d_in) or sae.get("hook_name") not in (None, "", hook):
        raise ConfigError(f"--resume: the checkpoint {last} is an SAE of {sae.get('hook_name')!r} (d_in "
                          f"{sae.get('d_in')}), the cache at {cache} gives {hook!r} (d_in {d_in})",
                          hint="resume with the cache the run was trained on, or start a new run with another --out")
    if target and sae.get("d_out") not in (None, 0, d_out):
        raise ConfigError(f"--resume: the checkpoint {last} is a transcoder to {sae.get('target_hook')!r} (d_out "
                          f"{sae.get('d_out')}), the cache at {cache} gives {target!r} (d_out {d_out})",
                          hint="resume with the cache the run was trained on, or start a new run with another --out")


def _check_out(out: Path) -> None:
    """A run folder can be made (or continued) at `out`."""
    from saelab.activations.writer import check_writable

    check_writable(out, ConfigError)
    entries = {p.name for p in out.iterdir()} if out.is_dir() else set()
    if entries and not entries & RunDir.entries():
        raise ConfigError(f"--out {out} exists, is not empty and is not a run directory",
                          hint="choose another --out (a new or empty directory, or an earlier run's)")


def resolve(cfg: TrainConfig) -> TrainConfig:
    """Check the inputs and fill the defaults that depend on the model or the cache: model (a cache's), hook name,
    run name, output directory. Raises a `SaelabError` before anything is loaded or written."""
    from saelab.config import from_dict, to_dict
    from saelab.data.corpus import CorpusSpec, check_source

    check_layout(cfg.shard_latents, rank_world()[1])  # first: the checks that need no file
    if cfg.wandb:
        from saelab.training.tracking import require_wandb

        require_wandb()
    data = to_dict(cfg)
    data["model"]["name"] = model_id(cfg.model.name)  # a local folder by its absolute path (what the SAE records)
    if cfg.source == "stream" and cfg.cache:
        raise ConfigError(f"source: 'stream', but a cache is given ({cfg.cache})",
                          hint="drop --cache to stream activations from the model, or --source to read the cache")
    d_in = None
    if cfg.cache and cfg.source != "stream":
        d_in = _check_cache(cfg, data)
        if cfg.sae.target_hook:
            from saelab.activations.format import read_manifest

            d_out = int(read_manifest(cfg.cache)["spec"]["d_in"][cfg.sae.target_hook])
    else:
        locate_model(cfg.model.name)
        check_source(cfg.corpus, "train")
        if not cfg.sae.hook_name:
            data["sae"]["hook_name"] = default_hook_name(cfg.model.name)
    if cfg.eval_tokens:  # the final evaluation needs the model and the validation split: fail now, not after training
        locate_model(data["model"]["name"])
        try:
            check_source(from_dict(CorpusSpec, data["corpus"]), "validation")
        except DataError as e:
            raise DataError(f"{e.message} (the final evaluation reads it)",
                            hint=f"--eval-tokens 0 skips the evaluation; {e.hint}") from None
    data["sae"]["model_name"] = data["model"]["name"]
    if not cfg.name:
        data["name"] = default_run_name(from_dict(TrainConfig, data))
    if not cfg.out:
        data["out"] = str(Path("runs") / data["name"])
    _check_out(Path(data["out"]))
    if d_in is not None and cfg.resume:
        _check_resume_width(Path(data["out"]), data["sae"]["hook_name"], d_in, cfg.cache, cfg.sae.target_hook,
                            d_out if cfg.sae.target_hook else 0)
    return from_dict(TrainConfig, data)


def make_source(cfg: TrainConfig, rank: int = 0, world: int = 1, progress: bool = True):
    """An `ActivationCache` (given, or written into the run directory by rank 0 and resumed if half-written) or a
    stream; rank r of `world` gets its own disjoint part of the data."""
    from saelab.activations import ActivationCache, stream_activations, write_cache
    from saelab.config import CacheConfig
    from saelab.sae.architectures import get_architecture

    grads = get_architecture(cfg.sae.architecture).needs_grads  # g-SAE: LM-loss gradients ride with the batches
    target = cfg.sae.target_hook or None  # a transcoder's target rows ride with them too
    if cfg.source != "stream":
        cache_dir = Path(cfg.cache) if cfg.cache else RunDir(cfg.out).cache
        with all_or_none():  # the other ranks wait for rank 0's cache (and stop with it if it cannot be made)
            if not cfg.cache and rank_world()[0] == 0:
                hooks = list(dict.fromkeys([cfg.sae.hook_name, target or cfg.sae.hook_name]))
                write_cache(CacheConfig(model=cfg.model, corpus=cfg.corpus, hooks=hooks,
                                        out=str(cache_dir), tokens=cfg.cache_tokens, context_size=cfg.context_size,
                                        with_grads=grads), progress=progress)
        with all_or_none():  # e.g. a cache with fewer blocks of rows than there are ranks
            return ActivationCache(cache_dir, hook_name=cfg.sae.hook_name, batch_size=cfg.batch_size, seed=cfg.seed,
                                   rank=rank, world_size=world, with_grads=grads, target_hook=target)
    from saelab.models import load_model

    with all_or_none():
        model = load_model(cfg.model.name, device=rank_device(cfg.model.resolved_device()), dtype=cfg.model.dtype)
        return stream_activations(model, cfg.sae.hook_name, corpus=cfg.corpus, context_size=cfg.context_size,
                                  batch_size=cfg.batch_size, seed=cfg.seed, rank=rank, world_size=world,
                                  with_grads=grads, target_hook=target)


def prepare(cfgs: list[TrainConfig], source_cfg, check=None, progress: bool = True):
    """Resolve every config (and `check` them together), then make the one batch source from `source_cfg(cfgs)`;
    a refusal before training leaves no new folder at the run's (or sweep's) root. → (resolved configs, source)."""
    rank = rank_world()[0]
    with all_or_none():
        cfgs = [resolve(c) for c in cfgs]
        if check is not None:
            check(cfgs)
    src = source_cfg(cfgs)
    root = Path(src.out)
    fresh = not root.exists()
    try:
        return cfgs, make_source(src, *data_position(src.shard_latents), progress)
    except SaelabError:
        if fresh and rank == 0:  # refused before training began: leave no half-made run folder behind
            shutil.rmtree(root, ignore_errors=True)
        raise


def run_training(cfg: TrainConfig, progress: bool = True) -> TrainResult:
    """Check the settings, get the batches and train one SAE (under torchrun: this rank's part of it)."""
    (cfg,), source = prepare([cfg], lambda cfgs: cfgs[0], progress=progress)
    return train(cfg, source, run_dir=cfg.out, progress=progress, device=rank_device(cfg.model.resolved_device()))
