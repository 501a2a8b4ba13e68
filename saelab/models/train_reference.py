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
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from saelab.errors import ConfigError, ModelError
from saelab.data.corpus import CorpusSpec, check_source, iter_documents
from saelab.data.packing import iter_doc_tokens
from saelab.files import tmp_path, write_dir_atomic
from saelab.settings import check

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
    steps: int = 6000
    lr: float = 2e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 200
    weight_decay: float = 0.1
    seed: int = 0
    threads: int = 0  # 0: torch's default
    save_dtype: str = "float16"  # halves the shipped size; quality is measured on the saved weights
    eval_rows: int | None = None  # None: the whole validation split
    bracket_sites: int = 2000
    # Training in phases (how the shipped model was made, see MODEL_CARD.md): `schedule_steps` > steps stops a
    # longer cosine schedule early; `init_from` continues from a model directory (its weights and tokenizer)
    # with a fresh optimizer; `decay="linear"` decays linearly from lr to 0 (a cool-down).
    schedule_steps: int = 0  # 0: the schedule spans `steps`
    init_from: str = ""
    decay: str = "linear"  # linear to zero beats cosine to 10 % at equal steps (and made the shipped model)
    # Mixed precision: bf16 autocast with float32 master weights, and torch.compile of the forward + loss: together
    # 2.9x the plain float32 step on 2 CPU cores with AMX (3.7k -> 10.7k tok/s). Without native bf16 (AVX-512
    # only) bf16 is emulated and 6x slower than float32, so "auto" takes bf16 only where the hardware has it.
    precision: str = "auto"
    compile: bool = True
    # Fraction of rows whose text restarts after its first h tokens (h uniform in [8, rows/2]): the row is a span
    # of real code, then the same span again, then its natural continuation. Repeats are what teach a model to
    # copy from context (induction); the corpus alone has too few of them for a model trained on ~20M tokens.
    repeat_frac: float = 0.25
    # Fraction of rows that open with a sequence of uniformly random tokens (8 to rows/2 of them) and its exact
    # repeat, then natural text: the classic synthetic induction task. It makes copying work for any token, rare
    # ones too, where natural repeats teach it mostly for common tokens. Note the card's induction probe is this
    # task's distribution (other random draws), so with this on, the probe measures a trained skill.
    random_repeat_frac: float = 0.0
    device: str = "auto"  # "auto": cuda when available, else cpu
    checkpoint_every: int = 500  # steps between resumable checkpoints in OUT/partial (and induction probes)

    def __post_init__(self):
        for name in ("steps", "n_layer", "n_embd", "n_head", "n_ctx", "batch_rows", "checkpoint_every"):
            check(getattr(self, name) >= 1, name, f"must be >= 1, got {getattr(self, name)}")
        for name in ("seed", "threads", "warmup_steps", "schedule_steps"):
            check(getattr(self, name) >= 0, name, f"must be >= 0, got {getattr(self, name)}")
        check(self.vocab_size >= 257, "vocab_size", f"must be >= 257 (256 bytes + {EOT}), got {self.vocab_size}")
        check(self.lr > 0, "lr", f"must be > 0, got {self.lr}")
        check(self.n_embd % self.n_head == 0, "n_embd", f"{self.n_embd} must be divisible by n_head ({self.n_head})")
        check(self.decay in ("cosine", "linear"), "decay", f"must be cosine or linear, got {self.decay!r}")
        check(self.precision in ("auto", "bfloat16", "float32"), "precision",
              f"must be auto, bfloat16 or float32, got {self.precision!r}")
        for name in ("repeat_frac", "random_repeat_frac"):
            check(0.0 <= getattr(self, name) <= 1.0, name, f"must be in [0, 1], got {getattr(self, name)}")
        check(self.save_dtype in ("float16", "float32", "bfloat16"), "save_dtype",
              f"must be float16, bfloat16 or float32, got {self.save_dtype!r}")
        check(self.device in ("auto", "cpu") or self.device.startswith("cuda"), "device",
              f"must be auto, cpu or cuda[:N], got {self.device!r}")


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


