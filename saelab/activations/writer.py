"""`write_cache`: one model pass per batch of packed rows, several hooks, sharded npy files, crash-safe and resumable.

Each shard is written under temporary names (`*.tmp`) while its batches stream in (checksummed as they are
written, by a background thread), then every file of the shard is renamed into place and only then is
`manifest.json` replaced (itself atomically). A killed run therefore leaves at most temporary files and renamed
files the manifest does not list yet; rerunning the same command deletes those, skips the packed rows of the
shards the manifest lists and continues, producing the same bytes an uninterrupted run would (same batches →
same numerics, statistics folded shard by shard in the same order).

The steps of `write_cache`: `_finished_without_model` (nothing to do, judged before loading the model),
`_plan` (hooks, folder, sizes and spec, from the config and the model), `_peeked_rows` (a new cache's corpus
holds at least one row), `_manifest_to_extend` (the manifest to continue, under the lock), `_write_shards`
(model → `_ShardFiles` on the writer thread → `_Committer`, shard after shard).
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import math
import os
import tempfile
import warnings
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from saelab.activations.capture import HookCapture
from saelab.activations.format import (FORMAT, LOCK, MANIFEST, SCHEMA_VERSION, STORAGE, CacheError, CacheLock,
                                       RunningStats, acts_file, from_storage, grads_file, load_stats, npy_header,
                                       read_manifest, stats_file, to_storage, tokens_file, write_manifest)
from saelab.activations.shards import layout, remove_unlisted
from saelab.activations.spec import auto_shard_rows, build_spec, holds_target, spec_differences
from saelab.config import CacheConfig
from saelab.data.corpus import check_source
from saelab.errors import ConfigError, DataError
from saelab.files import fsync_dir, tmp_path
from saelab.models.loading import default_hook_name

Fault = Callable[[str, int, int], None]


def default_out(cfg: CacheConfig, hooks: list[str]) -> str:
    model = Path(cfg.model.name).name or "model"
    more = f"+{len(hooks) - 1}" if len(hooks) > 1 else ""
    return str(Path("cache") / f"{model}-{hooks[0]}{more}")


def check_writable(out: Path, error=CacheError) -> None:
    """`out` is a directory, or can be made: not a file, and its nearest existing ancestor is a writable directory.
    Raises `error` (a `SaelabError` class) naming it."""
    if out.exists() and not out.is_dir():
        raise error(f"--out {out}: a file, not a directory", hint="choose another --out")
    parent = next((p for p in [out, *out.parents] if p.exists()), Path("."))
    writable = parent.is_dir() and os.access(parent, os.W_OK | os.X_OK)
    if writable:  # permission bits do not tell root (or a read-only or virtual file system such as /proc): try it
        try:
            os.rmdir(tempfile.mkdtemp(prefix=".saelab-probe-", dir=parent))
        except OSError:
            writable = False
    if not writable:
        raise error(f"--out {out}: cannot be written ({parent} is not a writable directory)",
                    hint="choose another --out")


def check_out_dir(root: Path) -> None:
    """The output directory can hold a cache: it is a cache already, or absent, or an empty directory, and it can
    be written. Raises `CacheError` before anything is written."""
    check_writable(root)
    if root.is_dir() and not (root / MANIFEST).exists() and any(p.name != LOCK for p in root.iterdir()):
        raise CacheError(f"--out {root} exists, is not empty and is not an activation cache",
                         hint="choose another --out")


# ------------------------------------------------------------------------------------------------ file writers
class _NpyWriter:
    """Appends rows to `<name>.tmp` with a precomputed npy header, hashing as it goes (on a writer thread)."""

    def __init__(self, root: Path, rel: str, shape: tuple[int, ...], dtype: np.dtype,
                 pool: ThreadPoolExecutor | None):
        self.final = root / rel
        self.final.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = tmp_path(self.final)
        self.rel, self.shape, self.dtype, self.pool = rel, shape, np.dtype(dtype), pool
        self.f = open(self.tmp, "wb")
        self.h = hashlib.sha256()
        self.rows = 0
        self.pending: list[Future] = []
        self._write(npy_header(shape, self.dtype))

    def _write(self, data) -> None:
        def job():
            mv = memoryview(data).cast("B")
            self.f.write(mv)
            self.h.update(mv)

        if self.pool is None:  # synchronous (already on the writer thread)
            job()
            return
        self.pending.append(self.pool.submit(job))
        if len(self.pending) > 8:  # bounded memory: wait for the oldest writes
            for fut in self.pending[:-4]:
                fut.result()
            self.pending = self.pending[-4:]

    def append(self, arr: np.ndarray) -> None:
        if arr.dtype != self.dtype or arr.shape[1:] != self.shape[1:]:
            raise ValueError(f"{self.rel}: got {arr.dtype} {arr.shape}, expected {self.dtype} [*, {self.shape[1:]}]")
        self.rows += arr.shape[0]
        if self.rows > self.shape[0]:
            raise ValueError(f"{self.rel}: more rows than the {self.shape[0]} announced")
        self._write(np.ascontiguousarray(arr))

    def close(self) -> dict:
        for fut in self.pending:
            fut.result()
        self.pending = []
        if self.rows != self.shape[0]:
            raise RuntimeError(f"{self.rel}: {self.rows} rows written, {self.shape[0]} announced")
        self.f.flush()
        os.fsync(self.f.fileno())
        size = self.f.tell()
        self.f.close()
        return {"bytes": size, "sha256": self.h.hexdigest()}

    def abort(self) -> None:
        for fut in self.pending:
            try:
                fut.result()
            except Exception:  # noqa: BLE001
                pass
        self.f.close()


def _packed_rows(cfg: CacheConfig, tokenizer):
    """Exactly `iter_packed_rows(corpus, tokenizer, context_size, split)` (tokenization is per document), with
    smaller tokenizer batches so that the first rows come quickly (64 stdlib files are ~10^5-10^6 tokens)."""
    from saelab.data.corpus import iter_documents
    from saelab.data.packing import iter_doc_tokens, pack_rows, special_ids

    bos, _ = special_ids(tokenizer)
    docs = iter_documents(cfg.corpus, cfg.split)
    return pack_rows(iter_doc_tokens(docs, tokenizer, batch_docs=8), cfg.context_size, bos)


class _ShardStats:
    """Statistics of one hook over one shard, computed from the stored arrays (exactly what a reader sees)."""

    def __init__(self, d: int, dtype: str):
        self.acts, self.dtype = RunningStats(d), dtype
        self.grad_sum_sq = 0.0
        self.pending: list[Future] = []

    def submit(self, pool: ThreadPoolExecutor, arr: np.ndarray, kind: str) -> None:
        def job():
            x = from_storage(arr, self.dtype)
            if kind == "acts":
                self.acts.add_batch(x)
            else:
                self.grad_sum_sq += float(x.double().pow(2).sum())

        self.pending.append(pool.submit(job))

    def wait(self) -> None:
        for fut in self.pending:
            fut.result()
        self.pending = []


class _Prefetch:
    """Pull chunks of `size` items from `it` on a background thread (tokenizing overlaps the model), in order."""

    _END = object()

    def __init__(self, it, depth: int = 2):
        import queue
        import threading

        self.it, self.q = it, queue.Queue(maxsize=depth)
        self.sizes: queue.Queue = queue.Queue()
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name="saelab-cache-rows", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            while not self.stop.is_set():
                size = self.sizes.get()
                if size is None:
                    return
                chunk = list(itertools.islice(self.it, size))
                self.q.put(chunk)
                if len(chunk) < size:
                    return
        except BaseException as e:  # noqa: BLE001 -- re-raised in the consumer
            self.q.put(e)

    def request(self, size: int) -> None:
        self.sizes.put(size)

    def get(self) -> list:
        item = self.q.get()
        if isinstance(item, BaseException):
            raise item
        return item

    def close(self) -> None:
        self.stop.set()
        self.sizes.put(None)


# ------------------------------------------------------------------------------------------------ write_cache
@dataclasses.dataclass
class _Plan:
    """What one `write_cache` call writes, worked out from the config and the loaded model."""

    cfg: CacheConfig
    root: Path
    hooks: list[str]
    d_in: dict[str, int]
    T: int  # context size (tokens per packed row)
    K: int  # kept positions per row: training rows per packed row
    shard_rows: int
    spec: dict
    target_seqs: int


def _finished_without_model(cfg: CacheConfig) -> Path | None:
    """The cache directory when it is already complete for `cfg`, judged without loading the model (the weights'
    hash identifies it); None when the model is needed to decide (or to write)."""
    from saelab.models.loading import model_fingerprint

    if not cfg.hooks or not cfg.out or not (Path(cfg.out) / MANIFEST).exists():
        return None
    try:
        m = read_manifest(cfg.out)
    except CacheError:
        return None
    spec = m["spec"]
    T = cfg.context_size
    want = {"model.name": cfg.model.name, "model.dtype": cfg.model.dtype, "hooks": list(cfg.hooks),
            "dtype": cfg.dtype, "context_size": T, "corpus": dataclasses.asdict(cfg.corpus), "split": cfg.split,
            "exclude_bos": cfg.exclude_bos, "with_grads": cfg.with_grads, "batch_rows": cfg.batch_rows}
    got = {"model.name": spec["model"]["name"], "model.dtype": spec["model"]["dtype"], "hooks": spec["hooks"],
           "dtype": spec["dtype"], "context_size": spec["context_size"], "corpus": spec["corpus"],
           "split": spec["split"], "exclude_bos": spec["special_tokens"]["exclude_bos"],
           "with_grads": spec["with_grads"], "batch_rows": spec["batch_rows"]}
    if want != got or (cfg.shard_rows and cfg.shard_rows != spec["shard_rows"]) or not m.get("complete"):
        return None
    if not holds_target(m, math.ceil(cfg.tokens / T)):
        return None
    if model_fingerprint(cfg.model.name) != spec["model"]["fingerprint"]:
        return None  # a different model under the same name: load it, and the spec check will say so
    return Path(cfg.out)


def _plan(cfg: CacheConfig, model) -> tuple[_Plan, HookCapture]:
    """The hooks (the default one when none is named), the output folder (checked), the sizes and the spec; and the
    hook capture, whose probe gives every hook's width."""
    hooks = list(cfg.hooks) or [default_hook_name(model)]
    root = Path(cfg.out or default_out(cfg, hooks))
    check_out_dir(root)
    T = cfg.context_size
    n_ctx = getattr(model.cfg, "n_ctx", None)
    if n_ctx and T > n_ctx:
        raise ConfigError(f"context_size: {T} is longer than the model's context ({n_ctx})",
                          hint=f"use --context-size {n_ctx} or less")
    first = 1 if cfg.exclude_bos else 0
    K = T - first
    capture = HookCapture(model, hooks, with_grads=cfg.with_grads, kept_from=first)
    d_in = capture.probe(T)
    shard_rows = auto_shard_rows(cfg, K, max(d_in.values()))
    spec = build_spec(cfg, model, hooks, d_in, shard_rows)
    return _Plan(cfg, root, hooks, d_in, T, K, shard_rows, spec, math.ceil(cfg.tokens / T)), capture


