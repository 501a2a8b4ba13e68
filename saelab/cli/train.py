"""`saelab train`: one SAE or a sweep, then the closing core evaluation."""

from __future__ import annotations

import argparse
import json

from saelab.cli.eval import _evaluate
from saelab.cli.flags import _add_model_flags, _add_table_flags, _table_overrides, parse_count


TRAIN_FLAGS = {  # flag → (config key, type, help)
    "--hook": ("hook_name", str, "hook to train on (default: the middle residual stream, blocks.{L//2}.hook_resid_pre)"),
    "--dataset": ("corpus.source", str, "corpus: 'stdlib' (default), an HF dataset name or a local path"),
    "--text-field": ("corpus.text_field", str, "text field of dataset rows (default: text)"),
    "--n-latents": ("sae.n_latents", int, "SAE width (default: 16 × d_in)"),
    "--expansion-factor": ("sae.expansion_factor", int, "width as a multiple of d_in when --n-latents is not given (16)"),
    "--k": ("sae.k", int, "active latents per token (32)"),
    "--arch": ("sae.architecture", str, "topk (default), batchtopk, matryoshka, gtopk, mp, mutual, "
                                        "feature_choice, relu or gated; "
                                        "`saelab train --arch NAME --help` lists its options"),
    "--normalize": ("sae.normalize", str, "input normalisation: scale (default; folded at save), layer_norm or none"),
    "--k-aux": ("sae.k_aux", int, "AuxK latents (default d_in // 2)"),
    "--aux-coef": ("sae.aux_coef", float, "AuxK loss coefficient (1/32)"),
    "--tokens": ("tokens", parse_count, "training tokens, e.g. 20M for a full-quality SAE (default 2M: a first look in ~4 minutes on 2 CPU cores)"),
    "--batch-size": ("batch_size", int, "tokens per step per process (4096)"),
    "--lr": ("lr", float, "learning rate (default 2e-4 / sqrt(n_latents / 2^14))"),
    "--dead-tokens": ("dead_tokens", parse_count, "a latent silent this many tokens is dead (default min(10M, tokens/4))"),
    "--out": ("out", str, "run directory (default runs/<name>)"),
    "--name": ("name", str, "run name (default <model>-<hook>-<arch>-k<k>)"),
    "--cache": ("cache", str, "train from this existing activation cache"),
    "--source": ("source", str, "auto (default: the --cache, else a cache made in the run directory) or stream"),
    "--cache-tokens": ("cache_tokens", parse_count, "size of the cache made when none is given (1M)"),
    "--context-size": ("context_size", int, "tokens per row (128)"),
    "--seed": ("seed", int, "seed (0)"),
    "--checkpoint-every": ("checkpoint_every", int, "steps between checkpoints (200)"),
    "--eval-tokens": ("eval_tokens", parse_count, "held-out tokens for the final core metrics (64k; 0 skips)"),
    "--threads": ("threads", int, "torch CPU threads (default: torch's)"),
    "--wandb": ("wandb", str, "log to this Weights & Biases project: the config, the metrics of metrics.jsonl and "
                              "the closing core metrics, one wandb run per SAE (rank 0 under torchrun); "
                              "WANDB_MODE=offline writes them to disk for `wandb sync`"),
}


def add_train(sub) -> None:
    p = sub.add_parser("train", help="train an SAE (default: TopK 16×, k=32, reference model, middle residual stream)",
                       description="Train a sparse autoencoder. With no arguments: a TopK SAE (16× width, k=32) on "
                                   "the reference model's middle residual stream over the standard-library corpus, "
                                   "in a few minutes on 2 CPU cores; then print its core metrics.")
    p.add_argument("--config", help="a YAML/JSON TrainConfig; flags override it")
    _add_model_flags(p, defaults=False)
    _add_table_flags(p, TRAIN_FLAGS)
    p.add_argument("--architecture", dest="arch", help=argparse.SUPPRESS)  # the older spelling of --arch
    p.add_argument("--resume", action="store_true", default=None, help="continue from the run's last checkpoint")
    p.add_argument("--sweep", metavar="FILE",
                   help="train several SAEs on the same batches, reading the activations once: a YAML/JSON file of "
                        "shared settings and `saes`, a list of per-SAE overrides, e.g. {cache: CACHE, tokens: 2e6, "
                        "out: runs/sweep, saes: [{name: a, sae: {k: 32}}, {name: b, sae: {architecture: batchtopk}}]}; "
                        "each SAE gets its run folder OUT/NAME; flags set the shared settings; with --resume, every "
                        "SAE restarts from their newest common checkpoint")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    _add_arch_option_flags(p)


