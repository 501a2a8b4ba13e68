"""`saelab.train`, `saelab.cache` and `saelab.calibrate`: train SAEs (one or a sweep, then each one's closing core
evaluation), write activation caches, re-fit a thresholded SAE's threshold on other text (`saelab train`,
`saelab cache`, `saelab calibrate`)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from saelab.api.run import Run, as_run
from saelab.data.corpus import SPLITS, CorpusSpec
from saelab.errors import ConfigError
from saelab.settings import as_count, check, parse_count, setting


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
    run = as_run(run)
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
