"""The recipe that trains the embedded reference model: `saelab reference train --out DIR`.

A GPT-2-architecture model with a byte-level BPE tokenizer, both trained on the train split of the
standard-library corpus, seeded. The output directory is a plain Hugging Face model directory (config.json,
model.safetensors, tokenizer.json, ...) plus MODEL_CARD.md and quality.json with the held-out numbers measured
on the saved weights.
"""

from __future__ import annotations

import json
import math
import platform
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from saelab.data.corpus import CorpusSpec, iter_documents
from saelab.data.packing import iter_doc_tokens

EOT = "<|endoftext|>"


@dataclass
class ReferenceRecipe:
    out: str
    vocab_size: int = 8192
    n_layer: int = 4
    n_embd: int = 256
    n_head: int = 8
    n_ctx: int = 256
    batch_rows: int = 32
    steps: int = 4000
    lr: float = 2e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 200
    weight_decay: float = 0.1
    seed: int = 0
    threads: int = 0  # 0: torch's default
    save_dtype: str = "float16"  # halves the shipped size; quality is measured on the saved weights
    eval_rows: int | None = None  # None: the whole validation split
    bracket_sites: int = 2000
    # Two-phase training (how the shipped model was made, see MODEL_CARD.md): `schedule_steps` > steps stops a
    # longer cosine schedule early; `init_from` continues from a model directory (its weights and tokenizer)
    # with a fresh optimizer; `decay="linear"` decays linearly from lr to 0 (a cool-down).
    schedule_steps: int = 0  # 0: the schedule spans `steps`
    init_from: str = ""
    decay: str = "cosine"

    def __post_init__(self):
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")
        if self.decay not in ("cosine", "linear"):
            raise ValueError(f"decay must be cosine or linear, got {self.decay!r}")
        if self.save_dtype not in ("float16", "float32", "bfloat16"):
            raise ValueError(f"save_dtype must be float16, bfloat16 or float32, got {self.save_dtype!r}")


def train_tokenizer(recipe: ReferenceRecipe, spec: CorpusSpec):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=recipe.vocab_size, special_tokens=[EOT],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator((d.text for d in iter_documents(spec, "train")), trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=EOT, eos_token=EOT, unk_token=EOT,
                                   model_max_length=recipe.n_ctx)


def _token_array(tokenizer, spec: CorpusSpec, split: str) -> np.ndarray:
    return np.concatenate(list(iter_doc_tokens(iter_documents(spec, split), tokenizer))).astype(np.int32)


def _lr_at(step: int, r: ReferenceRecipe) -> float:
    if step < r.warmup_steps:
        return r.lr * (step + 1) / r.warmup_steps
    horizon = r.schedule_steps or r.steps
    t = (step - r.warmup_steps) / max(1, horizon - r.warmup_steps)
    if r.decay == "linear":
        return r.lr * max(0.0, 1.0 - t)
    return r.lr * (r.min_lr_ratio + (1 - r.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(t, 1.0))))


