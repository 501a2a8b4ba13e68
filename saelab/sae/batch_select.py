"""Selections over the whole batch × latent matrix, from the dense pre-activations or block by block without them:
BatchTopK's global top k·B (BatchTopK, Matryoshka, Mutual Choice, Feature Choice's usage) and threshold inference.

BatchTopK keeps every entry at or above the cut t, the (k·B)-th largest pre-activation of the (global) batch; ties at
t are all kept, so the selected set is decided by the value t alone. Blocks of latents (`saelab.kernels.topk_stream`'s
`block_bounds` and `block_preacts`, whose pre-activations are the dense GEMM's bits) stream through a `RunningTop` of
the k·B largest entries seen with their (token, latent); an entry below its running bound can never be selected and
is not kept, so the memory is O(k·B + block), never [B, n]. The dense path is the same code with one block.

Exact, ties included: the cut is the value of the (k·B)-th largest entry, the same float whichever copies of a tied
value were kept; the kept entries are then every buffered entry ≥ t, unless a shrink of the buffer dropped an entry
equal to t (it knows the largest value it dropped), in which case one more pass collects every entry ≥ t. A NaN makes
the dense path's cut NaN, which selects nothing; it does here too. Under torch.distributed "the batch" is the global
one: each rank's k·B·world largest values go to `global_cut`, every rank gets the same t and keeps its entries ≥ t.
"""

from __future__ import annotations

import math
from typing import Callable, Iterable

import torch

from saelab.distributed import rank_world
from saelab.kernels.topk_stream import block_bounds, block_preacts
from saelab.sae.architectures import global_cut, pack_rows

# () -> the pre-activation blocks (first column s, [B, e − s]) in column order; called again for a second pass
Blocks = Callable[[], Iterable[tuple[int, torch.Tensor]]]


class RunningTop:
    """The `want` largest entries of a stream of [B, w] blocks, with their (row, column). Entries below `bound` (a
    lower bound of the stream's want-th largest) are never kept; the buffer holds up to 2·want entries and is cut
    back to the want largest when it overflows, remembering the largest value it dropped (`dropped`)."""

    def __init__(self, want: int, dtype: torch.dtype, device):
        self.want = want
        self.values = torch.empty(0, dtype=dtype, device=device)
        self.rows = self.cols = torch.empty(0, dtype=torch.long, device=device)
        self.bound = torch.tensor(float("-inf"), dtype=dtype, device=device)
        self.dropped = self.bound
        self.nan = False  # a NaN was seen: the cut is NaN, nothing is selected

    def add(self, pre: torch.Tensor, s: int) -> None:
        """Take in the block `pre` [B, w] of columns s:s+w. A NaN anywhere is found among the entries kept (topk
        and `~(pre < bound)` both let it through) and ends the scan: the cut is NaN."""
        if self.nan:
            return
        if self.values.numel() < self.want:
            rows, cols, vals = self._first(pre, s)
        else:
            rows, cols, vals = entries(pre, s, ~(pre < self.bound))
        if bool(torch.isnan(vals).any()):
            self.nan = True
            return
        self.values, self.rows, self.cols = (torch.cat(p) for p in ((self.values, vals), (self.rows, rows),
                                                                     (self.cols, cols)))
        if self.values.numel() > 2 * self.want:
            keep = torch.zeros_like(self.values, dtype=torch.bool)
            top = self.values.topk(self.want, sorted=False)
            keep[top.indices] = True
            self.dropped = torch.maximum(self.dropped, self.values[~keep].max())
            self.bound = torch.maximum(self.bound, top.values.min())
            self.values, self.rows, self.cols = self.values[keep], self.rows[keep], self.cols[keep]

    def _first(self, pre: torch.Tensor, s: int):
        """Entries of a block met without a bound (the first, usually; the whole matrix on the dense path), as the
        dense BatchTopK finds them: each row's top m = 2·want/B are candidates, the bound is the want-th largest of
        them (and of what is kept), and a row whose every candidate is ≥ the bound is scanned whole; any other row's
        entries ≥ the bound are all among its candidates."""
        B, w = pre.shape
        m = min(w, math.ceil(2 * self.want / B))
        cand = pre.topk(m, dim=1, sorted=False) if m < w else None
        cand_values = pre if cand is None else cand.values
        pool = torch.cat([self.values, cand_values.reshape(-1)])
        if pool.numel() >= self.want and not bool(torch.isnan(pool).any()):
            self.bound = torch.maximum(self.bound, pool.topk(self.want, sorted=False).values.min())
        keep = ~(cand_values < self.bound)
        if cand is None:
            return entries(pre, s, keep)
        full = keep.all(1)
        keep[full] = False
        rows = torch.arange(B, device=pre.device).unsqueeze(1).expand(B, m)[keep]
        found = [(rows, cand.indices[keep] + s, cand_values[keep])]
        if bool(full.any()):
            fr = full.nonzero().squeeze(1)
            r, c, v = entries(pre[fr], s, ~(pre[fr] < self.bound))
            found.append((fr[r], c, v))
        return tuple(torch.cat(p) for p in zip(*found))

    def cut(self) -> torch.Tensor:
        """The want-th largest value of the stream (of every rank's streams under torch.distributed; NaN if any
        rank saw a NaN, as the dense path's topk ranks NaN first)."""
        nan = self.values.new_tensor([float("nan")])
        return global_cut(nan if self.nan else self.values, self.want, rank_world()[1])


