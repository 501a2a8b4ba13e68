"""The on-disk layout of a dashboard bundle: file names, the manifest, and what each file holds.

A bundle is one folder per SAE (`research/browsers.md` §10.3). F = latents, V = vocabulary, B = histogram bins,
R = held-out rows, T = tokens per row (BOS first; position 0 is never scored, as in training and `eval`).

    manifest.json               written LAST, atomically: a folder without it is not a bundle (a build in progress
                                or killed). Holds schema version, model, hook, SAE hash, corpus, token count, the
                                settings of every view, and `files`: what each file below is.
    tokens.npy                  int32 [R, T]       the shared held-out rows; every example points into it
    vocab.json                  list[str] [V]      display string of each token id (Ġ → space, Ċ → ↵ cleaned)
    latents.parquet             one row per latent: statistics, decoder-map coordinates, joined evaluator scores
    act_hist.npy                uint32 [F, B]      histogram of each latent's active values (value != 0; its range
                                                   spans [min(0, min), max(0, max)], negative values included)
    act_hist_range.npy          float32 [F, 2]     (lo, hi) of those B equal bins
    intervals.npy               float32 [F, NI+1]  edges of the activation intervals (equal width on (0, max])
    interval_contains.npy       float32 [F, NI]    share of the latent's active tokens in each interval
    interval_rows.npy           int64 [F, NI]      rows whose peak lies in each interval (the sampled population)
    examples.parquet            one row per example, sorted by latent, row groups of whole latents (one read per
                                latent): latent, kind ('top'|'interval'|'random'|'bottom', the last only for
                                signed codes: the most negative rows), bin, rank, row, pos, act,
                                act_pos list<int16>, act_val list<float32> (the latent's activations on that row,
                                sparse: the positions where it is active)
    examples_offsets.npy        int64 [F + 1]      latent i's examples are rows offsets[i]:offsets[i+1]
    logit_top_ids.npy / _vals   int32 / float32 [F, NL]  tokens whose logits the decoder direction raises most
    logit_bottom_ids.npy / _vals                         ... lowers most
    logit_hist.npy              uint32 [F, B]      histogram over the vocabulary of the same logit effects
    logit_hist_range.npy        float32 [F, 2]
    neighbours_dec_ids.npy      int32 [F, NN]      nearest latents by decoder cosine (-1 pads)
    neighbours_dec_cos.npy      float32 [F, NN]
    coact_ids.npy               int32 [F, NC]      latents most often active on the same tokens, by Jaccard (-1 pads)
    coact_counts.npy            int64 [F, NC]      tokens where both are active
    coact_jaccard.npy           float32 [F, NC]    count / (n_i + n_j − count)
    token_index_offsets.npy     int64 [V + 1]      token v's entries are offsets[v]:offsets[v+1] of the two below
    token_index_latents.npy     int32              latents whose top examples peak on token v, strongest first
    token_index_acts.npy        float32            the strongest such peak activation
    token_index_hits.npy        int32              how many of that latent's top examples peak on v
    decoder_map.npy             float32 [F, 2]     2-D map of decoder directions (method in the manifest)
    scores.parquet              optional: evaluator scores joined by latent id (steering, probes, circuits)

A build in progress keeps its state in `work/` (deleted when the manifest is written).
"""

from __future__ import annotations

import json
from pathlib import Path

from saelab.errors import DataError

FORMAT = "saelab-dashboard-bundle"
SCHEMA_VERSION = 1
MANIFEST = "manifest.json"
WORK = "work"

TOKENS = "tokens.npy"
VOCAB = "vocab.json"
LATENTS = "latents.parquet"
ACT_HIST = "act_hist.npy"
ACT_HIST_RANGE = "act_hist_range.npy"
INTERVALS = "intervals.npy"
INTERVAL_CONTAINS = "interval_contains.npy"
INTERVAL_ROWS = "interval_rows.npy"
EXAMPLES = "examples.parquet"
EXAMPLES_OFFSETS = "examples_offsets.npy"
LOGIT_TOP_IDS = "logit_top_ids.npy"
LOGIT_TOP_VALS = "logit_top_vals.npy"
LOGIT_BOTTOM_IDS = "logit_bottom_ids.npy"
LOGIT_BOTTOM_VALS = "logit_bottom_vals.npy"
LOGIT_HIST = "logit_hist.npy"
LOGIT_HIST_RANGE = "logit_hist_range.npy"
NEIGHBOURS_DEC_IDS = "neighbours_dec_ids.npy"
NEIGHBOURS_DEC_COS = "neighbours_dec_cos.npy"
COACT_IDS = "coact_ids.npy"
COACT_COUNTS = "coact_counts.npy"
COACT_JACCARD = "coact_jaccard.npy"
TOKEN_INDEX_OFFSETS = "token_index_offsets.npy"
TOKEN_INDEX_LATENTS = "token_index_latents.npy"
TOKEN_INDEX_ACTS = "token_index_acts.npy"
TOKEN_INDEX_HITS = "token_index_hits.npy"
DECODER_MAP = "decoder_map.npy"
SCORES = "scores.parquet"

