"""One shard of a latent-parallel SAE: this process holds latents [offset, offset + size) of an SAE of `n_total`
(their encoder columns, decoder rows, share of b_enc, and the architecture's per-latent state), and the other shards
of its group hold the rest for the same batch. The SAE module on each process is an ordinary `SparseAutoencoder` of
`size` latents with `sae.shard` set; the architectures call the three collectives below where a step needs the
whole SAE (`saelab.training.latent_parallel` builds the groups and trains with them):

* `choose`: each token's global top-k from every shard's top-k candidates (values and global latent indices):
  ranked by value, equal candidates by the lower latent index. The global top-k of a row is the top-k of the union
  of its shards' top-k, so the chosen set is one process's whenever the k-th and (k+1)-th values of the row differ.
  Under an exact tie at the cut the two may keep different latents of the same value: ATen's topk does not define
  which of several equal values it keeps, neither on one process nor among a shard's own latents.
* `sum`: the reconstruction is the sum of the shards' partial decodes (an all-reduce whose backward is the identity:
  every shard computes the same loss from the same sum, so dL/d(partial) is that loss's gradient on each shard).
* `total`: counts over every shard (dead latents, active latents).

b_dec is replicated. Its gradient has a part every shard computes alike (through x̂ = Σ partials + b_dec) and a part
that is the shard's own (through the encoder's x̃ − b_dec); `reconstruct` gives each shard 1/S of the first part, so
that summing b_dec's gradient over the shards (the trainer does) is one process's gradient, the same on every rank.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from saelab.distributed import rank_world
from saelab.kernels import sparse_decode

INIT_BLOCK_ROWS = 4096  # rows of the random init drawn at a time (a multiple of 16: see `init_rows`)


@dataclass
class LatentShard:
    index: int  # which shard this process holds, 0 ≤ index < count
    count: int  # shards of the SAE
    n_total: int  # the whole SAE's latents
    batches: int  # distinct batches a step (data-parallel groups of the launch)
    group: Any = None  # the process group of the shards that see this process's batch

    @property
    def size(self) -> int:
        return self.n_total // self.count

    @property
    def offset(self) -> int:
        return self.index * self.size

    def init_rows(self, d: int, generator: torch.Generator | None) -> torch.Tensor:
        """This shard's rows of the whole SAE's `torch.randn(n_total, d, generator=generator)`, drawn in blocks so
        only a block is held at once. Exact: ATen fills a normal tensor of ≥ 16 elements 16 at a time from one
        stream of uniforms (re-drawing the last 16 of a length that is not a multiple of 16), so blocks of a
        multiple of 16 rows, the last one at least 16 values long, draw the same numbers as one call."""
        n, lo, hi = self.n_total, self.offset, self.offset + self.size
        bounds = [(s, min(n, s + INIT_BLOCK_ROWS)) for s in range(0, n, INIT_BLOCK_ROWS)]
        if len(bounds) > 1 and (bounds[-1][1] - bounds[-1][0]) * d < 16:  # a tail under 16 values joins the block before
            bounds[-2:] = [(bounds[-2][0], n)]
        out = torch.empty(self.size, d, dtype=torch.float32)
        for s, e in bounds:
            block = torch.randn(e - s, d, generator=generator, dtype=torch.float32)
            a, b = max(s, lo), min(e, hi)
            if a < b:
                out[a - lo:b - lo] = block[a - s:b - s]
        return out

    @torch.no_grad()
    def choose(self, keys: torch.Tensor, latents: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Each token's k best of every shard's candidates: `keys` [B, m] ranks this shard's candidates, `latents`
        [B, m] are their latents (local indices); m may differ between shards (at most k). Returns (positions [B, k]
        into this shard's candidates, mine [B, k]): the chosen slots this shard holds (position 0 where not mine)."""
        B, m = keys.shape
        pad = k - m  # every shard sends k candidates; the missing ones rank below everything
        keys = torch.cat([keys, keys.new_full((B, pad), float("-inf"))], 1) if pad else keys
        ids = latents + self.offset
        ids = torch.cat([ids, ids.new_full((B, pad), self.n_total)], 1) if pad else ids
        all_keys, all_ids = self._gather(keys.contiguous()), self._gather(ids.contiguous())
        by_id = all_ids.argsort(dim=1, stable=True)  # equal values: the lower latent index first
        best = all_keys.gather(1, by_id).sort(dim=1, descending=True, stable=True).indices[:, :k]
        slot = by_id.gather(1, best)
        pos = slot - self.index * k
        mine = (pos >= 0) & (pos < m)
        return torch.where(mine, pos, torch.zeros_like(pos)), mine

    def _gather(self, t: torch.Tensor) -> torch.Tensor:
        """[B, c] of every shard, side by side in shard order: [B, count·c]."""
        parts = [torch.empty_like(t) for _ in range(self.count)]
        dist.all_gather(parts, t, group=self.group)
        return torch.cat(parts, 1)

    def sum(self, partial: torch.Tensor) -> torch.Tensor:
        """Σ over the shards of `partial`, differentiable: the backward passes the gradient through unchanged."""
        return _SumShards.apply(partial, self.group)

    @torch.no_grad()
    def total(self, value: torch.Tensor | int) -> torch.Tensor:
        """Σ over the shards of a count (a tensor or an int), not differentiable."""
        t = value.clone() if isinstance(value, torch.Tensor) else torch.tensor(value)
        dist.all_reduce(t, group=self.group)
        return t


