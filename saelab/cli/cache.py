"""`saelab cache`: write, verify, repair and describe activation caches."""

from __future__ import annotations

import argparse


def add_cache(sub) -> None:
    from saelab.config import CacheConfig
    from saelab.settings import add_flags

    p = sub.add_parser(
        "cache", help="write model activations (and LM-loss gradients) of several hooks to disk; verify a cache",
        description="Run the model once per batch of packed rows, capture every --hooks in that one forward pass "
                    "(stopping after the last layer needed) and write sharded .npy files, token ids and a "
                    "manifest.json with statistics. Crash-safe: rerunning the same command resumes after the last "
                    "complete shard and gives the same bytes as an uninterrupted run; a different spec is refused. "
                    "`saelab cache verify DIR` checks row counts and SHA-256 checksums.",
        epilog="examples:\n  saelab cache --hooks blocks.1.hook_resid_post,blocks.2.hook_resid_post --tokens 2M "
               "--out cache/ref\n  saelab cache --tokens 500k --with-grads --dtype bfloat16 --out cache/grads\n"
               "  saelab cache verify cache/ref\n  saelab cache verify cache/ref --repair",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("action", nargs="?", choices=["write", "verify", "info"], default="write",
                   help="write (default) a cache; verify DIR: check files, row counts and checksums; info DIR: "
                        "describe a cache")
    p.add_argument("path", nargs="?", help="the cache directory, for verify and info")
    p.add_argument("--config", help="a YAML/JSON CacheConfig; flags override it")
    add_flags(p, CacheConfig)  # defaults None: a --config file's values are not overridden by a default
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--repair", action="store_true",
                   help="with verify: drop the first damaged shard and every later one from the manifest, so that "
                        "rerunning the writing command rewrites them")
    p.add_argument("--no-checksums", action="store_true", help="with verify: check sizes and row counts only")


def cache_config_from_args(args):
    """The --config file's CacheConfig (or the defaults) with the flags given on top."""
    from saelab.config import CacheConfig, load_config
    from saelab.settings import overrides_from_args

    return load_config(CacheConfig, args.config, overrides_from_args(args, CacheConfig))


def run_cache(args) -> int:
    import time
    from pathlib import Path

    from saelab.activations import describe, repair_cache, verify_cache
    from saelab.activations.format import NONFINITE, read_manifest
    from saelab.activations.verify import cache_bytes
    from saelab.api import cache
    from saelab.errors import ConfigError

    if args.action in ("verify", "info"):
        if not args.path:
            raise ConfigError(f"{args.action}: no cache directory given", hint=f"usage: saelab cache {args.action} DIR")
        if args.action == "info":
            print(describe(read_manifest(args.path)))
            return 0
        manifest, problems = verify_cache(args.path, checksums=not args.no_checksums)
        print(describe(manifest))
        n_files = sum(len(s["files"]) for s in manifest["shards"])
        if not problems:
            print(f"OK: {manifest['n_shards']} shards, {n_files} files, "
                  f"{cache_bytes(Path(args.path), manifest) / 2 ** 20:,.1f} MiB checked"
                  f"{'' if args.no_checksums else ' (sizes, row counts, SHA-256)'}")
            return 0
        for shard, problem in problems:
            print(f"DAMAGED shard {shard}: {problem}")
        first_bad = min(s for s, _ in problems)
        if args.repair:
            repair_cache(args.path, first_bad)
            print(f"repaired: the manifest now ends before shard {first_bad}; rerun the `saelab cache` command "
                  f"that wrote {args.path} to rewrite the dropped shards (identically)")
            return 0
        if all(NONFINITE in problem for _, problem in problems):  # written so: a rewrite would repeat them
            print("fix: the values were written non-finite (rewriting would repeat them): write a new cache under "
                  "another --out with --dtype float32 or bfloat16 (float16 overflows above 65504) or --model-dtype "
                  "float32")
            return 1
        print(f"fix: `saelab cache verify {args.path} --repair` drops shard {first_bad} and the later ones from "
              f"the manifest; then rerun the `saelab cache` command that wrote it")
        return 1
    cfg = cache_config_from_args(args)
    t0 = time.perf_counter()
    before = 0
    if cfg.out and (Path(cfg.out) / "manifest.json").exists():
        before = read_manifest(cfg.out)["n_tokens"]
    path = cache(cfg, progress=not args.no_progress)
    elapsed = time.perf_counter() - t0
    manifest = read_manifest(path)
    done = manifest["n_tokens"] - before
    print(f"wrote {path}: {cache_bytes(path, manifest) / 2 ** 20:,.1f} MiB"
          + (f", {done:,} new tokens in {elapsed:.1f} s including model loading ({done / elapsed:,.0f} tokens/s)"
             if done > 0 else
             " (already complete: nothing to do)"))
    print(describe(manifest))
    return 0
