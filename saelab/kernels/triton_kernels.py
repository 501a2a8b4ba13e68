"""Triton kernels of the sparse decoder and the sparse encoder backward (launched by `triton_ops`).

All of them are gather/scatter kernels: memory-bound, fp32 accumulation, results cast to the output pointer's dtype.
Each program works on a [rows × BLOCK_D] tile: a block of k-slots (or of one latent's occurrences) times a block of
columns, so the row gathers of a block are issued together instead of as a chain of dependent scalar loads. Loops
run over k, over occurrences and (where needed) over column blocks, so nothing limits k, and every access is
masked, so d need not be a power of two.

Importing this module decides how the kernels run: `@triton.jit` compiles for the GPU, or, when TRITON_INTERPRET=1
was set before triton was imported, makes interpreted (slow, exact) functions that run on CPU tensors.

A slot whose value (weight) is 0 contributes nothing and reads no row, so 0 · (a non-finite row) adds 0, not NaN;
`torch_ops` does the same.
"""

from __future__ import annotations

import os

import triton
import triton.language as tl


@triton.jit
def gather_sum_kernel(idx_ptr, w_ptr, table_ptr, out_ptr, K, D, stride_t,
                      BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr):
    """out[b, cols] = Σ_s w[b, s] · table[idx[b, s], cols]. Grid (B, cdiv(D, BLOCK_D)): one token per program."""
    b = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    cmask = cols < D
    acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    for s0 in range(0, K, BLOCK_K):
        slots = s0 + tl.arange(0, BLOCK_K)
        smask = slots < K
        v = tl.load(w_ptr + b * K + slots, mask=smask, other=0.0).to(tl.float32)
        i = tl.load(idx_ptr + b * K + slots, mask=smask, other=0).to(tl.int64)
        live = v != 0.0  # zero values (padding of variable-k codes) read no row
        rows = tl.load(table_ptr + i[:, None] * stride_t + cols[None, :], mask=live[:, None] & cmask[None, :],
                       other=0.0)
        acc += tl.sum(rows.to(tl.float32) * v[:, None], axis=0)
    tl.store(out_ptr + b * D + cols, acc.to(out_ptr.dtype.element_ty), mask=cmask)


@triton.jit
def gather_dot_kernel(idx_ptr, dense_ptr, table_ptr, out_ptr, K, D, stride_t,
                      BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr):
    """out[b, s] = <dense[b], table[idx[b, s]]>. Grid (B,); columns looped in BLOCK_D chunks, so any d works.

    Used only when d is too long for the fused owner kernel (there the dot comes for free)."""
    b = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK_D)
    for s0 in range(0, K, BLOCK_K):
        slots = s0 + tl.arange(0, BLOCK_K)
        smask = slots < K
        i = tl.load(idx_ptr + b * K + slots, mask=smask, other=0).to(tl.int64)
        acc = tl.zeros([BLOCK_K], dtype=tl.float32)
        for c0 in range(0, D, BLOCK_D):
            cols = c0 + offs
            cmask = cols < D
            g = tl.load(dense_ptr + b * D + cols, mask=cmask, other=0.0).to(tl.float32)
            w = tl.load(table_ptr + i[:, None] * stride_t + cols[None, :], mask=smask[:, None] & cmask[None, :],
                        other=0.0)
            acc += tl.sum(w.to(tl.float32) * g[None, :], axis=1)
        tl.store(out_ptr + b * K + slots, acc.to(out_ptr.dtype.element_ty), mask=smask)