def _peeked_rows(cfg: CacheConfig, tokenizer):
    """The packed rows, with the first one already read: a corpus too short for one row is refused before anything
    is written."""
    rows = _packed_rows(cfg, tokenizer)
    row0 = next(rows, None)
    if row0 is None:
        raise DataError(f"dataset {cfg.corpus.source!r}: its {cfg.split} split holds less than one row of "
                        f"{cfg.context_size} tokens, so the cache would be empty",
                        hint="use a larger dataset, another --split or a smaller --context-size")
    return itertools.chain([row0], rows)


def _new_manifest(plan: _Plan, model) -> dict:
    cfg = plan.cfg
    return {"format": FORMAT, "schema_version": SCHEMA_VERSION,
            # a summary for readers that need no more (the authoritative values are in "spec")
            "model": cfg.model.name,
            "model_source": getattr(model, "saelab_model_source", cfg.model.name),  # a hub alias resolved
            "hooks": plan.hooks, "d_in": plan.spec["d_in"], "dtype": cfg.dtype,
            "context_size": plan.T, "with_grads": cfg.with_grads,
            "spec": plan.spec, "layout": layout(plan.spec), "shards": [], "corpus_exhausted": False}


def _manifest_to_extend(plan: _Plan, model) -> tuple[dict, int, dict[str, RunningStats]]:
    """Under the lock: the existing manifest (refused when its spec differs) or a new one, cut back to the shards
    it keeps, with the files it does not list removed and its counts rewritten for this call's target. Returns
    (manifest, sequences it holds, every hook's statistics over them); `plan.target_seqs` becomes what the corpus
    holds when an earlier write ran it out."""
    root, T = plan.root, plan.T
    if (root / MANIFEST).exists():
        manifest = read_manifest(root)
        diffs = spec_differences(manifest["spec"], plan.spec)
        if diffs:
            raise CacheError(f"the existing cache at {root} was made with a different spec: " + "; ".join(diffs),
                             hint=f"use another --out, or delete {root} to rebuild it with these settings")
    else:
        manifest = _new_manifest(plan, model)
    shards = manifest["shards"]
    have = sum(s["sequences"] for s in shards)
    if have > plan.target_seqs:
        raise CacheError(f"the cache at {root} already holds {have * T:,} tokens, more than the "
                         f"{plan.target_seqs * T:,} asked",
                         hint=f"ask for --tokens {have * T} (or more, to extend it) or use another --out")
    if manifest["corpus_exhausted"]:
        plan.target_seqs = have
    if shards and shards[-1]["sequences"] < plan.shard_rows and have < plan.target_seqs:
        shards.pop()  # a short last shard (an earlier, smaller target): rewrite it full
        have = sum(s["sequences"] for s in shards)
    remove_unlisted(root, plan.hooks, len(shards))
    totals = {h: load_stats(root, manifest, h) for h in plan.hooks}
    write_manifest(root, manifest, plan.target_seqs, plan.hooks, totals)
    return manifest, have, totals


