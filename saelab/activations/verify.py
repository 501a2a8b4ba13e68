"""Checking a written cache (`verify_cache`), cutting off its damaged shards so that a rerun rewrites them
(`repair_cache`), and describing it (`describe`, `cache_bytes`): what `saelab cache verify|info` runs."""

from __future__ import annotations

from pathlib import Path

from saelab.activations.format import CacheLock, check_file, load_stats, read_manifest, write_manifest
from saelab.activations.shards import remove_unlisted, shard_files


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
    lock = CacheLock(root)
    try:
        manifest["shards"] = manifest["shards"][:first_bad]
        manifest["corpus_exhausted"] = False
        hooks = manifest["spec"]["hooks"]
        stats = {h: load_stats(root, manifest, h) for h in hooks}
        target = manifest["target_tokens"] // manifest["spec"]["context_size"]
        write_manifest(root, manifest, target, hooks, stats)
        remove_unlisted(root, hooks, len(manifest["shards"]))
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
    """The bytes of every shard file the manifest lists."""
    return sum(f["bytes"] for s in manifest["shards"] for f in s["files"].values())


__all__ = ["verify_cache", "repair_cache", "describe", "cache_bytes"]
