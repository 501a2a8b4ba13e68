"""The on-disk format of an activation cache: file names, the manifest, dtype codecs, npy headers, checksums.

A cache directory holds

    manifest.json                      written last, atomically (temporary name + rename)
    .lock                              held (flock) by the one process writing or repairing the cache
    tokens-NNNNN.npy                   int32 [rows, context_size]: the packed rows of shard N (BOS first)
    <hook>/acts-NNNNN.npy              [rows × kept positions, d_in]: the training rows of shard N, row-major
    <hook>/grads-NNNNN.npy             same shape: d loss / d activation (with --with-grads)
    <hook>/stats-NNNNN.npy             float64 [2, d_in]: mean and sum of squared deviations of shard N's rows

Training row r of a shard is position `r % K + first_kept` of packed row `r // K` (K = kept positions per row,
`context_size - 1` when BOS is excluded). bfloat16 is stored as its raw bits in uint16 (numpy has no bfloat16), so
it round-trips exactly; `manifest["spec"]["dtype"]` says how to read the bits.
"""

from __future__ import annotations

import fcntl
import hashlib
import io
import json
import os
from pathlib import Path

import numpy as np
import torch

from saelab.files import write_json_atomic

FORMAT = "saelab-activation-cache"
SCHEMA_VERSION = 1
MANIFEST = "manifest.json"
LOCK = ".lock"
STORAGE = {"float32": np.dtype("<f4"), "float16": np.dtype("<f2"), "bfloat16": np.dtype("<u2")}
TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


from saelab.errors import CacheError  # noqa: E402  (re-exported for `from saelab.activations import CacheError`)


def tokens_file(i: int) -> str:
    return f"tokens-{i:05d}.npy"


def acts_file(hook: str, i: int) -> str:
    return f"{hook}/acts-{i:05d}.npy"


def grads_file(hook: str, i: int) -> str:
    return f"{hook}/grads-{i:05d}.npy"


def stats_file(hook: str, i: int) -> str:
    return f"{hook}/stats-{i:05d}.npy"


# ------------------------------------------------------------------------------------------------ dtype codecs
def to_storage(x: torch.Tensor, dtype: str) -> np.ndarray:
    """A float tensor → the numpy array written to disk (bfloat16 as raw uint16 bits), on the CPU, contiguous."""
    t = x.detach().to(TORCH_DTYPES[dtype])
    if t.device.type != "cpu":
        t = t.cpu()
    t = t.contiguous()
    if dtype == "bfloat16":
        return t.view(torch.int16).numpy().view(np.uint16)
    return t.numpy()


def from_storage(a: np.ndarray, dtype: str) -> torch.Tensor:
    """The inverse of `to_storage`, as float32."""
    a = np.ascontiguousarray(a)
    if dtype == "bfloat16":
        return torch.from_numpy(a.view(np.int16)).view(torch.bfloat16).float()
    return torch.from_numpy(a).float()


# ------------------------------------------------------------------------------------------------ npy files
def npy_header(shape: tuple[int, ...], dtype: np.dtype) -> bytes:
    """The exact header `np.save` would write for a C-ordered array of this shape and dtype."""
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        buf, {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)), "fortran_order": False, "shape": tuple(shape)})
    return buf.getvalue()


def read_npy_header(path: Path) -> tuple[tuple[int, ...], np.dtype, int]:
    """(shape, dtype, data offset) of a C-ordered .npy file; raises `CacheError` naming the file when unreadable."""
    try:
        with open(path, "rb") as f:
            version = np.lib.format.read_magic(f)
            if version == (1, 0):
                shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
            else:
                shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
            offset = f.tell()
    except FileNotFoundError:
        raise
    except Exception as e:  # noqa: BLE001 -- any parse failure means a damaged file
        raise CacheError(f"{path}: not a readable .npy file ({e})") from None
    if fortran:
        raise CacheError(f"{path}: Fortran-ordered arrays are not supported")
    return tuple(shape), np.dtype(dtype), offset


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            b = f.read(chunk)
            if not b:
                return h.hexdigest()
            h.update(b)


def pread_into(fd: int, out: np.ndarray, offset: int) -> None:
    """Fill the contiguous array `out` with bytes read from `fd` at `offset` (no memory map: bounded RSS)."""
    mv = memoryview(out.reshape(-1).view(np.uint8))
    done = 0
    n = len(mv)
    while done < n:
        got = os.preadv(fd, [mv[done:]], offset + done)
        if got <= 0:
            raise CacheError(f"unexpected end of file (fd {fd}) at byte {offset + done}")
        done += got


