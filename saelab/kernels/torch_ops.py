"""The exact PyTorch path of the sparse ops (CPU, and the fallback on GPUs without Triton).

Everything here is an embedding-bag in disguise: the decoder forward *is* `embedding_bag(indices, W_dec,
per_sample_weights=values, mode="sum")`, and its two backward pieces are the two halves of embedding_bag's own
backward. On the CPU we call those two aten kernels directly:

* `_embedding_bag_dense_backward` (the weight gradient) sorts the B·k indices once, then gives each latent row to
  one thread, which adds `w · dense[token]` for each occurrence with a BLAS axpy: the owner-per-row scheme of the
  Triton path, with no `[B·k, d]` contributions tensor and no atomics. For narrow rows (d ≤ 512) a COO
  `torch.sparse.mm` is faster (measured, see `transpose_matmul`).
* `_embedding_bag_per_sample_weights_backward` (the per-value gradient) takes `<grad[token], W[latent]>` for each
  (token, slot) without gathering a `[B, k, d]` block.

They are private ops, so where they are missing, and off the CPU (where this path is only the no-Triton fallback),
the same numbers come from autograd through the public `F.embedding_bag`, which costs one extra gather.

Half-precision weight gradients are accumulated in float32 and cast once at the end.

A slot whose weight is 0 (padding of a variable-k code) contributes nothing to a sum and reads no row, as on the
Triton path: such entries are dropped before the sums (one pass over the B·k entries), so 0 · (a non-finite row)
adds 0, not NaN. `gather_dot` still gives every slot its dot product (the gradient of a zero value is not zero).

Each op is written for *bags*: flat entries (index, weight) with a non-decreasing bag id each, one bag per output
row. The four ops of the common API use one bag of k per token; `grouped_decode` uses one bag per (token, group).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

_aten = torch.ops.aten
_HAS_PRIVATE = all(hasattr(_aten, name) for name in
                   ("_embedding_bag_dense_backward", "_embedding_bag_per_sample_weights_backward"))
_HALF = (torch.float16, torch.bfloat16)
COO_MAX_D = 512  # CPU weight gradients: COO sparse.mm up to this row width, embedding-bag backward above


def _use_private(t: torch.Tensor) -> bool:
    return _HAS_PRIVATE and t.device.type == "cpu"


def token_bags(indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(flat indices, bag id of each flat entry) for one bag of k slots per token."""
    B, k = indices.shape
    return indices.reshape(-1), torch.arange(B, device=indices.device).repeat_interleave(k)


def _offsets(bag: torch.Tensor, n_bags: int) -> torch.Tensor:
    """First entry of each bag (bag ids non-decreasing; an empty bag starts where the next one does)."""
    return torch.searchsorted(bag, torch.arange(n_bags, device=bag.device, dtype=bag.dtype))


def _live(flat: torch.Tensor, weights: torch.Tensor, bag: torch.Tensor):
    """The entries with a non-zero weight (what the Triton kernels read)."""
    live = weights != 0
    return flat[live], weights[live], bag[live]


def bag_sum(flat: torch.Tensor, weights: torch.Tensor, bag: torch.Tensor, n_bags: int,
            table: torch.Tensor) -> torch.Tensor:
    """out[g] = Σ_{e in bag g} weights[e] · table[flat[e]]  ->  [n_bags, d] in table's dtype; zero weights skipped."""
    flat, weights, bag = _live(flat, weights, bag)
    return F.embedding_bag(flat, table, _offsets(bag, n_bags), mode="sum",
                           per_sample_weights=weights.to(table.dtype))


