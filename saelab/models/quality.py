"""Quality checks for a language model on code: held-out bits per byte, bracket closing, induction.

They take any causal LM callable on token ids (a `transformers` model or a `TransformerBridge`), so the same
numbers are computed by the reference recipe, by the model-card test and, later, by evaluators.
"""

from __future__ import annotations

import io
import math
import tokenize as pytokenize
from dataclasses import dataclass
from itertools import islice

import numpy as np
import torch
import torch.nn.functional as F

from saelab.data.corpus import CorpusSpec, iter_documents
from saelab.data.packing import batched_rows, iter_packed_rows, special_ids
from saelab.models.loading import model_device

CLOSERS = ")]}"


def logits_of(model, tokens: torch.Tensor) -> torch.Tensor:
    out = model(tokens)
    return out.logits if hasattr(out, "logits") else out


def token_byte_lengths(tokenizer) -> np.ndarray:
    """Bytes of text each token id stands for (0 for special tokens)."""
    vocab = len(tokenizer)
    lengths = np.zeros(vocab, dtype=np.int64)
    special = set(tokenizer.all_special_ids)
    byte_level = "ByteLevel" in type(getattr(tokenizer.backend_tokenizer, "pre_tokenizer", None)).__name__ if hasattr(
        tokenizer, "backend_tokenizer"
    ) else False
    tokens = tokenizer.convert_ids_to_tokens(list(range(vocab)))
    for i, tok in enumerate(tokens):
        if i in special or tok is None:
            continue
        # byte-level BPE maps each byte to one printable character, so characters == bytes
        lengths[i] = len(tok) if byte_level else len(tokenizer.decode([i]).encode("utf-8"))
    return lengths


@torch.no_grad()
def bits_per_byte(model, tokenizer, spec: CorpusSpec = CorpusSpec(), split: str = "validation",
                  context_size: int = 256, batch_size: int = 16, max_rows: int | None = None,
                  every: int = 1) -> dict:
    """Held-out bits per byte over packed rows; each stream token is predicted exactly once.

    `every` > 1 scores every `every`-th row only (a sample spread over the whole split), then `max_rows` caps it.
    """
    device = model_device(model)
    nbytes = torch.as_tensor(token_byte_lengths(tokenizer), device=device)
    rows = iter_packed_rows(spec, tokenizer, context_size, split)
    if every > 1:
        rows = islice(rows, 0, None, every)
    if max_rows is not None:
        rows = islice(rows, max_rows)
    total_nats, total_bytes, total_tokens = 0.0, 0, 0
    for batch in batched_rows(rows, batch_size):
        tokens = torch.as_tensor(batch, device=device)
        logp = F.log_softmax(logits_of(model, tokens)[:, :-1].float(), dim=-1)
        target = tokens[:, 1:]
        total_nats += -logp.gather(-1, target[..., None]).sum().item()
        total_bytes += nbytes[target].sum().item()
        total_tokens += target.numel()
    return {
        "bits_per_byte": total_nats / math.log(2) / max(total_bytes, 1),
        "nats_per_token": total_nats / max(total_tokens, 1),
        "bytes_per_token": total_bytes / max(total_tokens, 1),
        "tokens": total_tokens,
        "bytes": total_bytes,
    }


@dataclass(frozen=True)
class BracketSite:
    tokens: list[int]  # the context, BOS first, ending right before the closer
    closer: str  # the right closer: one of ")]}"


def bracket_sites(tokenizer, spec: CorpusSpec = CorpusSpec(), split: str = "validation", context_size: int = 256,
                  max_sites: int = 2000, every: int = 7) -> list[BracketSite]:
    """Held-out contexts that end right where `)`, `]` or `}` closes an open bracket.

    Closers come from Python's own tokenizer (so brackets inside strings and comments are not counted), and a
    site is kept only where the model's tokenization has a token boundary right before the closer, i.e. the
    context is exactly what the model saw in training. Every `every`-th site is taken, deterministically.
    """
    bos, _ = special_ids(tokenizer)
    backend = tokenizer.backend_tokenizer
    sites: list[BracketSite] = []
    seen = 0
    for doc in iter_documents(spec, split):
        try:
            py_tokens = list(pytokenize.generate_tokens(io.StringIO(doc.text).readline))
        except (pytokenize.TokenError, IndentationError, SyntaxError):
            continue
        line_starts = np.cumsum([0] + [len(line) for line in doc.text.splitlines(keepends=True)])
        closer_at = {int(line_starts[t.start[0] - 1] + t.start[1]): t.string for t in py_tokens
                     if t.type == pytokenize.OP and t.string in CLOSERS}
        if not closer_at:
            continue
        enc = backend.encode(doc.text, add_special_tokens=False)
        for i, (start, _end) in enumerate(enc.offsets):
            if start in closer_at and i > 0:
                seen += 1
                if seen % every:
                    continue
                ctx = enc.ids[max(0, i - (context_size - 1)):i]
                sites.append(BracketSite([bos] + ctx, closer_at[start]))
                if len(sites) >= max_sites:
                    return sites
    return sites


