"""`saelab info`, `saelab hooks`, `saelab reference`: a model's report, its hook names, the reference recipe."""

from __future__ import annotations

import json

from saelab.settings import add_flags, flag_values


# ---- info
def add_info(sub) -> None:
    p = sub.add_parser("info", help="load a model and print a short report: hooks and held-out loss",
                       description="Load a model (the embedded reference model by default) and report its shape, "
                                   "its residual-stream hooks and its held-out loss on the corpus.")
    from saelab.api import InfoSettings
    from saelab.config import ModelSpec

    add_flags(p, ModelSpec, defaults=True)
    add_flags(p, InfoSettings, defaults=True)


def run_info(args) -> int:
    from saelab.api import InfoSettings, info

    print(info(args.model, args.device, args.model_dtype, **flag_values(args, InfoSettings)))
    return 0


# ---- hooks
def add_hooks(sub) -> None:
    p = sub.add_parser("hooks", help="list every hook name of a model", description="List every valid hook name.")
    from saelab.config import ModelSpec

    add_flags(p, ModelSpec, defaults=True)
    p.add_argument("--grep", default="", help="only names containing this text")


def run_hooks(args) -> int:
    from saelab.api import hooks

    for name in hooks(args.model, args.device, args.model_dtype, args.grep):
        print(name)
    return 0


# ---- reference
def add_reference(sub) -> None:
    p = sub.add_parser("reference", help="the embedded reference model's recipe",
                       description="Rebuild the embedded reference model with its seeded recipe.")
    rsub = p.add_subparsers(dest="reference_cmd", required=True)
    t = rsub.add_parser("train", help="train the reference model (tokenizer + GPT-2) from the corpus",
                        description="Train the byte-level BPE tokenizer and the GPT-2-architecture reference model "
                                    "on the train split, then measure it and write MODEL_CARD.md.")
    t.add_argument("--out", required=True, help="output directory (a Hugging Face model directory)")
    from saelab.data.corpus import CorpusSpec
    from saelab.models.train_reference import ReferenceRecipe

    d = ReferenceRecipe(out="")
    for name in ("steps", "n_layer", "n_embd", "n_head", "n_ctx", "batch_rows", "vocab_size", "seed", "threads",
                 "warmup_steps", "schedule_steps", "checkpoint_every"):
        t.add_argument(f"--{name.replace('_', '-')}", type=int, default=getattr(d, name),
                       help=f"default {getattr(d, name)}")
    t.add_argument("--lr", type=float, default=d.lr, help=f"peak learning rate (default {d.lr})")
    t.add_argument("--dataset", default=CorpusSpec.source, help=f"corpus (default {CorpusSpec.source})")
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
    from saelab.api import train_reference

    report = train_reference(args.out, args.dataset, steps=args.steps, n_layer=args.n_layer, n_embd=args.n_embd,
                             n_head=args.n_head, n_ctx=args.n_ctx, batch_rows=args.batch_rows,
                             vocab_size=args.vocab_size, seed=args.seed, threads=args.threads, lr=args.lr,
                             warmup_steps=args.warmup_steps, schedule_steps=args.schedule_steps,
                             init_from=args.init_from, decay=args.decay, save_dtype=args.save_dtype,
                             precision=args.precision, compile=args.compile, device=args.device,
                             checkpoint_every=args.checkpoint_every, repeat_frac=args.repeat_frac,
                             random_repeat_frac=args.random_repeat_frac)
    print(json.dumps(report["validation"], indent=1))
    return 0