def train_reference(recipe: ReferenceRecipe, spec: CorpusSpec = CorpusSpec(), log=print) -> dict:
    from transformers import GPT2Config, GPT2LMHeadModel

    from saelab.models import quality

    out = Path(recipe.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "recipe.json").write_text(json.dumps(asdict(recipe), indent=2))
    earlier = []  # the phases that made `init_from`, oldest first, so the card can list every command
    if recipe.init_from:
        prev = Path(recipe.init_from)
        prev_report = json.loads((prev / "quality.json").read_text()) if (prev / "quality.json").exists() else {}
        earlier = prev_report.get("phases") or []
        if not earlier and (prev / "recipe.json").exists():
            earlier = [json.loads((prev / "recipe.json").read_text())]
    torch.manual_seed(recipe.seed)
    if recipe.threads:
        torch.set_num_threads(recipe.threads)
    t0 = time.time()

    if recipe.init_from:
        from transformers import PreTrainedTokenizerFast

        tokenizer = PreTrainedTokenizerFast.from_pretrained(recipe.init_from)
    else:
        tokenizer = train_tokenizer(recipe, spec)
    tokenizer.save_pretrained(out)
    log(f"tokenizer: {len(tokenizer)} tokens ({time.time() - t0:.0f}s)")
    data = _token_array(tokenizer, spec, "train")
    bos = tokenizer.bos_token_id
    log(f"train split: {len(data):,} tokens ({time.time() - t0:.0f}s)")

    config = GPT2Config(vocab_size=len(tokenizer), n_positions=recipe.n_ctx, n_embd=recipe.n_embd,
                        n_layer=recipe.n_layer, n_head=recipe.n_head, bos_token_id=bos,
                        eos_token_id=tokenizer.eos_token_id, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    model = (GPT2LMHeadModel.from_pretrained(recipe.init_from, dtype=torch.float32) if recipe.init_from
             else GPT2LMHeadModel(config))
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": recipe.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=recipe.lr, betas=(0.9, 0.95))
    gen = np.random.default_rng(recipe.seed)
    body = recipe.n_ctx - 1
    t_train = time.time()
    model.train()
    ema = None
    for step in range(recipe.steps):
        # random windows of the train stream, each behind a BOS, as packed rows are at inference
        starts = gen.integers(0, len(data) - body, size=recipe.batch_rows)
        windows = np.stack([data[s:s + body] for s in starts])
        tokens = torch.from_numpy(np.concatenate([np.full((recipe.batch_rows, 1), bos), windows], 1)).long()
        for g in opt.param_groups:
            g["lr"] = _lr_at(step, recipe)
        loss = model(tokens, labels=tokens).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        ema = loss.item() if ema is None else 0.98 * ema + 0.02 * loss.item()
        if step % 100 == 0 or step == recipe.steps - 1:
            el = time.time() - t_train
            tps = (step + 1) * recipe.batch_rows * recipe.n_ctx / el
            log(f"step {step:6d}/{recipe.steps}  loss {ema:.4f}  lr {_lr_at(step, recipe):.2e}  "
                f"{tps:,.0f} tok/s  {el / 60:.1f} min")
        if step and step % 1000 == 0:
            model.save_pretrained(out / "partial")
    train_seconds = time.time() - t_train

    dtype = getattr(torch, recipe.save_dtype)
    model.to(dtype).save_pretrained(out)  # model.safetensors + config.json
    model = GPT2LMHeadModel.from_pretrained(out, dtype=torch.float32).eval()
    log("evaluating the saved weights on the validation split ...")
    bpb = quality.bits_per_byte(model, tokenizer, spec, "validation", recipe.n_ctx, max_rows=recipe.eval_rows)
    sites = quality.bracket_sites(tokenizer, spec, "validation", recipe.n_ctx, max_sites=recipe.bracket_sites)
    brackets = quality.bracket_closing_accuracy(model, tokenizer, sites)
    induction = quality.induction_losses(model, tokenizer)
    report = {
        "recipe": asdict(recipe),
        "phases": earlier + [asdict(recipe)],
        "corpus": spec.to_dict(),
        "n_params": sum(p.numel() for p in model.parameters()),
        "train_tokens": recipe.steps * recipe.batch_rows * recipe.n_ctx,
        "train_split_tokens": int(len(data)),
        "train_seconds": train_seconds,
        "total_seconds": time.time() - t0,
        "device": f"cpu: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads",
        "torch": torch.__version__,
        "python": platform.python_version(),
        "validation": bpb,
        "bracket_closing": brackets,
        "induction": induction,
    }
    (out / "quality.json").write_text(json.dumps(report, indent=2))
    (out / "MODEL_CARD.md").write_text(model_card(report))
    partial = out / "partial"
    if partial.exists():
        for f in partial.iterdir():
            f.unlink()
        partial.rmdir()
    log(json.dumps({k: report[k] for k in ("validation", "bracket_closing", "induction")}, indent=1))
    return report


def recipe_command(rc: dict) -> str:
    """The `saelab reference train` command line that reproduces one phase."""
    d = asdict(ReferenceRecipe(out=""))
    flags = [f"--{k.replace('_', '-')} {v}" for k, v in rc.items()
             if k not in ("out", "eval_rows", "bracket_sites") and v != d[k] and v not in (None, "")]
    return " ".join(["saelab reference train --out", rc["out"], *flags])


def model_card(r: dict) -> str:
    rc, v, b, ind = r["recipe"], r["validation"], r["bracket_closing"], r["induction"]
    phases = r.get("phases") or [rc]
    total_steps = sum(p["steps"] for p in phases)
    total_tokens = sum(p["steps"] * p["batch_rows"] * p["n_ctx"] for p in phases)
    commands = "\n".join(f"{i + 1}. `{recipe_command(p)}`" for i, p in enumerate(phases))
    return f"""# saelab reference model

A small GPT-2-architecture language model trained on the Python standard library's source, shipped inside
saelab so that every command works offline. Load it with `saelab.load_model("reference")`.

## Recipe
Trained by the seeded recipe `saelab reference train` (module `saelab.models.train_reference`), in
{len(phases)} phase(s), each continuing from the one before (`--init-from`, fresh optimizer):

{commands}

| | |
| --- | --- |
| architecture | GPT2LMHeadModel: {rc['n_layer']} layers, d_model {rc['n_embd']}, {rc['n_head']} heads, context {rc['n_ctx']}, tied embeddings, no dropout |
| parameters | {r['n_params']:,} |
| tokenizer | byte-level BPE, {rc['vocab_size']} tokens, `<|endoftext|>` is BOS and EOS; trained on the train split |
| data | the train split of the standard-library corpus (Python {r['python']}, `.py` files, site-packages excluded, split by sha256 of the relative path, {r['corpus']['validation_per_mille'] / 10:.1f} % validation): {r['train_split_tokens']:,} tokens |
| training | {total_steps:,} steps × {rc['batch_rows']} rows × {rc['n_ctx']} tokens = {total_tokens:,} tokens in all; AdamW (β 0.9/0.95, weight decay {rc['weight_decay']}), gradient clipping 1.0; each row is a random window of the token stream behind a BOS. Schedules per phase: {'; '.join(f"{p['steps']} steps, lr {p['lr']:.3g}, {p['warmup_steps']} warm-up, {p['decay']} decay over {p.get('schedule_steps') or p['steps']} steps" for p in phases)} |
| wall time | last phase {r['train_seconds'] / 60:.1f} min training, {r['total_seconds'] / 60:.1f} min in all |
| device | {r['device']}, torch {r['torch']} |
| weights | `model.safetensors`, stored in {rc['save_dtype']}; all numbers below are measured on these stored weights |

## Held-out numbers (validation split)
| measure | value |
| --- | --- |
| bits per byte | **{v['bits_per_byte']:.4f}** ({v['tokens']:,} tokens, {v['bytes']:,} bytes, {v['bytes_per_token']:.2f} bytes/token, {v['nats_per_token']:.4f} nats/token) |
| bracket closing (right closer ranked above the other two) | **{b['accuracy'] * 100:.1f} %** of {b['n_sites']} sites; balanced over closers {b['balanced_accuracy'] * 100:.1f} %, always-`)` baseline {b['majority_baseline'] * 100:.1f} % ({', '.join(f"`{c}` {d['accuracy'] * 100:.1f} % of {d['n']}" for c, d in b['per_closer'].items() if d['n'])}) |
| induction: loss on 1st copy of a random sequence | {ind['first_copy_loss']:.3f} nats/token |
| induction: loss on 2nd copy | **{ind['second_copy_loss']:.3f}** nats/token ({ind['n_seqs']} sequences of {ind['seq_len']} tokens) |

For calibration, `xz -9e` compresses such files to about 1.6 bits per byte.

## Use and limits
A research artefact for interpretability on CPU: its residual stream is small (d_model {rc['n_embd']}) so SAEs train
in minutes. It has only seen Python source; on prose it is poor.
"""