EXAMPLE_KINDS = ("top", "interval", "random", "bottom")  # stored as indices: new kinds go at the end

FILES = {  # what each file is; copied into the manifest so a bundle describes itself
    TOKENS: "int32 [rows, tokens_per_row]: the held-out rows (BOS at position 0, never scored)",
    VOCAB: "list of display strings, one per token id",
    LATENTS: "parquet, one row per latent: n_active, density, max, min, mean, var, skew, kurtosis, dead, dense, "
             "n_rows, map_x, map_y",
    ACT_HIST: "uint32 [n_latents, bins]: histogram of each latent's active values",
    ACT_HIST_RANGE: "float32 [n_latents, 2]: (lo, hi) of the equal-width histogram bins",
    INTERVALS: "float32 [n_latents, n_intervals + 1]: activation-interval edges, equal width on (0, max]",
    INTERVAL_CONTAINS: "float32 [n_latents, n_intervals]: share of active tokens in each interval",
    INTERVAL_ROWS: "int64 [n_latents, n_intervals]: rows whose peak activation lies in each interval",
    EXAMPLES: "parquet, sorted by latent: latent, kind, bin, rank, row, pos, act, act_pos, act_val",
    EXAMPLES_OFFSETS: "int64 [n_latents + 1]: latent i's examples are rows offsets[i]:offsets[i+1]",
    LOGIT_TOP_IDS: "int32 [n_latents, n_logits]: tokens the decoder direction promotes most",
    LOGIT_TOP_VALS: "float32 [n_latents, n_logits]: their logit effects",
    LOGIT_BOTTOM_IDS: "int32 [n_latents, n_logits]: tokens the decoder direction suppresses most",
    LOGIT_BOTTOM_VALS: "float32 [n_latents, n_logits]: their logit effects",
    LOGIT_HIST: "uint32 [n_latents, bins]: histogram of the logit effects over the vocabulary",
    LOGIT_HIST_RANGE: "float32 [n_latents, 2]: (lo, hi) of those bins",
    NEIGHBOURS_DEC_IDS: "int32 [n_latents, n_neighbours]: nearest latents by decoder cosine (-1 pads)",
    NEIGHBOURS_DEC_COS: "float32 [n_latents, n_neighbours]: their cosines",
    COACT_IDS: "int32 [n_latents, n_coact]: latents most often active on the same tokens, by Jaccard (-1 pads)",
    COACT_COUNTS: "int64 [n_latents, n_coact]: tokens where both are active",
    COACT_JACCARD: "float32 [n_latents, n_coact]: count / (n_i + n_j - count)",
    TOKEN_INDEX_OFFSETS: "int64 [vocab + 1]: token v's entries are offsets[v]:offsets[v+1]",
    TOKEN_INDEX_LATENTS: "int32: latents whose top examples peak on the token, strongest first",
    TOKEN_INDEX_ACTS: "float32: the strongest peak activation of that latent on the token",
    TOKEN_INDEX_HITS: "int32: how many of the latent's top examples peak on the token",
    DECODER_MAP: "float32 [n_latents, 2]: 2-D map of the decoder directions",
    SCORES: "parquet, optional: evaluator scores joined by latent id",
}


def read_manifest(path: str | Path) -> dict:
    """The manifest of a finished bundle; a clear `DataError` for anything else."""
    path = Path(path)
    mf = path / MANIFEST
    if not mf.exists():
        if (path / WORK).exists():
            raise DataError(f"{path} is a dashboard bundle whose build did not finish (no {MANIFEST})",
                            hint=f"rerun `saelab dashboard RUN --out {path}` to continue it")
        raise DataError(f"no dashboard bundle at {path} (no {MANIFEST})",
                        hint="build one with `saelab dashboard RUN`")
    try:
        m = json.loads(mf.read_text())
    except json.JSONDecodeError as e:
        raise DataError(f"{mf} is not valid JSON ({e})", hint=f"delete {path} and rebuild it") from None
    if m.get("format") != FORMAT:
        raise DataError(f"{mf} is not a saelab dashboard manifest (format {m.get('format')!r})")
    if m.get("schema_version") != SCHEMA_VERSION:
        raise DataError(f"{mf} has schema version {m.get('schema_version')}; this saelab reads version "
                        f"{SCHEMA_VERSION}", hint="rebuild it with `saelab dashboard`")
    return m
