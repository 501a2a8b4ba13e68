"""The Triton path of the sparse ops: same four functions as `torch_ops`, launching `triton_kernels`.

The weight gradients (dW_dec, dW_enc) use a counting sort instead of OpenAI's comparison sort + float atomics:
histogram of latent ids → cumsum (CSR offsets) → reverse map of occurrences, then one owner program per latent row.
The sort depends only on the indices, so it is kept (a few entries, keyed by the indices tensor) and shared by the
decoder and encoder backward of the same code. Under `torch.use_deterministic_algorithms(True)` the reverse map is a
stable argsort instead of the atomic fill, so results are bit-for-bit repeatable.

Every op launches under its tensors' CUDA device (`_on_tensors_device`): a Triton launch goes to the *current* device,
which for tensors on cuda:1 is not theirs unless the caller switched to it.
"""

from __future__ import annotations

import contextlib
import functools
import weakref
from dataclasses import dataclass

import torch
import triton

from saelab.kernels.triton_kernels import (count_kernel, fill_kernel, gather_dot_kernel, gather_sum_kernel,
                                           owner_kernel)

MAX_FUSED_D = 4096  # longest row the owner kernel keeps whole in registers to fuse d_values; longer rows: 2 kernels
LATENTS_PER_PROGRAM = 4  # owner kernel: latents per program (amortises launch; small enough to balance)
SORT_BLOCK = 1024  # entries per program in the counting-sort kernels
TILE = 4096  # elements of the [rows × columns] tile one program holds in registers


def _block_d(D: int, largest: int = 1024) -> int:
    """Column block: the largest power of two ≤ `largest` that wastes ≤ 1/8 of the lanes on padding at width D."""
    full = triton.next_power_of_2(D)
    if full <= largest:
        return max(full, 16)
    block = largest
    while block > 128 and (triton.cdiv(D, block) * block - D) * 8 > D:
        block //= 2
    return block


