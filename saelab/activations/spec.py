"""A cache's spec: everything that determines its bytes (model, tokenizer, hooks, dtype, corpus, context, shard
size), stored in the manifest and compared on every rerun, so that a resumed or extended cache is never a mix."""

from __future__ import annotations

import dataclasses
import hashlib

from saelab.activations.capture import GRAD_LOSS
from saelab.activations.format import STORAGE
from saelab.config import CacheConfig, flatten

SHARD_TARGET_BYTES = 64 * 2 ** 20  # per activation file, when shard_rows is 0


def tokenizer_hash(tokenizer) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        return hashlib.sha256(backend.to_str().encode("utf-8")).hexdigest()
    vocab = sorted(tokenizer.get_vocab().items())
    return hashlib.sha256(repr(vocab).encode("utf-8")).hexdigest()


def model_revision(model) -> str | None:
    orig = getattr(model, "original_model", None)
    return getattr(getattr(orig, "config", None), "_commit_hash", None)


def auto_shard_rows(cfg: CacheConfig, kept: int, d_max: int) -> int:
    if cfg.shard_rows:
        return cfg.shard_rows
    per_row = kept * d_max * STORAGE[cfg.dtype].itemsize
    rows = max(1, SHARD_TARGET_BYTES // per_row)
    return max(cfg.batch_rows, rows // cfg.batch_rows * cfg.batch_rows)


def build_spec(cfg: CacheConfig, model, hooks: list[str], d_in: dict[str, int], shard_rows: int) -> dict:
    """Everything that determines the cache's bytes. Compared on every rerun against an existing cache."""
    from saelab.data.packing import special_ids
    from saelab.models.loading import model_fingerprint

    bos, eos = special_ids(model.tokenizer)
    first = 1 if cfg.exclude_bos else 0
    return {
        "model": {"name": cfg.model.name, "fingerprint": model_fingerprint(cfg.model.name),
                  "revision": model_revision(model), "dtype": cfg.model.dtype},
        "tokenizer": {"sha256": tokenizer_hash(model.tokenizer), "vocab_size": len(model.tokenizer)},
        "hooks": list(hooks),
        "d_in": {h: d_in[h] for h in hooks},
        "dtype": cfg.dtype,
        "context_size": cfg.context_size,
        "corpus": dataclasses.asdict(cfg.corpus),
        "split": cfg.split,
        "special_tokens": {
            "bos_id": bos, "eos_id": eos, "exclude_bos": cfg.exclude_bos, "first_kept_position": first,
            "padding": "none: rows are packed end to end ([BOS] + context_size-1 corpus tokens, documents "
                       "separated by EOS), so no position is padding; EOS separators are kept",
        },
        "with_grads": cfg.with_grads,
        "grad_loss": GRAD_LOSS if cfg.with_grads else None,
        "batch_rows": cfg.batch_rows,
        "shard_rows": shard_rows,
    }


def spec_differences(old: dict, new: dict) -> list[str]:
    a, b = flatten(old), flatten(new)
    diffs, derived = [], []
    for k in sorted(set(a) | set(b)):
        if a.get(k, "<absent>") != b.get(k, "<absent>"):
            line = f"{k}: cache has {a.get(k, '<absent>')!r}, this run asks for {b.get(k, '<absent>')!r}"
            # values that follow from others (hooks → d_in, dtype → automatic shard size, with_grads → grad_loss)
            # are named only when nothing else explains the difference
            (derived if k.startswith(("d_in.", "grad_loss")) or k == "shard_rows" else diffs).append(line)
    return diffs or derived


def holds_target(manifest: dict, target_seqs: int) -> bool:
    """The cache holds what a write of `target_seqs` sequences asks: exactly that many, or all its corpus had."""
    have = sum(s["sequences"] for s in manifest["shards"])
    return have == target_seqs or manifest["corpus_exhausted"] and have <= target_seqs
