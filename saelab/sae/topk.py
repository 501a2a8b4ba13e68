"""TopK (Gao et al. 2024): keep the k largest pre-activations of each token.

An architecture file says only how latents are selected; `SparseAutoencoder` does the rest (sparse values with
the encoder's gradient, sparse decode, losses, AuxK).
"""

from __future__ import annotations

import torch

from saelab.config import SAEConfig


def select(pre: torch.Tensor, cfg: SAEConfig, k: int | None = None, grad: torch.Tensor | None = None) -> torch.Tensor:
    """Indices [B, k] of the selected latents; `pre` is the dense pre-activation [B, n] (no grad)."""
    k = k or cfg.k
    if cfg.relu_before_topk:
        pre = pre.clamp_min(0)
    return pre.topk(k, dim=-1, sorted=False).indices