@triton.jit
def count_kernel(idx_ptr, count_ptr, total, BLOCK: tl.constexpr):
    """Counting sort, step 1: histogram of latent ids (integer atomics only)."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < total
    i = tl.load(idx_ptr + offs, mask=mask, other=0)
    tl.atomic_add(count_ptr + i, 1, mask=mask, sem="relaxed")


@triton.jit
def fill_kernel(idx_ptr, start_ptr, cursor_ptr, rev_ptr, total, BLOCK: tl.constexpr):
    """Counting sort, step 3 (after a cumsum gave CSR `start`): rev[start[j] + c] = flat position of j's c-th
    occurrence. The cursor is an integer atomic, so the order *within* a latent varies from run to run."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < total
    i = tl.load(idx_ptr + offs, mask=mask, other=0)
    c = tl.atomic_add(cursor_ptr + i, 1, mask=mask, sem="relaxed")
    base = tl.load(start_ptr + i, mask=mask, other=0)
    tl.store(rev_ptr + base + c, offs.to(tl.int32), mask=mask)


@triton.jit
def owner_kernel(order_ptr, start_ptr, rev_ptr, w_ptr, dense_ptr, out_ptr, table_ptr, dot_ptr,
                 n, K, D, stride_t, n_progs,
                 LATENTS: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_D: tl.constexpr, FUSE_DOT: tl.constexpr):
    """out[j, cols] = Σ over occurrences (b, s) of latent j of w[b, s] · dense[b, cols]; with FUSE_DOT also
    dot[b, s] = <dense[b], table[j]> (needs the whole row in one block: grid axis 1 of size 1).

    Each latent row is owned by one program, so rows are written once, without float atomics (bf16-safe and
    exact up to summation order), and unused latents get zero rows (a dense gradient, as Adam wants).
    Program p owns latents order[p], order[p + n_progs], ...: `order` lists latents by decreasing count, so the
    busy rows start first and each program gets a mix of busy and idle ones. Occurrences go BLOCK_P at a time.
    """
    pid = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    cmask = cols < D
    for r in range(LATENTS):
        slot = pid + r * n_progs
        if slot < n:
            j = tl.load(order_ptr + slot).to(tl.int64)
            beg = tl.load(start_ptr + j)
            end = tl.load(start_ptr + j + 1)
            acc = tl.zeros([BLOCK_D], dtype=tl.float32)
            if FUSE_DOT:
                wrow = tl.load(table_ptr + j * stride_t + cols, mask=cmask, other=0.0).to(tl.float32)
            for p0 in range(beg, end, BLOCK_P):
                ps = p0 + tl.arange(0, BLOCK_P)
                pmask = ps < end
                pos = tl.load(rev_ptr + ps, mask=pmask, other=0).to(tl.int64)
                w = tl.load(w_ptr + pos, mask=pmask, other=0.0).to(tl.float32)
                if FUSE_DOT:
                    live = pmask  # every occurrence needs its dot, zero-valued or not
                else:
                    live = pmask & (w != 0.0)
                g = tl.load(dense_ptr + (pos // K)[:, None] * D + cols[None, :], mask=live[:, None] & cmask[None, :],
                            other=0.0).to(tl.float32)
                if FUSE_DOT:  # g was read for the dot: a zero weight must still add 0, also to a non-finite g
                    acc += tl.sum(tl.where((w != 0.0)[:, None], g * w[:, None], 0.0), axis=0)
                else:
                    acc += tl.sum(g * w[:, None], axis=0)
                if FUSE_DOT:
                    tl.store(dot_ptr + pos, tl.sum(g * wrow[None, :], axis=1).to(dot_ptr.dtype.element_ty),
                             mask=pmask)
            tl.store(out_ptr + j * D + cols, acc.to(out_ptr.dtype.element_ty), mask=cmask)


def _interpreted(kernel) -> bool:
    """Was `kernel` built by the Triton interpreter? Asked of the kernel object itself, which works on every triton
    3.x (`triton.knobs`, the newer switch, exists only from 3.4)."""
    try:
        from triton.runtime.interpreter import InterpretedFunction
    except ImportError:  # a layout this module does not know: ask the switch the decorator read
        return os.environ.get("TRITON_INTERPRET", "0") == "1"
    return isinstance(kernel, InterpretedFunction)


# True when the kernels above were built in interpreter mode (they then run on CPU tensors)
INTERPRETED = _interpreted(gather_sum_kernel)