def _native_bf16(device: torch.device) -> bool:
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    # torch's own CPU feature checks (ATen's cpuinfo), not /proc/cpuinfo: they work on every OS
    return any(getattr(torch.cpu, f, lambda: False)() for f in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"))


def _batch(data: np.ndarray, recipe: ReferenceRecipe, step: int, bos: int, vocab_size: int = 0) -> torch.Tensor:
    """The rows of one step: random windows of the train stream, each behind a BOS, as packed rows are at
    inference, with `repeat_frac` of them repeating their opening span and `random_repeat_frac` opening with a
    repeated random sequence (tokens in [0, vocab_size) other than BOS). The generator is seeded by (seed, step)
    so a resumed run draws exactly the rows the uninterrupted run would have."""
    body = recipe.n_ctx - 1
    rng = np.random.default_rng([recipe.seed, step])
    starts = rng.integers(0, len(data) - body, size=recipe.batch_rows)
    repeat = rng.random(recipe.batch_rows) < recipe.repeat_frac
    spans = rng.integers(8, body // 2 + 1, size=recipe.batch_rows)
    rows = [np.concatenate([data[s:s + h], data[s:s + body - h]]) if r else data[s:s + body]
            for s, r, h in zip(starts, repeat, spans)]
    if recipe.random_repeat_frac:  # drawn after the above, so those rows do not depend on this option
        for i in np.flatnonzero(rng.random(recipe.batch_rows) < recipe.random_repeat_frac):
            h = int(rng.integers(8, body // 2 + 1))
            seq = rng.integers(0, vocab_size - 1, size=h)
            seq = seq + (seq >= bos)  # every id but BOS
            rows[i] = np.concatenate([seq, seq, rows[i][:body - 2 * h]]).astype(rows[i].dtype)
    return torch.from_numpy(np.concatenate([np.full((recipe.batch_rows, 1), bos), np.stack(rows)], 1)).long()


# the fields an older recipe.json lacks, at the values its run used
_LEGACY = {"precision": "float32", "compile": False, "checkpoint_every": 0, "repeat_frac": 0.0,
           "random_repeat_frac": 0.0, "device": "auto"}


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


# fields that do not change what is trained: a checkpoint resumes across changes in these
_RUN_ONLY = ("out", "threads", "eval_rows", "bracket_sites", "checkpoint_every", "compile", "device")


def _checkpoint(partial: Path, step: int, recipe: ReferenceRecipe, model, opt) -> None:
    """Weights (safetensors) and optimizer state (tensors only), written to a temp dir and renamed into place."""
    def write(folder: Path) -> None:
        model.save_pretrained(folder)
        torch.save(opt.state_dict(), folder / "optimizer.pt")
        (folder / "step.json").write_text(json.dumps({"step": step, "recipe": asdict(recipe)}))

    write_dir_atomic(partial, write)


def _resume(partial: Path, recipe: ReferenceRecipe, model, opt, log) -> int:
    """The step to start from: a checkpoint of the same recipe in OUT/partial is loaded, else 0."""
    tmp = tmp_path(partial)  # where write_dir_atomic writes it
    if not (partial / "step.json").exists() and (tmp / "step.json").exists():
        tmp.rename(partial)  # killed between removing the old checkpoint and renaming the new one into place
    if not (partial / "step.json").exists():
        return 0
    saved = json.loads((partial / "step.json").read_text())
    now = asdict(recipe)
    diff = sorted(k for k in now if k not in _RUN_ONLY and saved["recipe"].get(k) != now[k])
    if diff:
        raise ConfigError(f"{partial} holds a checkpoint of a different recipe (it differs in {', '.join(diff)}); "
                          f"rerun with the same flags to resume, or delete {partial} to start over")
    from safetensors.torch import load_file

    missing, unexpected = model.load_state_dict(load_file(partial / "model.safetensors"), strict=False)
    if unexpected or set(missing) - {"lm_head.weight"}:  # lm_head is tied to the embedding, so not stored
        raise ConfigError(f"{partial}/model.safetensors does not match the model: missing {missing}, "
                          f"unexpected {unexpected}; delete {partial} to start over")
    model.tie_weights()
    # weights_only: tensors and plain containers only, never arbitrary objects
    opt.load_state_dict(torch.load(partial / "optimizer.pt", weights_only=True, map_location="cpu"))
    step = saved["step"]
    log(f"resuming from the checkpoint at step {step} in {partial}")
    return step


def check_inputs(recipe: ReferenceRecipe, spec: CorpusSpec) -> None:
    """Paths and data, checked before anything is written: --out can be a model directory, --init-from is one,
    the corpus has text in its train split."""
    out = Path(recipe.out)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"out: {out} is a file, not a directory", hint="choose another --out")
    if recipe.init_from:
        prev = Path(recipe.init_from)
        if not (prev / "config.json").is_file() or not any(prev.glob("*.safetensors")):
            raise ModelError(f"init_from: {prev} is not a model directory (config.json + *.safetensors)",
                             hint="give a directory written by `saelab reference train`")
    check_source(spec, "train")


def train_reference(recipe: ReferenceRecipe, spec: CorpusSpec = CorpusSpec(), log=print) -> dict:
    from transformers import GPT2Config, GPT2LMHeadModel

    from saelab.models import quality

    out = Path(recipe.out)
    check_inputs(recipe, spec)
    out.mkdir(parents=True, exist_ok=True)
    (out / "recipe.json").write_text(json.dumps(asdict(recipe), indent=2))
    earlier = []  # the phases that made `init_from`, oldest first, so the card can list every command
    if recipe.init_from:
        prev = Path(recipe.init_from)
        prev_report = json.loads((prev / "quality.json").read_text()) if (prev / "quality.json").exists() else {}
        earlier = prev_report.get("phases") or []
        if not earlier and (prev / "recipe.json").exists():
            earlier = [json.loads((prev / "recipe.json").read_text())]
        earlier = [{**_LEGACY, **p} for p in earlier]
    torch.manual_seed(recipe.seed)
    if recipe.threads:
        torch.set_num_threads(recipe.threads)
    t0 = time.time()

    resuming = any((out / name / "step.json").exists() for name in ("partial", "partial.tmp"))
    if recipe.init_from or resuming:
        from transformers import PreTrainedTokenizerFast

        # a resumed run keeps the tokenizer its checkpoint was trained with
        tokenizer = PreTrainedTokenizerFast.from_pretrained(out if resuming else recipe.init_from)
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
    device = torch.device("cuda" if recipe.device == "auto" and torch.cuda.is_available()
                          else "cpu" if recipe.device == "auto" else recipe.device)
    model.to(device)
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": recipe.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=recipe.lr, betas=(0.9, 0.95))
    partial = out / "partial"
    start = _resume(partial, recipe, model, opt, log)
    use_bf16 = recipe.precision == "bfloat16" or (recipe.precision == "auto" and _native_bf16(device))
    log(f"precision: {'bf16 autocast, float32 master weights' if use_bf16 else 'float32'}"
        f"{', torch.compile' if recipe.compile else ''} on {device}")

    def loss_fn(tokens):
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16):
            logits = model(tokens).logits
        return torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), tokens[:, 1:].flatten())

    step_loss = torch.compile(loss_fn) if recipe.compile else loss_fn
    probe_len = min(64, (recipe.n_ctx - 1) // 2)  # the induction probe's two copies fit in one context
    t_train = time.time()
    ema = None
    model.train()
    for step in range(start, recipe.steps):
        tokens = _batch(data, recipe, step, bos, len(tokenizer))
        for g in opt.param_groups:
            g["lr"] = _lr_at(step, recipe)
        loss = step_loss(tokens.to(device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        ema = loss.item() if ema is None else 0.98 * ema + 0.02 * loss.item()
        if step % 100 == 0 or step == recipe.steps - 1:
            el = time.time() - t_train
            tps = (step + 1 - start) * recipe.batch_rows * recipe.n_ctx / el
            log(f"step {step:6d}/{recipe.steps}  loss {ema:.4f}  lr {_lr_at(step, recipe):.2e}  "
                f"{tps:,.0f} tok/s  {el / 60:.1f} min")
        if recipe.checkpoint_every and (step + 1) % recipe.checkpoint_every == 0 and step + 1 < recipe.steps:
            model.eval()
            with torch.no_grad():
                ind = quality.induction_losses(model, tokenizer, seq_len=probe_len)
            log(f"step {step + 1}: induction first copy {ind['first_copy_loss']:.2f}, "
                f"second copy {ind['second_copy_loss']:.2f}")
            _checkpoint(partial, step + 1, recipe, model, opt)
            model.train()
    train_seconds = time.time() - t_train

    dtype = getattr(torch, recipe.save_dtype)
    model.to("cpu", dtype).save_pretrained(out)  # model.safetensors + config.json
    # save_dtype is storage only: config.json says float32, so a plain `from_pretrained` computes in float32
    # (float16 on a CPU is ~9x slower); the stored values upcast exactly
    config = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({**config, "dtype": "float32"}, indent=2, sort_keys=True) + "\n")
    model = GPT2LMHeadModel.from_pretrained(out, dtype=torch.float32).eval()
    log("evaluating the saved weights on the validation split ...")
    bpb = quality.bits_per_byte(model, tokenizer, spec, "validation", recipe.n_ctx, max_rows=recipe.eval_rows)
    sites = quality.bracket_sites(tokenizer, spec, "validation", recipe.n_ctx, max_sites=recipe.bracket_sites)
    brackets = quality.bracket_closing_accuracy(model, tokenizer, sites)
    induction = quality.induction_losses(model, tokenizer, seq_len=probe_len)
    report = {
        "recipe": asdict(recipe),
        "phases": earlier + [asdict(recipe)],
        "precision_used": "bfloat16" if use_bf16 else "float32",
        "corpus": spec.to_dict(),
        "n_params": sum(p.numel() for p in model.parameters()),
        "train_tokens": recipe.steps * recipe.batch_rows * recipe.n_ctx,
        "train_split_tokens": int(len(data)),
        "train_seconds": train_seconds,
        "total_seconds": time.time() - t0,
        "device": (f"cuda: {torch.cuda.get_device_name(device)}" if device.type == "cuda" else
                   f"cpu: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "validation": bpb,
        "bracket_closing": brackets,
        "induction": induction,
    }
    (out / "quality.json").write_text(json.dumps(report, indent=2))
    (out / "MODEL_CARD.md").write_text(model_card(report))
    shutil.rmtree(partial, ignore_errors=True)
    log(json.dumps({k: report[k] for k in ("validation", "bracket_closing", "induction")}, indent=1))
    return report


def recipe_command(rc: dict) -> str:
    """The `saelab reference train` command line that reproduces one phase."""
    d = asdict(ReferenceRecipe(out=""))
    skip = ("out", "eval_rows", "bracket_sites", "checkpoint_every", "device", "compile")
    flags = [f"--{k.replace('_', '-')} {v}" for k, v in rc.items()
             if k not in skip and v != d[k] and v not in (None, "")]
    if not rc.get("compile", True):
        flags.append("--no-compile")
    return " ".join(["saelab reference train --out", rc["out"], *flags])


def _row_mix(p: dict) -> str:
    mix = [f"{p[k] * 100:.0f} % {name} rows" for k, name in (("repeat_frac", "repeat"),
                                                             ("random_repeat_frac", "random-repeat")) if p.get(k)]
    return f", {', '.join(mix)}" if mix else ""


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
| training | {total_steps:,} steps × {rc['batch_rows']} rows × {rc['n_ctx']} tokens = {total_tokens:,} tokens in all; AdamW (β 0.9/0.95, weight decay {rc['weight_decay']}), gradient clipping 1.0; each row is a random window of the token stream behind a BOS{f"; a *repeat* row repeats its first 8-{(rc['n_ctx'] - 1) // 2} tokens before continuing, a *random-repeat* row opens with a random token sequence of that length and its repeat (the synthetic induction task: with it, the induction numbers below are in its distribution)" if any(_row_mix(p) for p in phases) else ''}; last phase {'bf16 autocast with float32 master weights' if r.get('precision_used') == 'bfloat16' else 'float32'}{', torch.compile' if rc.get('compile') else ''}. Schedules per phase: {'; '.join(f"{p['steps']} steps, lr {p['lr']:.3g}, {p['warmup_steps']} warm-up, {p['decay']} decay over {p.get('schedule_steps') or p['steps']} steps{_row_mix(p)}" for p in phases)} |
| wall time | last phase {r['train_seconds'] / 60:.1f} min training, {r['total_seconds'] / 60:.1f} min in all |
| device | {r['device']}, torch {r['torch']} |
| weights | `model.safetensors`, stored in {rc['save_dtype']}; all numbers below are measured on these stored weights. `config.json` says `"dtype": "float32"`, so a plain `transformers` `from_pretrained` computes in float32 (float16 on a CPU is several times slower) |

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
