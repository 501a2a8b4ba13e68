"""`encoder_values`: the sparse backward of the TopK encoder, so the encoder forward GEMM is the only dense matmul
of a training step.

The caller computes the dense pre-activations without autograd, selects indices, gathers
`values = (x @ W_enc + b_enc).gather(1, indices)` and passes them here. The forward returns those values unchanged
(a copy); the backward treats them as `x @ W_enc[:, idx] + b_enc[idx]` and returns, from g = dL/dvalues [B, k]:

    grad_x[b]      = Σ_s g[b, s] · W_enc[:, idx[b, s]]        (an embedding-bag over W_enc.T)
    grad_W_enc[:, j] = Σ_{(b, s): idx = j} g[b, s] · x[b]      (dense [d, n], the same column-major layout as W_enc)
    grad_b_enc[j]  = Σ_{(b, s): idx = j} g[b, s]

Contract: these are the gradients of the *pre-activations*. Apply any activation after this function
(`encoder_values(...).relu()`) and autograd masks g before it reaches here; pass the pre-activation values, not
post-ReLU ones. `values` itself gets no gradient.
"""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

from saelab.kernels.backend import ops_for
from saelab.kernels.decode import _check


class EncoderValues(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, W_enc, b_enc, indices, values):
        ctx.ops = ops_for(x, W_enc, indices)
        ctx.b_dtype = b_enc.dtype if b_enc is not None else None
        ctx.save_for_backward(x, W_enc, indices)
        return values.detach().clone()  # a copy: the caller's tensor keeps its own identity and grad_fn

    @staticmethod
    @once_differentiable  # the backward itself is not differentiable (no double backward)
    def backward(ctx, g: torch.Tensor):
        x, W_enc, indices = ctx.saved_tensors
        need_x, need_W, need_b = ctx.needs_input_grad[:3]
        ops = ctx.ops
        g = g.contiguous()
        n = W_enc.shape[1]
        grad_x = grad_W = grad_b = None
        if need_x:
            # W_enc.T is [n, d] with contiguous rows when W_enc is stored column-major (the SAE's layout)
            grad_x = ops.gather_sum(indices, g, W_enc.T).to(x.dtype)
        if need_W:
            grad_W = ops.transpose_matmul(indices, g, x.to(W_enc.dtype), n).T
        if need_b:
            grad_b = torch.zeros(n, dtype=torch.float32, device=g.device)
            grad_b.index_add_(0, indices.reshape(-1), g.reshape(-1).float())
            grad_b = grad_b.to(ctx.b_dtype)
        return grad_x, grad_W, grad_b, None, None


def encoder_values(x: torch.Tensor, W_enc: torch.Tensor, b_enc: torch.Tensor | None, indices: torch.Tensor,
                   values: torch.Tensor) -> torch.Tensor:
    """`values` (the gathered pre-activations) with the sparse gradient of `x @ W_enc[:, idx] + b_enc[idx]` to
    x [B, d], W_enc [d, n] and b_enc [n] (or None). See the module docstring for the ReLU contract."""
    indices = _check(indices, values, W_enc, "encoder_values", W_enc.shape[1])
    if x.dim() != 2 or x.shape[0] != indices.shape[0] or x.shape[1] != W_enc.shape[0]:
        raise ValueError(f"encoder_values: x {tuple(x.shape)} must be [B={indices.shape[0]}, d={W_enc.shape[0]}] "
                         f"for W_enc {tuple(W_enc.shape)}")
    return EncoderValues.apply(x, W_enc, b_enc, indices, values)
