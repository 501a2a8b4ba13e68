"""Co-activation: for each latent, the latents most often active on the same tokens, by exact sparse counting.

count(i, j) = tokens where both i and j are active, counted over the first `max_tokens` scored tokens of the pass
(all of them when the pass is shorter; sae_vis also correlates on a token subset). Latents are ranked by Jaccard
count / (n_i + n_j − count), with n the active counts on those tokens, so a dense latent that fires everywhere
does not top every list; the count is kept too.

Counting: every token contributes its K(K−1)/2 (latent, latent) slot pairs to a dense int32 counter with one spare
row and column that absorb the inactive slots (id −1), so no pair needs filtering; the counter plus its transpose
is the symmetric count. When [F+1, F+1] exceeds `max_cells`,
the subset's entries are sorted by latent once and a block of latents at a time gets a [block, F+1] counter filled
from the pairs of its entries (one contiguous slice). Memory: max_tokens · K entries plus max_cells counters.
"""

from __future__ import annotations

from typing import Iterator

import numpy as np
import torch


def _subset(chunks: Iterator, max_tokens: int) -> torch.Tensor:
    parts, n_tok = [], 0
    for _, ids, _ in chunks:
        take = min(ids.shape[0], max_tokens - n_tok)
        if take <= 0:
            break
        parts.append(ids[:take])
        n_tok += take
    if not parts:
        return torch.zeros((0, 1), dtype=torch.int64)
    width = max(p.shape[1] for p in parts)
    return torch.cat([torch.nn.functional.pad(p, (0, width - p.shape[1]), value=-1) for p in parts]).long()


def _count(rows: torch.Tensor, partners: torch.Tensor, counts: torch.Tensor, F: int) -> None:
    """counts[(row, partner)] += 1 for every pair; rows [E] or [E, K] local row ids, partners [E, K] (−1 → F)."""
    p = torch.where(partners < 0, F, partners)
    keys = rows.unsqueeze(-1) * (F + 1) + (p.unsqueeze(1) if rows.dim() == 2 else p)
    counts.index_add_(0, keys.reshape(-1), torch.ones(keys.numel(), dtype=torch.int32))


def coactivation_neighbours(chunks: Iterator, n_latents: int, k: int = 10, max_tokens: int = 1 << 17,
                            max_cells: int = 1 << 26) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """(ids int32 [F, k] (−1 pads), counts int64 [F, k], jaccard float32 [F, k], tokens counted).

    `chunks` yields (first row, ids [N, K] int32 with −1 in inactive slots, anything) in token order."""
    F = n_latents
    codes = _subset(chunks, max_tokens)
    n_tok = codes.shape[0]
    out_ids = np.full((F, k), -1, dtype=np.int32)
    out_cnt = np.zeros((F, k), dtype=np.int64)
    out_jac = np.zeros((F, k), dtype=np.float32)
    kk = min(k, F - 1)
    if n_tok == 0 or kk <= 0:
        return out_ids, out_cnt, out_jac, n_tok
    n_act = torch.bincount(codes[codes >= 0], minlength=F)
    step = max(1, (1 << 22) // (codes.shape[1] ** 2))  # tokens per counting step: ≤ 4M pairs

    def finish(a0: int, c: torch.Tensor) -> None:
        # Only the nonzero counts matter (a pair never seen together is no neighbour), and they are a tiny share
        # of the [block, F] counter at large F: rank those entries instead of the dense block.
        r, j = c[:, :F].nonzero(as_tuple=True)  # row-major: j ascends within a row
        keep = r + a0 != j  # a latent is not its own neighbour
        r, j = r[keep], j[keep]
        cnt = c[r, j].long()
        jac = cnt.double() / (n_act[r + a0] + n_act[j] - cnt).clamp_min(1).double()
        order = torch.argsort(-jac, stable=True)  # ties: the lower latent id first
        order = order[torch.argsort(r[order], stable=True)]
        r, j, cnt, jac = r[order], j[order], cnt[order], jac[order]
        starts = torch.searchsorted(r, torch.arange(c.shape[0]))
        rank = torch.arange(len(r)) - starts[r]
        top = rank < kk
        rows, cols = (r[top] + a0).numpy(), rank[top].numpy()
        out_ids[rows, cols] = j[top].numpy()
        out_cnt[rows, cols] = cnt[top].numpy()
        out_jac[rows, cols] = jac[top].float().numpy()

    if (F + 1) * (F + 1) <= max_cells:  # one counter for everything: pairs of slots i < j straight from the tokens
        counts = torch.zeros((F + 1) * (F + 1), dtype=torch.int32)
        i, j = torch.triu_indices(codes.shape[1], codes.shape[1], 1)
        for t0 in range(0, n_tok, step):
            c = torch.where(codes[t0:t0 + step] < 0, F, codes[t0:t0 + step])
            keys = (c[:, i] * (F + 1) + c[:, j]).reshape(-1)
            counts.index_add_(0, keys, torch.ones(keys.numel(), dtype=torch.int32))
        c = counts.view(F + 1, F + 1)
        finish(0, (c + c.T)[:F])  # each unordered pair was counted once, in either orientation
        return out_ids, out_cnt, out_jac, n_tok

    nz = codes >= 0
    lat = codes[nz]
    tok = torch.arange(n_tok).unsqueeze(1).expand_as(codes)[nz]
    order = torch.argsort(lat)
    lat, tok = lat[order], tok[order]
    bounds = torch.cat([torch.zeros(1, dtype=torch.int64), torch.cumsum(n_act, 0)])
    block = max(1, min(F, max_cells // (F + 1)))
    for a0 in range(0, F, block):
        a1 = min(F, a0 + block)
        counts = torch.zeros((a1 - a0) * (F + 1), dtype=torch.int32)
        s, e = int(bounds[a0]), int(bounds[a1])
        for c0 in range(s, e, step):
            c1 = min(e, c0 + step)
            _count(lat[c0:c1] - a0, codes[tok[c0:c1]], counts, F)
        finish(a0, counts.view(a1 - a0, F + 1))
    return out_ids, out_cnt, out_jac, n_tok
