"""The files of a cache's shards: which files shard N holds, with which shapes and dtypes (`shard_files`), how the
manifest describes them to other tools (`layout`), and removing what a killed write left (`remove_unlisted`)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from saelab.activations.format import STORAGE, acts_file, grads_file, stats_file, tokens_file
from saelab.files import TMP_SUFFIX

SHARD_FILE_KINDS = ("tokens", "acts", "grads", "stats")


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


def layout(spec: dict) -> dict:
    """The manifest's `layout`: the shard files described in words, for tools other than saelab."""
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


def remove_unlisted(root: Path, hooks: list[str], n_shards: int) -> None:
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
            if prefix in SHARD_FILE_KINDS and num.isdigit() and int(num) >= n_shards:
                p.unlink()