def read_manifest(path: str | Path) -> dict:
    path = Path(path)
    mf = path / MANIFEST
    make = f"make one with `saelab cache --out {path} ...` (see `saelab cache --help`)"
    if path.exists() and not path.is_dir():
        raise CacheError(f"{path}: a file, not an activation cache (a cache is a directory holding {MANIFEST})",
                         hint=make)
    if not mf.exists():
        if path.exists() and any(p.name != LOCK for p in path.iterdir()):
            raise CacheError(f"{path} has no {MANIFEST}: it is not an activation cache (or its first shard was never "
                             f"finished)", hint=f"write one with `saelab cache --out {path}`, or use another --out")
        raise CacheError(f"{path}: no activation cache here (no {MANIFEST})", hint=make)
    try:
        m = json.loads(mf.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CacheError(f"{mf} is not valid JSON ({e}); the cache cannot be trusted",
                         hint=f"delete {path} and rewrite it") from None
    if not isinstance(m, dict) or m.get("format") != FORMAT:
        got = m.get("format") if isinstance(m, dict) else type(m).__name__
        raise CacheError(f"{mf} is not a saelab activation-cache manifest (format {got!r})")
    if m.get("schema_version") != SCHEMA_VERSION:
        raise CacheError(f"{mf} has schema version {m.get('schema_version')}, this saelab reads version "
                         f"{SCHEMA_VERSION}", hint="rewrite the cache with this version of saelab")
    return m


def write_manifest(root: Path, manifest: dict, target_seqs: int, hooks: list[str],
                   totals: dict[str, "RunningStats"]) -> None:
    """Fill in the manifest's counts and statistics from its shards and `totals` (every hook's statistics over
    them), then replace `root/manifest.json` atomically."""
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


class CacheLock:
    """The cache's lock file, held by one writing process at a time (a second one is refused, not queued)."""

    def __init__(self, root: Path):
        self.path = root / LOCK
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


# ------------------------------------------------------------------------------------------------ statistics
class RunningStats:
    """Per-dimension mean and M2 (sum of squared deviations) plus norm statistics, accumulated in float64.

    Batches merge with Chan et al.'s pairwise update, so the result depends only on the sequence of batches: a
    resumed write folds the same per-shard statistics in the same order and gets the same bits.
    """

    def __init__(self, d: int):
        self.n = 0
        self.mean = np.zeros(d, dtype=np.float64)
        self.m2 = np.zeros(d, dtype=np.float64)
        self.sum_norm = 0.0
        self.sum_sq_norm = 0.0
        self.max_norm = 0.0
        self.min_norm = float("inf")

    def add_batch(self, x: torch.Tensor) -> None:
        """x: [N, d] float (any device); statistics are taken in float64."""
        if x.shape[0] == 0:
            return
        # The batch's own mean and M2 are taken in float32 (torch's pairwise sums: ~1e-7 relative error, 4-5x
        # cheaper than float64 on CPU, which matters because this runs for every hook of every batch); everything
        # from there on (merging batches and shards, norm sums) is float64.
        x = x.detach()
        x = x.float() if x.dtype != torch.float64 else x
        n = x.shape[0]
        mean = x.sum(0) / n  # (plain sums: torch.var_mean over dim 0 is several times slower on CPU)
        c = x - mean
        m2 = (c * c).sum(0)
        norms_sq = (x * x).sum(1)
        norms = norms_sq.sqrt()
        sum_norm, sum_sq, max_norm, min_norm = torch.stack(
            [norms.double().sum(), norms_sq.double().sum(), norms.max().double(), norms.min().double()]).tolist()
        self._merge(n, mean.double().cpu().numpy(), m2.double().cpu().numpy(), sum_norm, sum_sq, max_norm, min_norm)

    def _merge(self, n, mean, m2, sum_norm, sum_sq_norm, max_norm, min_norm) -> None:
        if n == 0:
            return
        tot = self.n + n
        delta = mean - self.mean
        self.mean = self.mean + delta * (n / tot)
        self.m2 = self.m2 + m2 + delta * delta * (self.n * n / tot)
        self.n = tot
        self.sum_norm += sum_norm
        self.sum_sq_norm += sum_sq_norm
        self.max_norm = max(self.max_norm, max_norm)
        self.min_norm = min(self.min_norm, min_norm)

    def merge(self, other: "RunningStats") -> None:
        self._merge(other.n, other.mean, other.m2, other.sum_norm, other.sum_sq_norm, other.max_norm,
                    other.min_norm)

    def scalars(self) -> dict:
        return {"n": self.n, "sum_norm": self.sum_norm, "sum_sq_norm": self.sum_sq_norm, "max_norm": self.max_norm,
                "min_norm": self.min_norm if self.n else 0.0}

    def vectors(self) -> np.ndarray:
        return np.stack([self.mean, self.m2])

    @classmethod
    def from_parts(cls, scalars: dict, vectors: np.ndarray) -> "RunningStats":
        s = cls(vectors.shape[1])
        s.n = int(scalars["n"])
        s.mean, s.m2 = vectors[0].astype(np.float64), vectors[1].astype(np.float64)
        s.sum_norm, s.sum_sq_norm = float(scalars["sum_norm"]), float(scalars["sum_sq_norm"])
        s.max_norm = float(scalars["max_norm"])
        s.min_norm = float(scalars["min_norm"]) if s.n else float("inf")
        return s

    def summary(self) -> dict:
        """What the manifest shows for a hook (vectors live in the per-shard stats files)."""
        n = max(self.n, 1)
        var = self.m2 / n
        return {"n": self.n, "mean_sq_norm": self.sum_sq_norm / n, "mean_norm": self.sum_norm / n,
                "max_norm": self.max_norm, "min_norm": self.min_norm if self.n else 0.0,
                "var_total": float(var.sum()), "mean_norm_of_mean": float(np.sqrt((self.mean ** 2).sum()))}


# ------------------------------------------------------------------------------------------------ checking shards
def load_stats(root: Path, manifest: dict, hook: str, shards: list[dict] | None = None) -> RunningStats:
    """Fold the per-shard statistics of `hook` in shard order."""
    d = manifest["spec"]["d_in"][hook]
    total = RunningStats(d)
    for s in manifest["shards"] if shards is None else shards:
        vec = np.load(root / stats_file(hook, s["index"]))
        total.merge(RunningStats.from_parts(s["stats"][hook], vec))
    return total



def fix_hint(root: Path) -> str:
    return (f"run `saelab cache verify {root} --repair` (it drops the damaged shard and the ones after it from the "
            f"manifest), then rerun the `saelab cache` command that made the cache: it rewrites them identically")


NONFINITE = "NaN or inf"


def _finite_rows(a: np.ndarray) -> np.ndarray:
    """[rows, d] stored values → bool [rows]: every value of the row is finite (bfloat16 as raw bits: a NaN or inf
    has all 8 exponent bits set)."""
    if a.dtype == np.uint16:
        return ((a & 0x7F80) != 0x7F80).all(1)
    return np.isfinite(a).all(1)


def scan_file(path: Path, offset: int, shape: tuple, dtype: np.dtype, finite: bool,
              chunk_bytes: int = 1 << 22) -> tuple[str, int, int | None]:
    """One pass over a file: (SHA-256 of the whole file, rows holding NaN/inf, the first such row or None); the
    rows are checked only with `finite` (for activation and gradient files)."""
    h = hashlib.sha256()
    row_bytes = int(np.prod(shape[1:], dtype=np.int64)) * dtype.itemsize if len(shape) > 1 else dtype.itemsize
    chunk = max(1, chunk_bytes // max(row_bytes, 1)) * row_bytes
    n_bad, first_bad, row = 0, None, 0
    with open(path, "rb") as f:
        h.update(f.read(offset))
        while True:
            b = f.read(chunk)
            if not b:
                break
            h.update(b)
            if finite and len(b) % row_bytes == 0:
                ok = _finite_rows(np.frombuffer(b, dtype=dtype).reshape(len(b) // row_bytes, -1))
                if not ok.all():
                    bad = np.flatnonzero(~ok)
                    first_bad = row + int(bad[0]) if first_bad is None else first_bad
                    n_bad += len(bad)
            row += len(b) // row_bytes
    return h.hexdigest(), n_bad, first_bad


def check_file(root: Path, rel: str, shape: tuple, dtype: np.dtype, entry: dict | None, checksum: bool,
               finite: bool = False) -> tuple[int, str | None]:
    """(data offset, problem or None) for one shard file. `finite`: also find rows holding NaN/inf (one pass with
    the checksum)."""
    path = root / rel
    if not path.exists():
        return 0, f"{rel}: missing"
    try:
        got_shape, got_dtype, offset = read_npy_header(path)
    except CacheError as e:
        return 0, f"{rel}: corrupt header ({e})"
    if got_shape != tuple(shape) or got_dtype != dtype:
        return offset, f"{rel}: holds {got_dtype} {got_shape}, the manifest says {dtype} {tuple(shape)} (wrong row count)"
    size = path.stat().st_size
    want = offset + int(np.prod(shape)) * dtype.itemsize
    if size != want:
        return offset, f"{rel}: {size:,} bytes, expected {want:,} ({'truncated' if size < want else 'trailing bytes'})"
    if entry is not None and entry.get("bytes") not in (None, size):
        return offset, f"{rel}: {size:,} bytes, the manifest recorded {entry['bytes']:,}"
    if checksum or finite:
        digest, n_bad, first_bad = scan_file(path, offset, tuple(shape), dtype, finite)
        if checksum and entry is not None and digest != entry["sha256"]:
            return offset, f"{rel}: SHA-256 differs from the manifest (corrupted contents)"
        if n_bad:
            return offset, f"{rel}: row {first_bad} holds {NONFINITE} ({n_bad:,} of {shape[0]:,} rows do)"
    return offset, None