def _tile_rows(block_d: int, want: int) -> int:
    """Rows per tile: enough for `want` (a power of two is taken), at most TILE // block_d."""
    return max(1, min(triton.next_power_of_2(max(want, 1)), TILE // block_d))


def _warps(tile: int) -> int:
    """About 8 tile elements a thread, at most 8 warps (every variant then fits in ≤ ~100 registers a thread with
    no spills on sm_80/sm_90, per `python -m saelab.kernels.compile_check`)."""
    return max(1, min(8, tile // 512))


def device_guard(device: torch.device):
    """Make `device` the current CUDA device for the launches inside (nothing to do for the interpreter's CPU)."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def _on_tensors_device(op):
    """Run `op(indices, ...)` under `device_guard(indices.device)` (every tensor of an op is on one device)."""
    @functools.wraps(op)
    def launch(indices: torch.Tensor, *args, **kwargs):
        with device_guard(indices.device):
            return op(indices, *args, **kwargs)
    return launch


def _rows(t: torch.Tensor) -> torch.Tensor:
    """A table whose rows are contiguous (stride(1) == 1); any row stride is fine."""
    return t if t.stride(1) == 1 or t.shape[1] <= 1 else t.contiguous()


# ------------------------------------------------------------------------------------------------ forward gathers
@_on_tensors_device
def gather_sum(indices: torch.Tensor, weights: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """out[b] = Σ_s weights[b, s] · table[indices[b, s]]  ->  [B, d] in table's dtype (fp32 accumulation)."""
    B, K = indices.shape
    table = _rows(table)
    D = table.shape[1]
    out = torch.empty(B, D, dtype=table.dtype, device=table.device)
    if K == 0:
        return out.zero_()
    if B == 0 or D == 0:
        return out
    block = _block_d(D)
    rows = _tile_rows(block, K)
    gather_sum_kernel[(B, triton.cdiv(D, block))](
        indices.contiguous(), weights.contiguous(), table, out, K, D, table.stride(0),
        BLOCK_K=rows, BLOCK_D=block, num_warps=_warps(rows * block))
    return out


@_on_tensors_device
def gather_dot(indices: torch.Tensor, dense: torch.Tensor, table: torch.Tensor,
               out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """out[b, s] = <dense[b], table[indices[b, s]]>  ->  [B, k] (fp32 accumulation)."""
    B, K = indices.shape
    table = _rows(table)
    D = table.shape[1]
    out = torch.empty(B, K, dtype=out_dtype or table.dtype, device=table.device)
    if B == 0 or K == 0:
        return out
    if D == 0:
        return out.zero_()
    block = _block_d(D)
    rows = _tile_rows(block, K)
    gather_dot_kernel[(B,)](indices.contiguous(), dense.contiguous(), table, out, K, D, table.stride(0),
                            BLOCK_K=rows, BLOCK_D=block, num_warps=_warps(rows * block))
    return out


# ------------------------------------------------------------------------------------------------ counting sort
@dataclass
class _CSR:
    start: torch.Tensor  # int32 [n + 1]: occurrences of latent j are rev[start[j]:start[j+1]]
    rev: torch.Tensor  # int32 [B·k]: flat (token·k + slot) positions grouped by latent
    order: torch.Tensor  # int64 [n]: latents by decreasing count (owner-kernel load balance)


_CSR_CACHE: list[tuple[weakref.ref, int, int, bool, _CSR]] = []
_CSR_CACHE_SIZE = 4


def _csr(indices: torch.Tensor, n: int) -> _CSR:
    deterministic = torch.are_deterministic_algorithms_enabled()
    for ref, version, n_, det, csr in _CSR_CACHE:
        if ref() is indices and version == indices._version and n_ == n and det == deterministic:
            return csr
    csr = _build_csr(indices, n, deterministic)
    _CSR_CACHE[:] = [e for e in _CSR_CACHE if e[0]() is not None][: _CSR_CACHE_SIZE - 1]  # drop dead codes
    _CSR_CACHE.insert(0, (weakref.ref(indices), indices._version, n, deterministic, csr))
    return csr


def _build_csr(indices: torch.Tensor, n: int, deterministic: bool) -> _CSR:
    flat = indices.reshape(-1).contiguous()
    total = flat.numel()
    if total >= 2 ** 31:
        raise ValueError(f"sparse kernels: B·k = {total} entries; the Triton path supports fewer than 2^31")
    dev = flat.device
    grid = (triton.cdiv(total, SORT_BLOCK),)
    count = torch.zeros(n, dtype=torch.int32, device=dev)
    if total:
        count_kernel[grid](flat, count, total, BLOCK=SORT_BLOCK)
    start = torch.zeros(n + 1, dtype=torch.int32, device=dev)
    torch.cumsum(count, 0, dtype=torch.int32, out=start[1:])
    if deterministic:
        rev = torch.argsort(flat, stable=True).to(torch.int32)
    else:
        rev = torch.empty(total, dtype=torch.int32, device=dev)
        if total:
            fill_kernel[grid](flat, start, torch.zeros_like(count), rev, total, BLOCK=SORT_BLOCK)
    order = torch.argsort(count, descending=True, stable=deterministic)
    return _CSR(start, rev, order)


# ------------------------------------------------------------------------------------------------ owner kernel
def _owner(csr: _CSR, weights: torch.Tensor, dense: torch.Tensor, n: int, out_dtype: torch.dtype,
           table: torch.Tensor | None = None, dot_out: torch.Tensor | None = None) -> tuple[torch.Tensor, bool]:
    """Dense [n, d] Σ weights·dense rows per latent; also fills dot_out when the row fits one block (returns
    whether it did)."""
    B, D = dense.shape
    K = weights.shape[1]
    out = torch.empty(n, D, dtype=out_dtype, device=dense.device)
    if n == 0 or D == 0:
        return out, False
    fuse = table is not None and dot_out is not None and D <= MAX_FUSED_D
    block = triton.next_power_of_2(D) if fuse else _block_d(D)
    rows = _tile_rows(block, triton.cdiv(B * K, n))  # about one latent's mean occurrence count per step
    n_progs = triton.cdiv(n, LATENTS_PER_PROGRAM)
    table = _rows(table) if fuse else out  # unused pointers when not fused
    owner_kernel[(n_progs, triton.cdiv(D, block))](
        csr.order, csr.start, csr.rev, weights.contiguous(), dense.contiguous(), out, table,
        dot_out if fuse else out, n, K, D, table.stride(0), n_progs,
        LATENTS=LATENTS_PER_PROGRAM, BLOCK_P=rows, BLOCK_D=block, FUSE_DOT=fuse, num_warps=_warps(rows * block))
    return out, fuse


@_on_tensors_device
def transpose_matmul(indices: torch.Tensor, weights: torch.Tensor, dense: torch.Tensor, n: int) -> torch.Tensor:
    """out[j] = Σ_{(b, s): indices[b, s] = j} weights[b, s] · dense[b]  ->  dense [n, d] in dense's dtype."""
    out, _ = _owner(_csr(indices, n), weights, dense, n, dense.dtype)
    return out


@_on_tensors_device
def decoder_backward(indices: torch.Tensor, values: torch.Tensor, grad_out: torch.Tensor, W_dec: torch.Tensor,
                     need_values: bool, need_weight: bool) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(d_values [B, k] in values' dtype, dW_dec [n, d] in W_dec's dtype), fused in one pass where d allows."""
    n = W_dec.shape[0]
    d_values = dW = None
    fused = False
    if need_values:
        d_values = torch.empty(indices.shape, dtype=values.dtype, device=values.device)
    if need_weight:
        dW, fused = _owner(_csr(indices, n), values, grad_out, n, W_dec.dtype,
                           table=W_dec if need_values else None, dot_out=d_values)
    if need_values and not fused:
        d_values = gather_dot(indices, grad_out, W_dec, out_dtype=values.dtype)
    return d_values, dW
