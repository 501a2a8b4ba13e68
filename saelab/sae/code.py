"""`SparseCode`: the one sparse representation every architecture produces and every kernel consumes."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class SparseCode:
    """Per token, K (latent index, value) pairs. Variable-k architectures pad with value 0 (any index)."""

    indices: torch.Tensor  # LongTensor [B, K]
    values: torch.Tensor  # [B, K]

    def __post_init__(self):
        if self.indices.shape != self.values.shape or self.indices.dim() != 2:
            raise ValueError(f"SparseCode: indices {tuple(self.indices.shape)} and values "
                             f"{tuple(self.values.shape)} must both be [B, K]")

    @property
    def k(self) -> int:
        return self.indices.shape[1]

    def to_dense(self, n_latents: int) -> torch.Tensor:
        out = torch.zeros(self.indices.shape[0], n_latents, dtype=self.values.dtype, device=self.values.device)
        return out.scatter_add_(1, self.indices, self.values)

    def l0(self) -> torch.Tensor:
        """Active latents per token (non-zero values)."""
        return (self.values != 0).sum(-1)

    def detach(self) -> "SparseCode":
        return SparseCode(self.indices, self.values.detach())
