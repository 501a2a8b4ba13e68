"""Streaming encoder top-k: each token's k largest pre-activations without ever holding the [B, n] matrix.

The encoder GEMM runs over blocks of at most `chunk` latents; each block's pre-activations are merged into a running
per-token top-k (keys, values, indices), so memory is O(B·(k + chunk)) instead of O(B·n). The result is today's
dense `pre.topk(k)` bit for bit on CPU (tests/test_streaming_topk.py), for three reasons, each checked here:

* The numbers. A block's `addmm(b[s:e], x, W[:, s:e])` is bitwise the full addmm's columns s:e on MKL 2024.2
  (AVX2) for blocks at least 12 wide (d 16-768, B 12-4096 or a multiple of 4, any column offset); narrower blocks,
  and widths not a multiple of 4 with fewer than 12 tokens (B not a multiple of 4) on 2 threads, take MKL's
  small-matrix kernels, which sum in another order (a few ulps). So blocks are a multiple of `BLOCK_ALIGN` columns
  wide, a narrower remainder joins the last full block, and a batch of fewer than `SMALL_BATCH` tokens is one block
  (its [B, n] is smaller than W_enc). Row subsets are *not* bitwise (an addmm of 1-7 rows
  differs from the same rows of the batch's), so no step here ever recomputes a row subset: every GEMM has the
  whole batch's rows.
* The order. torch's CPU topk (ATen TopKImpl.h) sorts the row with `std::partial_sort` when k·64 ≤ n, so even with
  sorted=False its output is in descending order; otherwise it uses `std::nth_element`, whose order is arbitrary.
  Below that width the streaming path runs the dense top-k itself (B·n < 64·B·k is within the memory bound).
* Ties. Neither std algorithm breaks ties by index: which of several equal values is kept, and in which slot, depends
  on the heap (or the introselect pivots) over the whole row. A merge cannot reproduce that, but it knows exactly
  when it matters: the merged keys are the row's top-k multiset, the largest key a merge dropped is the row's
  (k+1)-th, so a row's answer is determined by its keys alone iff its k keys are strictly decreasing and the k-th
  is strictly above the (k+1)-th (NaN, which topk ranks first, fails these comparisons too). Rows that fail are
  recomputed whole — block by block over the whole batch, so the same bits — and given to `topk` like the dense
  path, a group of rows at a time within the same memory bound (a pathological batch of all-tied rows, such as
  all-zero codes, costs one more encoder pass per group).

`key` ranks by something other than the pre-activation itself (AbsTopK's |pre|, g-SAE's gradient score): it maps a
block of pre-activations (and its column range) to ranking keys elementwise per column, and the values returned are
still the pre-activations at the chosen indices. `columns` restricts the scan to a subset of latents (AuxK's dead
ones), gathered a block at a time; indices are then positions in `columns`.

On CUDA (Triton path, see `backend`) a call ranked by the pre-activations themselves (no `key`), k ≤ 256
(`triton_topk_stream.MAX_K`), runs the fused Triton kernel instead (`triton_topk_stream`: the GEMM tile and the
top-k merge in one kernel, no block of pre-activations in memory): the same selection with ties to the lowest index,
values to GEMM rounding.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from saelab.kernels.backend import backend_for, forced_backend, with_fallback

BLOCK_ALIGN = 16  # block widths are multiples of this (MKL computes narrow or odd blocks with other kernels)
SMALL_BATCH = 12  # fewer rows: one block (MKL's kernel for them depends on the block's width)
PARTIAL_SORT_FACTOR = 64  # ATen's CPU topk uses partial_sort (descending output) when k * 64 <= n

# (pre-activations of one block [B, e - s], s, e) -> ranking keys [B, e - s]
Key = Callable[[torch.Tensor, int, int], torch.Tensor]


def abs_key(pre: torch.Tensor, s: int, e: int) -> torch.Tensor:
    """Rank by magnitude (AbsTopK, signed AuxK)."""
    return pre.abs()


def relu_key(pre: torch.Tensor, s: int, e: int) -> torch.Tensor:
    """Rank ReLU'd pre-activations (TopK's relu_before_topk)."""
    return pre.clamp_min(0)


# the keys the fused Triton kernel computes itself (its KEY); any other key (g-SAE's gradient) takes the torch path
FUSED_KEYS: dict = {None: "pre", abs_key: "abs", relu_key: "relu"}


def block_bounds(n: int, chunk: int, rows: int | None = None) -> list[tuple[int, int]]:
    """The column blocks [s, e) of a scan over n latents: `chunk` rounded down to a multiple of BLOCK_ALIGN (at least
    BLOCK_ALIGN) wide, a remainder narrower than BLOCK_ALIGN joined to the block before it; one block when chunk ≥ n
    or the batch has fewer than SMALL_BATCH `rows`."""
    if chunk < 1:
        raise ValueError(f"streaming_topk: chunk must be >= 1, got {chunk}")
    if chunk >= n or (rows is not None and rows < SMALL_BATCH):
        return [(0, n)]
    width = max(BLOCK_ALIGN, chunk // BLOCK_ALIGN * BLOCK_ALIGN)
    bounds = [(s, min(n, s + width)) for s in range(0, n, width)]
    if len(bounds) > 1 and bounds[-1][1] - bounds[-1][0] < BLOCK_ALIGN:  # no narrow remainder: it joins the last
        bounds[-2:] = [(bounds[-2][0], n)]
    return bounds


def block_preacts(x_c: torch.Tensor, W_enc: torch.Tensor, b_enc: torch.Tensor, s: int, e: int,
                  columns: torch.Tensor | None = None) -> torch.Tensor:
    """Pre-activations of latents s:e (of `columns[s:e]` when given) for every row of x_c: [B, e − s]."""
    if columns is None:
        return torch.addmm(b_enc[s:e], x_c, W_enc[:, s:e])
    cols = columns[s:e]
    # rows of W_encᵀ by embedding keep the column-major layout of W_enc, so the GEMM is the dense one's
    return torch.addmm(b_enc[cols], x_c, F.embedding(cols, W_enc.T).T)


@torch.no_grad()
def streaming_topk(x_c: torch.Tensor, W_enc: torch.Tensor, b_enc: torch.Tensor, k: int, chunk: int,
                   key: Key | None = None, columns: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(values [B, k], indices [B, k]): `pre.topk(k, sorted=False)` of pre = x_c·W_enc + b_enc (ranked by `key(pre)`
    when given; values are pre at the indices) computed in blocks of at most `chunk` latents. No autograd."""
    n = W_enc.shape[1] if columns is None else columns.numel()
    if not 1 <= k <= n:
        raise ValueError(f"streaming_topk: k must be in [1, {n}], got {k}")
    if key in FUSED_KEYS and backend_for(x_c, W_enc, b_enc, columns) == "triton":
        fused = _fused_topk(x_c, W_enc, b_enc, k, columns, FUSED_KEYS[key])
        if fused is not None:
            return fused
    blocks = block_bounds(n, chunk, x_c.shape[0])
    if len(blocks) == 1 or k * PARTIAL_SORT_FACTOR > n:  # one block, or narrow enough that [B, n] is O(B·k)
        pre = block_preacts(x_c, W_enc, b_enc, 0, n, columns)
        idx = (pre if key is None else key(pre, 0, n)).topk(k, dim=-1, sorted=False).indices
        return pre.gather(1, idx), idx

    B = x_c.shape[0]
    run_key = x_c.new_empty(B, 0, dtype=b_enc.dtype)
    run_val = run_key
    run_idx = torch.empty(B, 0, dtype=torch.long, device=x_c.device)
    dropped = torch.full((B,), float("-inf"), dtype=b_enc.dtype, device=x_c.device)  # largest key not kept
    for s, e in blocks:
        pre = block_preacts(x_c, W_enc, b_enc, s, e, columns)
        block_key = pre if key is None else key(pre, s, e)
        # the block's own top k+1 first, so the merge sorts 2k+1 candidates a row instead of copying the block: at
        # least one of them is dropped, and it is >= every entry of the block outside them, so `dropped` stays exact
        best = block_key.topk(min(k + 1, e - s), dim=1, sorted=False)
        cand_key = torch.cat([run_key, best.values], 1)
        top = cand_key.topk(min(k + 1, cand_key.shape[1]), dim=1, sorted=True)
        if top.values.shape[1] > k:
            dropped = torch.maximum(dropped, top.values[:, k])  # NaN propagates, and fails the checks below
        pos = top.indices[:, :k]
        run_key = top.values[:, :k]
        run_val = run_key if key is None else torch.cat([run_val, pre.gather(1, best.indices)], 1).gather(1, pos)
        run_idx = torch.cat([run_idx, best.indices + s], 1).gather(1, pos)

    # rows whose answer the keys alone decide: strictly decreasing, and the k-th strictly above the (k+1)-th
    decided = (run_key[:, :-1] > run_key[:, 1:]).all(1) & (run_key[:, -1] > dropped)
    tied = (~decided).nonzero().squeeze(1)
    if tied.numel():
        group = max(1, B * (k + blocks[0][1]) // n)  # rows per re-scan, within the streaming memory bound
        for g in range(0, tied.numel(), group):
            rows = tied[g:g + group]
            vals, idx = _dense_rows(x_c, W_enc, b_enc, k, blocks, key, columns, rows)
            run_val[rows] = vals
            run_idx[rows] = idx
    return run_val, run_idx


def _dense_rows(x_c, W_enc, b_enc, k, blocks, key, columns, rows):
    """The dense path's top-k of some rows: their whole pre-activation rows, each block computed for the whole batch
    (the first pass's bits), then `topk` on the rows as the dense path does."""
    n = blocks[-1][1]
    full_val = x_c.new_empty(rows.numel(), n, dtype=b_enc.dtype)
    full_key = full_val if key is None else torch.empty_like(full_val)
    for s, e in blocks:
        pre = block_preacts(x_c, W_enc, b_enc, s, e, columns)
        full_val[:, s:e] = pre[rows]
        if key is not None:
            full_key[:, s:e] = key(pre, s, e)[rows]
    idx = full_key.topk(k, dim=-1, sorted=False).indices
    return full_val.gather(1, idx), idx


def _fused_topk(x_c, W_enc, b_enc, k, columns, key: str):
    """The fused Triton kernel's (values, indices); None where it does not serve the call (k above its MAX_K, mixed
    dtypes, which the dense addmm refuses too) or failed in `auto` (warned once by `with_fallback`): the blocked
    torch path answers."""
    from saelab.kernels import triton_topk_stream as fused

    if k > fused.MAX_K or not x_c.dtype == W_enc.dtype == b_enc.dtype:
        return None
    if forced_backend() == "triton":
        return fused.fused_topk(x_c, W_enc, b_enc, k, key, columns)
    return with_fallback(x_c.device, frozenset({x_c.dtype}), "streaming_topk",
                         lambda: fused.checked(x_c.device, x_c.dtype)
                         and fused.fused_topk(x_c, W_enc, b_enc, k, key, columns), lambda: None)
