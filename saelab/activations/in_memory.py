"""Batches from activations already in memory (a notebook tensor, a synthetic benchmark), with an exact cursor."""

from __future__ import annotations

import torch

from saelab.errors import ConfigError


class InMemoryActivations:
    """Shuffled fixed-size batches over the rows of `acts` [N, d], epoch after epoch, reproducible for a seed.

    Same contract as `ActivationCache`: infinite iteration, `state_dict()` / `load_state_dict()` for exact resume,
    and `rank` / `world_size` to give each process a disjoint slice of every global batch. `targets` [N, d_out]: a
    transcoder's target rows of the same tokens, batched row for row with `acts` (`Batch.targets`).
    """

    def __init__(self, acts: torch.Tensor, batch_size: int = 4096, seed: int = 0, grads: torch.Tensor | None = None,
                 shuffle: bool = True, rank: int = 0, world_size: int = 1, targets: torch.Tensor | None = None):
        if acts.dim() != 2:
            raise ConfigError(f"acts must be [N, d], got {tuple(acts.shape)}")
        if targets is not None and (targets.dim() != 2 or targets.shape[0] != acts.shape[0]):
            raise ConfigError(f"targets must be [N, d_out] with one row per row of acts ({acts.shape[0]}), got "
                              f"{tuple(targets.shape)}")
        if batch_size * world_size > acts.shape[0]:
            raise ConfigError(f"a global batch of {batch_size}×{world_size} rows needs more than the {acts.shape[0]} "
                             f"rows given")
        self.acts, self.grads, self.targets = acts, grads, targets
        self.batch_size, self.seed, self.shuffle = batch_size, seed, shuffle
        self.rank, self.world_size = rank, world_size
        self.d_in, self.n_rows = acts.shape[1], acts.shape[0]
        self.epoch, self.step_in_epoch = 0, 0

    def stats(self) -> dict:
        return _stats_of(self.acts)

    def target_stats(self) -> dict:
        return _stats_of(self.targets)

    def _order(self, epoch: int) -> torch.Tensor:
        if not self.shuffle:
            return torch.arange(self.n_rows)
        return torch.randperm(self.n_rows, generator=torch.Generator().manual_seed(self.seed * 100_003 + epoch))

    def __iter__(self):
        from saelab.activations import Batch

        glob = self.batch_size * self.world_size
        while True:
            order = self._order(self.epoch)
            per_epoch = self.n_rows // glob
            while self.step_in_epoch < per_epoch:
                start = self.step_in_epoch * glob + self.rank * self.batch_size
                rows = order[start:start + self.batch_size]
                self.step_in_epoch += 1
                yield Batch(acts=self.acts[rows], grads=None if self.grads is None else self.grads[rows],
                            tokens=None, positions=None, targets=None if self.targets is None else self.targets[rows])
            self.epoch, self.step_in_epoch = self.epoch + 1, 0

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "step_in_epoch": self.step_in_epoch, "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.step_in_epoch = int(state["epoch"]), int(state["step_in_epoch"])


def _stats_of(rows: torch.Tensor) -> dict:
    x = rows.double()
    return {"mean": x.mean(0), "var": x.var(0, unbiased=False), "mean_sq_norm": float(x.pow(2).sum(-1).mean()),
            "n": x.shape[0]}