def bag_dot(flat: torch.Tensor, bag: torch.Tensor, dense: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """out[e] = <dense[bag[e]], table[flat[e]]>  ->  [E] in table's dtype (every entry, zero-weighted or not)."""
    if flat.numel() == 0:
        return table.new_zeros(0)
    dense = dense.to(table.dtype)
    offsets = _offsets(bag, dense.shape[0])
    if _use_private(table):
        return _aten._embedding_bag_per_sample_weights_backward(dense, table, flat, offsets, bag, 0)
    with torch.enable_grad():
        w = torch.zeros(flat.shape, dtype=table.dtype, device=table.device, requires_grad=True)
        out = F.embedding_bag(flat, table.detach(), offsets, per_sample_weights=w, mode="sum")
        (grad,) = torch.autograd.grad(out, w, dense)
    return grad


def bag_transpose_matmul(flat: torch.Tensor, weights: torch.Tensor, bag: torch.Tensor, dense: torch.Tensor,
                         n: int) -> torch.Tensor:
    """out[j] = Σ_{e: flat[e] = j} weights[e] · dense[bag[e]]  ->  dense [n, d] in dense's dtype (zero rows for
    unused j; zero weights skipped).

    CPU: no [E, d] tensor. Measured candidates (B 4096, k 32, 1 thread, CPU time per call, min/median of 7;
    wall-clock 2-thread timings on the loaded dev box were too noisy to rank; rerun bench/kernels.py
    --candidates on a quiet machine):
        d / n          index_add [B·k,d]  emb.-bag backward  CSR(sorted)@G  CSR[B,n].t()@G  COO sparse.mm
        256 / 4096     75.4/77.9          16.3/17.0          10.8/12.9      12.2/14.8       7.7/8.1
        768 / 24576    247/254            58.8/60.7          82.5/84.1      83.0/85.0       94.8/100
        768 / 32768    259/267            71.7/73.2          106/108        108/109         122/126
    and a sweep at n = 16 d: COO wins up to d = 512 (21.5 vs 23.9 ms), embedding-bag's backward from 768 on
    (38.4 vs 60.2 ms). So: COO sparse.mm (coalesce = one sort, then one pass) for narrow rows, embedding-bag's
    owner-per-row backward (per-occurrence axpy, whose call overhead dominates at small d) for wide ones.
    """
    n_bags, d = dense.shape
    out_dtype = dense.dtype
    if dense.dtype in _HALF:  # accumulate half-precision gradients in float32
        dense = dense.float()
    flat, weights, bag = _live(flat, weights.to(dense.dtype), bag)
    if flat.numel() == 0:
        return torch.zeros(n, d, dtype=out_dtype, device=dense.device)
    if dense.device.type == "cpu" and d <= COO_MAX_D:
        S = torch.sparse_coo_tensor(torch.stack([flat, bag]), weights, (n, n_bags), check_invariants=False)
        out = torch.sparse.mm(S, dense)
    elif _use_private(dense):
        bag_size = torch.bincount(bag, minlength=n_bags)
        out = _aten._embedding_bag_dense_backward(dense, flat, bag, bag_size, bag_size, n, False, 0, weights)
    else:
        with torch.enable_grad():
            table = torch.zeros(n, d, dtype=dense.dtype, device=dense.device, requires_grad=True)
            y = F.embedding_bag(flat, table, _offsets(bag, n_bags), per_sample_weights=weights, mode="sum")
            (out,) = torch.autograd.grad(y, table, dense)
    return out.to(out_dtype)


# ------------------------------------------------------------------------------------------------ the common API
def gather_sum(indices: torch.Tensor, weights: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """out[b] = Σ_s weights[b, s] · table[indices[b, s]]  ->  [B, d] in table's dtype."""
    flat, bag = token_bags(indices)
    return bag_sum(flat, weights.reshape(-1), bag, indices.shape[0], table)


def gather_dot(indices: torch.Tensor, dense: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """out[b, s] = <dense[b], table[indices[b, s]]>  ->  [B, k] in table's dtype."""
    flat, bag = token_bags(indices)
    return bag_dot(flat, bag, dense, table).view(indices.shape)


def transpose_matmul(indices: torch.Tensor, weights: torch.Tensor, dense: torch.Tensor, n: int) -> torch.Tensor:
    """out[j] = Σ_{(b, s): indices[b, s] = j} weights[b, s] · dense[b]  ->  dense [n, d] (zero rows for unused j)."""
    flat, bag = token_bags(indices)
    return bag_transpose_matmul(flat, weights.reshape(-1), bag, dense, n)


def decoder_backward(indices: torch.Tensor, values: torch.Tensor, grad_out: torch.Tensor, W_dec: torch.Tensor,
                     need_values: bool, need_weight: bool) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(d_values [B, k] in values' dtype, dW_dec [n, d] in W_dec's dtype) of out = sparse_decode(...)."""
    d_values = gather_dot(indices, grad_out, W_dec).to(values.dtype) if need_values else None
    dW = transpose_matmul(indices, values, grad_out.to(W_dec.dtype), W_dec.shape[0]) if need_weight else None
    return d_values, dW
