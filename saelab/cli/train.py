"""`saelab train`: parse the flags, call `saelab.api.train` (one SAE or a sweep, then the closing core evaluation),
print what it did."""

from __future__ import annotations

import argparse
import json

DESCRIPTION = ("Train a sparse autoencoder. With no arguments: a TopK SAE (16× width, k=32) on the reference model's "
               "middle residual stream over the standard-library corpus, in a few minutes on 2 CPU cores; then print "
               "its core metrics.")
ARCH_GROUP = "architecture options (set with --arch; `--arch NAME --help` shows one architecture's)"


def add_train(sub) -> None:
    p = sub.add_parser("train", help="train an SAE (default: TopK 16×, k=32, reference model, middle residual stream)",
                       description=DESCRIPTION, add_help=False)
    _add_train_flags(p)


def _add_train_flags(p: argparse.ArgumentParser, arch: str | None = None) -> None:
    """The command's flags: TrainConfig's settings, then every architecture's options (with `arch`: that one's)."""
    from saelab.config import TrainConfig
    from saelab.sae.architectures import registry
    from saelab.settings import add_flags

    p.add_argument("-h", "--help", action=_ArchHelp, help="show this help (after --arch NAME: that architecture's)")
    p.add_argument("--config", help="a YAML/JSON TrainConfig; flags override it")
    add_flags(p, TrainConfig, listed={"sae.architecture": [n for n, a in registry().items() if a.trainable]})
    p.add_argument("--architecture", dest="arch", help=argparse.SUPPRESS)  # the older spelling of --arch
    p.add_argument("--sweep", metavar="FILE",
                   help="train several SAEs on the same batches, reading the activations once: a YAML/JSON file of "
                        "shared settings and `saes`, a list of per-SAE overrides, e.g. {cache: CACHE, tokens: 2e6, "
                        "out: runs/sweep, saes: [{name: a, sae: {k: 32}}, {name: b, sae: {architecture: batchtopk}}]}; "
                        "each SAE gets its run folder OUT/NAME; flags set the shared settings; with --resume, every "
                        "SAE restarts from their newest common checkpoint")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    _add_arch_option_flags(p, arch)


class _ArchHelp(argparse.Action):
    """--help that, after --arch NAME, describes that architecture and lists only its options: the help of a parser
    built for that architecture alone."""

    def __init__(self, option_strings, dest=argparse.SUPPRESS, default=argparse.SUPPRESS, help=None):
        super().__init__(option_strings, dest=dest, default=default, nargs=0, help=help)

    def __call__(self, parser, namespace, values, option_string=None):
        from saelab.sae.architectures import registry

        name = getattr(namespace, "arch", None)
        if name in registry():
            parser = argparse.ArgumentParser(prog=parser.prog, description=parser.description, add_help=False)
            _add_train_flags(parser, arch=name)
        parser.print_help()
        parser.exit()


def _arch_option_flags() -> dict:
    """Option name → (its `Flag`, the trainable architectures that have it), over every trainable architecture
    (an option several share, such as threshold_momentum, once)."""
    from saelab.sae.architectures import registry
    from saelab.settings import flags

    out: dict = {}
    for name, arch in registry().items():
        if arch.trainable:
            for flag in flags(arch.Options):
                out.setdefault(flag.name, (flag, []))[1].append(name)
    return out


def _add_arch_option_flags(p: argparse.ArgumentParser, arch: str | None = None) -> None:
    """One `--x` (a bool: `--x/--no-x`) per architecture option; with `arch`, only that architecture's, under its
    description."""
    from saelab.sae.architectures import get_architecture
    from saelab.settings import add_flag, flags

    description = None
    if arch is not None:
        a = get_architecture(arch)
        mine = {f.name for f in flags(a.Options)}
        description = f"{a.name}: {a.help}" + ("" if mine else " (no options of its own)")
    group = p.add_argument_group(ARCH_GROUP, description)
    for opt, (flag, archs) in _arch_option_flags().items():
        if arch is None or opt in mine:
            add_flag(group, flag, options=True, note=f"[{', '.join(archs)}] ")


def _settings(args) -> dict:
    """The settings given as flags, by keyword name (TrainConfig's and the architecture options), for
    `saelab.api.train`."""
    from saelab.config import TrainConfig
    from saelab.settings import flag_values

    given = flag_values(args, TrainConfig)
    given.update({opt: getattr(args, opt) for opt in _arch_option_flags() if getattr(args, opt, None) is not None})
    return given


def run_train(args) -> int:
    """Train (under torchrun: every rank its part of each batch, in one process group); rank 0 prints what was
    trained, then the closing evaluation's metrics."""
    from saelab.api import train
    from saelab.eval.core import format_core

    runs = train(args.config, progress=not args.no_progress, sweep=args.sweep, **_settings(args))
    if runs is None:  # another rank than 0 under torchrun
        return 0
    runs = runs if isinstance(runs, list) else [runs]
    for run in runs:
        print(_trained(run))
    for run in runs:
        if run.config.eval_tokens:  # evaluated by saelab.api.train
            print(format_core(run.core))
            print(f"wrote {run.dir.core}")
    return 0


def _trained(run) -> str:
    """'trained RUN/sae: steps, tokens; FVU, L0, dead %' from the SAE's training record (saelab.json)."""
    from saelab.sae.saelens import SAELAB_FILE

    training = json.loads((run.dir.sae / SAELAB_FILE).read_text())["training"]
    last, window = training["final_metrics"], training.get("dead_token_threshold")
    return (f"trained {run.dir.sae}: {training['steps']:,} steps, {training['tokens']:,} tokens; "
            f"FVU {last.get('fvu', float('nan')):.4f}, L0 {last.get('l0', float('nan')):.1f}, "
            f"dead {last.get('dead_pct', float('nan')):.2f} %"
            + (f" (silent for the last {window:,} training tokens)" if window else ""))