class _ShardFiles:
    """Shard `index` being written: its token rows and, per hook, the activation (and gradient) files, fed batch by
    batch; the writes, checksums and statistics run on the writer thread `pool`, in order."""

    def __init__(self, plan: _Plan, index: int, tokens: np.ndarray, pool: ThreadPoolExecutor):
        cfg, root = plan.cfg, plan.root
        self.index, self.tokens, self.n = index, tokens, tokens.shape[0]
        self.pool, self.dtype, self.hooks = pool, cfg.dtype, plan.hooks
        self.writers = [_NpyWriter(root, tokens_file(index), tokens.shape, np.int32, pool)]
        try:
            self.writers[0].append(tokens.astype(np.int32))
            rows = self.n * plan.K
            self.acts = {h: self._open(root, acts_file(h, index), (rows, plan.d_in[h])) for h in plan.hooks}
            self.grads = {}
            if cfg.with_grads:
                self.grads = {h: self._open(root, grads_file(h, index), (rows, plan.d_in[h])) for h in plan.hooks}
        except BaseException:
            self.abort()
            raise
        self.stats = {h: _ShardStats(plan.d_in[h], cfg.dtype) for h in plan.hooks}

    def _open(self, root: Path, rel: str, shape: tuple[int, int]) -> _NpyWriter:
        w = _NpyWriter(root, rel, shape, STORAGE[self.dtype], self.pool)
        self.writers.append(w)
        return w

    def add(self, acts: dict[str, torch.Tensor], grads: dict[str, torch.Tensor] | None) -> None:
        """One batch's captured activations (and gradients) of every hook."""
        for h in self.hooks:  # checksums, writes and statistics run on the writer thread, in order
            a = to_storage(acts[h], self.dtype)
            self.acts[h].append(a)
            self.stats[h].submit(self.pool, a, "acts")
            if grads is not None:
                g = to_storage(grads[h], self.dtype)
                self.grads[h].append(g)
                self.stats[h].submit(self.pool, g, "grads")

    def abort(self) -> None:
        """Close the files of a shard that will not be committed (its temporary files are removed on resume)."""
        for w in self.writers:
            w.abort()


