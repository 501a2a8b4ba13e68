"""`ActivationCache`: shuffled fixed-size batches from an on-disk cache, in bounded RAM, with an exact cursor.

Shuffle scheme (a block shuffle plus a bounded buffer, never the whole cache in RAM):

1. The rows a process reads are cut into *blocks* of `block_rows` consecutive rows (a block never crosses a shard).
2. Each epoch permutes all blocks (seeded by `seed`, epoch), a cheap permutation of block ids, not of rows.
3. Consecutive permuted blocks are grouped into *windows* of `buffer_rows` rows; a window is read into RAM
   (positioned reads, contiguous per block) and its rows are permuted (seeded by seed, epoch, window).
4. Batches are cut from the resulting row stream; the stream runs epoch after epoch, so every batch has exactly
   `batch_size` rows and every row appears exactly once per epoch (a batch may straddle two epochs).

Mixing quality: a batch draws from the `buffer_rows / block_rows` blocks of its window, which come from anywhere
in the cache; rows inside one block are neighbours in the corpus (≈ block_rows / context_size sequences), so
smaller blocks or a larger buffer mix better, at the cost of smaller reads or more RAM. With the defaults
(1024-row blocks, 256 MiB buffer ≈ 256 blocks for d=256 float32) a 4096-row batch holds rows from ~250 random
places of the cache, ~16 per place. RAM is one window of activations (and gradients) in the stored dtype plus one
batch; it does not grow with the cache. Reads use `os.preadv` rather than a memory map, because pages touched
through a map stay resident (and counted in RSS) for as long as the map lives.

Cursor: (epoch, rows consumed in the epoch). Resuming regenerates the block permutation (cheap) and reads only
the window the cursor is in; nothing consumed before that window is read again.
"""

from __future__ import annotations

import os
import warnings
from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch

from saelab.activations.batch import BatchSource
from saelab.activations.format import (STORAGE, CacheError, RunningStats, acts_file, check_file, fix_hint,
                                       from_storage, grads_file, load_stats, pread_into, read_manifest, tokens_file)
from saelab.errors import ConfigError

DEFAULT_BUFFER_BYTES = 256 * 2 ** 20
DEFAULT_BLOCK_ROWS = 1024


class _FdCache:
    """A bounded set of open file descriptors (a big cache has more files than the process may open)."""

    def __init__(self, limit: int = 64):
        self.limit = limit
        self.fds: OrderedDict[Path, int] = OrderedDict()

    def get(self, path: Path) -> int:
        fd = self.fds.get(path)
        if fd is None:
            fd = os.open(path, os.O_RDONLY)
            self.fds[path] = fd
            if len(self.fds) > self.limit:
                _, old = self.fds.popitem(last=False)
                os.close(old)
        else:
            self.fds.move_to_end(path)
        return fd

    def close(self) -> None:
        for fd in self.fds.values():
            os.close(fd)
        self.fds.clear()


