"""The one model pass: held-out rows → model (stopped at the SAE's hook) → SAE codes, written to the work folder.

Everything else in a bundle is computed from what this writes, without the model. The pass writes segments of
`segment_rows` whole rows, each one file, written under a temporary name and renamed when complete:

    work/seg-NNNNN.npz   tokens int32 [rows, T]            the rows, BOS first
                         ids    int32 [rows·(T-1), Kmax]   active latent ids per scored token (positions
                                                           1..T-1), active entries first, -1 in the other slots
                         vals   float32 [rows·(T-1), Kmax] their values (0 where inactive)
                         (Kmax = the most latents active on one token of the segment: any architecture fits)
    work/pass.json       {"complete": true, "rows": R}     written once the corpus or the row budget is exhausted

Memory stays at one segment whatever the token count; the disk holds ~8·L0 bytes per token until the bundle is
finished. A killed pass continues after its last complete segment: the corpus rows are a pure function of the
corpus and the tokenizer, so the rows it skips are the rows already written.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np
import torch
from tqdm.auto import tqdm

from saelab.eval.core import active_entries
from saelab.files import write_atomic, write_json_atomic

PASS = "pass.json"


def segment_file(work: Path, i: int) -> Path:
    return work / f"seg-{i:05d}.npz"


def pack_code(code, n_latents: int) -> tuple[np.ndarray, np.ndarray]:
    """A `SparseCode` [N, K] → (ids int32 [N, Kmax], values float32 [N, Kmax]): active entries (value != 0;
    repeated ids within a token summed first, as `active_entries` does) first in each token, -1 / 0 after."""
    n_tok = code.indices.shape[0]
    rows, lat, val = active_entries(code, n_latents)  # sorted by token
    counts = torch.bincount(rows, minlength=n_tok)
    width = max(int(counts.max()) if n_tok else 0, 1)
    start = torch.cumsum(counts, 0) - counts
    slot = torch.arange(rows.numel()) - start[rows]
    ids = torch.full((n_tok, width), -1, dtype=torch.int32)
    vals = torch.zeros((n_tok, width), dtype=torch.float32)
    ids[rows, slot] = lat.to(torch.int32)
    vals[rows, slot] = val.float()
    return ids.numpy(), vals.numpy()


def _pad(parts: list[np.ndarray], fill) -> np.ndarray:
    width = max(p.shape[1] for p in parts)
    return np.concatenate([np.pad(p, ((0, 0), (0, width - p.shape[1])), constant_values=fill) for p in parts])


def segments_done(work: Path) -> int:
    i = 0
    while segment_file(work, i).exists():
        i += 1
    return i


def pass_result(work: Path) -> dict | None:
    p = work / PASS
    return json.loads(p.read_text()) if p.exists() else None


def write_codes(work: Path, rows: Iterable[np.ndarray], n_rows: int, capture: Callable, encode: Callable,
                n_latents: int, segment_rows: int = 256, batch_rows: int = 32, progress: bool = True) -> int:
    """Run the pass, or what is left of it, and return the rows written (fewer than `n_rows` when the corpus ends
    first). `capture(tokens [B, T] int64) → acts [B·(T-1), d]` runs the model to the hook (positions 1..T-1);
    `encode(acts) → SparseCode`."""
    from saelab.data.packing import batched_rows

    done = pass_result(work)
    if done is not None:
        return int(done["rows"])
    seg = segments_done(work)
    it = iter(rows)
    r = 0
    for _ in range(min(seg * segment_rows, n_rows)):  # rows already written: re-derive them to reach the same stream point
        if next(it, None) is None:
            break
        r += 1
    bar = None
    while r < n_rows and r == seg * segment_rows:  # (not so only when the corpus ended inside written rows)
        take = min(segment_rows, n_rows - r)
        seg_rows = [row for _, row in zip(range(take), it)]
        if not seg_rows:
            break
        if bar is None:
            T = len(seg_rows[0])
            bar = tqdm(total=n_rows * (T - 1), initial=r * (T - 1), unit="tok", unit_scale=True,
                       desc="dashboard pass", disable=not progress)
        ids, vals = [], []
        for batch in batched_rows(seg_rows, batch_rows):
            i, v = pack_code(encode(capture(torch.from_numpy(batch))), n_latents)
            ids.append(i)
            vals.append(v)
            bar.update(batch.shape[0] * (batch.shape[1] - 1))
        _write_segment(segment_file(work, seg), np.stack(seg_rows).astype(np.int32), _pad(ids, -1), _pad(vals, 0))
        seg += 1
        r += len(seg_rows)
        if len(seg_rows) < take:
            break
    if bar is not None:
        bar.close()
    write_json_atomic(work / PASS, {"complete": True, "rows": r})
    return r


def _write_segment(path: Path, tokens: np.ndarray, ids: np.ndarray, vals: np.ndarray) -> None:
    write_atomic(path, lambda f: np.savez(f, tokens=tokens, ids=ids, vals=vals))


def iter_segments(work: Path, with_values: bool = True) -> Iterator[tuple[int, torch.Tensor, torch.Tensor | None]]:
    """(first row, ids [rows·(T-1), Kmax] int32, values or None) of each segment, in order."""
    r0 = 0
    for i in range(segments_done(work)):
        with np.load(segment_file(work, i), allow_pickle=False) as z:
            ids = torch.from_numpy(z["ids"])
            vals = torch.from_numpy(z["vals"]) if with_values else None
            n = z["tokens"].shape[0] if "tokens" in z.files else 0
        yield r0, ids, vals
        r0 += n


def read_tokens(work: Path, out: Path) -> tuple[int, int]:
    """Concatenate the segments' rows into the bundle's tokens.npy (streamed); returns (rows, T)."""
    n = segments_done(work)
    shapes = []
    for i in range(n):
        with np.load(segment_file(work, i), allow_pickle=False) as z:
            shapes.append(z["tokens"].shape)
    R = sum(s[0] for s in shapes)
    T = shapes[0][1] if shapes else 0
    mm = np.lib.format.open_memmap(out, mode="w+", dtype=np.int32, shape=(R, T))
    r = 0
    for i in range(n):
        with np.load(segment_file(work, i), allow_pickle=False) as z:
            t = z["tokens"]
            mm[r:r + len(t)] = t
            r += len(t)
    mm.flush()
    del mm
    return R, T