class _Committer:
    """Commits each finished shard on the writer thread, after every write of it: closes its files, writes its
    statistics file, renames all of them into place, and only then records the shard in the manifest. Once one
    shard fails, no later shard commits (the manifest must never skip a shard)."""

    def __init__(self, plan: _Plan, manifest: dict, totals: dict[str, RunningStats], fault: Fault | None):
        self.plan, self.manifest, self.totals, self.fault = plan, manifest, totals, fault
        self.failed: list[BaseException] = []

    def __call__(self, shard: _ShardFiles, seq0: int, target_seqs: int, exhausted: bool) -> None:
        if self.failed:  # never commit shard i+1 when shard i did not make it into the manifest
            raise RuntimeError("not committed: an earlier shard failed") from self.failed[0]
        try:
            self._commit(shard, seq0, target_seqs, exhausted)
        except BaseException as e:
            self.failed.append(e)
            raise

    def raise_if_failed(self) -> None:
        if self.failed:
            raise self.failed[0]

    def _commit(self, shard: _ShardFiles, seq0: int, target_seqs: int, exhausted: bool) -> None:
        plan, hooks, i = self.plan, self.plan.hooks, shard.index
        files = {w.rel: w.close() for w in shard.writers}
        done = list(shard.writers)
        for h in hooks:
            shard.stats[h].wait()
            w = _NpyWriter(plan.root, stats_file(h, i), (2, plan.d_in[h]), np.float64, None)
            w.append(shard.stats[h].acts.vectors())
            files[w.rel] = w.close()
            done.append(w)
        for w in done:
            os.replace(w.tmp, w.final)
        for d in {plan.root, *(plan.root / h for h in hooks)}:
            fsync_dir(d)
        if self.fault:
            self.fault("renamed", i, -1)
        shard_stats = {}
        for h in hooks:
            shard_stats[h] = shard.stats[h].acts.scalars()
            if plan.cfg.with_grads:
                shard_stats[h]["grad_sum_sq_norm"] = shard.stats[h].grad_sum_sq
            self.totals[h].merge(shard.stats[h].acts)
        self.manifest["shards"].append({"index": i, "seq_start": seq0, "sequences": shard.n,
                                        "rows": shard.n * plan.K, "files": dict(sorted(files.items())),
                                        "stats": shard_stats})
        self.manifest["corpus_exhausted"] = self.manifest["corpus_exhausted"] or exhausted
        write_manifest(plan.root, self.manifest, target_seqs, hooks, self.totals)
        if self.fault:
            self.fault("committed", i, -1)


