"""Tokenize documents and pack them into fixed-length rows that start with BOS.

The token stream is `doc_1 EOS doc_2 EOS ...`; row i is `[BOS] + stream[i*(L-1) : (i+1)*(L-1)]`, so no token is
lost or repeated across rows (only the incomplete tail of the stream is dropped). Every row starting with BOS
matches how the model is used downstream, and lets the cache exclude that one position by index.
"""

from __future__ import annotations

from typing import Iterable, Iterator

import numpy as np

from saelab.data.corpus import CorpusSpec, Document, iter_documents
from saelab.errors import ConfigError, ModelError


def special_ids(tokenizer) -> tuple[int, int]:
    """(bos_id, eos_id) for a HF tokenizer; models without a BOS token reuse EOS, as GPT-2 does."""
    eos = tokenizer.eos_token_id
    bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else eos
    if bos is None:
        raise ModelError("the model's tokenizer has neither a BOS nor an EOS token, so rows cannot be packed")
    return int(bos), int(eos if eos is not None else bos)


def encode_batch(tokenizer, texts: list[str]) -> list[list[int]]:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:  # the Rust tokenizer directly: parallel, and no max-length warnings
        return [e.ids for e in backend.encode_batch(texts, add_special_tokens=False)]
    return tokenizer(texts, add_special_tokens=False)["input_ids"]


def iter_doc_tokens(docs: Iterable[Document], tokenizer, batch_docs: int = 64) -> Iterator[np.ndarray]:
    """Token ids of each document followed by EOS, tokenized in batches."""
    _, eos = special_ids(tokenizer)
    buf: list[str] = []

    def flush():
        for ids in encode_batch(tokenizer, buf):
            yield np.asarray(ids + [eos], dtype=np.int64)
        buf.clear()

    for doc in docs:
        buf.append(doc.text)
        if len(buf) >= batch_docs:
            yield from flush()
    if buf:
        yield from flush()


def pack_rows(chunks: Iterable[np.ndarray], context_size: int, bos_id: int) -> Iterator[np.ndarray]:
    """Pack a stream of token chunks into rows `[BOS] + (context_size - 1) tokens`."""
    if context_size < 2:
        raise ConfigError(f"context_size: must be >= 2, got {context_size}")
    body = context_size - 1
    pending = np.empty(0, dtype=np.int64)
    for chunk in chunks:
        pending = np.concatenate([pending, chunk]) if pending.size else np.asarray(chunk, dtype=np.int64)
        n_full = pending.size // body
        for i in range(n_full):
            row = np.empty(context_size, dtype=np.int64)
            row[0] = bos_id
            row[1:] = pending[i * body : (i + 1) * body]
            yield row
        pending = pending[n_full * body :]


def iter_packed_rows(spec: CorpusSpec, tokenizer, context_size: int, split: str = "train") -> Iterator[np.ndarray]:
    """The whole path: documents of a split → tokens → packed rows (lazily)."""
    bos, _ = special_ids(tokenizer)
    return pack_rows(iter_doc_tokens(iter_documents(spec, split), tokenizer), context_size, bos)


def batched_rows(rows: Iterable[np.ndarray], batch_size: int) -> Iterator[np.ndarray]:
    batch: list[np.ndarray] = []
    for row in rows:
        batch.append(row)
        if len(batch) == batch_size:
            yield np.stack(batch)
            batch = []
    if batch:
        yield np.stack(batch)