class _SumShards(torch.autograd.Function):
    @staticmethod
    def forward(ctx, partial, group):
        out = partial.clone()
        dist.all_reduce(out, group=group)
        return out

    @staticmethod
    def backward(ctx, g):
        return g, None


class _ScaleGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, t, scale: float):
        ctx.scale = scale
        return t.clone()

    @staticmethod
    def backward(ctx, g):
        return g * ctx.scale, None


def shard_of(sae) -> LatentShard | None:
    return getattr(sae, "shard", None)


def batch_count(sae) -> int:
    """How many distinct batches a step of `sae` has (a BatchTopK selection's "batch" is their union): the world
    size under data parallelism; one per shard group under latent parallelism."""
    shard = shard_of(sae)
    return rank_world()[1] if shard is None else shard.batches


def total_latents(sae) -> int:
    """The whole SAE's width (its own on one process)."""
    shard = shard_of(sae)
    return sae.cfg.n_latents if shard is None else shard.n_total


def random_rows(sae, d: int, generator: torch.Generator | None) -> torch.Tensor:
    """The init's random [n, d] float32 draw; a shard's rows of the whole SAE's draw."""
    shard = shard_of(sae)
    if shard is None:
        return torch.randn(sae.cfg.n_latents, d, generator=generator, dtype=torch.float32)
    return shard.init_rows(d, generator)


def reconstruct(sae, indices: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """x̂ in normalised space, Σ values·W_dec[indices] + b_dec, of the whole SAE (every shard's latents)."""
    partial = sparse_decode(indices, values, sae.W_dec)
    shard = shard_of(sae)
    if shard is None:
        return partial + sae.b_dec
    return shard.sum(partial) + _ScaleGrad.apply(sae.b_dec, 1.0 / shard.count)


def check_width(n_latents: int, k: int, shards: int) -> None:
    """`shards` equal shards of an SAE of `n_latents`, each able to offer a token k candidates."""
    from saelab.errors import ConfigError

    if shards <= 1 or not n_latents:
        return
    if n_latents % shards:
        raise ConfigError(f"shard_latents {shards}: the SAE's {n_latents} latents do not split into {shards} equal "
                          f"shards", hint=f"choose --n-latents a multiple of {shards}, or another shard count")
    if n_latents // shards < k:
        raise ConfigError(f"shard_latents {shards}: each shard would hold {n_latents // shards} latents, fewer than "
                          f"k ({k})", hint="use fewer shards or a wider SAE")