def _write_shards(plan: _Plan, capture: HookCapture, manifest: dict, totals: dict[str, RunningStats], rows,
                  have: int, progress: bool, fault: Fault | None) -> None:
    """Run the model over the packed rows after the first `have` sequences, shard after shard, until the target.

    One writer thread, FIFO: checksums, file writes and statistics of every batch, then each shard's commit
    (fsync, renames, manifest), in order, while this thread runs the model on the next batches."""
    cfg, T = plan.cfg, plan.T
    target_seqs = plan.target_seqs
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=target_seqs * T, initial=have * T, unit="tok", unit_scale=True, dynamic_ncols=True,
                   desc=f"cache {len(plan.hooks)} hook{'s' if len(plan.hooks) > 1 else ''}")
    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="saelab-cache-writer")
    prefetch = _Prefetch(rows)
    sizes = [min(plan.shard_rows, target_seqs - s0) for s0 in range(have, target_seqs, plan.shard_rows)]
    for size in sizes[:2]:  # the rows of the next shard are tokenized while this one runs through the model
        prefetch.request(size)
    requested = 2
    commit = _Committer(plan, manifest, totals, fault)
    commits: list[Future] = []
    shard = None
    exhausted, seqs = False, [None]
    try:
        i, seq0 = len(manifest["shards"]), have
        while seq0 < target_seqs:
            want = min(plan.shard_rows, target_seqs - seq0)
            seqs = prefetch.get()
            if requested < len(sizes):
                prefetch.request(sizes[requested])
                requested += 1
            exhausted = len(seqs) < want
            if exhausted:
                warnings.warn(f"the corpus split {cfg.split!r} ran out after {(seq0 + len(seqs)) * T:,} tokens "
                              f"(asked {target_seqs * T:,}); the cache holds what there is")
                target_seqs = seq0 + len(seqs)
                if not seqs:
                    break
            shard = _ShardFiles(plan, i, np.stack(seqs), pool)
            for b, start in enumerate(range(0, shard.n, cfg.batch_rows)):
                batch = torch.from_numpy(shard.tokens[start:start + cfg.batch_rows])
                shard.add(*capture(batch))
                if bar is not None:
                    bar.update(batch.shape[0] * T)
                if fault:
                    fault("batch", i, b)
                commit.raise_if_failed()
            commits.append(pool.submit(commit, shard, seq0, target_seqs, exhausted))
            shard = None
            i, seq0 = i + 1, seq0 + len(seqs)
        for fut in commits:
            fut.result()
        if exhausted and not seqs:  # the corpus ended exactly at a shard boundary: record it
            manifest["corpus_exhausted"] = True
            write_manifest(plan.root, manifest, target_seqs, plan.hooks, totals)
    except BaseException:
        pool.shutdown(wait=True)  # shards already complete still commit (unless one failed: see _Committer)
        if shard is not None:  # the shard being written when it failed: its temporary files stay, cleaned on resume
            shard.abort()
        raise
    finally:
        prefetch.close()
        pool.shutdown(wait=True)
        if bar is not None:
            bar.close()


