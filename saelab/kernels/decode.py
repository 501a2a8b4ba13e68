"""`sparse_decode`: the TopK decoder as one autograd function, out[b] = Σ_s values[b, s] · W_dec[indices[b, s]].

Forward is a gather (embedding-bag), O(B·k·d) instead of the dense O(B·n·d). Backward gives
d_values[b, s] = <grad_out[b], W_dec[indices[b, s]]> and a *dense* dW_dec [n, d] (zero rows for unused latents,
because Adam keeps state for every row anyway); indices get no gradient.
"""

from __future__ import annotations

import weakref

import torch
from torch.autograd.function import once_differentiable

from saelab.kernels import torch_ops
from saelab.kernels.backend import backend_for, ops_for


_IN_RANGE: list = [None, -1, 0]  # the indices last found in range: weakref, version, their max + 1


def check_bounds(indices: torch.Tensor, n: int, what: str) -> None:
    """Every index in [0, n), the same error on both paths (the Triton kernels check no bounds: an index out of range
    there reads or writes outside the table). Cost: one min/max reduction over the B·k indices and, on CUDA, one
    device-to-host copy of its two numbers (a sync: the CPU stops queueing ahead) per call; the indices last found in
    range are remembered (until changed in place), so an encoder_values and a sparse_decode of one code check once."""
    if indices.numel() == 0:
        return
    ref, version, need = _IN_RANGE
    tracked = not indices.is_inference()  # inference tensors have no version counter
    if tracked and ref is not None and ref() is indices and version == indices._version and need <= n:
        return
    lo, hi = torch.stack(torch.aminmax(indices)).tolist()
    if lo < 0 or hi >= n:
        raise IndexError(f"{what}: indices must lie in [0, {n}) for a weight of {n} latents; found "
                         f"{lo if lo < 0 else hi} (padding slots too need a valid index, e.g. 0, with value 0)")
    if tracked:
        _IN_RANGE[:] = [weakref.ref(indices), indices._version, hi + 1]


def _check(indices: torch.Tensor, values: torch.Tensor, W: torch.Tensor, what: str, n: int) -> torch.Tensor:
    """The arguments' shapes and dtypes, and the indices' range [0, n); returns the indices as int64."""
    if indices.dim() != 2 or indices.shape != values.shape:
        raise ValueError(f"{what}: indices {tuple(indices.shape)} and values {tuple(values.shape)} must both be "
                         f"[B, k]")
    if W.dim() != 2:
        raise ValueError(f"{what}: weight must be 2-D, got shape {tuple(W.shape)}")
    if indices.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"{what}: indices must be an integer tensor (int64), got {indices.dtype}")
    if not values.is_floating_point():
        raise TypeError(f"{what}: values must be floating point, got {values.dtype}")
    check_bounds(indices, n, what)
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
    indices = _check(indices, values, W_dec, "sparse_decode", W_dec.shape[0])
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

    PyTorch path: the (token, group) segments are the bags of `torch_ops`' bag ops (`GroupedBags`). Triton path:
    the plain sparse decoder on [B·G, K] virtual rows whose values are masked to one group each; its kernels read no
    row for a zero value, so each decoder row is still read once per slot in the forward.
    """
    indices = _check(indices, values, W_dec, "grouped_decode", W_dec.shape[0])
    B, K = indices.shape
    G = int(n_groups)
    if backend_for(indices, values, W_dec) == "triton":
        mask = groups.unsqueeze(1) == torch.arange(G, device=groups.device).view(1, G, 1)  # [B, G, K]
        v = (values.unsqueeze(1) * mask).reshape(B * G, K)
        return SparseDecode.apply(indices.unsqueeze(1).expand(B, G, K).reshape(B * G, K), v, W_dec).view(B, G, -1)
    bag = (torch.arange(B, device=indices.device).unsqueeze(1) * G + groups.long()).reshape(-1)
    return GroupedBags.apply(indices.reshape(-1), values.reshape(-1), W_dec, bag, B * G).view(B, G, -1)


class GroupedBags(torch.autograd.Function):
    """out[g] = Σ_{e in bag g} values[e] · W_dec[flat[e]] on the PyTorch path, differentiable in values and W_dec
    (bag ids non-decreasing). The same semantics as `SparseDecode` (zero values read no row), for any bags."""

    @staticmethod
    def forward(ctx, flat: torch.Tensor, values: torch.Tensor, W_dec: torch.Tensor, bag: torch.Tensor,
                n_bags: int) -> torch.Tensor:
        ctx.save_for_backward(flat, values, W_dec, bag)
        return torch_ops.bag_sum(flat, values, bag, n_bags, W_dec)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: torch.Tensor):
        flat, values, W_dec, bag = ctx.saved_tensors
        _, need_values, need_weight, _, _ = ctx.needs_input_grad
        grad_out = grad_out.contiguous().to(W_dec.dtype)
        d_values = torch_ops.bag_dot(flat, bag, grad_out, W_dec).to(values.dtype) if need_values else None
        dW = torch_ops.bag_transpose_matmul(flat, values, bag, grad_out, W_dec.shape[0]) if need_weight else None
        return None, d_values, dW, None, None
