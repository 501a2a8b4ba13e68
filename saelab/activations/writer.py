"""`write_cache`: one model pass per batch of packed rows, several hooks, sharded npy files, crash-safe and resumable.

Each shard is written under temporary names (`*.tmp`) while its batches stream in (checksummed as they are
written, by a background thread), then every file of the shard is renamed into place and only then is
`manifest.json` replaced (itself atomically). A killed run therefore leaves at most temporary files and renamed
files the manifest does not list yet; rerunning the same command deletes those, skips the packed rows of the
shards the manifest lists and continues, producing the same bytes an uninterrupted run would (same batches →
same numerics, statistics folded shard by shard in the same order).
"""

from __future__ import annotations

import dataclasses
import fcntl
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

from saelab.activations.capture import GRAD_LOSS, HookCapture
from saelab.activations.format import (FORMAT, MANIFEST, SCHEMA_VERSION, STORAGE, TMP_SUFFIX, CacheError,
                                       RunningStats, acts_file, check_file, from_storage, fsync_dir, grads_file,
                                       load_stats, npy_header, read_manifest, stats_file, to_storage, tokens_file,
                                       write_json_atomic)
from saelab.config import CacheConfig
from saelab.data.corpus import check_source
from saelab.errors import ConfigError, DataError

SHARD_TARGET_BYTES = 64 * 2 ** 20  # per activation file, when shard_rows is 0


def default_hook(model) -> str:
    return f"blocks.{model.cfg.n_layers // 2}.hook_resid_pre"


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
    if root.is_dir() and not (root / MANIFEST).exists() and any(p.name != ".lock" for p in root.iterdir()):
        raise CacheError(f"--out {root} exists, is not empty and is not an activation cache",
                         hint="choose another --out")


def tokenizer_hash(tokenizer) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        return hashlib.sha256(backend.to_str().encode("utf-8")).hexdigest()
    vocab = sorted(tokenizer.get_vocab().items())
    return hashlib.sha256(repr(vocab).encode("utf-8")).hexdigest()


def model_revision(model) -> str | None:
    orig = getattr(model, "original_model", None)
    return getattr(getattr(orig, "config", None), "_commit_hash", None)


