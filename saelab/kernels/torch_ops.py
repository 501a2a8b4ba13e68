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


def _bags(indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Flat indices, bag offsets and the bag of each flat entry, for fixed-size bags of k (one bag per token)."""
    B, k = indices.shape
    flat = indices.reshape(-1)
    offsets = torch.arange(0, B * k, k, device=indices.device, dtype=indices.dtype)
    offset2bag = torch.arange(B, device=indices.device, dtype=indices.dtype).repeat_interleave(k)
    return flat, offsets, offset2bag


def gather_sum(indices: torch.Tensor, weights: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """out[b] = Σ_s weights[b, s] · table[indices[b, s]]  ->  [B, d] in table's dtype."""
    B, k = indices.shape
    if k == 0:
        return table.new_zeros(B, table.shape[1])
    return F.embedding_bag(indices, table, per_sample_weights=weights.to(table.dtype), mode="sum")


def gather_dot(indices: torch.Tensor, dense: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """out[b, s] = <dense[b], table[indices[b, s]]>  ->  [B, k] in table's dtype."""
    B, k = indices.shape
    if k == 0 or B == 0:
        return table.new_zeros(B, k)
    dense = dense.to(table.dtype)
    if _use_private(table):
        flat, offsets, offset2bag = _bags(indices)
        return _aten._embedding_bag_per_sample_weights_backward(dense, table, flat, offsets, offset2bag, 0).view(B, k)
    with torch.enable_grad():
        w = torch.zeros(B, k, dtype=table.dtype, device=table.device, requires_grad=True)
        out = F.embedding_bag(indices, table.detach(), per_sample_weights=w, mode="sum")
        (grad,) = torch.autograd.grad(out, w, dense)
    return grad


def transpose_matmul(indices: torch.Tensor, weights: torch.Tensor, dense: torch.Tensor, n: int) -> torch.Tensor:
    """out[j] = Σ_{(b, s): indices[b, s] = j} weights[b, s] · dense[b]  ->  dense [n, d] (zero rows for unused j).

    CPU: no [B·k, d] tensor. Measured candidates (B 4096, k 32, 1 thread, CPU time per call, min/median of 7;
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
    B, k = indices.shape
    out_dtype = dense.dtype
    if dense.dtype in _HALF:  # accumulate half-precision gradients in float32
        dense = dense.float()
    weights = weights.to(dense.dtype)
    d = dense.shape[1]
    if k == 0 or B == 0:
        return torch.zeros(n, d, dtype=out_dtype, device=dense.device)
    if dense.device.type == "cpu" and d <= COO_MAX_D:
        _, _, offset2bag = _bags(indices)
        S = torch.sparse_coo_tensor(torch.stack([indices.reshape(-1), offset2bag]), weights.reshape(-1), (n, B),
                                    check_invariants=False)
        out = torch.sparse.mm(S, dense)
    elif _use_private(dense):
        flat, _, offset2bag = _bags(indices)
        bag_size = torch.full((B,), k, dtype=indices.dtype, device=indices.device)
        out = _aten._embedding_bag_dense_backward(dense, flat, offset2bag, bag_size, bag_size, n, False, 0,
                                                  weights.reshape(-1))
    else:
        with torch.enable_grad():
            table = torch.zeros(n, d, dtype=dense.dtype, device=dense.device, requires_grad=True)
            y = F.embedding_bag(indices, table, per_sample_weights=weights.detach(), mode="sum")
            (out,) = torch.autograd.grad(y, table, dense)
    return out.to(out_dtype)


def decoder_backward(indices: torch.Tensor, values: torch.Tensor, grad_out: torch.Tensor, W_dec: torch.Tensor,
                     need_values: bool, need_weight: bool) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(d_values [B, k] in values' dtype, dW_dec [n, d] in W_dec's dtype) of out = sparse_decode(...)."""
    d_values = gather_dot(indices, grad_out, W_dec).to(values.dtype) if need_values else None
    dW = transpose_matmul(indices, values, grad_out.to(W_dec.dtype), W_dec.shape[0]) if need_weight else None
    return d_values, dW
