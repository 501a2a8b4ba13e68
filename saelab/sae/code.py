"""`SparseCode`: the one sparse representation every architecture produces and every kernel consumes; `PackedRows`:
a variable-k code's (token, latent) pairs laid out for the kernels in rows of a common width."""

from __future__ import annotations

import math
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


# PackedRows.pack's cost of one more row, in slots: each row is a [d] vector in several passes (its input gathered,
# its decoded output summed into its token, both of their gradients) where a slot is one [d] row read or dot product
# in a kernel. JumpReLU's step CPU time at d 256, n 4096, B 4096 on the reference model's activations (support: mean
# 53, widest 348), K forced, against TopK's: K 16, 24, 32, 48, 64, 348 (padded) gave 1.19, 1.10, 1.09, 1.09, 1.17,
# 1.47x; 16 per row puts the choice at 37 there
ROW_COST = 16


@dataclass
class PackedRows:
    """A variable-k code's pairs for the kernels' [rows, K] interface. Padding every token to the widest one's count
    makes a few wide tokens cost the whole batch (on the reference model's activations a JumpReLU support of 53
    latents per token on average packs into 348 columns: 6.6x the work), so a token with more than K pairs continues
    on overflow rows of K slots appended after the B tokens' own rows; K minimises the slots plus ROW_COST per row.
    Each row's latents are ascending; padded slots (valid False) hold index 0 and get value 0.

    `token[r]` is the token of row r (None: no overflow, row b is token b); `code_indices` / `code_valid` [B, K_tok]
    are the per-token layout of the same pairs (the SparseCode's), and `slot` [E] the flat [R·K] slot of each pair in
    token order (None without overflow: the two layouts are one)."""

    indices: torch.Tensor  # [R, K] long
    valid: torch.Tensor  # [R, K] bool
    token: torch.Tensor | None  # [R] long
    code_indices: torch.Tensor  # [B, K_tok] long
    code_valid: torch.Tensor  # [B, K_tok] bool
    slot: torch.Tensor | None  # [E] long

    @classmethod
    def pack(cls, rows: torch.Tensor, cols: torch.Tensor, n_tokens: int, split: bool = True) -> "PackedRows":
        """From (token, latent) pairs sorted by (token, latent), as `nonzero` gives them. `split` False: one row per
        token (the SparseCode's layout)."""
        counts = torch.bincount(rows, minlength=n_tokens)
        widest = max(1, int(counts.max())) if rows.numel() else 1
        code_valid = torch.arange(widest, device=rows.device) < counts.unsqueeze(1)
        # sorted pairs fill the first counts[token] slots of each row, in order: one row-major masked scatter
        code_indices = torch.zeros(n_tokens, widest, dtype=torch.long, device=rows.device).masked_scatter_(code_valid,
                                                                                                            cols)
        K = row_width(counts, widest) if split else widest
        if K == widest:
            return cls(code_indices, code_valid, None, code_indices, code_valid, None)
        extra = (counts - 1).clamp_min(0) // K  # overflow rows of each token
        first = n_tokens + torch.cumsum(extra, 0) - extra  # each token's first overflow row
        pos = torch.arange(rows.numel(), device=rows.device) - (torch.cumsum(counts, 0) - counts)[rows]
        chunk = pos // K
        slot = torch.where(chunk == 0, rows, first[rows] + chunk - 1) * K + pos % K
        R = n_tokens + int(extra.sum())
        indices = torch.zeros(R * K, dtype=torch.long, device=rows.device).index_put_((slot,), cols).view(R, K)
        valid = torch.zeros(R * K, dtype=torch.bool, device=rows.device).index_fill_(0, slot, True).view(R, K)
        token = torch.cat([torch.arange(n_tokens, device=rows.device),
                           torch.repeat_interleave(torch.arange(n_tokens, device=rows.device), extra)])
        return cls(indices, valid, token, code_indices, code_valid, slot)

    @property
    def n_tokens(self) -> int:
        return self.code_indices.shape[0]

    def gather(self, dense: torch.Tensor) -> torch.Tensor:
        """dense [B, n] at each slot -> [R, K]."""
        if self.token is None:
            return dense.gather(1, self.indices)
        return dense.take(self.indices + self.token.unsqueeze(1) * dense.shape[1])

    def token_rows(self, x: torch.Tensor) -> torch.Tensor:
        """Each row's token's x [B, ...] -> [R, ...] (differentiable)."""
        return x if self.token is None else x.index_select(0, self.token)

    def sum_tokens(self, y: torch.Tensor) -> torch.Tensor:
        """Per-row y [R, ...] summed into their tokens -> [B, ...] (differentiable)."""
        B = self.n_tokens
        return y if self.token is None else y[:B].index_add(0, self.token[B:], y[B:])

    def code_values(self, values: torch.Tensor) -> torch.Tensor:
        """values [R, K] in the per-token layout [B, K_tok] (differentiable; padding 0)."""
        if self.slot is None:
            return values
        return values.new_zeros(self.code_valid.shape).masked_scatter(self.code_valid, values.reshape(-1)[self.slot])


def row_width(counts: torch.Tensor, widest: int) -> int:
    """PackedRows' K for tokens holding `counts` pairs: the least slots plus ROW_COST per row over a geometric grid
    from half the mean count to the widest (the widest itself: no overflow rows)."""
    B = counts.numel()
    low = max(1.0, float(counts.float().mean()) / 2)
    grid = torch.unique(torch.logspace(math.log10(low), math.log10(widest), 16, device=counts.device).round()).long()
    grid = torch.cat([grid[grid < widest], grid.new_tensor([widest])])
    n_rows = B + ((counts.unsqueeze(1) - 1).clamp_min(0) // grid).sum(0)
    return int(grid[torch.argmin(n_rows * (grid + ROW_COST))])
