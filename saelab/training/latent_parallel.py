"""Latent-parallel training (`--shard-latents S` under torchrun): the SAE's latents are split over S processes, so
each holds n/S encoder columns, decoder rows and b_enc entries, their gradients and Adam state, and the SAE's width
is bounded by S processes' memory instead of one's.

The launch's W processes form a grid of W/S data-parallel groups × S latent shards: rank r holds shard r mod S of
batch r div S. The S shards of a batch read the same batch (`data_position`), choose each token's latents together
and sum their partial reconstructions (`saelab.sae.latent_shard`, which the architectures call); the shards' own
parameters average their gradients over the W/S batches (the ranks holding the same shard, `data_group`), as data
parallelism does; b_dec, replicated, sums its gradient over the shards and averages it over the batches, so it stays
the same on every rank. Gradient clipping takes the norm of the whole SAE's gradient. One process with the whole SAE
on the same global batches trains the same SAE, to float rounding (tests/test_latent_parallel.py).

Checkpoints: the shards of batch 0 each write their tensors file (parameters, Adam state, dead-latent counters) into
the checkpoint folder that rank 0 renames once every shard has written (`saelab.training.checkpoint`); a run resumes
with the same layout. The finished SAE is gathered on rank 0 and saved as one ordinary SAE folder.

Which architectures shard: those whose class declares `latent_sharding` (`saelab.sae.architectures`).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from saelab.config import SAEConfig, TrainConfig, from_dict, to_dict
from saelab.distributed import rank_world, timeout_s
from saelab.errors import ConfigError
from saelab.sae import SparseAutoencoder
from saelab.sae.latent_shard import LatentShard, check_width
from saelab.training import checkpoint as ckpt

# the SAE's tensors split over the shards, by the dimension that holds the latents; every other one is replicated
LATENT_DIMS = {"W_enc": 1, "b_enc": 0, "W_dec": 0, "threshold": 0}
REPLICATED = ("b_dec", "loss_normalizer")


def check_layout(shards: int, world: int) -> None:
    """`shards` latent shards over the `world` processes of this launch: a `ConfigError` unless they divide it."""
    if shards <= 1:
        return
    if world == 1:
        raise ConfigError(f"shard_latents {shards}: latent-parallel training splits the SAE over the processes of a "
                          f"torchrun launch, and this is one process",
                          hint=f"launch with `torchrun --nproc-per-node {shards} -m saelab.cli train ...` (or a "
                               f"multiple of {shards} processes), or drop --shard-latents")
    if world % shards:
        raise ConfigError(f"shard_latents {shards} does not divide the {world} processes of this launch",
                          hint=f"use a shard count that divides {world}, or launch a multiple of {shards} processes "
                               f"(world / shards data-parallel groups)")


def data_position(shards: int) -> tuple[int, int]:
    """(which batch this process reads, how many distinct batches a step has): the rank and world size, or with
    latent shards, rank div shards and world / shards."""
    rank, world = rank_world()
    shards = max(1, shards)
    return rank // shards, world // shards


@dataclass
class LatentGrid:
    shards: int
    batches: int  # data-parallel groups: distinct batches a step
    shard: int  # the shard this process holds
    batch: int  # the batch it reads
    latent_group: Any  # the shards of this process's batch
    data_group: Any  # the processes holding this shard (None with one batch)
    first_group: Any  # the shards of batch 0: they write the checkpoints and gather the finished SAE
    encoder_chunk: int  # the run's streaming-encoder block (a shard streams min(it, its width))

    def local_sae(self, cfg: SAEConfig, device) -> SparseAutoencoder:
        """This process's shard of the SAE that `cfg` describes (the whole SAE's config)."""
        check_width(cfg.n_latents, cfg.k, self.shards)
        size = cfg.n_latents // self.shards
        local = from_dict(SAEConfig, {**to_dict(cfg), "n_latents": size,
                                      "encoder_chunk": min(cfg.encoder_chunk, size)})
        shard = LatentShard(self.shard, self.shards, cfg.n_latents, self.batches, self.latent_group)
        sae = SparseAutoencoder(local, device=device, shard=shard)
        other = sorted(set(sae.state_dict()) - set(LATENT_DIMS) - set(REPLICATED))
        if other:  # e.g. a transcoder's b_in and W_skip
            raise ConfigError(f"shard_latents: this SAE has tensors latent-parallel training does not split or "
                              f"replicate ({', '.join(other)})",
                              hint="latent-parallel training trains SAEs of W_enc, b_enc, W_dec, b_dec; drop "
                                   "--shard-latents")
        return sae

    def full_config(self, local: SAEConfig) -> SAEConfig:
        """The whole SAE's config, from a shard's."""
        return from_dict(SAEConfig, {**to_dict(local), "n_latents": local.n_latents * self.shards,
                                     "encoder_chunk": self.encoder_chunk})

    # ---------------------------------------------------------------------------------------------- a step
    @torch.no_grad()
    def reduce_grads(self, sae: SparseAutoencoder) -> None:
        """The shard's parameters average their gradients over the batches; b_dec sums its over the shards (each
        holds its own encoder's part and 1/S of the part every shard shares: `latent_shard.reconstruct`) and
        averages over the batches: one all-reduce over every process."""
        for name, p in sae.named_parameters():
            if p.grad is None:
                continue
            if name in LATENT_DIMS:
                if self.batches > 1:
                    dist.all_reduce(p.grad, group=self.data_group)
            else:
                dist.all_reduce(p.grad)
            if self.batches > 1:
                p.grad /= self.batches

    @torch.no_grad()
    def clip_grad_norm_(self, sae: SparseAutoencoder, max_norm: float) -> None:
        """`torch.nn.utils.clip_grad_norm_` of the whole SAE's gradient: the shards' parts of the norm summed, the
        replicated b_dec's counted once."""
        grads = {name: p.grad for name, p in sae.named_parameters() if p.grad is not None}
        shard_sq = sum(torch.linalg.vector_norm(g).square() for name, g in grads.items() if name in LATENT_DIMS)
        shard_sq = self.count(torch.as_tensor(shard_sq, dtype=torch.float32))
        replicated_sq = sum(torch.linalg.vector_norm(g).square() for name, g in grads.items()
                            if name not in LATENT_DIMS)
        total = (shard_sq + replicated_sq).sqrt()
        coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
        for g in grads.values():
            g.mul_(coef.to(g.dtype))

    def count(self, t: torch.Tensor) -> torch.Tensor:
        """Σ of `t` over the shards of this batch (active or dead latents)."""
        t = t.clone()
        dist.all_reduce(t, group=self.latent_group)
        return t

    # ---------------------------------------------------------------------------------------------- files
    def save_checkpoint(self, run_dir: Path, step: int, tensors: dict[str, torch.Tensor], meta: dict) -> None:
        """Checkpoint `step`: the shards of batch 0 each write their `tensors` (rank 0 the metadata too) into the
        folder rank 0 renames once all have written. Other processes write nothing."""
        if self.batch != 0:
            return
        if self.shard == 0:
            def others(folder: Path) -> None:
                dist.barrier(group=self.first_group)  # the folder exists
                dist.barrier(group=self.first_group)  # every shard's file is in it
            ckpt.save_checkpoint(run_dir, step, tensors, meta, keep=None, also=others)
            return
        dist.barrier(group=self.first_group)
        ckpt.write_tensors(ckpt.staging_dir(run_dir, step) / ckpt.tensors_file(self.shard), tensors)
        dist.barrier(group=self.first_group)

    @torch.no_grad()
    def gather_sae(self, sae: SparseAutoencoder) -> SparseAutoencoder | None:
        """The whole SAE on rank 0, from the shards of batch 0 (None on every other process)."""
        if self.batch != 0:
            return None
        full = None
        if self.shard == 0:
            with torch.random.fork_rng(devices=[]):  # building it draws an init that is overwritten
                full = SparseAutoencoder(self.full_config(sae.cfg), device=sae.W_dec.device)
        state = {}
        for name, t in sae.state_dict().items():
            if name not in LATENT_DIMS:
                state[name] = t
                continue
            t = t.contiguous()
            parts = [torch.empty_like(t) for _ in range(self.shards)] if full is not None else None
            dist.gather(t, parts, group=self.first_group, group_dst=0)
            if full is not None:
                state[name] = torch.cat(parts, LATENT_DIMS[name])
        if full is not None:
            full.load_state_dict(state)
        return full


def make_grid(cfg: TrainConfig) -> LatentGrid | None:
    """The grid of a latent-parallel run (`cfg.shard_latents` > 1; None otherwise), with its process groups. Every
    process of the launch calls it, in the same order (process groups are made collectively)."""
    shards = cfg.shard_latents
    if shards <= 1:
        return None
    rank, world = rank_world()
    check_layout(shards, world)
    batches = world // shards
    timeout = timedelta(seconds=timeout_s())
    latent_groups = [dist.new_group([b * shards + s for s in range(shards)], timeout=timeout)
                     for b in range(batches)]
    data_groups = ([dist.new_group([b * shards + s for b in range(batches)], timeout=timeout) for s in range(shards)]
                   if batches > 1 else [None] * shards)
    return LatentGrid(shards, batches, rank % shards, rank // shards, latent_groups[rank // shards],
                      data_groups[rank % shards], latent_groups[0], cfg.sae.encoder_chunk)
