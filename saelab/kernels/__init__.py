"""Sparse kernels of the TopK family: the decoder and the encoder backward in O(B·k·d) instead of O(B·n·d).

Public API:

* `sparse_decode(indices, values, W_dec)` / `decode(code, W_dec)`: Σ_s values[b, s] · W_dec[indices[b, s]],
  differentiable in values and W_dec (dense dW_dec).
* `grouped_decode(indices, values, W_dec, groups, n_groups)`: per-(token, group) sums in one pass (Matryoshka).
* `encoder_values(x, W_enc, b_enc, indices, values)`: the gathered encoder pre-activations with a sparse backward
  to x, W_enc and b_enc.
* `sparse_transpose_matmul(indices, weights, dense, n)`: the shared core of both weight gradients.
* `backend_for(*tensors)`: 'triton' or 'torch', the path these tensors would take.

Two implementations, one API: `torch_ops` (exact PyTorch, CPU and fallback) and `triton_ops` (CUDA). Triton is
chosen when the tensors are on CUDA in float32/float16/bfloat16, triton imports and the Triton path passed its
self-test for that device and dtype (`self_test`; see `backend` for the fallback); `SAELAB_KERNELS=torch|triton`
forces one. triton is only imported when the Triton path is taken. Indices are checked to lie in [0, n) on both
paths (`check_bounds`: one min/max reduction per call).
"""

from __future__ import annotations

import torch

from saelab.kernels.backend import ENV_VAR, KernelFallbackWarning, backend_for, ops_for, self_test, triton_available
from saelab.kernels.decode import SparseDecode, check_bounds, decode, grouped_decode, sparse_decode
from saelab.kernels.encoder import EncoderValues, encoder_values


def sparse_transpose_matmul(indices: torch.Tensor, weights: torch.Tensor, dense: torch.Tensor,
                            n: int) -> torch.Tensor:
    """out[j] = Σ_{(b, s): indices[b, s] = j} weights[b, s] · dense[b]  ->  dense [n, d] in dense's dtype.

    i.e. Sᵀ @ dense for the sparse [B, n] matrix S with S[b, indices[b, s]] += weights[b, s]; no autograd."""
    if indices.dim() != 2 or indices.shape != weights.shape or dense.dim() != 2 or dense.shape[0] != indices.shape[0]:
        raise ValueError(f"sparse_transpose_matmul: indices {tuple(indices.shape)}, weights {tuple(weights.shape)} "
                         f"must be [B, k] and dense {tuple(dense.shape)} [B, d]")
    check_bounds(indices, n, "sparse_transpose_matmul")
    return ops_for(indices, weights, dense).transpose_matmul(indices.long(), weights, dense, n)


__all__ = ["ENV_VAR", "EncoderValues", "KernelFallbackWarning", "SparseDecode", "backend_for", "check_bounds", "decode",
           "encoder_values", "grouped_decode", "ops_for", "self_test", "sparse_decode", "sparse_transpose_matmul",
           "triton_available"]