def _closer_groups(tokenizer) -> list[torch.Tensor]:
    """For each closer, the ids of every token whose text starts with it (e.g. `)`, `):`, `))`)."""
    tokens = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    special = set(tokenizer.all_special_ids)
    return [torch.tensor([i for i, t in enumerate(tokens) if t and i not in special and t.startswith(c)])
            for c in CLOSERS]


@torch.no_grad()
def bracket_closing_accuracy(model, tokenizer, sites: list[BracketSite], batch_size: int = 32) -> dict:
    """Fraction of sites where the right closer's total probability beats both others'."""
    device = model_device(model)
    groups = [g.to(device) for g in _closer_groups(tokenizer)]
    correct, by_closer = 0, {c: [0, 0] for c in CLOSERS}
    for start in range(0, len(sites), batch_size):
        chunk = sites[start:start + batch_size]
        width = max(len(s.tokens) for s in chunk)
        tokens = torch.zeros(len(chunk), width, dtype=torch.long)
        for j, s in enumerate(chunk):  # right padding: a causal model's earlier positions do not see it
            tokens[j, :len(s.tokens)] = torch.tensor(s.tokens)
        logits = logits_of(model, tokens.to(device)).float()
        last = torch.tensor([len(s.tokens) - 1 for s in chunk], device=device)
        logp = F.log_softmax(logits[torch.arange(len(chunk), device=device), last], dim=-1)
        scores = torch.stack([logp[:, g].logsumexp(-1) for g in groups], dim=-1)
        pred = scores.argmax(-1).tolist()
        for j, s in enumerate(chunk):
            ok = CLOSERS[pred[j]] == s.closer
            correct += ok
            by_closer[s.closer][0] += ok
            by_closer[s.closer][1] += 1
    counts = [n for _, n in by_closer.values()]
    per = [k / n for k, n in by_closer.values() if n]
    return {
        "accuracy": correct / max(len(sites), 1),
        # ")" dominates code, so always answering ")" already scores high: report the chance-corrected views too
        "balanced_accuracy": sum(per) / max(len(per), 1),
        "majority_baseline": max(counts) / max(len(sites), 1),
        "n_sites": len(sites),
        "per_closer": {c: {"accuracy": k / n if n else None, "n": n} for c, (k, n) in by_closer.items()},
    }


@torch.no_grad()
def induction_losses(model, tokenizer, seq_len: int = 64, n_seqs: int = 32, seed: int = 0) -> dict:
    """Mean next-token loss on the first and on the second copy of a repeated random token sequence."""
    device = model_device(model)
    bos, _ = special_ids(tokenizer)
    special = sorted(set(tokenizer.all_special_ids))
    gen = torch.Generator().manual_seed(seed)
    allowed = torch.tensor([i for i in range(len(tokenizer)) if i not in special])
    rand = allowed[torch.randint(len(allowed), (n_seqs, seq_len), generator=gen)]
    tokens = torch.cat([torch.full((n_seqs, 1), bos), rand, rand], dim=1).to(device)
    logp = F.log_softmax(logits_of(model, tokens)[:, :-1].float(), dim=-1)
    nll = -logp.gather(-1, tokens[:, 1:, None])[..., 0]  # nll[:, t] predicts tokens[:, t+1]
    first = nll[:, 1:seq_len]  # predicting rand[1:] within the first copy (rand[0] follows BOS alone)
    second = nll[:, seq_len + 1:]  # predicting rand[1:] within the second copy
    return {"first_copy_loss": first.mean().item(), "second_copy_loss": second.mean().item(),
            "seq_len": seq_len, "n_seqs": n_seqs}