class ActivationCache(BatchSource):
    """Batches of one hook's activations (and gradients) from a cache written by `write_cache`.

    Iterating gives an endless stream of `Batch`es of exactly `batch_size` rows, epoch after epoch, each epoch
    reshuffled from (seed, epoch). `state_dict()` is the cursor after the batches handed out so far;
    `load_state_dict()` makes a fresh reader continue with exactly the batches that would have followed.
    With `world_size` > 1, rank r reads shards r, r + world_size, ... (disjoint, together complete); a cache with
    fewer shards than ranks is split by blocks instead. `n_rows` is the number of rows *this* reader covers per
    epoch (all training rows when world_size is 1); `n_rows_total` is the cache's.

    `target_hook` (a transcoder's target): a second hook of the cache, read from the same rows in the same order
    (`Batch.targets`); the gradients (`with_grads`) are then the target hook's.
    """

    def __init__(self, path: str | Path, hook_name: str | None = None, batch_size: int = 4096, seed: int = 0,
                 buffer_rows: int | None = None, with_grads: bool = False, rank: int = 0, world_size: int = 1,
                 device: str | torch.device = "cpu", verify: bool = False, block_rows: int = DEFAULT_BLOCK_ROWS,
                 target_hook: str | None = None):
        self.path = Path(path)
        self.manifest = m = read_manifest(self.path)
        spec = m["spec"]
        hooks = spec["hooks"]
        if hook_name is None:
            if len(hooks) != 1:
                raise CacheError(f"the cache at {self.path} holds {len(hooks)} hooks ({', '.join(hooks)}); pass "
                                 f"hook_name= one of them")
            hook_name = hooks[0]
        for name in (hook_name, target_hook or hook_name):
            if name not in hooks:
                raise CacheError(f"the cache at {self.path} has no hook {name!r}; it holds {', '.join(hooks)}")
        if with_grads and not spec["with_grads"]:
            raise CacheError(f"the cache at {self.path} was written without gradients, which this run needs",
                             hint="write one with `saelab cache ... --with-grads` (another --out) and train from it, "
                                  "or stream with --source stream")
        if batch_size < 1 or block_rows < 1:
            raise ConfigError(f"batch_size and block_rows must be >= 1, got {batch_size} and {block_rows}")
        if not 0 <= rank < world_size:
            raise ConfigError(f"rank must be in [0, world_size), got rank {rank}, world_size {world_size}")
        if not m["shards"]:
            raise CacheError(f"the cache at {self.path} has no complete shard yet; finish writing it "
                             f"(rerun the `saelab cache` command)")
        if not m["complete"]:
            warnings.warn(f"the cache at {self.path} is incomplete ({m['n_tokens']:,} of {m['target_tokens']:,} "
                          f"tokens); reading the {len(m['shards'])} complete shards. Rerun the `saelab cache` command "
                          f"to finish it.")
        self.hook_name, self.target_hook = hook_name, target_hook or None
        self.grad_hook = self.target_hook or hook_name  # a transcoder's gradients are its target's
        self.d_in = int(spec["d_in"][hook_name])
        self.d_out = int(spec["d_in"][self.target_hook]) if self.target_hook else None
        self.dtype = spec["dtype"]
        self.batch_size, self.seed, self.with_grads = batch_size, seed, with_grads
        self.rank, self.world_size = rank, world_size
        self.device = torch.device(device)
        self.T = spec["context_size"]
        self.first = spec["special_tokens"]["first_kept_position"]
        self.K = self.T - self.first
        self.n_rows_total = int(m["n_rows"])
        self._check(verify)

        width = self.d_out or self.d_in  # of the gradients (the target's for a transcoder)
        row_bytes = STORAGE[self.dtype].itemsize * (self.d_in + (self.d_out or 0) + (width if with_grads else 0))
        if buffer_rows is None:
            buffer_rows = max(4 * batch_size, DEFAULT_BUFFER_BYTES // row_bytes)
        self.block_rows = min(block_rows, buffer_rows)
        self.blocks_per_window = max(1, buffer_rows // self.block_rows)
        self.buffer_rows = self.blocks_per_window * self.block_rows
        self._make_blocks()
        self.epoch, self.offset = 0, 0
        self._window_key = None
        self._fds = _FdCache()
        self._stats = None

    # ------------------------------------------------------------------------------------------- opening
    def _check(self, checksum: bool) -> None:
        """Every file this reader needs exists with the manifest's shape and size (and hash, when asked)."""
        self._offsets: dict[str, int] = {}
        problems = []
        for s in self.manifest["shards"]:
            i = s["index"]
            want = {tokens_file(i): ((s["sequences"], self.T), np.dtype("<i4")),
                    acts_file(self.hook_name, i): ((s["rows"], self.d_in), STORAGE[self.dtype])}
            if self.target_hook:
                want[acts_file(self.target_hook, i)] = ((s["rows"], self.d_out), STORAGE[self.dtype])
            if self.with_grads:
                want[grads_file(self.grad_hook, i)] = ((s["rows"], self.d_out or self.d_in), STORAGE[self.dtype])
            for rel, (shape, dtype) in want.items():
                offset, problem = check_file(self.path, rel, shape, dtype, s["files"].get(rel), checksum)
                if problem:
                    problems.append(problem)
                self._offsets[rel] = offset
        if problems:
            more = f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""
            raise CacheError(f"the cache at {self.path} is damaged: " + "; ".join(problems[:5]) + more,
                             hint=fix_hint(self.path))

    def _make_blocks(self) -> None:
        shards = self.manifest["shards"]
        blocks = []  # (position in manifest shard list, first row, rows)
        for j, s in enumerate(shards):
            for r0 in range(0, s["rows"], self.block_rows):
                blocks.append((j, r0, min(self.block_rows, s["rows"] - r0)))
        blocks_arr = np.asarray(blocks, dtype=np.int64).reshape(-1, 3)
        if len(shards) >= self.world_size:
            mine = blocks_arr[blocks_arr[:, 0] % self.world_size == self.rank]
        else:
            if self.world_size > 1:
                warnings.warn(f"the cache has {len(shards)} shards for {self.world_size} processes: splitting by "
                              f"blocks of {self.block_rows} rows instead of by shards")
            mine = blocks_arr[self.rank::self.world_size]
        if len(mine) == 0:
            raise CacheError(f"rank {self.rank} of {self.world_size} gets no rows from the cache at {self.path} "
                             f"(the processes share it in blocks of up to {self.block_rows} rows; it has "
                             f"{len(blocks_arr)})",
                             hint="write a larger cache (`saelab cache --tokens`), or start fewer processes")
        self._blocks = mine
        self.n_rows = int(mine[:, 2].sum())

    # ------------------------------------------------------------------------------------------- order
    def _epoch_order(self, epoch: int):
        if getattr(self, "_order_epoch", None) != epoch:
            perm = np.random.default_rng([self.seed, epoch]).permutation(len(self._blocks))
            ends = np.cumsum(self._blocks[perm, 2])
            nw = (len(perm) + self.blocks_per_window - 1) // self.blocks_per_window
            wend = ends[np.minimum(np.arange(1, nw + 1) * self.blocks_per_window, len(perm)) - 1]
            self._order_epoch, self._perm, self._wend = epoch, perm, wend
        return self._perm, self._wend

    def _window(self, epoch: int, w: int):
        """Load window w of `epoch` (its rows, permuted) unless it is the one in memory."""
        if self._window_key == (epoch, w):
            return
        perm, wend = self._epoch_order(epoch)
        blocks = self._blocks[perm[w * self.blocks_per_window:(w + 1) * self.blocks_per_window]]
        n = int(blocks[:, 2].sum())
        if getattr(self, "_acts", None) is None:
            cap = self.buffer_rows
            self._acts = np.empty((cap, self.d_in), dtype=STORAGE[self.dtype])
            self._grads = np.empty((cap, self.d_out or self.d_in), dtype=STORAGE[self.dtype]) \
                if self.with_grads else None
            self._targets = np.empty((cap, self.d_out), dtype=STORAGE[self.dtype]) if self.target_hook else None
            self._tok = np.empty(cap, dtype=np.int64)
            self._pos = np.empty((cap, 2), dtype=np.int64)
        shards = self.manifest["shards"]
        itemsize = self.d_in * STORAGE[self.dtype].itemsize
        out_itemsize = (self.d_out or self.d_in) * STORAGE[self.dtype].itemsize  # the gradients' and targets' rows
        o = 0
        for j, r0, nb in blocks.tolist():
            s = shards[j]
            i = s["index"]
            rel = acts_file(self.hook_name, i)
            pread_into(self._fds.get(self.path / rel), self._acts[o:o + nb], self._offsets[rel] + r0 * itemsize)
            if self.target_hook:
                rel = acts_file(self.target_hook, i)
                pread_into(self._fds.get(self.path / rel), self._targets[o:o + nb],
                           self._offsets[rel] + r0 * out_itemsize)
            if self.with_grads:
                rel = grads_file(self.grad_hook, i)
                pread_into(self._fds.get(self.path / rel), self._grads[o:o + nb],
                           self._offsets[rel] + r0 * out_itemsize)
            rows = np.arange(r0, r0 + nb)
            seq, pos = rows // self.K, rows % self.K + self.first
            s_lo, s_hi = int(seq[0]), int(seq[-1]) + 1
            toks = np.empty((s_hi - s_lo, self.T), dtype=np.int32)
            rel = tokens_file(i)
            pread_into(self._fds.get(self.path / rel), toks, self._offsets[rel] + s_lo * self.T * 4)
            self._tok[o:o + nb] = toks[seq - s_lo, pos]
            self._pos[o:o + nb, 0] = seq + s["seq_start"]
            self._pos[o:o + nb, 1] = pos
            o += nb
        self._wperm = np.random.default_rng([self.seed, epoch, w, 1]).permutation(n)
        self._wstart = int(wend[w - 1]) if w else 0
        self._window_key = (epoch, w)

    def _take(self, count: int) -> list[tuple[torch.Tensor, ...]]:
        """The next `count` rows of the stream (advancing the cursor), as pieces of the windows they come from."""
        pieces = []
        while count:
            if self.offset >= self.n_rows:
                self.epoch, self.offset = self.epoch + 1, 0
            _, wend = self._epoch_order(self.epoch)
            w = int(np.searchsorted(wend, self.offset, side="right"))
            self._window(self.epoch, w)
            end = int(wend[w])
            k = min(count, end - self.offset)
            idx = self._wperm[self.offset - self._wstart:self.offset - self._wstart + k]
            pieces.append((from_storage(self._acts[idx], self.dtype),
                           None if self._grads is None else from_storage(self._grads[idx], self.dtype),
                           torch.from_numpy(self._tok[idx]), torch.from_numpy(self._pos[idx]),
                           None if self._targets is None else from_storage(self._targets[idx], self.dtype)))
            self.offset += k
            count -= k
        return pieces

    # ------------------------------------------------------------------------------------------- cursor
    def _identity(self) -> dict:
        return {"hook": self.hook_name, "seed": self.seed, "rank": self.rank, "world_size": self.world_size,
                "n_rows": self.n_rows, "block_rows": self.block_rows, "buffer_rows": self.buffer_rows,
                **({"target_hook": self.target_hook} if self.target_hook else {})}

    def state_dict(self) -> dict:
        return {"kind": "ActivationCache", "epoch": self.epoch, "offset": self.offset, **self._identity()}

    def load_state_dict(self, state: dict) -> None:
        mine = self._identity()
        diffs = [f"{k}: cursor {state.get(k)!r}, reader {v!r}" for k, v in mine.items() if state.get(k) != v]
        if state.get("kind") != "ActivationCache" or diffs:
            raise CacheError("this cursor belongs to a different reader, so the continuation would not be exact: "
                             + ("; ".join(diffs) or f"kind {state.get('kind')!r}") + ". Open the cache with the "
                             "same hook, seed, rank/world_size, buffer_rows and block_rows (an extended cache has "
                             "more rows and cannot continue an old cursor).")
        self.epoch, self.offset = int(state["epoch"]), int(state["offset"])

    # ------------------------------------------------------------------------------------------- statistics
    def stats(self) -> dict:
        """Statistics of this hook over the whole cache (all ranks), float64, from the per-shard files."""
        if self._stats is None:
            self._stats = self._hook_stats(self.hook_name)
        return self._stats

    def target_stats(self) -> dict:
        """`stats` of the target hook (a transcoder's)."""
        return self._hook_stats(self.target_hook)

    def _hook_stats(self, hook: str) -> dict:
        s: RunningStats = load_stats(self.path, self.manifest, hook)
        n = max(s.n, 1)
        return {"mean": torch.from_numpy(s.mean.copy()), "var": torch.from_numpy(s.m2 / n),
                "mean_sq_norm": s.sum_sq_norm / n, "mean_norm": s.sum_norm / n, "max_norm": s.max_norm, "n": s.n}

    def close(self) -> None:
        self._fds.close()
        self._acts = self._grads = self._targets = None
        self._window_key = None

    def __del__(self):
        try:
            self._fds.close()
        except Exception:  # noqa: BLE001
            pass

    def __repr__(self) -> str:
        target = f", target_hook={self.target_hook!r}, d_out={self.d_out}" if self.target_hook else ""
        return (f"ActivationCache({str(self.path)!r}, hook={self.hook_name!r}, d_in={self.d_in}{target}, "
                f"rows={self.n_rows:,}"
                f", dtype={self.dtype}, batch_size={self.batch_size}, buffer_rows={self.buffer_rows:,})")