class _ArchHelp(argparse.Action):
    """--help that, after --arch NAME, describes that architecture and lists only its options."""

    def __init__(self, option_strings, dest=argparse.SUPPRESS, default=argparse.SUPPRESS, help=None):
        super().__init__(option_strings, dest=dest, default=default, nargs=0, help=help)

    def __call__(self, parser, namespace, values, option_string=None):
        from saelab.sae.architectures import get_architecture, option_fields, registry

        name = getattr(namespace, "arch", None)
        if name not in registry():
            parser.print_help()
            parser.exit()
        arch = get_architecture(name)
        keep = {f"--{f.name.replace('_', '-')}" for f in option_fields(name)}
        for group in parser._action_groups:
            if group.title == ARCH_GROUP:
                drop = [a for a in group._group_actions if not set(a.option_strings) & keep]
                group._group_actions = [a for a in group._group_actions if a not in drop]
                parser._actions = [a for a in parser._actions if a not in drop]  # and out of the usage line
                group.description = f"{arch.name}: {arch.help}" + ("" if keep else " (no options of its own)")
        parser.print_help()
        parser.exit()


ARCH_GROUP = "architecture options (set with --arch; `--arch NAME --help` shows one architecture's)"


def _add_arch_option_flags(p: argparse.ArgumentParser) -> None:
    """One flag per option of any architecture (shared names, such as threshold_momentum, appear once)."""
    import dataclasses

    from saelab.sae.architectures import option_fields, registry

    for action in p._actions:
        if "-h" in action.option_strings:
            p._remove_action(action)
            for group in p._action_groups:
                if action in group._group_actions:
                    group._group_actions.remove(action)
            p._option_string_actions.pop("-h", None)
            p._option_string_actions.pop("--help", None)
    p.add_argument("-h", "--help", action=_ArchHelp, help="show this help (after --arch NAME: that architecture's)")
    group = p.add_argument_group(ARCH_GROUP)
    seen: dict[str, list[str]] = {}
    fields: dict[str, dataclasses.Field] = {}
    for name, arch in registry().items():
        if not arch.trainable:
            continue
        for f in option_fields(name):
            seen.setdefault(f.name, []).append(name)
            fields.setdefault(f.name, f)
    for opt, archs in seen.items():
        f = fields[opt]
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        kw = {"action": argparse.BooleanOptionalAction} if isinstance(default, bool) else {"metavar": opt.upper()}
        group.add_argument(f"--{opt.replace('_', '-')}", dest=f"archopt_{opt}", default=None,
                           help=f"[{', '.join(archs)}] {f.metadata.get('help', '')} (default {default})", **kw)


def _arch_options(args) -> dict:
    """The architecture options given as flags, as SAEConfig.options overrides."""
    return {k[len("archopt_"):]: v for k, v in vars(args).items() if k.startswith("archopt_") and v is not None}


def _train_overrides(args) -> dict:
    overrides = _table_overrides(args, TRAIN_FLAGS)
    overrides.update({"resume": args.resume})
    options = _arch_options(args)
    if options:
        overrides["sae.options"] = options
    return overrides


def train_config_from_args(args):
    from saelab.config import TrainConfig, load_config

    return load_config(TrainConfig, args.config, _train_overrides(args))


def run_train(args) -> int:
    """Train (under torchrun: every rank its part of each batch, in one process group), then, on rank 0 alone, print
    the summary and run the closing evaluation."""
    from saelab import distributed
    from saelab.training.pipeline import run_training
    from saelab.training.sweep import load_sweep, run_sweep

    if args.sweep:
        cfgs = load_sweep(args.sweep, _train_overrides(args), config=args.config)
    else:
        cfgs = [train_config_from_args(args)]
    with distributed.process_group(cfgs[0].model.resolved_device()):
        if args.sweep:
            results = run_sweep(cfgs, progress=not args.no_progress)
        else:
            results = [run_training(cfgs[0], progress=not args.no_progress)]
    if not distributed.is_main():
        return 0
    for result in results:
        _print_trained(result)
    for cfg, result in zip(cfgs, results):
        metrics = _evaluate(result.run_dir, cfg.eval_tokens) if cfg.eval_tokens else None
        result.close_tracking(metrics.to_dict(per_latent=False) if metrics else None)  # → the wandb run, if any
    return 0


def _print_trained(result) -> None:
    last = result.last
    info = result.run_dir / "sae" / "saelab.json"  # training's dead window: latents silent this many tokens
    window = json.loads(info.read_text()).get("training", {}).get("dead_token_threshold") if info.exists() else None
    print(f"trained {result.run_dir}/sae: {result.steps:,} steps, {result.tokens:,} tokens; "
          f"FVU {last.get('fvu', float('nan')):.4f}, L0 {last.get('l0', float('nan')):.1f}, "
          f"dead {last.get('dead_pct', float('nan')):.2f} %"
          + (f" (silent for the last {window:,} training tokens)" if window else ""))
