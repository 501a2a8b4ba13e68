"""`sparse_decode`: the TopK decoder as one autograd function, out[b] = Σ_s values[b, s] · W_dec[indices[b, s]].

Forward is a gather (embedding-bag), O(B·k·d) instead of the dense O(B·n·d). Backward gives
d_values[b, s] = <grad_out[b], W_dec[indices[b, s]]> and a *dense* dW_dec [n, d] (zero rows for unused latents,
because Adam keeps state for every row anyway); indices get no gradient.
"""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

from saelab.kernels.backend import ops_for


def _check(indices: torch.Tensor, values: torch.Tensor, W: torch.Tensor, what: str) -> torch.Tensor:
    if indices.dim() != 2 or indices.shape != values.shape:
        raise ValueError(f"{what}: indices {tuple(indices.shape)} and values {tuple(values.shape)} must both be "
                         f"[B, k]")
    if W.dim() != 2:
        raise ValueError(f"{what}: weight must be 2-D, got shape {tuple(W.shape)}")
    if indices.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"{what}: indices must be an integer tensor (int64), got {indices.dtype}")
    if not values.is_floating_point():
        raise TypeError(f"{what}: values must be floating point, got {values.dtype}")
    return indices.long()


class SparseDecode(torch.autograd.Function):
    @staticmethod
    def forward(ctx, indices: torch.Tensor, values: torch.Tensor, W_dec: torch.Tensor) -> torch.Tensor:
        ops = ops_for(indices, values, W_dec)
        ctx.ops = ops
        ctx.save_for_backward(indices, values, W_dec)
        return ops.gather_sum(indices, values, W_dec)

    @staticmethod
    @once_differentiable  # the backward itself is not differentiable (no double backward)
    def backward(ctx, grad_out: torch.Tensor):
        indices, values, W_dec = ctx.saved_tensors
        _, need_values, need_weight = ctx.needs_input_grad
        d_values, dW = ctx.ops.decoder_backward(indices, values, grad_out.contiguous(), W_dec,
                                                need_values, need_weight)
        return None, d_values, dW


def sparse_decode(indices: torch.Tensor, values: torch.Tensor, W_dec: torch.Tensor) -> torch.Tensor:
    """Σ_s values[b, s] · W_dec[indices[b, s]]  ->  [B, d] in W_dec's dtype.

    indices: integer [B, k] in [0, n) (padding entries: any valid index with value 0); values: [B, k];
    W_dec: [n, d] with contiguous rows. Differentiable in values and W_dec (dense gradient).
    """
    indices = _check(indices, values, W_dec, "sparse_decode")
    return SparseDecode.apply(indices, values, W_dec)


def decode(code, W_dec: torch.Tensor) -> torch.Tensor:
    """`sparse_decode` of a `SparseCode`."""
    return sparse_decode(code.indices, code.values, W_dec)


def grouped_decode(indices: torch.Tensor, values: torch.Tensor, W_dec: torch.Tensor, groups: torch.Tensor,
                   n_groups: int) -> torch.Tensor:
    """out[b, g] = Σ_{s: groups[b, s] = g} values[b, s] · W_dec[indices[b, s]]  ->  [B, n_groups, d].

    One pass over the code for all groups (Matryoshka: a cumulative sum over groups then gives every prefix's
    reconstruction). `groups` must be non-decreasing along each row (sort each token's latents by index once;
    padding slots go last with any group). Differentiable in values and W_dec.

    PyTorch path: one `embedding_bag` whose bags are the (token, group) segments. Triton path: the plain sparse
    decoder on [B·G, K] virtual rows whose values are masked to one group each; its kernels read no row for a zero
    value, so each decoder row is still read once per slot.
    """
    indices = _check(indices, values, W_dec, "grouped_decode")
    B, K = indices.shape
    G = int(n_groups)
    if ops_for(indices, values, W_dec).__name__.endswith("triton_ops"):
        mask = groups.unsqueeze(1) == torch.arange(G, device=groups.device).view(1, G, 1)  # [B, G, K]
        v = (values.unsqueeze(1) * mask).reshape(B * G, K)
        return SparseDecode.apply(indices.unsqueeze(1).expand(B, G, K).reshape(B * G, K), v, W_dec).view(B, G, -1)
    bag = (torch.arange(B, device=indices.device).unsqueeze(1) * G + groups.long()).reshape(-1)
    offsets = torch.searchsorted(bag, torch.arange(B * G, device=bag.device))
    out = torch.nn.functional.embedding_bag(indices.reshape(-1), W_dec, offsets, mode="sum",
                                            per_sample_weights=values.reshape(-1).to(W_dec.dtype))
    return out.view(B, G, -1)
