"""`saelab cache`: write, verify, repair and describe activation caches."""

from __future__ import annotations

import argparse

from saelab.cli.flags import _add_model_flags, _add_table_flags, _table_overrides, parse_count


# ---- cache
CACHE_FLAGS = {  # flag → (config key, type, help)
    "--hooks": ("hooks", str, "comma-separated hook names (default: the middle residual stream, "
                              "blocks.{L//2}.hook_resid_pre); all are captured in one forward pass"),
    "--tokens": ("tokens", parse_count, "cache size in tokens, e.g. 2M, 500k or 20000 (default 1M); a larger value "
                                        "later extends the cache"),
    "--out": ("out", str, "cache directory (default cache/<model>-<hook>); rerunning resumes or extends it"),
    "--dataset": ("corpus.source", str, "corpus: 'stdlib' (default), an HF dataset name or a local path"),
    "--text-field": ("corpus.text_field", str, "text field of dataset rows (default: text)"),
    "--split": ("split", str, "corpus split: train (default), validation or all"),
    "--context-size": ("context_size", int, "tokens per packed row, BOS included (default 128)"),
    "--dtype": ("dtype", str, "storage dtype: float32 (default), float16 or bfloat16 (stored as raw bits, exact)"),
    "--batch-rows": ("batch_rows", int, "rows per model forward (default 32)"),
    "--shard-rows": ("shard_rows", int, "rows per shard, a multiple of --batch-rows (default: ~64 MB files)"),
}


def add_cache(sub) -> None:
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
    _add_model_flags(p, defaults=False)  # so a --config file's model is not overridden by a default
    _add_table_flags(p, CACHE_FLAGS)
    p.add_argument("--with-grads", action="store_true", default=None,
                   help="also store d(next-token cross-entropy, summed over predicted tokens)/d(activation) per "
                        "hook, from one backward pass per batch (for gradient-TopK SAEs)")
    p.add_argument("--keep-bos", action="store_true", default=None,
                   help="keep position 0 (BOS) as a training row (default: excluded, its norm dwarfs the rest)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--repair", action="store_true",
                   help="with verify: drop the first damaged shard and every later one from the manifest, so that "
                        "rerunning the writing command rewrites them")
    p.add_argument("--no-checksums", action="store_true", help="with verify: check sizes and row counts only")


def cache_config_from_args(args):
    from saelab.config import CacheConfig, load_config

    overrides = _table_overrides(args, CACHE_FLAGS)
    overrides.update({"with_grads": args.with_grads, "exclude_bos": False if args.keep_bos else None})
    return load_config(CacheConfig, args.config, overrides)


def run_cache(args) -> int:
    import time
    from pathlib import Path

    from saelab.activations import describe, repair_cache, verify_cache, write_cache
    from saelab.activations.format import NONFINITE, read_manifest
    from saelab.activations.verify import cache_bytes
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
    path = write_cache(cfg, progress=not args.no_progress)
    elapsed = time.perf_counter() - t0
    manifest = read_manifest(path)
    done = manifest["n_tokens"] - before
    print(f"wrote {path}: {cache_bytes(path, manifest) / 2 ** 20:,.1f} MiB"
          + (f", {done:,} new tokens in {elapsed:.1f} s including model loading ({done / elapsed:,.0f} tokens/s)"
             if done > 0 else
             " (already complete: nothing to do)"))
    print(describe(manifest))
    return 0