def entries(pre: torch.Tensor, s: int, mask: torch.Tensor):
    """(rows, columns, values) of a block's entries where `mask`, columns offset by the block's first column s."""
    rows, cols = mask.nonzero(as_tuple=True)
    return rows, cols + s, pre[rows, cols]


def batch_topk_entries(blocks: Blocks, k: int, batches: int | None = None) -> tuple[torch.Tensor, torch.Tensor,
                                                                                      torch.Tensor]:
    """(rows, columns, values) of the BatchTopK selection (every entry ≥ the (k·B·world)-th largest), unordered."""
    top = None
    for s, pre in blocks():
        if top is None:
            top = RunningTop(k * pre.shape[0] * (batches or rank_world()[1]), pre.dtype, pre.device)
        top.add(pre, s)
    cut = top.cut()
    if bool(top.dropped >= cut):  # a shrink dropped entries tied at the cut: collect every entry ≥ cut again
        found = [entries(pre, s, pre >= cut) for s, pre in blocks()]
        return tuple(torch.cat(p) for p in zip(*found))
    keep = top.values >= cut
    return top.rows[keep], top.cols[keep], top.values[keep]


def batch_topk_indices(pre: torch.Tensor, k: int, batches: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """BatchTopK on the dense pre-activations [B, n]: the k·B largest entries of the whole matrix (all ranks' under
    torch.distributed), packed per token (`pack_rows`: columns ascending): (indices, valid)."""
    rows, cols, _ = batch_topk_entries(lambda: [(0, pre)], k, batches)
    return pack_rows(rows, cols, pre.shape[0])


def preact_blocks(x_c: torch.Tensor, W_enc: torch.Tensor, b_enc: torch.Tensor, chunk: int,
                  first_column: list | None = None) -> Blocks:
    """The pre-activation blocks of at most `chunk` latents (0: one block, the dense GEMM), computed when iterated;
    the first pass appends latent 0's pre-activations [B] to `first_column` (what the dense path reads at a padded
    slot, index 0)."""
    n = W_enc.shape[1]

    def blocks():
        for s, e in block_bounds(n, chunk, x_c.shape[0]) if chunk else [(0, n)]:
            pre = block_preacts(x_c, W_enc, b_enc, s, e)
            if s == 0 and first_column is not None and not first_column:
                first_column.append(pre[:, 0].clone())
            yield s, pre
    return blocks


def packed(rows: torch.Tensor, cols: torch.Tensor, values: torch.Tensor, first_column: torch.Tensor, n: int):
    """(values [B, K], indices [B, K], valid [B, K]) of flat entries, packed per token as `pack_rows` packs them
    (columns ascending); a padded slot holds the token's pre-activation of latent 0, as the dense path's gather."""
    order = torch.argsort(rows * n + cols)
    idx, valid = pack_rows(rows[order], cols[order], first_column.shape[0], presorted=True)
    vals = first_column.unsqueeze(1).expand(idx.shape).clone().masked_scatter_(valid, values[order])
    return vals, idx, valid


@torch.no_grad()
def batch_topk_streaming(x_c: torch.Tensor, W_enc: torch.Tensor, b_enc: torch.Tensor, k: int, chunk: int,
                         batches: int | None = None):
    """`batch_topk_indices` of pre = x_c·W_enc + b_enc in blocks of at most `chunk` latents, with the selected
    pre-activations: (values, indices, valid), each [B, K], equal to the dense path's bit for bit."""
    first: list = []
    rows, cols, vals = batch_topk_entries(preact_blocks(x_c, W_enc, b_enc, chunk, first), k, batches)
    return packed(rows, cols, vals, first[0], W_enc.shape[1])


@torch.no_grad()
def threshold_streaming(x_c: torch.Tensor, W_enc: torch.Tensor, b_enc: torch.Tensor, threshold: torch.Tensor,
                        chunk: int):
    """`threshold_indices` (every latent whose pre-activation exceeds its threshold, [n] or a scalar tensor) in
    blocks of at most `chunk` latents, with the selected pre-activations: (values, indices, valid)."""
    first: list = []
    theta = threshold.expand(W_enc.shape[1])
    found = [entries(pre, s, pre > theta[s:s + pre.shape[1]])
             for s, pre in preact_blocks(x_c, W_enc, b_enc, chunk, first)()]
    rows, cols, vals = (torch.cat(p) for p in zip(*found))
    return packed(rows, cols, vals, first[0], W_enc.shape[1])
