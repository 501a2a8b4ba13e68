"""`SparseCode`: the one sparse representation every architecture produces and every kernel consumes."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class SparseCode:
    """Per token, K (latent index, value) pairs. Variable-k codes (BatchTopK, thresholds) pad with value 0 and
    index 0; kernels read no row for a zero value and padded slots get no gradient. "Active" means value != 0."""

    indices: torch.Tensor  # LongTensor [B, K]
    values: torch.Tensor  # [B, K]
    # per-token input normalisation (shift [B, 1], scale [B, 1]) for layer_norm-style SAEs, so decode needs no
    # state from encode; None for fixed normalisations
    norm: tuple | None = None

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

    def active(self) -> torch.Tensor:
        """[B, K] bool: the slots that hold an active latent."""
        return self.values != 0

    def detach(self) -> "SparseCode":
        return SparseCode(self.indices, self.values.detach(), self.norm)

    def __getitem__(self, rows) -> "SparseCode":
        """The code of a subset of tokens (rows), statistics included."""
        norm = None if self.norm is None else tuple(t[rows] for t in self.norm)
        return SparseCode(self.indices[rows], self.values[rows], norm)
