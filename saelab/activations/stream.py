"""`stream_activations`: the same `Batch`es as `ActivationCache`, computed on the fly from the model (no disk).

For models too big to cache. The packed rows of the corpus split are cut into *windows* of whole sequences
(≈ `shuffle_buffer` training rows); the model runs over one window (in forward batches of `batch_rows` rows),
the window's rows are permuted (seeded by seed, epoch, window) and batches are cut from the resulting stream.
At the end of the split the stream starts the next epoch over the same rows with new permutations.

Mixing quality is weaker than a cache's block shuffle: a window holds consecutive sequences of the corpus, so a
batch mixes only the documents inside `shuffle_buffer` tokens. Raise `shuffle_buffer` (RAM: one window of float32
activations, and gradients, on the model's device) for better mixing.

Resume is exact: the cursor is (epoch, window, rows consumed in the window); `load_state_dict` re-tokenizes up to
the window (no model work), recomputes that one window and skips the consumed rows.

Data parallelism: with rank / world_size, rank r takes windows r, r + world_size, ... (disjoint, together the
whole corpus); `stats()` always estimates from window 0, so every rank normalises alike.

A transcoder's target (`target_hook`) is captured in the same forward as the input hook, so its rows are the same
tokens in the same order (`Batch.targets`); the gradients are then the target hook's.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import torch

from saelab.activations.batch import BatchSource
from saelab.activations.capture import HookCapture
from saelab.data.corpus import CorpusSpec
from saelab.errors import ConfigError, DataError


class ActivationStream(BatchSource):
    """An endless iterator of `Batch`es of one hook, straight from `model` (see the module docstring)."""

    def __init__(self, model, hook_name: str, corpus: CorpusSpec | None = None, context_size: int = 128,
                 batch_size: int = 4096, seed: int = 0, shuffle_buffer: int | None = None, with_grads: bool = False,
                 exclude_bos: bool = True, split: str = "train", device: str | torch.device | None = None,
                 batch_rows: int = 32, rank: int = 0, world_size: int = 1, target_hook: str | None = None):
        if not 0 <= rank < world_size:
            raise ConfigError(f"rank must be in [0, world_size), got rank {rank}, world_size {world_size}")
        self.model, self.hook_name, self.target_hook = model, hook_name, target_hook or None
        self.rank, self.world_size = rank, world_size
        self.corpus = corpus or CorpusSpec()
        self.T, self.split = context_size, split
        self.first = 1 if exclude_bos else 0
        self.K = self.T - self.first
        self.batch_size, self.seed, self.with_grads = batch_size, seed, with_grads
        self.batch_rows = batch_rows
        hooks = [hook_name] + ([self.target_hook] if self.target_hook not in (None, hook_name) else [])
        self.capture = HookCapture(model, hooks, with_grads=with_grads, kept_from=self.first)
        self.device = torch.device(device) if device is not None else self.capture.device
        shuffle_buffer = shuffle_buffer or 16 * batch_size
        seqs = max(1, math.ceil(shuffle_buffer / self.K))
        self.window_seqs = math.ceil(seqs / batch_rows) * batch_rows
        self.epoch, self.window, self.pos = 0, rank, 0  # this rank's windows: rank, rank + world_size, ...
        self._loaded = None  # (epoch, window) of the window in memory
        self._rows_iter, self._iter_at = None, 0  # packed-row iterator and the sequence index it is at
        self._stats = None

    # ------------------------------------------------------------------------------------------- windows
    def _row_iterator(self, skip_seqs: int):
        from saelab.data.packing import iter_packed_rows

        it = iter_packed_rows(self.corpus, self.model.tokenizer, self.T, self.split)
        if skip_seqs:
            next(itertools.islice(it, skip_seqs - 1, skip_seqs), None)
        return it

    def _compute(self, seqs: np.ndarray):
        acts, grads, toks, targets = [], [], [], []
        grad_hook = self.target_hook or self.hook_name  # a transcoder's gradients are its target's
        for start in range(0, len(seqs), self.batch_rows):
            tokens = torch.from_numpy(seqs[start:start + self.batch_rows])
            a, g = self.capture(tokens)
            acts.append(a[self.hook_name].float())
            if self.target_hook:
                targets.append(a[self.target_hook].float())
            if g is not None:
                grads.append(g[grad_hook].float())
            toks.append(tokens[:, self.first:].reshape(-1))
        B = len(seqs)
        seq_idx = np.repeat(np.arange(B), self.K)
        pos = np.tile(np.arange(self.first, self.T), B)
        return (torch.cat(acts), torch.cat(grads) if grads else None, torch.cat(toks),
                torch.from_numpy(np.stack([seq_idx, pos], 1)), torch.cat(targets) if targets else None)

    def _load(self, epoch: int, window: int) -> bool:
        """Compute window `window` of `epoch`; False when the epoch has no such window (the split is over)."""
        if self._loaded == (epoch, window):
            return True
        start = window * self.window_seqs
        if self._rows_iter is None or self._loaded is None or self._loaded[0] != epoch or self._iter_at > start:
            self._rows_iter, self._iter_at = self._row_iterator(start), start
        elif self._iter_at < start:  # other ranks' windows
            next(itertools.islice(self._rows_iter, start - self._iter_at - 1, start - self._iter_at), None)
            self._iter_at = start
        seqs = list(itertools.islice(self._rows_iter, self.window_seqs))
        self._iter_at += len(seqs)
        if not seqs:
            self._loaded, self._rows_iter = None, None
            if window == self.rank:
                raise DataError(f"the corpus split {self.split!r} of {self.corpus.source!r} has no rows of "
                                 f"{self.T} tokens for rank {self.rank} of {self.world_size}")
            return False
        acts, grads, toks, pos, targets = self._compute(np.stack(seqs))
        pos[:, 0] += window * self.window_seqs
        self._acts, self._grads, self._tok, self._pos, self._targets = acts, grads, toks, pos, targets
        n = acts.shape[0]
        self._perm = torch.from_numpy(np.random.default_rng([self.seed, epoch, window, 2]).permutation(n))
        self._loaded = (epoch, window)
        if epoch == 0 and window == 0 and self._stats is None:
            self._stats = _stats_of(acts)
            self._target_stats = None if targets is None else _stats_of(targets)
        return True

    def _take(self, count: int):
        pieces = []
        while count:
            if not self._load(self.epoch, self.window):
                self.epoch, self.window, self.pos = self.epoch + 1, self.rank, 0
                continue
            n = self._acts.shape[0]
            if self.pos >= n:
                self.window, self.pos = self.window + self.world_size, 0
                continue
            k = min(count, n - self.pos)
            idx = self._perm[self.pos:self.pos + k]
            dev_idx = idx.to(self._acts.device)
            pieces.append((self._acts[dev_idx], None if self._grads is None else self._grads[dev_idx],
                           self._tok[idx.to(self._tok.device)], self._pos[idx],
                           None if self._targets is None else self._targets[dev_idx]))
            self.pos += k
            count -= k
        return pieces

    # ------------------------------------------------------------------------------------------- cursor
    def _identity(self) -> dict:
        return {"hook": self.hook_name, "seed": self.seed, "window_seqs": self.window_seqs, "context_size": self.T,
                "first_kept_position": self.first, "split": self.split, "corpus": self.corpus.source,
                "rank": self.rank, "world_size": self.world_size,
                **({"target_hook": self.target_hook} if self.target_hook else {})}

    def state_dict(self) -> dict:
        return {"kind": "ActivationStream", "epoch": self.epoch, "window": self.window, "pos": self.pos,
                **self._identity()}

    def load_state_dict(self, state: dict) -> None:
        mine = self._identity()
        diffs = [f"{k}: cursor {state.get(k)!r}, stream {v!r}" for k, v in mine.items() if state.get(k) != v]
        if state.get("kind") != "ActivationStream" or diffs:
            raise ConfigError("this cursor belongs to a different stream, so the continuation would not be exact: "
                             + ("; ".join(diffs) or f"kind {state.get('kind')!r}"))
        self.epoch, self.window, self.pos = int(state["epoch"]), int(state["window"]), int(state["pos"])

    # ------------------------------------------------------------------------------------------- statistics
    def stats(self) -> dict:
        """Estimated from the first window of the stream (`n` rows): mean, var, mean_sq_norm, float64."""
        if self._stats is None:
            it = self._row_iterator(0)
            seqs = list(itertools.islice(it, self.window_seqs))
            computed = self._compute(np.stack(seqs))
            self._stats = _stats_of(computed[0])
            self._target_stats = None if computed[4] is None else _stats_of(computed[4])
        return self._stats

    def target_stats(self) -> dict:
        """`stats` of the target hook (a transcoder's), from the same window."""
        self.stats()
        return self._target_stats


def _stats_of(acts: torch.Tensor) -> dict:
    x = acts.double()
    n = x.shape[0]
    sq = x.pow(2).sum(1)
    return {"mean": x.mean(0).cpu(), "var": x.var(0, unbiased=False).cpu(), "mean_sq_norm": float(sq.mean()),
            "mean_norm": float(sq.sqrt().mean()), "max_norm": float(sq.sqrt().max()), "n": n, "estimated": True}


def stream_activations(model, hook_name: str, corpus: CorpusSpec | None = None, context_size: int = 128,
                       batch_size: int = 4096, seed: int = 0, shuffle_buffer: int | None = None,
                       with_grads: bool = False, exclude_bos: bool = True, split: str = "train",
                       device: str | torch.device | None = None, batch_rows: int = 32, rank: int = 0,
                       world_size: int = 1, target_hook: str | None = None) -> ActivationStream:
    """Batches of `hook_name` computed on the fly; same `Batch` interface and cursor API as `ActivationCache`.

    shuffle_buffer: training rows per shuffled window (default 16 × batch_size); device: where batches go (default
    the model's); batch_rows: packed rows per model forward; rank / world_size: with `torchrun`, rank r takes
    windows r, r + world_size, ... of the corpus (disjoint, together complete; each rank tokenizes everything but
    runs the model only on its windows); target_hook: a transcoder's target, captured in the same forwards
    (`Batch.targets`, the same tokens in the same order; the gradients are then its).
    """
    return ActivationStream(model, hook_name, corpus=corpus, context_size=context_size, batch_size=batch_size,
                            seed=seed, shuffle_buffer=shuffle_buffer, with_grads=with_grads, exclude_bos=exclude_bos,
                            split=split, device=device, batch_rows=batch_rows, rank=rank, world_size=world_size,
                            target_hook=target_hook)
