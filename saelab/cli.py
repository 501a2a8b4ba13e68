"""The `saelab` command. Parses flags into a config, calls the library, prints a short summary; no logic of its own.

Each subcommand is a pair: `add_<name>(subparsers)` declares its flags, `run_<name>(args)` runs it.
"""

from __future__ import annotations

import argparse
import json
import sys


def _add_model_flags(p: argparse.ArgumentParser, defaults: bool = True) -> None:
    """--model/--device/--model-dtype; without defaults (None) when a --config file may set them instead."""
    p.add_argument("--model", default="reference" if defaults else None,
                   help="'reference' (embedded, default), a hub name such as gpt2, or a local model directory")
    p.add_argument("--device", default="cpu" if defaults else None, help="cpu, cuda[:N] or auto (default: cpu)")
    p.add_argument("--model-dtype", default="float32" if defaults else None,
                   help="float32 (default), float16 or bfloat16")


# ---------------------------------------------------------------------------------------------------- info
def add_info(sub) -> None:
    p = sub.add_parser("info", help="load a model and print a short report: hooks and held-out loss",
                       description="Load a model (the embedded reference model by default) and report its shape, "
                                   "its residual-stream hooks and its held-out loss on the corpus.")
    _add_model_flags(p)
    p.add_argument("--dataset", default="stdlib", help="corpus: 'stdlib' (default), an HF dataset or a local path")
    p.add_argument("--rows", type=int, default=32, help="validation rows to score (default 32)")
    p.add_argument("--context-size", type=int, default=128, help="tokens per row (default 128)")


def _model_spec(args):
    """The --model/--device/--model-dtype flags, checked before anything is loaded."""
    from saelab.config import ModelSpec

    return ModelSpec(name=args.model, device=args.device, dtype=args.model_dtype)


def run_info(args) -> int:
    from saelab.config import check
    from saelab.data.corpus import CorpusSpec, check_source
    from saelab.errors import DataError
    from saelab.models import load_model, quality
    from saelab.models.loading import hook_names

    spec = _model_spec(args)
    check(args.rows > 0, "--rows", f"must be > 0, got {args.rows}")
    check(args.context_size >= 2, "--context-size", f"must be >= 2, got {args.context_size}")
    corpus = CorpusSpec(args.dataset)
    check_source(corpus, "validation")
    model = load_model(spec.name, device=spec.resolved_device(), dtype=spec.dtype)
    cfg = model.cfg
    check(args.context_size <= cfg.n_ctx, "--context-size",
          f"must be <= the model's context ({cfg.n_ctx}), got {args.context_size}")
    names = hook_names(model)
    resid = [h for h in names if h.endswith(("hook_resid_pre", "hook_resid_post", "hook_resid_mid"))]
    print(f"model      {args.model}: {cfg.n_layers} layers, d_model {cfg.d_model}, vocab {cfg.d_vocab}, "
          f"context {cfg.n_ctx}")
    print(f"hooks      {len(names)} in all; residual stream: {', '.join(resid[:6])}{' …' if len(resid) > 6 else ''}")
    print(f"           middle residual stream: blocks.{cfg.n_layers // 2}.hook_resid_pre "
          f"(= blocks.{cfg.n_layers // 2 - 1}.hook_resid_post)")
    r = quality.bits_per_byte(model, model.tokenizer, corpus, "validation",
                              context_size=args.context_size, max_rows=args.rows)
    if not r["tokens"]:
        raise DataError(f"dataset {args.dataset!r}: its validation split holds less than one row of "
                        f"{args.context_size} tokens", hint="use a larger dataset or a smaller --context-size")
    print(f"held-out   {r['nats_per_token']:.4f} nats/token, {r['bits_per_byte']:.4f} bits/byte "
          f"over {r['tokens']:,} tokens of the validation split")
    return 0


# ---------------------------------------------------------------------------------------------------- hooks
def add_hooks(sub) -> None:
    p = sub.add_parser("hooks", help="list every hook name of a model", description="List every valid hook name.")
    _add_model_flags(p)
    p.add_argument("--grep", default="", help="only names containing this text")


def run_hooks(args) -> int:
    from saelab.models import load_model
    from saelab.models.loading import hook_names

    spec = _model_spec(args)
    for name in hook_names(load_model(spec.name, device=spec.resolved_device(), dtype=spec.dtype)):
        if args.grep in name:
            print(name)
    return 0