def write_cache(cfg: CacheConfig, progress: bool = True, model=None, _fault: Fault | None = None) -> Path:
    """Write (or resume, or extend) the activation cache `cfg` describes; returns its directory.

    `model`: an already loaded `TransformerBridge` for `cfg.model` (else it is loaded). `_fault(event, shard,
    batch)` is a test hook called after each batch ("batch") and around each shard's commit ("renamed",
    "committed"); raising in it simulates a crash at that point.
    """
    from saelab.models.loading import model_id

    # the manifest names the model as later commands must load it: a local folder by its absolute path
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, name=model_id(cfg.model.name)))
    if model is None:
        done = _finished_without_model(cfg)
        if done is not None:
            return done
    if cfg.out:  # the checks that need no model come first, so a bad input costs no model loading
        check_out_dir(Path(cfg.out))
    check_source(cfg.corpus, cfg.split)
    if model is None:
        from saelab.models import load_model

        model = load_model(cfg.model.name, device=cfg.model.resolved_device(), dtype=cfg.model.dtype)
    plan, capture = _plan(cfg, model)
    root = plan.root
    first_rows = None if (root / MANIFEST).exists() else _peeked_rows(cfg, model.tokenizer)
    if (root / MANIFEST).exists():  # finished already? then touch nothing (the cache may be read-only)
        existing = read_manifest(root)
        if (not spec_differences(existing["spec"], plan.spec) and existing.get("complete")
                and holds_target(existing, plan.target_seqs)):
            return root
    root.mkdir(parents=True, exist_ok=True)
    lock = CacheLock(root)
    try:
        manifest, have, totals = _manifest_to_extend(plan, model)
        rows = first_rows if first_rows is not None else _packed_rows(cfg, model.tokenizer)
        if have:
            next(itertools.islice(rows, have - 1, have), None)  # skip what is already cached
        _write_shards(plan, capture, manifest, totals, rows, have, progress, _fault)
    finally:
        lock.release()
    return root


__all__ = ["write_cache", "check_writable"]
