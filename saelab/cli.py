"""The `saelab` command. Parses flags into a config, calls the library, prints a short summary; no logic of its own.

Each subcommand is a pair: `add_<name>(subparsers)` declares its flags, `run_<name>(args)` runs it.
"""

from __future__ import annotations

import argparse
import json
import sys


def _add_model_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="reference",
                   help="'reference' (embedded, default), a hub name such as gpt2, or a local model directory")
    p.add_argument("--device", default="cpu", help="cpu, cuda[:N] or auto (default: cpu)")
    p.add_argument("--model-dtype", default="float32", help="float32 (default), float16 or bfloat16")


# ---------------------------------------------------------------------------------------------------- info
def add_info(sub) -> None:
    p = sub.add_parser("info", help="load a model and print a short report: hooks and held-out loss",
                       description="Load a model (the embedded reference model by default) and report its shape, "
                                   "its residual-stream hooks and its held-out loss on the corpus.")
    _add_model_flags(p)
    p.add_argument("--dataset", default="stdlib", help="corpus: 'stdlib' (default), an HF dataset or a local path")
    p.add_argument("--rows", type=int, default=32, help="validation rows to score (default 32)")
    p.add_argument("--context-size", type=int, default=128, help="tokens per row (default 128)")


def run_info(args) -> int:
    from saelab.data.corpus import CorpusSpec
    from saelab.models import load_model, quality
    from saelab.models.loading import hook_names

    model = load_model(args.model, device=args.device, dtype=args.model_dtype)
    cfg = model.cfg
    names = hook_names(model)
    resid = [h for h in names if h.endswith(("hook_resid_pre", "hook_resid_post", "hook_resid_mid"))]
    print(f"model      {args.model}: {cfg.n_layers} layers, d_model {cfg.d_model}, vocab {cfg.d_vocab}, "
          f"context {cfg.n_ctx}")
    print(f"hooks      {len(names)} in all; residual stream: {', '.join(resid[:6])}{' …' if len(resid) > 6 else ''}")
    print(f"           middle residual stream: blocks.{cfg.n_layers // 2}.hook_resid_pre "
          f"(= blocks.{cfg.n_layers // 2 - 1}.hook_resid_post)")
    r = quality.bits_per_byte(model, model.tokenizer, CorpusSpec(args.dataset), "validation",
                              context_size=args.context_size, max_rows=args.rows)
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

    for name in hook_names(load_model(args.model, device=args.device, dtype=args.model_dtype)):
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
    for name in ("steps", "n_layer", "n_embd", "n_head", "n_ctx", "batch_rows", "vocab_size", "seed", "threads"):
        t.add_argument(f"--{name.replace('_', '-')}", type=int, default=getattr(d, name),
                       help=f"default {getattr(d, name)}")
    t.add_argument("--lr", type=float, default=d.lr, help=f"peak learning rate (default {d.lr})")
    t.add_argument("--dataset", default="stdlib", help="corpus (default: stdlib)")


def run_reference(args) -> int:
    from saelab.data.corpus import CorpusSpec
    from saelab.models.train_reference import ReferenceRecipe, train_reference

    recipe = ReferenceRecipe(out=args.out, steps=args.steps, n_layer=args.n_layer, n_embd=args.n_embd,
                             n_head=args.n_head, n_ctx=args.n_ctx, batch_rows=args.batch_rows,
                             vocab_size=args.vocab_size, seed=args.seed, threads=args.threads, lr=args.lr)
    report = train_reference(recipe, CorpusSpec(args.dataset))
    print(json.dumps(report["validation"], indent=1))
    return 0


COMMANDS = ["info", "hooks", "reference"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="saelab",
        description="Train, evaluate and explore sparse autoencoders on language-model activations. "
                    "Every command works offline on the embedded reference model and the standard-library corpus.")
    sub = parser.add_subparsers(dest="command", required=True)
    mod = sys.modules[__name__]
    for name in COMMANDS:
        getattr(mod, f"add_{name}")(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    from saelab.config import ConfigError

    args = build_parser().parse_args(argv)
    try:
        return getattr(sys.modules[__name__], f"run_{args.command}")(args) or 0
    except (ConfigError, KeyError, FileNotFoundError, ConnectionError) as e:
        msg = e.args[0] if isinstance(e, KeyError) and e.args else e
        print(f"saelab {args.command}: error: {msg}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