# ---------------------------------------------------------------------------------------------------- reference
def add_reference(sub) -> None:
    p = sub.add_parser("reference", help="the embedded reference model's recipe",
                       description="Rebuild the embedded reference model with its seeded recipe.")
    rsub = p.add_subparsers(dest="reference_cmd", required=True)
    t = rsub.add_parser("train", help="train the reference model (tokenizer + GPT-2) from the corpus",
                        description="Train the byte-level BPE tokenizer and the GPT-2-architecture reference model "
                                    "on the train split, then measure it and write MODEL_CARD.md.")
    t.add_argument("--out", required=True, help="output directory (a Hugging Face model directory)")
    from saelab.models.train_reference import ReferenceRecipe

    d = ReferenceRecipe(out="")
    for name in ("steps", "n_layer", "n_embd", "n_head", "n_ctx", "batch_rows", "vocab_size", "seed", "threads",
                 "warmup_steps", "schedule_steps", "checkpoint_every"):
        t.add_argument(f"--{name.replace('_', '-')}", type=int, default=getattr(d, name),
                       help=f"default {getattr(d, name)}")
    t.add_argument("--lr", type=float, default=d.lr, help=f"peak learning rate (default {d.lr})")
    t.add_argument("--dataset", default="stdlib", help="corpus (default: stdlib)")
    t.add_argument("--init-from", default="", help="continue from this model directory (weights + tokenizer)")
    t.add_argument("--decay", default=d.decay, choices=["cosine", "linear"], help="lr decay shape (cosine)")
    t.add_argument("--save-dtype", default=d.save_dtype, help="dtype of the saved weights (float16)")
    t.add_argument("--precision", default=d.precision, choices=["auto", "bfloat16", "float32"],
                   help="bfloat16: autocast with float32 master weights; auto (default): bfloat16 where the "
                        "hardware has it (CUDA, AMX/AVX512-BF16 CPUs), else float32")
    t.add_argument("--repeat-frac", type=float, default=d.repeat_frac,
                   help="fraction of rows that repeat their opening span, to teach in-context copying "
                        f"(default {d.repeat_frac})")
    t.add_argument("--random-repeat-frac", type=float, default=d.random_repeat_frac,
                   help="fraction of rows that open with a repeated random token sequence (the synthetic "
                        f"induction task; default {d.random_repeat_frac})")
    t.add_argument("--no-compile", dest="compile", action="store_false",
                   help="skip torch.compile (it costs ~30 s up front and makes each step ~1.6x faster on CPU)")
    t.add_argument("--device", default=d.device, help="auto (cuda when available, default), cpu or cuda")


def run_reference(args) -> int:
    from saelab.data.corpus import CorpusSpec
    from saelab.models.train_reference import ReferenceRecipe, train_reference

    recipe = ReferenceRecipe(out=args.out, steps=args.steps, n_layer=args.n_layer, n_embd=args.n_embd,
                             n_head=args.n_head, n_ctx=args.n_ctx, batch_rows=args.batch_rows,
                             vocab_size=args.vocab_size, seed=args.seed, threads=args.threads, lr=args.lr,
                             warmup_steps=args.warmup_steps, schedule_steps=args.schedule_steps,
                             init_from=args.init_from, decay=args.decay, save_dtype=args.save_dtype,
                             precision=args.precision, compile=args.compile, device=args.device,
                             checkpoint_every=args.checkpoint_every, repeat_frac=args.repeat_frac,
                             random_repeat_frac=args.random_repeat_frac)
    report = train_reference(recipe, CorpusSpec(args.dataset))
    print(json.dumps(report["validation"], indent=1))
    return 0


def _add_table_flags(p: argparse.ArgumentParser, table: dict) -> None:
    for flag, (_, typ, help_) in table.items():
        p.add_argument(flag, type=typ, default=None, help=help_)


def _table_overrides(args, table: dict) -> dict:
    """Config overrides ({dotted key: value}) from the flags of a table; unset flags are None and ignored."""
    overrides = {key: getattr(args, flag[2:].replace("-", "_")) for flag, (key, _, _) in table.items()}
    overrides.update({"model.name": args.model, "model.device": args.device, "model.dtype": args.model_dtype})
    return overrides


# ---------------------------------------------------------------------------------------------------- train
def parse_count(text: str) -> int:
    """'20M' → 20_000_000, '500k' → 500_000, '1.5G', '4096'."""
    t = str(text).strip().lower().replace("_", "")
    mult = {"k": 10 ** 3, "m": 10 ** 6, "g": 10 ** 9, "b": 10 ** 9}.get(t[-1:], 1)
    try:
        return int(float(t[:-1] if mult > 1 else t) * mult)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a count: {text!r} (use e.g. 20M, 500k or 4096)") from None