def auto_shard_rows(cfg: CacheConfig, kept: int, d_max: int) -> int:
    if cfg.shard_rows:
        return cfg.shard_rows
    per_row = kept * d_max * STORAGE[cfg.dtype].itemsize
    rows = max(1, SHARD_TARGET_BYTES // per_row)
    return max(cfg.batch_rows, rows // cfg.batch_rows * cfg.batch_rows)


def build_spec(cfg: CacheConfig, model, hooks: list[str], d_in: dict[str, int], shard_rows: int) -> dict:
    """Everything that determines the cache's bytes. Compared on every rerun against an existing cache."""
    from saelab.data.packing import special_ids
    from saelab.models.loading import model_fingerprint

    bos, eos = special_ids(model.tokenizer)
    first = 1 if cfg.exclude_bos else 0
    return {
        "model": {"name": cfg.model.name, "fingerprint": model_fingerprint(cfg.model.name),
                  "revision": model_revision(model), "dtype": cfg.model.dtype},
        "tokenizer": {"sha256": tokenizer_hash(model.tokenizer), "vocab_size": len(model.tokenizer)},
        "hooks": list(hooks),
        "d_in": {h: d_in[h] for h in hooks},
        "dtype": cfg.dtype,
        "context_size": cfg.context_size,
        "corpus": dataclasses.asdict(cfg.corpus),
        "split": cfg.split,
        "special_tokens": {
            "bos_id": bos, "eos_id": eos, "exclude_bos": cfg.exclude_bos, "first_kept_position": first,
            "padding": "none: rows are packed end to end ([BOS] + context_size-1 corpus tokens, documents "
                       "separated by EOS), so no position is padding; EOS separators are kept",
        },
        "with_grads": cfg.with_grads,
        "grad_loss": GRAD_LOSS if cfg.with_grads else None,
        "batch_rows": cfg.batch_rows,
        "shard_rows": shard_rows,
    }


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def spec_differences(old: dict, new: dict) -> list[str]:
    a, b = _flatten(old), _flatten(new)
    diffs, derived = [], []
    for k in sorted(set(a) | set(b)):
        if a.get(k, "<absent>") != b.get(k, "<absent>"):
            line = f"{k}: cache has {a.get(k, '<absent>')!r}, this run asks for {b.get(k, '<absent>')!r}"
            # values that follow from others (hooks → d_in, dtype → automatic shard size, with_grads → grad_loss)
            # are named only when nothing else explains the difference
            (derived if k.startswith(("d_in.", "grad_loss")) or k == "shard_rows" else diffs).append(line)
    return diffs or derived


def layout(spec: dict) -> dict:
    return {
        "tokens": "tokens-NNNNN.npy: int32 [sequences, context_size], the packed rows of shard NNNNN (BOS first)",
        "acts": "<hook>/acts-NNNNN.npy: [sequences × kept_per_sequence, d_in], training row r is position "
                "first_kept_position + r % kept_per_sequence of sequence r // kept_per_sequence",
        "grads": "<hook>/grads-NNNNN.npy: same shape as acts, see spec.grad_loss",
        "stats": "<hook>/stats-NNNNN.npy: float64 [2, d_in], the shard's per-dimension mean and sum of squared "
                 "deviations (M2); combine shards with Chan's parallel update",
        "storage_dtype": {"float32": "float32", "float16": "float16",
                          "bfloat16": "uint16 holding the raw bfloat16 bits (view as bfloat16)"}[spec["dtype"]],
        "kept_per_sequence": spec["context_size"] - spec["special_tokens"]["first_kept_position"],
    }


# ------------------------------------------------------------------------------------------------ file writers
class _NpyWriter:
    """Appends rows to `<name>.tmp` with a precomputed npy header, hashing as it goes (on a writer thread)."""

    def __init__(self, root: Path, rel: str, shape: tuple[int, ...], dtype: np.dtype,
                 pool: ThreadPoolExecutor | None):
        self.final = root / rel
        self.final.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = self.final.with_name(self.final.name + TMP_SUFFIX)
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


# ------------------------------------------------------------------------------------------------ the cache lock
class _Lock:
    def __init__(self, root: Path):
        self.path = root / ".lock"
        self.f = open(self.path, "a+")
        try:
            fcntl.flock(self.f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self.f.close()
            raise CacheError(f"{root} is being written by another process right now",
                             hint="wait for it, or use another --out") from None

    def release(self) -> None:
        fcntl.flock(self.f.fileno(), fcntl.LOCK_UN)
        self.f.close()


def _cleanup(root: Path, hooks: list[str], n_shards: int) -> None:
    """Delete temporary files and shard files the manifest does not list (left by a killed run)."""
    dirs = [root] + [root / h for h in hooks]
    for d in dirs:
        if not d.is_dir():
            continue
        for p in d.iterdir():
            if p.name.endswith(TMP_SUFFIX):
                p.unlink()
                continue
            stem = p.name.rsplit(".", 1)[0]
            prefix, _, num = stem.rpartition("-")
            if prefix in ("tokens", "acts", "grads", "stats") and num.isdigit() and int(num) >= n_shards:
                p.unlink()


# ------------------------------------------------------------------------------------------------ write_cache
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
    have = sum(s["sequences"] for s in m["shards"])
    target = math.ceil(cfg.tokens / T)
    if not (have == target or m["corpus_exhausted"] and have <= target):
        return None
    if model_fingerprint(cfg.model.name) != spec["model"]["fingerprint"]:
        return None  # a different model under the same name: load it, and the spec check will say so
    return Path(cfg.out)


def write_cache(cfg: CacheConfig, progress: bool = True, model=None,
                _fault: Callable[[str, int, int], None] | None = None) -> Path:
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
    hooks = list(cfg.hooks) or [default_hook(model)]
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
    target_seqs = math.ceil(cfg.tokens / T)

    first_rows = None
    if not (root / MANIFEST).exists():  # a new cache: refuse a corpus too short for one row before writing anything
        first_rows = _packed_rows(cfg, model.tokenizer)
        row0 = next(first_rows, None)
        if row0 is None:
            raise DataError(f"dataset {cfg.corpus.source!r}: its {cfg.split} split holds less than one row of {T} "
                            f"tokens, so the cache would be empty",
                            hint="use a larger dataset, another --split or a smaller --context-size")
        first_rows = itertools.chain([row0], first_rows)
    if (root / MANIFEST).exists():  # finished already? then touch nothing (the cache may be read-only)
        existing = read_manifest(root)
        diffs = spec_differences(existing["spec"], spec)
        have = sum(s["sequences"] for s in existing["shards"])
        if not diffs and existing.get("complete") and (have == target_seqs or existing["corpus_exhausted"]
                                                       and have <= target_seqs):
            return root
    root.mkdir(parents=True, exist_ok=True)
    lock = _Lock(root)
    try:
        if (root / MANIFEST).exists():
            manifest = read_manifest(root)
            diffs = spec_differences(manifest["spec"], spec)
            if diffs:
                raise CacheError(f"the existing cache at {root} was made with a different spec: " + "; ".join(diffs),
                                 hint=f"use another --out, or delete {root} to rebuild it with these settings")
        else:
            manifest = {"format": FORMAT, "schema_version": SCHEMA_VERSION,
                        # a summary for readers that need no more (the authoritative values are in "spec")
                        "model": cfg.model.name,
                        "model_source": getattr(model, "saelab_model_source", cfg.model.name),  # a hub alias resolved
                        "hooks": hooks, "d_in": spec["d_in"], "dtype": cfg.dtype,
                        "context_size": T, "with_grads": cfg.with_grads,
                        "spec": spec, "layout": layout(spec), "shards": [], "corpus_exhausted": False}
        shards = manifest["shards"]
        have = sum(s["sequences"] for s in shards)
        if have > target_seqs:
            raise CacheError(f"the cache at {root} already holds {have * T:,} tokens, more than the {target_seqs * T:,} "
                             f"asked", hint=f"ask for --tokens {have * T} (or more, to extend it) or use another --out")
        if manifest["corpus_exhausted"]:
            target_seqs = have
        if shards and shards[-1]["sequences"] < shard_rows and have < target_seqs:
            shards.pop()  # a short last shard (an earlier, smaller target): rewrite it full
            have = sum(s["sequences"] for s in shards)
        _cleanup(root, hooks, len(shards))
        totals = {h: load_stats(root, manifest, h) for h in hooks}
        _finish_manifest(root, manifest, target_seqs, hooks, totals)

        rows_iter = first_rows if first_rows is not None else _packed_rows(cfg, model.tokenizer)
        if have:
            next(itertools.islice(rows_iter, have - 1, have), None)  # skip what is already cached
        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=target_seqs * T, initial=have * T, unit="tok", unit_scale=True, dynamic_ncols=True,
                       desc=f"cache {len(hooks)} hook{'s' if len(hooks) > 1 else ''}")
        # One writer thread, FIFO: checksums, file writes and statistics of every batch, then each shard's commit
        # (fsync, renames, manifest), in order, while the main thread runs the model on the next batches.
        pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="saelab-cache-writer")
        prefetch = _Prefetch(rows_iter)
        sizes = [min(shard_rows, target_seqs - s0) for s0 in range(have, target_seqs, shard_rows)]
        for size in sizes[:2]:  # the rows of the next shard are tokenized while this one runs through the model
            prefetch.request(size)
        requested = 2
        commits: list[Future] = []
        writers: list[_NpyWriter] = []

        failed: list[BaseException] = []

        def commit(*a) -> None:  # runs on the writer thread, after every write of its shard
            if failed:  # never commit shard i+1 when shard i did not make it into the manifest
                raise RuntimeError("not committed: an earlier shard failed") from failed[0]
            try:
                _commit(*a)
            except BaseException as e:
                failed.append(e)
                raise

        def _commit(i: int, seq0: int, n: int, shard_writers: list[_NpyWriter], stats: dict, target: int,
                    exhausted: bool) -> None:
            files = {w.rel: w.close() for w in shard_writers}
            done = list(shard_writers)
            for h in hooks:
                stats[h].wait()
                w = _NpyWriter(root, stats_file(h, i), (2, d_in[h]), np.float64, None)
                w.append(stats[h].acts.vectors())
                files[w.rel] = w.close()
                done.append(w)
            for w in done:
                os.replace(w.tmp, w.final)
            for d in {root, *(root / h for h in hooks)}:
                fsync_dir(d)
            if _fault:
                _fault("renamed", i, -1)
            shard_stats = {}
            for h in hooks:
                shard_stats[h] = stats[h].acts.scalars()
                if cfg.with_grads:
                    shard_stats[h]["grad_sum_sq_norm"] = stats[h].grad_sum_sq
                totals[h].merge(stats[h].acts)
            shards.append({"index": i, "seq_start": seq0, "sequences": n, "rows": n * K,
                           "files": dict(sorted(files.items())), "stats": shard_stats})
            manifest["corpus_exhausted"] = manifest["corpus_exhausted"] or exhausted
            _finish_manifest(root, manifest, target, hooks, totals)
            if _fault:
                _fault("committed", i, -1)

        def raise_failed_commit() -> None:
            if failed:
                raise failed[0]

        exhausted, seqs = False, [None]
        try:
            i, seq0 = len(shards), have
            while seq0 < target_seqs:
                want = min(shard_rows, target_seqs - seq0)
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
                tokens = np.stack(seqs)
                n = tokens.shape[0]
                writers = [_NpyWriter(root, tokens_file(i), tokens.shape, np.int32, pool)]
                writers[0].append(tokens.astype(np.int32))
                acts_w = {h: _NpyWriter(root, acts_file(h, i), (n * K, d_in[h]), STORAGE[cfg.dtype], pool)
                          for h in hooks}
                writers += acts_w.values()
                grads_w = {}
                if cfg.with_grads:
                    grads_w = {h: _NpyWriter(root, grads_file(h, i), (n * K, d_in[h]), STORAGE[cfg.dtype], pool)
                               for h in hooks}
                    writers += grads_w.values()
                stats = {h: _ShardStats(d_in[h], cfg.dtype) for h in hooks}
                for b, start in enumerate(range(0, n, cfg.batch_rows)):
                    batch = torch.from_numpy(tokens[start:start + cfg.batch_rows])
                    acts, grads = capture(batch)
                    for h in hooks:  # checksums, writes and statistics run on the writer thread, in order
                        a = to_storage(acts[h], cfg.dtype)
                        acts_w[h].append(a)
                        stats[h].submit(pool, a, "acts")
                        if grads is not None:
                            g = to_storage(grads[h], cfg.dtype)
                            grads_w[h].append(g)
                            stats[h].submit(pool, g, "grads")
                    if bar is not None:
                        bar.update(batch.shape[0] * T)
                    if _fault:
                        _fault("batch", i, b)
                    raise_failed_commit()
                commits.append(pool.submit(commit, i, seq0, n, writers, stats, target_seqs, exhausted))
                writers = []
                i, seq0 = i + 1, seq0 + n
            for fut in commits:
                fut.result()
            if exhausted and not seqs:  # the corpus ended exactly at a shard boundary: record it
                manifest["corpus_exhausted"] = True
                _finish_manifest(root, manifest, target_seqs, hooks, totals)
        except BaseException:
            pool.shutdown(wait=True)  # shards already complete still commit (unless one failed: see commit)
            for w in writers:  # the shard being written when it failed: its temporary files stay, cleaned on resume
                w.abort()
            raise
        finally:
            prefetch.close()
            pool.shutdown(wait=True)
            if bar is not None:
                bar.close()
    finally:
        lock.release()
    return root


def _finish_manifest(root: Path, manifest: dict, target_seqs: int, hooks: list[str],
                     totals: dict[str, RunningStats]) -> None:
    spec = manifest["spec"]
    T = spec["context_size"]
    K = manifest["layout"]["kept_per_sequence"]
    have = sum(s["sequences"] for s in manifest["shards"])
    manifest["target_tokens"] = target_seqs * T
    manifest["n_shards"] = len(manifest["shards"])
    manifest["n_sequences"] = have
    manifest["n_tokens"] = have * T
    manifest["n_rows"] = have * K
    manifest["complete"] = have >= target_seqs
    manifest["stats"] = {h: {**totals[h].summary(), "vectors": f"{h}/stats-NNNNN.npy (per shard)"} for h in hooks}
    if spec["with_grads"]:
        for h in hooks:
            g = sum(s["stats"][h].get("grad_sum_sq_norm", 0.0) for s in manifest["shards"])
            manifest["stats"][h]["grad_mean_sq_norm"] = g / max(1, totals[h].n)
    write_json_atomic(root / MANIFEST, manifest)


# ------------------------------------------------------------------------------------------------ verification
def shard_files(manifest: dict, shard: dict, hooks: list[str] | None = None, with_grads: bool | None = None) -> dict:
    """rel path → (expected shape, expected numpy dtype) for the files of one shard."""
    spec = manifest["spec"]
    hooks = spec["hooks"] if hooks is None else hooks
    with_grads = spec["with_grads"] if with_grads is None else with_grads
    i, n, rows = shard["index"], shard["sequences"], shard["rows"]
    out = {tokens_file(i): ((n, spec["context_size"]), np.dtype("<i4"))}
    for h in hooks:
        d = spec["d_in"][h]
        out[acts_file(h, i)] = ((rows, d), STORAGE[spec["dtype"]])
        if with_grads:
            out[grads_file(h, i)] = ((rows, d), STORAGE[spec["dtype"]])
        out[stats_file(h, i)] = ((2, d), np.dtype("<f8"))
    return out


def verify_cache(path: str | Path, checksums: bool = True) -> tuple[dict, list[tuple[int, str]]]:
    """Check every shard file of every hook: presence, npy header, row count, size and (optionally, in one pass)
    SHA-256 and finiteness of every activation and gradient row.

    Returns (manifest, [(shard index, problem)]); an empty list means the cache is sound."""
    root = Path(path)
    manifest = read_manifest(root)
    problems = []
    for shard in manifest["shards"]:
        for rel, (shape, dtype) in shard_files(manifest, shard).items():
            values = rel.rsplit("/", 1)[-1].startswith(("acts-", "grads-"))
            _, problem = check_file(root, rel, shape, dtype, shard["files"].get(rel), checksums,
                                    finite=checksums and values)
            if problem:
                problems.append((shard["index"], problem))
    return manifest, problems


def repair_cache(path: str | Path, first_bad: int) -> dict:
    """Drop shard `first_bad` and every later one from the manifest (their files too); mark it incomplete."""
    root = Path(path)
    manifest = read_manifest(root)
    lock = _Lock(root)
    try:
        manifest["shards"] = manifest["shards"][:first_bad]
        manifest["corpus_exhausted"] = False
        hooks = manifest["spec"]["hooks"]
        stats = {h: load_stats(root, manifest, h) for h in hooks}
        target = manifest["target_tokens"] // manifest["spec"]["context_size"]
        _finish_manifest(root, manifest, target, hooks, stats)
        _cleanup(root, hooks, len(manifest["shards"]))
    finally:
        lock.release()
    return manifest


def describe(manifest: dict) -> str:
    """A few lines about a cache, for the CLI."""
    spec = manifest["spec"]
    lines = [f"model {spec['model']['name']} ({spec['model']['fingerprint'][:12]}), corpus "
             f"{spec['corpus']['source']}/{spec['split']}, context {spec['context_size']}, dtype {spec['dtype']}"
             f"{', with gradients' if spec['with_grads'] else ''}",
             f"{manifest['n_tokens']:,} tokens in {manifest['n_shards']} shards → {manifest['n_rows']:,} training rows "
             f"per hook (BOS {'excluded' if spec['special_tokens']['exclude_bos'] else 'kept'})"
             + ("" if manifest["complete"] else f"; INCOMPLETE: target {manifest['target_tokens']:,} tokens")]
    for h in spec["hooks"]:
        s = manifest.get("stats", {}).get(h, {})
        extra = f", E‖∇‖² {s['grad_mean_sq_norm']:.3g}" if "grad_mean_sq_norm" in s else ""
        lines.append(f"  {h}: d_in {spec['d_in'][h]}, E‖x‖² {s.get('mean_sq_norm', float('nan')):.4g}, "
                     f"max ‖x‖ {s.get('max_norm', float('nan')):.4g}, total variance {s.get('var_total', float('nan')):.4g}"
                     + extra)
    return "\n".join(lines)


def cache_bytes(root: Path, manifest: dict) -> int:
    return sum(f["bytes"] for s in manifest["shards"] for f in s["files"].values())


__all__ = ["write_cache", "verify_cache", "repair_cache", "describe", "default_hook", "spec_differences",
           "load_stats"]
