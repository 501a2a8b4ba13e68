"""Matryoshka SAE (Bussmann, Nabeshima, Karvonen, Nanda 2025): BatchTopK selection, and the loss is the mean FVU
of nested prefixes of the dictionary (latents 0:m₁, 0:m₂, …, 0:n), so early latents must reconstruct on their own
and keep general features instead of being absorbed by later, more specific ones.

All prefix reconstructions come from one pass: each token's active latents are sorted by index once (BatchTopK's
packing already does it), `grouped_decode` sums them per group, and a cumulative sum over groups gives every prefix;
no prefix is decoded again. Gradients flow through all prefixes (no stop-gradient, as the paper chose). Fixed
prefixes by default (the paper's group fractions); `random_prefixes` samples them each step as in Nabeshima's
variant (§3.2 of the research notes). Inference and the threshold are BatchTopK's.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from saelab.kernels import grouped_decode
from saelab.sae.architectures import ThresholdOptions
from saelab.settings import setting as option
from saelab.sae.batchtopk import BatchTopK

PAPER_FRACTIONS = [1 / 32, 1 / 16, 1 / 8, 1 / 4, 1 / 2 + 1 / 32]


@dataclass
class MatryoshkaOptions(ThresholdOptions):
    group_fractions: list[float] = option(PAPER_FRACTIONS, "fractions of the width in each nested group (the last takes "
                                                    "the remainder); default the paper's 1/32, 1/16, 1/8, 1/4, 17/32")
    random_prefixes: int = option(0, "0: fixed prefixes; N > 0: each step sample N−1 prefix lengths from a "
                                     "truncated Pareto (power 0.5, as Nabeshima) plus the full width")
    min_prefix: int = option(1, "smallest sampled prefix length (random_prefixes only)")

    def __post_init__(self):
        super().__post_init__()
        from saelab.settings import check

        fr = [float(f) for f in self.group_fractions]
        check(len(fr) >= 1 and all(f > 0 for f in fr), "group_fractions", f"must be positive numbers, got {fr}")
        check(sum(fr) <= 1 + 1e-6, "group_fractions", f"must sum to at most 1, got {sum(fr):.4f}")
        self.group_fractions = fr
        check(self.random_prefixes >= 0, "random_prefixes", f"must be >= 0, got {self.random_prefixes}")
        check(self.min_prefix >= 1, "min_prefix", f"must be >= 1, got {self.min_prefix}")


class Matryoshka(BatchTopK):
    name = "matryoshka"
    help = "Matryoshka (Bussmann et al. 2025): BatchTopK with the mean FVU of nested dictionary prefixes"
    Options = MatryoshkaOptions

    def prefix_ends(self) -> list[int]:
        """Fixed prefix lengths m₁ < … < m_G = n from the group fractions (each group ≥ 1 latent)."""
        n = self.cfg.n_latents
        ends, total = [], 0.0
        for f in self.opt.group_fractions[:-1]:
            total += f
            ends.append(min(n - 1, max(ends[-1] + 1 if ends else 1, round(total * n))))
        return sorted(set(ends)) + [n]

    def sample_prefix_ends(self, device) -> list[int]:
        """N−1 distinct lengths in [min_prefix, n) from the truncated Pareto(0.5) of the notes, plus n."""
        n, lo = self.cfg.n_latents, min(self.opt.min_prefix, self.cfg.n_latents - 1)
        ell = torch.arange(lo, n, dtype=torch.float64)
        cdf = 1 - (ell / (n - lo + 1)) ** 0.5
        p = (cdf - torch.cat([cdf[1:], cdf.new_zeros(1)])).clamp_min(0)
        want = min(self.opt.random_prefixes - 1, len(ell))
        picks = torch.multinomial(p, want, replacement=False) if want > 0 else torch.empty(0, dtype=torch.long)
        return sorted(int(ell[i]) for i in picks) + [n]

    def losses(self, sae, x_norm, x_c, pre, code, grad, dead_mask):
        ends = self.sample_prefix_ends(x_c.device) if self.opt.random_prefixes else self.prefix_ends()
        bounds = torch.tensor(ends, device=code.indices.device)
        # group of each slot; rows are sorted by latent index, and the running max keeps trailing padding
        # (index 0, value 0) in the last real group, so groups are non-decreasing along each row
        groups = torch.cummax(torch.bucketize(code.indices, bounds, right=True), dim=1).values
        parts = grouped_decode(code.indices, code.values, sae.W_dec, groups, len(ends))  # [B, G, d]
        x_hats = parts.cumsum(1) + sae.b_dec  # prefix reconstructions
        errs = x_norm.unsqueeze(1) - x_hats
        per_prefix = errs.pow(2).sum(-1).mean(0) / sae.loss_normalizer  # [G]
        x_hat, err = x_hats[:, -1], errs[:, -1]
        losses = {"fvu": per_prefix[-1]}
        if not self.opt.random_prefixes:
            for i in range(len(ends)):
                losses[f"fvu_prefix{i}"] = per_prefix[i]
        losses["matryoshka"] = per_prefix.mean()
        losses["loss"] = losses["matryoshka"] + self.aux_losses(sae, x_c, pre, err, dead_mask, losses)
        return x_hat, losses


ARCHITECTURE = Matryoshka