TRAIN_FLAGS = {  # flag → (config key, type, help)
    "--hook": ("hook_name", str, "hook to train on (default: the middle residual stream, blocks.{L//2}.hook_resid_pre)"),
    "--dataset": ("corpus.source", str, "corpus: 'stdlib' (default), an HF dataset name or a local path"),
    "--text-field": ("corpus.text_field", str, "text field of dataset rows (default: text)"),
    "--n-latents": ("sae.n_latents", int, "SAE width (default: 16 × d_in)"),
    "--expansion-factor": ("sae.expansion_factor", int, "width as a multiple of d_in when --n-latents is not given (16)"),
    "--k": ("sae.k", int, "active latents per token (32)"),
    "--arch": ("sae.architecture", str, "topk (default), batchtopk, matryoshka, gtopk, mp, mutual or "
                                        "feature_choice; "
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


# ---------------------------------------------------------------------------------------------------- eval
def add_eval(sub) -> None:
    p = sub.add_parser("eval", help="core metrics of a trained SAE → RUN/eval/core.json",
                       description="Score a trained SAE on held-out text: explained variance, FVU, MSE, L0, dead "
                                   "and dense latents, CE and KL with the SAE spliced in, loss recovered (zero and "
                                   "mean ablation), ΔCE. Writes RUN/eval/core.json. A g-SAE (gtopk) is scored "
                                   "twice on the same tokens: with the LM-loss gradient at the hook (its own "
                                   "selection; one backward per batch) and by its TopK fallback, side by side.")
    p.add_argument("run", help="a run directory (with sae/ and config.yaml) or an SAE directory (cfg.json)")
    p.add_argument("--tokens", type=parse_count, default=None,
                   help="held-out tokens (default 64k; probing: 80k of labelled code)")
    p.add_argument("--suite", default="core", choices=["core", "probing", "steering"],
                   help="core (default): RUN/eval/core.json; probing: k-sparse probes on the reference code tasks "
                        "(or --data) vs neuron, random-rotation and dense baselines → RUN/eval/probing.json; "
                        "steering: input and output scores of every latent → RUN/eval/steering_scores.parquet")
    from saelab.eval.probing import DENSE_DENSITY, KS, LEVELS, SELECTIONS

    p.add_argument("--selection", default=SELECTIONS[0], choices=SELECTIONS,
                   help="probing: how the k features are ranked on the probe-train examples: mean_diff (default; "
                        "|mean_pos - mean_neg|, SAEBench), f_stat (ANOVA F: the std-normalised mean difference), "
                        "probe_loss (the loss of a 1-D probe on each feature alone, Gao et al. 2024)")
    p.add_argument("--max-density", type=float, default=None,
                   help="probing: leave out of the selection SAE latents active on more than this share of the "
                        f"probe-train tokens, e.g. {DENSE_DENSITY:g} (default: none left out)")
    p.add_argument("--ks", type=_int_list, default=list(KS),
                   help=f"probing: comma-separated probe sizes k (default {','.join(map(str, KS))})")
    p.add_argument("--data", default=None,
                   help="probing: your labelled data instead of the code tasks: a .jsonl/.csv file or an HF dataset "
                        "with a text and a label column (--level sequence), or a .jsonl file with the text and "
                        "positive character spans per task (--level token), each line like "
                        '{"text": "x = foo(1)", "spans": {"call": [[4, 10]], "number": [[8, 9]]}}')
    p.add_argument("--level", default=LEVELS[0], choices=LEVELS,
                   help="probing --data: sequence (default): one example per text, label per text; token: one "
                        "example per BPE token, positive inside a task's [start, end) character spans (a line "
                        "without a task's key is unlabelled for it)")
    p.add_argument("--text-field", default="text", help="probing --data: the text column (text)")
    p.add_argument("--label-field", default=None,
                   help="probing --data: the label column (label), or at --level token the spans column (spans)")
    p.add_argument("--pooling", default="mean", choices=["mean", "last"],
                   help="probing --data at --level sequence: pool token activations by mean (default) or take the "
                        "last token")


def _int_list(text: str) -> list[int]:
    """'1,2,4' → [1, 2, 4] (argparse type: a bad value is a one-line usage error)."""
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def run_eval(args) -> int:
    from pathlib import Path

    from saelab.config import check

    check(args.tokens is None or args.tokens > 0, "--tokens", f"must be > 0, got {args.tokens}")
    if args.suite == "core":
        _evaluate(args.run, args.tokens or 65_536)
        return 0
    from saelab.eval.probing import format_probing
    from saelab.eval.run import probe_run, score_run
    from saelab.eval.steering import format_scores

    if args.suite == "probing":
        result, path = probe_run(Path(args.run), args.tokens or 80_000, args.selection, args.data, args.text_field,
                                 args.label_field, args.pooling, level=args.level, max_density=args.max_density,
                                 ks=args.ks)
        print(format_probing(result))
    else:
        scores, path = score_run(Path(args.run), args.tokens or 65_536)
        print(format_scores(scores))
    print(f"wrote {path}")
    return 0


def _evaluate(run, tokens: int):
    """Core metrics of a run's SAE, printed and written to RUN/eval/core.json; returns them."""
    from pathlib import Path

    from saelab.eval.core import format_core
    from saelab.eval.run import evaluate_run

    metrics, path = evaluate_run(Path(run), tokens)
    print(format_core(metrics))
    print(f"wrote {path}")
    return metrics


# ---------------------------------------------------------------------------------------------------- cache
CACHE_FLAGS = {  # flag → (config key, type, help)
    "--hooks": ("hooks", str, "comma-separated hook names (default: the middle residual stream, "
                              "blocks.{L//2}.hook_resid_pre); all are captured in one forward pass"),
    "--tokens": ("tokens", parse_count, "cache size in tokens, e.g. 2M, 500k or 20000 (default 1M); a larger value "
                                        "later extends the cache"),
    "--out": ("out", str, "cache directory (default cache/<model>-<hook>); rerunning resumes or extends it"),
    "--dataset": ("corpus.source", str, "corpus: 'stdlib' (default), an HF dataset name or a local path"),
    "--text-field": ("corpus.text_field", str, "text field of dataset rows (default: text)"),
    "--split": ("split", str, "corpus split: train (default), validation or all"),
    "--context-size": ("context_size", int, "tokens per packed row, BOS included (default 128)"),
    "--dtype": ("dtype", str, "storage dtype: float32 (default), float16 or bfloat16 (stored as raw bits, exact)"),
    "--batch-rows": ("batch_rows", int, "rows per model forward (default 32)"),
    "--shard-rows": ("shard_rows", int, "rows per shard, a multiple of --batch-rows (default: ~64 MB files)"),
}


def add_cache(sub) -> None:
    p = sub.add_parser(
        "cache", help="write model activations (and LM-loss gradients) of several hooks to disk; verify a cache",
        description="Run the model once per batch of packed rows, capture every --hooks in that one forward pass "
                    "(stopping after the last layer needed) and write sharded .npy files, token ids and a "
                    "manifest.json with statistics. Crash-safe: rerunning the same command resumes after the last "
                    "complete shard and gives the same bytes as an uninterrupted run; a different spec is refused. "
                    "`saelab cache verify DIR` checks row counts and SHA-256 checksums.",
        epilog="examples:\n  saelab cache --hooks blocks.1.hook_resid_post,blocks.2.hook_resid_post --tokens 2M "
               "--out cache/ref\n  saelab cache --tokens 500k --with-grads --dtype bfloat16 --out cache/grads\n"
               "  saelab cache verify cache/ref\n  saelab cache verify cache/ref --repair",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("action", nargs="?", choices=["write", "verify", "info"], default="write",
                   help="write (default) a cache; verify DIR: check files, row counts and checksums; info DIR: "
                        "describe a cache")
    p.add_argument("path", nargs="?", help="the cache directory, for verify and info")
    p.add_argument("--config", help="a YAML/JSON CacheConfig; flags override it")
    _add_model_flags(p, defaults=False)  # so a --config file's model is not overridden by a default
    _add_table_flags(p, CACHE_FLAGS)
    p.add_argument("--with-grads", action="store_true", default=None,
                   help="also store d(next-token cross-entropy, summed over predicted tokens)/d(activation) per "
                        "hook, from one backward pass per batch (for gradient-TopK SAEs)")
    p.add_argument("--keep-bos", action="store_true", default=None,
                   help="keep position 0 (BOS) as a training row (default: excluded, its norm dwarfs the rest)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--repair", action="store_true",
                   help="with verify: drop the first damaged shard and every later one from the manifest, so that "
                        "rerunning the writing command rewrites them")
    p.add_argument("--no-checksums", action="store_true", help="with verify: check sizes and row counts only")


def cache_config_from_args(args):
    from saelab.config import CacheConfig, load_config

    overrides = _table_overrides(args, CACHE_FLAGS)
    overrides.update({"with_grads": args.with_grads, "exclude_bos": False if args.keep_bos else None})
    return load_config(CacheConfig, args.config, overrides)


def run_cache(args) -> int:
    import time
    from pathlib import Path

    from saelab.activations import describe, repair_cache, verify_cache, write_cache
    from saelab.activations.format import NONFINITE, read_manifest
    from saelab.activations.writer import cache_bytes
    from saelab.errors import ConfigError

    if args.action in ("verify", "info"):
        if not args.path:
            raise ConfigError(f"{args.action}: no cache directory given", hint=f"usage: saelab cache {args.action} DIR")
        if args.action == "info":
            print(describe(read_manifest(args.path)))
            return 0
        manifest, problems = verify_cache(args.path, checksums=not args.no_checksums)
        print(describe(manifest))
        n_files = sum(len(s["files"]) for s in manifest["shards"])
        if not problems:
            print(f"OK: {manifest['n_shards']} shards, {n_files} files, "
                  f"{cache_bytes(Path(args.path), manifest) / 2 ** 20:,.1f} MiB checked"
                  f"{'' if args.no_checksums else ' (sizes, row counts, SHA-256)'}")
            return 0
        for shard, problem in problems:
            print(f"DAMAGED shard {shard}: {problem}")
        first_bad = min(s for s, _ in problems)
        if args.repair:
            repair_cache(args.path, first_bad)
            print(f"repaired: the manifest now ends before shard {first_bad}; rerun the `saelab cache` command "
                  f"that wrote {args.path} to rewrite the dropped shards (identically)")
            return 0
        if all(NONFINITE in problem for _, problem in problems):  # written so: a rewrite would repeat them
            print("fix: the values were written non-finite (rewriting would repeat them): write a new cache under "
                  "another --out with --dtype float32 or bfloat16 (float16 overflows above 65504) or --model-dtype "
                  "float32")
            return 1
        print(f"fix: `saelab cache verify {args.path} --repair` drops shard {first_bad} and the later ones from "
              f"the manifest; then rerun the `saelab cache` command that wrote it")
        return 1
    cfg = cache_config_from_args(args)
    t0 = time.perf_counter()
    before = 0
    if cfg.out and (Path(cfg.out) / "manifest.json").exists():
        before = read_manifest(cfg.out)["n_tokens"]
    path = write_cache(cfg, progress=not args.no_progress)
    elapsed = time.perf_counter() - t0
    manifest = read_manifest(path)
    done = manifest["n_tokens"] - before
    print(f"wrote {path}: {cache_bytes(path, manifest) / 2 ** 20:,.1f} MiB"
          + (f", {done:,} new tokens in {elapsed:.1f} s including model loading ({done / elapsed:,.0f} tokens/s)"
             if done > 0 else
             " (already complete: nothing to do)"))
    print(describe(manifest))
    return 0


# ---------------------------------------------------------------------------------------------------- calibrate
def add_calibrate(sub) -> None:
    p = sub.add_parser(
        "calibrate", help="re-fit a thresholded SAE's inference threshold on your own text (for a target L0)",
        description="BatchTopK, Matryoshka, mutual and feature choice SAEs infer with thresholds calibrated for "
                    "mean L0 = k on their training corpus; on text unlike it the L0 drifts. This re-runs the "
                    "architecture's calibration on activations of --dataset for mean L0 = --target-l0 and writes "
                    "the SAE (weights unchanged, new threshold) to --out. It prints the L0 before and after.",
        epilog="example:\n  saelab calibrate runs/batchtopk --dataset path/to/my/code --target-l0 32",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", help="a run directory (with sae/ and config.yaml) or an SAE directory (cfg.json)")
    p.add_argument("--dataset", required=True,
                   help="your text: a local file or directory (.txt/.py/.md/.jsonl/.parquet) or an HF dataset name")
    p.add_argument("--target-l0", type=float, default=None, help="mean active latents per token (default: the SAE's k)")
    p.add_argument("--tokens", type=parse_count, default=65_536, help="tokens of --dataset to fit on (default 64k)")
    p.add_argument("--split", default="all", choices=["train", "validation", "all"],
                   help="which part of --dataset by saelab's document split (default all)")
    p.add_argument("--out", default=None, help="where to write the SAE (default RUN/calibrated-<dataset name>)")


def run_calibrate(args) -> int:
    from saelab.api import calibrate
    from saelab.config import check

    check(args.tokens > 0, "--tokens", f"must be > 0, got {args.tokens}")
    path, info = calibrate(args.run, args.dataset, target_l0=args.target_l0, tokens=args.tokens, split=args.split,
                           out=args.out)
    print(f"calibrated on {info['tokens']:,} tokens of {args.dataset}: mean L0 {info['l0_before']:.1f} → "
          f"{info['l0_after']:.1f} (target {info['target_l0']:g})")
    print(f"wrote {path}")
    return 0


# ---------------------------------------------------------------------------------------------------- dashboard
def add_dashboard(sub) -> None:
    p = sub.add_parser(
        "dashboard", help="build a run's dashboard bundle (every latent's stats, examples, logits, neighbours)",
        description="One streaming pass of held-out rows (of the SAE's training corpus: its validation split, then "
                    "train rows the SAE never trained on) through the model, stopped at the SAE's hook, then every latent's statistics, "
                    "activation histogram, top / interval / random examples, logit lens, decoder and co-activation "
                    "neighbours, token index, decoder map and the run's evaluator scores, written as a bundle "
                    "(memory-mapped arrays + Parquet + manifest.json) that `saelab explore` and "
                    "saelab.dashboard.open() read. Resumable: rerunning continues a killed build.",
        epilog="examples:\n  saelab dashboard runs/reference-blocks.2.hook_resid_pre-topk-k32\n"
               "  saelab dashboard runs/x --tokens 200k --out /tmp/x-dash",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", help="a run directory (with sae/ and config.yaml) or an SAE directory (cfg.json)")
    p.add_argument("--tokens", type=parse_count, default=1_000_000,
                   help="held-out tokens to scan (default 1M; fewer if the split is shorter)")
    p.add_argument("--out", help="bundle directory (default RUN/dashboard)")
    p.add_argument("--split", default="heldout",
                   help="rows to scan: heldout (default; the validation split, then the train split's rows past "
                        "those the run's training cache holds: fresh rows for >= 1M tokens, the dead-latent count's "
                        "window), validation, train or all")
    p.add_argument("--dataset", help="another corpus: 'stdlib', an HF dataset name or a local path "
                                     "(default: the run's training corpus)")
    p.add_argument("--context-size", type=int, help="tokens per row, BOS included (default: the run's, 128)")
    p.add_argument("--map", default="auto", choices=["auto", "umap", "pca"],
                   help="decoder map: UMAP when umap-learn is installed (auto), else PCA")
    p.add_argument("--device", help="cpu, cuda[:N] or auto (default: the run's)")
    p.add_argument("--force", action="store_true", help="rebuild even if OUT already holds a finished bundle")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def run_dashboard(args) -> int:
    from pathlib import Path

    from saelab.dashboard.build import DashboardSettings
    from saelab.dashboard.run import build_run_bundle, summary

    path = build_run_bundle(Path(args.run), out=args.out, tokens=args.tokens, split=args.split,
                            dataset=args.dataset, context_size=args.context_size,
                            settings=DashboardSettings(map_method=args.map), device=args.device,
                            progress=not args.no_progress, force=args.force)
    print(summary(path))
    return 0


# ---------------------------------------------------------------------------------------------------- patch
def add_patch(sub) -> None:
    p = sub.add_parser(
        "patch", help="activation patching vs attribution patching, RelP and IG on a contrast task → eval/patching",
        description="Patch every component (residual stream, attention and MLP output per layer x position, each "
                    "head; with --sae also every SAE latent and error node) from clean into corrupted prompts, "
                    "estimate the same effects with attribution patching, RelP and integrated gradients, and report "
                    "their Pearson r against activation patching per component type, plus a sparse feature "
                    "circuit's faithfulness/completeness curve. Writes patching-<task>.json and .html (Plotly).",
        epilog="examples:\n  saelab patch --task bracket\n  saelab patch --task copy --sae runs/x --method all\n"
               "  saelab patch --task pairs.jsonl --method activation,relp --relp-rules ln,identity",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_model_flags(p)
    p.add_argument("--task", default="bracket",
                   help="bracket (default), copy, quote, ioi (GPT-2-style English models), or a .jsonl file of "
                        "{clean, corrupted, answer, wrong} pairs")
    p.add_argument("--pairs", type=int, default=32, help="prompt pairs (default 32)")
    p.add_argument("--method", default="all",
                   help="comma list of activation, attribution, relp, ig, or all (default)")
    p.add_argument("--components", default="resid,attn,mlp,head", help="comma list of resid, attn, mlp, head")
    p.add_argument("--relp-rules", default="ln,identity,half",
                   help="RelP rules: comma list of ln, attn, identity, half, or none (default ln,identity,half)")
    p.add_argument("--ig-steps", type=int, default=10, help="integrated-gradients steps (default 10)")
    p.add_argument("--sae", action="append", default=[],
                   help="a run directory or SAE directory to splice in (repeat for several hooks)")
    p.add_argument("--circuit-method", default="ig", help="estimator that ranks circuit nodes (default ig)")
    p.add_argument("--max-ap-nodes", type=int, default=2000,
                   help="SAE nodes patched one by one for the ground truth (a seeded sample when more change)")
    p.add_argument("--seed", type=int, default=0, help="task sampling seed (0)")
    p.add_argument("--out", help="output directory (default: RUN/eval/patching of the first --sae run, else "
                                 "eval/patching)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def run_patch(args) -> int:
    from saelab.eval.patching_report import format_report, load_saes, patch_settings, run_patching, write_report
    from saelab.models import load_model

    st = patch_settings(args.method, args.components, args.relp_rules, args.pairs, args.ig_steps,
                        args.circuit_method, args.sae, args.task)
    model = load_model(args.model, device=args.device, dtype=args.model_dtype)
    report = run_patching(model, args.task, args.pairs, st.methods, st.kinds, st.rules, args.ig_steps,
                          load_saes(model, st.saes), args.circuit_method, args.seed, progress=not args.no_progress,
                          max_ap_nodes=args.max_ap_nodes)
    jpath, hpath = write_report(report, args.out or st.default_out or "eval/patching")
    print(format_report(report))
    print(f"wrote {jpath} and {hpath}")
    return 0


# ---------------------------------------------------------------------------------------------------- explore
def add_explore(sub) -> None:
    p = sub.add_parser(
        "explore", help="open the feature explorer (Streamlit + Plotly) on dashboard bundles",
        description="Start the local feature explorer: overview, a page per latent, finder, prompt view, steering "
                    "and compare, reading the bundles `saelab dashboard` wrote. Offline; bound to 127.0.0.1 unless "
                    "--host says otherwise. Every view is a deep link (the URL holds its state).",
        epilog="examples:\n  saelab explore                      every bundle under runs/\n"
               "  saelab explore runs/a runs/b        two runs (compare them on the Compare page)\n"
               "  saelab explore runs/a/dashboard --port 8600",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("paths", nargs="*", help="run folders, dashboard bundles or folders of runs (default: runs/)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8501, help="port (default 8501)")
    p.add_argument("--open", action="store_true", help="open a browser tab as well")


def explorer_script():
    """app/explore.py of the source checkout this saelab runs from (the app is not part of the wheel)."""
    from pathlib import Path

    from saelab.errors import ConfigError

    script = Path(__file__).resolve().parent.parent / "app" / "explore.py"
    if not script.exists():
        raise ConfigError(f"the explorer app is not next to this saelab (no {script})",
                          hint="install saelab from a source checkout: git clone …; pip install -e .")
    return script


def run_explore(args) -> int:
    import os
    import subprocess
    from pathlib import Path

    from saelab.config import check
    from saelab.errors import DataError

    check(0 < args.port < 65536, "--port", f"must be in 1..65535, got {args.port}")
    paths = args.paths or ["runs"]
    for p in paths:
        if not Path(p).exists():
            raise DataError(f"{p} does not exist", hint="pass a run folder with a bundle (build one with "
                                                        "`saelab dashboard RUN`) or a bundle folder")
    env = {**os.environ, "SAELAB_EXPLORE": json.dumps([str(Path(p).resolve()) for p in paths])}
    cmd = [sys.executable, "-m", "streamlit", "run", str(explorer_script()), "--server.address", args.host,
           "--server.port", str(args.port), "--server.headless", str(not args.open).lower(),
           "--browser.gatherUsageStats", "false", "--client.showErrorDetails", "none",
           "--server.fileWatcherType", "none", "--client.toolbarMode", "minimal"]
    print(f"explorer   http://{args.host}:{args.port}  ({', '.join(paths)}; Ctrl+C stops it)", flush=True)
    if hasattr(os, "execve"):  # become the server: a signal to this process (Ctrl+C, terminate) reaches it
        os.execve(sys.executable, cmd, env)
    return subprocess.call(cmd, env=env)


# ---------------------------------------------------------------------------------------------------- steer
def add_steer(sub) -> None:
    p = sub.add_parser(
        "steer", help="steer generation with SAE latents: steered vs unsteered text, or a strength sweep",
        description="Add α × (the largest latent activation at that position, as Arad et al. 2025) × the "
                    "latent's decoder direction at the SAE's hook on every position while generating, and print "
                    "the steered and unsteered continuations of --prompt. "
                    "--sweep measures concept success (generated tokens among the latent's top logit-lens tokens) "
                    "and fluency (the unsteered model's loss on the steered text) over a strength grid and writes "
                    "RUN/eval/steer_sweep_<latents>.json and .html.",
        epilog="examples:\n  saelab steer runs/NAME --latent 123 --alpha 4 --prompt 'def '\n"
               "  saelab steer runs/NAME --latent 123 --latent 7 --alpha 2 --prompt 'import '\n"
               "  saelab steer runs/NAME --latent 123 --sweep",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", help="a run directory (with sae/) or an SAE directory")
    p.add_argument("--latent", type=int, action="append", required=True,
                   help="latent index; repeat to steer several at once")
    p.add_argument("--alpha", type=float, action="append", default=None,
                   help="strength in units of --strength-scale (default 4); one, or one per --latent; with "
                        "--sweep, several give the grid (default: the paper's 0, 0.2, 0.4, 0.8, 1.2, 1.6, 2, 3, 4, "
                        "6, 8, 10, 20)")
    p.add_argument("--strength-scale", default="position", choices=["position", "corpus"],
                   help="what α multiplies: position (default, the paper's rule): the largest latent activation "
                        "of the SAE at each steered position; corpus: the latent's own largest activation over "
                        "held-out text (RUN/eval/steering_scores.parquet, else a 16k-token pass)")
    p.add_argument("--prompt", default="", help="text to continue (default: a newline; --sweep: 8 neutral code "
                                                "prefixes)")
    p.add_argument("--max-new-tokens", type=int, default=30, help="tokens to generate (30)")
    p.add_argument("--temperature", type=float, default=0.7, help="sampling temperature; 0 = greedy (0.7)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (0)")
    p.add_argument("--mode", default="add", choices=["add", "clamp"],
                   help="add (default): add α·scale·d_f; clamp: set the latent to α·scale, SAE error term kept")
    p.add_argument("--sweep", action="store_true", help="concept success and fluency over a strength grid")


def run_steer(args) -> int:
    from pathlib import Path

    from saelab.eval.run import format_steer, steer_run

    result, paths = steer_run(Path(args.run), args.latent, args.alpha or [4.0], args.prompt, args.max_new_tokens,
                              args.temperature, args.seed, args.sweep, args.mode,
                              strength_scale=args.strength_scale)
    print(format_steer(result))
    for path in paths:
        print(f"wrote {path}")
    return 0


# ---------------------------------------------------------------------------------------------------- bench
def add_bench(sub) -> None:
    p = sub.add_parser(
        "bench", help="benchmarks with known answers: `bench synthetic` trains every architecture on planted features",
        description="synthetic: activations built from planted unit features with a hierarchy (the MP-SAE paper's "
                    "toy tree: parents that always fire with their mutually exclusive children), on two top levels: "
                    "the paper's, one parent per row, and independent parents that co-fire; trains each "
                    "architecture on the same rows and batches and scores it against the truth: decoder recovery "
                    "(mean max cosine, fraction ≥ 0.9), absorption (mean cosine of child latents with the true "
                    "parent), code F1, dead latents, FVU. Writes OUT/synthetic.json and OUT/synthetic.html.",
        epilog="example:\n  saelab bench synthetic --steps 1500 --out runs/bench-synthetic",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("which", choices=["synthetic"], help="the benchmark")
    p.add_argument("--archs", default="topk,batchtopk,matryoshka,mp,mutual,feature_choice",
                   help="comma list of architectures (default: all trainable ones but gtopk, which needs LM gradients)")
    p.add_argument("--k", type=int, default=2,
                   help="k of every SAE (2); MP pursues each row until its residual is <= 0.05 or an atom repeats")
    p.add_argument("--mp-steps", type=int, default=0,
                   help="0 (default): MP pursues each row to convergence, as the paper's synthetic runs; N: exactly "
                        "N steps, no early stop, as MP trains by default with N = k (it absorbs when N is below the "
                        "number of features some rows hold)")
    p.add_argument("--steps", type=int, default=1500, help="training steps per SAE (1500)")
    p.add_argument("--batch", type=int, default=200, help="batch size (200, the paper's)")
    p.add_argument("--corr", type=float, default=0.0, help="intra-level correlation ε of the features (0)")
    p.add_argument("--noise", type=float, default=0.0, help="Gaussian noise std added to the activations (0)")
    p.add_argument("--parents", choices=["exclusive", "independent", "both"], default="both",
                   help="how the tree's parents fire: exclusive (one per row, the paper's tree), independent (each "
                        "on its own, so parents co-fire), or both, one table after the other (default)")
    p.add_argument("--seed", type=int, default=0, help="data and training seed (0)")
    p.add_argument("--out", default="runs/bench-synthetic", help="output folder (runs/bench-synthetic)")


def run_bench(args) -> int:
    import json
    from pathlib import Path

    from saelab.config import check
    from saelab.sae import ARCHITECTURES
    from saelab.synthetic.generator import PARENT_MODES, TreeSpec
    from saelab.synthetic.runner import BenchSpec, figure, run_benchmark

    archs = [a.strip() for a in args.archs.split(",") if a.strip()]
    for a in archs:
        check(a in ARCHITECTURES and ARCHITECTURES[a].trainable and not ARCHITECTURES[a].needs_grads, "--archs",
              f"{a!r} is not an architecture this benchmark can train; choose from "
              f"{sorted(n for n, c in ARCHITECTURES.items() if c.trainable and not c.needs_grads)}")
    check(args.k >= 1, "--k", f"must be >= 1, got {args.k}")
    check(args.mp_steps >= 0, "--mp-steps", f"must be >= 0, got {args.mp_steps}")
    check(args.steps >= 1, "--steps", f"must be >= 1, got {args.steps}")
    check(args.batch >= 1, "--batch", f"must be >= 1, got {args.batch}")
    check(0 <= args.corr < 1, "--corr", f"must be in [0, 1), got {args.corr}")
    check(args.noise >= 0, "--noise", f"must be >= 0, got {args.noise}")
    out = Path(args.out)
    rows = []
    for parents in (PARENT_MODES if args.parents == "both" else [args.parents]):
        spec = BenchSpec(tree=TreeSpec(corr=args.corr, noise=args.noise, parents=parents), k=args.k,
                         steps=args.steps, batch=args.batch, seed=args.seed, mp_steps=args.mp_steps)
        rows += run_benchmark(spec, archs, out / "runs" / parents)
    cols = ["absorption", "recovered", "mean_max_cos", "code_f1", "dead", "l0", "fvu"]
    print(f"{'arch':15}{'parents':>13}" + "".join(f"{c:>13}" for c in cols))
    for r in rows:
        print(f"{r['arch']:15}{r['parents']:>13}" + "".join(f"{r[c]:13.4f}" for c in cols))
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / "synthetic.json.tmp"
    tmp.write_text(json.dumps({"spec": {"k": args.k, "steps": args.steps, "batch": args.batch, "corr": args.corr,
                                        "noise": args.noise, "parents": args.parents, "mp_steps": args.mp_steps,
                                        "seed": args.seed},
                               "rows": rows}, indent=2))
    tmp.replace(out / "synthetic.json")
    figure(rows).write_html(str(out / "synthetic.html"))
    print(f"wrote {out / 'synthetic.json'} and {out / 'synthetic.html'}")
    return 0


# ---------------------------------------------------------------------------------------------------- doctor
def add_doctor(sub) -> None:
    p = sub.add_parser(
        "doctor", help="print the environment a bug report needs and check that the sparse kernels work here",
        description="Print versions (Python, saelab, torch and its CUDA build, triton, TransformerLens, transformers, "
                    "the NVIDIA driver), the devices, for each device and dtype the sparse-kernel path saelab would "
                    "take (SAELAB_KERNELS=auto|torch|triton) with the self-test of both paths run there, the "
                    "Hugging Face model cache and whether the embedded reference model is present. Exits 0 when "
                    "every check passes, 1 when one fails (listed at the end). Paste the output into bug reports.",
        epilog="example:\n  saelab doctor --json doctor.json",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", metavar="FILE", default=None,
                   help="also write the report as JSON to FILE (its folder must exist)")


def run_doctor(args) -> int:
    from saelab.doctor import check_json_path, collect, format_report, write_json

    if args.json:
        check_json_path(args.json)  # before the self-tests, so a bad path fails at once
    report = collect()
    print(format_report(report))
    if args.json:
        print(f"wrote {write_json(report, args.json)}")
    return 0 if report["ok"] else 1


COMMANDS = ["info", "hooks", "reference", "train", "eval", "cache", "dashboard", "patch", "explore", "steer", "bench",
            "doctor", "calibrate"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="saelab",
        description="Train, evaluate and explore sparse autoencoders on language-model activations. "
                    "Every command works offline on the embedded reference model and the standard-library corpus.")
    parser.add_argument("--debug", action="store_true",
                        help="on an error, print the full traceback as well (for bug reports); also SAELAB_DEBUG=1")
    sub = parser.add_subparsers(dest="command", required=True)
    mod = sys.modules[__name__]
    for name in COMMANDS:
        getattr(mod, f"add_{name}")(sub)
    return parser


def _command_label(args) -> str:
    """'cache verify', 'reference train', 'train': what the user ran, for the first word of an error line."""
    words = [args.command]
    if getattr(args, "reference_cmd", None):
        words.append(args.reference_cmd)
    if args.command == "cache" and getattr(args, "action", "write") != "write":
        words.append(args.action)
    return " ".join(words)


def report_error(label: str, error, debug: bool = False) -> None:
    """The error boundary's output: `saelab <cmd>: error: <message>` and `hint: <hint>` on stderr, one line each
    (a multi-line message is joined with '; '); with `debug`, the traceback first."""
    import traceback

    if debug:
        traceback.print_exception(error)
    message = "; ".join(line.strip() for line in error.message.splitlines() if line.strip())
    print(f"saelab {label}: error: {message}", file=sys.stderr)
    if error.hint:
        print(f"hint: {' '.join(error.hint.split())}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    """Run one command. A `SaelabError` (a user's mistake) prints one line (+ a hint) and exits 2; any other
    exception is a bug: its traceback is printed and the exit code is 1. `--debug` / SAELAB_DEBUG=1 print the
    traceback of a `SaelabError` too."""
    import os
    import traceback

    from saelab.errors import SaelabError

    args = build_parser().parse_args(argv)
    label = _command_label(args)
    debug = args.debug or os.environ.get("SAELAB_DEBUG", "").strip() not in ("", "0")
    try:
        return getattr(sys.modules[__name__], f"run_{args.command}")(args) or 0
    except SaelabError as e:
        from saelab.distributed import reports

        if reports(e):  # under torchrun, an error every rank shares is printed once, by rank 0
            report_error(label, e, debug)
        return 2
    except KeyboardInterrupt:
        print(f"saelab {label}: interrupted", file=sys.stderr)
        return 130
    except Exception:  # noqa: BLE001 -- not a user error: a bug, shown in full
        traceback.print_exc()
        print(f"saelab {label}: internal error (a bug in saelab, not in your input); please report it with the "
              f"traceback above", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
