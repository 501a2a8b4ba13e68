"""Build a dashboard bundle: the model pass (`codes`), then every view from the codes and the weights.

    build_run_bundle("runs/x")                      the SAE of a run, on the validation split of its corpus
    build_bundle(out, rows, n_rows, capture, encode, sae_info, ...)   the general form (any rows, any encoder)

Crash safety: the work folder holds the pass's segments and `spec.json` (what is being built). Rerunning with
the same spec continues the pass; a different spec wipes the work folder and starts clean. The bundle's files are
written next, and `manifest.json` last and atomically, then the work folder is removed: a folder without a
manifest is never read as a bundle.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import torch
from tqdm.auto import tqdm

from saelab.dashboard import format as fmt
from saelab.dashboard.codes import iter_segments, read_tokens, write_codes
from saelab.dashboard.coact import coactivation_neighbours
from saelab.dashboard.examples import ExampleSampler, RowActivations, row_peaks, row_troughs
from saelab.dashboard.stats import LatentStatistics, dashboard_window, dead_latents
from saelab.errors import ConfigError, DataError
from saelab.files import write_atomic, write_json_atomic
from saelab.rundir import RunDir


@dataclass
class DashboardSettings:
    """What a bundle holds; every field is recorded in the manifest."""

    n_top: int = 20  # top examples per latent (sae_vis: 20)
    n_intervals: int = 10  # activation intervals (sae_vis "quantiles": 10)
    per_interval: int = 5  # examples sampled per interval (sae_vis: 5)
    n_random: int = 10  # random positive examples per latent
    bins: int = 50  # histogram bins (activations and logit effects; sae_vis: 50)
    n_logits: int = 10  # top and bottom logit-lens tokens
    n_neighbours: int = 10  # decoder-cosine neighbours
    n_coact: int = 10  # co-activation neighbours
    dense_threshold: float = 0.1  # a latent active on more than this share of tokens is dense (as `eval`)
    map_method: str = "auto"  # decoder map: auto (UMAP if installed, else PCA), umap or pca
    segment_rows: int = 256  # rows per work segment (the checkpoint and streaming unit)
    batch_rows: int = 32  # rows per model forward
    latents_per_row_group: int = 64  # examples.parquet row groups hold whole latents
    coact_tokens: int = 1 << 17  # co-activation is counted on the first this many scored tokens
    coact_max_cells: int = 1 << 26  # co-activation counter size (int32 cells) per block of latents
    seed: int = 0  # example sampling

    def __post_init__(self):
        for name in ("n_top", "n_intervals", "per_interval", "n_random", "bins", "n_logits", "n_neighbours",
                     "n_coact", "segment_rows", "batch_rows", "latents_per_row_group", "coact_tokens",
                     "coact_max_cells"):
            v = getattr(self, name)
            minimum = 1 if name in ("n_intervals", "bins", "segment_rows", "batch_rows", "latents_per_row_group",
                                    "coact_tokens", "coact_max_cells") else 0
            if not isinstance(v, int) or v < minimum:
                raise ConfigError(f"dashboard {name}: must be an integer >= {minimum}, got {v!r}")
        if not 0 < self.dense_threshold <= 1:
            raise ConfigError(f"dashboard dense_threshold: must be in (0, 1], got {self.dense_threshold}")
        if self.map_method not in ("auto", "umap", "pca"):
            raise ConfigError(f"dashboard map method: must be auto, umap or pca, got {self.map_method!r}")


def sae_sha256(sae) -> str:
    """sha256 over the SAE's parameters and config (what the bundle was built from)."""
    h = hashlib.sha256()
    for name, t in sorted(sae.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    h.update(json.dumps(asdict(sae.cfg), sort_keys=True, default=str).encode())
    return h.hexdigest()


def _prepare_out(out: Path, spec: dict) -> str:
    """'done' when `out` already holds this exact bundle, 'resume' or 'fresh' otherwise (work folder ready)."""
    work = out / fmt.WORK
    mf = out / fmt.MANIFEST
    if mf.exists():
        try:
            old = json.loads(mf.read_text()).get("spec")
        except json.JSONDecodeError:
            old = None
        if old == spec:
            shutil.rmtree(work, ignore_errors=True)  # a leftover of a kill after the manifest was written
            return "done"
        raise DataError(f"{out} already holds a dashboard bundle built from another SAE or other settings",
                        hint="pass --force to rebuild it, or choose another --out")
    if out.exists() and any(out.iterdir()) and not work.exists():
        raise DataError(f"{out} exists, is not empty and is not a dashboard bundle; refusing to write into it",
                        hint="choose another --out, or delete the folder")
    spec_file = work / "spec.json"
    if work.exists():
        try:
            same = json.loads(spec_file.read_text()) == spec
        except (OSError, json.JSONDecodeError):
            same = False
        if same:
            return "resume"
        shutil.rmtree(work)  # a half-built bundle of something else: restart cleanly
    for p in out.glob("*") if out.exists() else []:  # files of an unfinished build: rewritten below
        if p.is_file():
            p.unlink()
    work.mkdir(parents=True)
    write_json_atomic(spec_file, spec)
    return "fresh"


def build_bundle(out: str | Path, rows: Iterable[np.ndarray], n_rows: int, capture: Callable, encode: Callable,
                 sae_info: dict, directions: torch.Tensor, unembed: tuple | None, vocab: list[str],
                 meta: dict, settings: DashboardSettings | None = None, run: Path | None = None,
                 progress: bool = True, force: bool = False) -> Path:
    """Build (or finish, or find) the bundle at `out`.

    rows: packed token rows (BOS first), at least `n_rows` of them unless the corpus is shorter; capture(tokens
    [B, T]) → activations [B·(T-1), d_in] at the SAE's hook; encode(acts) → SparseCode. sae_info: n_latents,
    hook_name, sha256, signed_codes (whether values may be negative; also set when any is), a transcoder's target_hook
    and d_out, ... ; directions: raw-space decoder rows [F, d_out] (d_in for an SAE: the space the decoder writes);
    unembed: (W_U, gain, centres) or None when the hook the decoder writes is not in the residual stream; meta: model/corpus descriptions for the manifest (its "spec"
    part decides whether a half-built bundle is resumed)."""
    settings = settings or DashboardSettings()
    out = Path(out)
    F = int(sae_info["n_latents"])
    spec = {"sae": sae_info["sha256"], "n_rows": int(n_rows), "settings": asdict(settings), **meta.get("spec", {})}
    if force and out.exists() and ((out / fmt.MANIFEST).exists() or (out / fmt.WORK).exists()):
        shutil.rmtree(out)
    state = _prepare_out(out, spec)
    if state == "done":
        _refresh_scores(out, run, F)
        return out
    work = out / fmt.WORK
    t0 = time.perf_counter()
    rows_written = write_codes(work, rows, n_rows, capture, encode, F, segment_rows=settings.segment_rows,
                               batch_rows=settings.batch_rows, progress=progress)
    if rows_written == 0:
        raise DataError("the corpus split gave no rows to build a dashboard from",
                        hint="use another --split or --dataset, or a smaller --context-size")
    t_pass = time.perf_counter() - t0
    R, T = read_tokens(work, out / fmt.TOKENS)
    timings = {"pass_s": t_pass}
    t1 = time.perf_counter()
    table, arrays, n_examples, coact_tokens = _views_from_codes(work, out, F, R, T, settings, progress)
    timings["views_s"] = time.perf_counter() - t1

    t2 = time.perf_counter()
    arrays.update(_weight_views(directions, unembed, settings))
    coords, method = _decoder_map(directions, settings)
    arrays[fmt.DECODER_MAP] = coords
    table["map_x"], table["map_y"] = coords[:, 0], coords[:, 1]
    timings["weights_s"] = time.perf_counter() - t2
    arrays.update(_token_index(arrays.pop("_top_latent"), arrays.pop("_top_token"),
                               arrays.pop("_top_act"), len(vocab)))
    for name, a in arrays.items():
        np.save(out / name, a)
    (out / fmt.VOCAB).write_text(json.dumps(vocab, ensure_ascii=False))
    _write_table(out / fmt.LATENTS, table)
    score_report = _write_scores(out, run, F)
    n_tok = R * (T - 1)
    dead = dead_latents(table["n_active"], n_tok,
                        dashboard_window(n_tok, meta.get("corpus", {}).get("rows_from", "the rows given")),
                        sae_info.get("group_ends"))
    timings["total_s"] = time.perf_counter() - t0
    # signed codes (value < 0 possible): as the architecture declares, or as the codes showed (any encoder)
    alive_min = table["min"][~table["dead"]]
    signed = bool(sae_info.get("signed_codes")) or bool(len(alive_min) and alive_min.min() < 0)
    manifest = {
        "format": fmt.FORMAT, "schema_version": fmt.SCHEMA_VERSION,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "created_by": f"saelab {_version()}",
        "model": meta.get("model", {}), "sae": {**sae_info, "signed_codes": signed}, "corpus": {**meta.get("corpus", {}), "rows": R,
                                                                     "tokens_per_row": T, "tokens": n_tok},
        "settings": {**asdict(settings), "map_method": method, "logit_lens": unembed is not None,
                     "scored_positions": "1..T-1 of each row (position 0, BOS, is never scored)",
                     "active": "value != 0, values taken as they are (sae.signed_codes: values may be negative; "
                               "then 'bottom' examples hold each latent's most negative rows)",
                     "example_unit": "a (latent, row) pair centred on the latent's peak in the row",
                     "coact_tokens_counted": coact_tokens},
        "n_examples": n_examples, "dead_latents": dead, "scores": score_report, "timings": timings, "spec": spec,
        "files": {k: v for k, v in fmt.FILES.items() if (out / k).exists()},
    }
    write_json_atomic(out / fmt.MANIFEST, manifest)
    shutil.rmtree(work, ignore_errors=True)
    return out


def _write_scores(out: Path, run: Path | None, F: int) -> dict:
    """Join the run's evaluator scores into scores.parquet (atomically); returns the report for the manifest."""
    from saelab.dashboard.scores import collect_scores

    scores, report = collect_scores(run, F)
    path = out / fmt.SCORES
    if scores is None:
        path.unlink(missing_ok=True)
    else:
        write_atomic(path, lambda f: scores.to_parquet(f, index=False))
    return report


def _refresh_scores(out: Path, run: Path | None, F: int) -> None:
    """A finished bundle: evaluators may have written scores since; join them again (cheap) when they changed."""
    from saelab.dashboard.scores import PATTERNS, collect_scores

    if run is None or not RunDir(run).eval.is_dir():
        return
    mf = out / fmt.MANIFEST
    m = json.loads(mf.read_text())
    _, report = collect_scores(run, F)
    newest = max((p.stat().st_mtime for pat in PATTERNS for p in RunDir(run).eval.glob(pat)), default=0.0)
    if report == m.get("scores") and newest <= mf.stat().st_mtime:
        return
    m["scores"] = _write_scores(out, run, F)
    m["files"] = {k: v for k, v in fmt.FILES.items() if (out / k).exists()}
    write_json_atomic(out / fmt.MANIFEST, m)


def _version() -> str:
    from saelab import __version__

    return __version__


def _views_from_codes(work: Path, out: Path, F: int, R: int, T: int, settings: DashboardSettings, progress: bool):
    """Reads 1–3 of the codes (statistics, examples) and the co-activation reads; writes examples.parquet."""
    s = settings
    stats = LatentStatistics(F, bins=s.bins, n_intervals=s.n_intervals)
    sampler = ExampleSampler(F, n_top=s.n_top, n_intervals=s.n_intervals, per_interval=s.per_interval,
                             n_random=s.n_random, seed=s.seed)
    n_seg = sum(1 for _ in work.glob("seg-*.npz"))

    def reads(desc):
        return tqdm(iter_segments(work), total=n_seg, desc=desc, unit="seg", disable=not progress, leave=False)

    for r0, ids, vals in reads("statistics"):
        lat, val, plat, prow, ppos, pval = row_peaks(r0, ids, vals, T, F)
        stats.add_first(lat, val, plat)
        troughs = row_troughs(r0, ids, vals, T, F) if bool((val < 0).any()) else (None, None)  # signed codes
        sampler.add_first(plat, prow, ppos, pval, *troughs)
    stats.ranges()
    for r0, ids, vals in reads("histograms"):
        lat, val, plat, prow, ppos, pval = row_peaks(r0, ids, vals, T, F)
        stats.add_second(lat, val, plat, pval)
        sampler.add_second(plat, prow, ppos, pval, stats.interval_of)
    ex = sampler.examples()
    acts = RowActivations(ex["latent"], ex["row"], F)
    for r0, ids, vals in reads("example rows"):
        acts.add(r0, ids, vals, T)
    offsets, pos, val = acts.lists(ex["latent"], ex["row"])
    ex_offsets = _write_examples(out / fmt.EXAMPLES, ex, offsets, pos, val, F, s.latents_per_row_group)

    cols = stats.finish(R * (T - 1), s.dense_threshold)
    arrays = {fmt.ACT_HIST: cols.pop("act_hist"), fmt.ACT_HIST_RANGE: cols.pop("act_hist_range"),
              fmt.INTERVALS: cols.pop("intervals"), fmt.INTERVAL_CONTAINS: cols.pop("interval_contains"),
              fmt.INTERVAL_ROWS: cols.pop("interval_rows"),
              fmt.EXAMPLES_OFFSETS: ex_offsets}
    ci, cc, cj, coact_tokens = coactivation_neighbours(iter_segments(work, with_values=False), F, k=s.n_coact,
                                                       max_tokens=s.coact_tokens, max_cells=s.coact_max_cells)
    arrays.update({fmt.COACT_IDS: ci, fmt.COACT_COUNTS: cc, fmt.COACT_JACCARD: cj})
    top = ex["kind"] == 0
    tokens = np.load(out / fmt.TOKENS, mmap_mode="r")
    arrays["_top_latent"] = ex["latent"][top]
    arrays["_top_token"] = np.asarray(tokens[ex["row"][top], ex["pos"][top]])
    arrays["_top_act"] = ex["act"][top]
    table = {"latent": np.arange(F, dtype=np.int64), **cols}
    return table, arrays, int(len(ex["latent"])), coact_tokens


def _write_examples(path: Path, ex: dict, offsets, pos, val, F: int, per_group: int) -> np.ndarray:
    """examples.parquet with row groups of whole latents; returns the per-latent row offsets [F + 1]."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    counts = np.bincount(ex["latent"], minlength=F)
    lat_off = np.zeros(F + 1, dtype=np.int64)
    np.cumsum(counts, out=lat_off[1:])
    kinds = np.asarray(fmt.EXAMPLE_KINDS)
    schema = pa.schema([("latent", pa.int32()), ("kind", pa.dictionary(pa.int8(), pa.string())),
                        ("bin", pa.int8()), ("rank", pa.int16()), ("row", pa.int32()), ("pos", pa.int16()),
                        ("act", pa.float32()), ("act_pos", pa.list_(pa.int16())),
                        ("act_val", pa.list_(pa.float32()))])
    with pq.ParquetWriter(path, schema, compression="zstd") as w:
        for a in range(0, F, per_group):
            s, e = int(lat_off[a]), int(lat_off[min(F, a + per_group)])
            if e == s:
                continue
            o = offsets[s:e + 1]
            t = pa.table({
                "latent": pa.array(ex["latent"][s:e].astype(np.int32)),
                "kind": pa.DictionaryArray.from_arrays(pa.array(ex["kind"][s:e].astype(np.int8)),
                                                       pa.array(kinds.tolist())),
                "bin": pa.array(ex["bin"][s:e].astype(np.int8)), "rank": pa.array(ex["rank"][s:e].astype(np.int16)),
                "row": pa.array(ex["row"][s:e].astype(np.int32)), "pos": pa.array(ex["pos"][s:e].astype(np.int16)),
                "act": pa.array(ex["act"][s:e].astype(np.float32)),
                "act_pos": pa.ListArray.from_arrays(pa.array((o - o[0]).astype(np.int32)),
                                                    pa.array(pos[o[0]:o[-1]].astype(np.int16))),
                "act_val": pa.ListArray.from_arrays(pa.array((o - o[0]).astype(np.int32)),
                                                    pa.array(val[o[0]:o[-1]].astype(np.float32))),
            }, schema=schema)
            w.write_table(t, row_group_size=len(t))
    return lat_off


def _weight_views(directions: torch.Tensor, unembed, s: DashboardSettings) -> dict[str, np.ndarray]:
    from saelab.dashboard.weights import decoder_neighbours, logit_lens

    F = directions.shape[0]
    out = {}
    if unembed is not None:
        W_U, gain, centre = unembed
        lens = logit_lens(directions, W_U, gain, centre, n_logits=s.n_logits, bins=s.bins)
        out.update({fmt.LOGIT_TOP_IDS: lens["logit_top_ids"], fmt.LOGIT_TOP_VALS: lens["logit_top_vals"],
                    fmt.LOGIT_BOTTOM_IDS: lens["logit_bottom_ids"], fmt.LOGIT_BOTTOM_VALS: lens["logit_bottom_vals"],
                    fmt.LOGIT_HIST: lens["logit_hist"], fmt.LOGIT_HIST_RANGE: lens["logit_hist_range"]})
    else:  # the hook is not in the residual stream: no logit lens (empty arrays keep the layout uniform)
        out.update({fmt.LOGIT_TOP_IDS: np.zeros((F, 0), np.int32), fmt.LOGIT_TOP_VALS: np.zeros((F, 0), np.float32),
                    fmt.LOGIT_BOTTOM_IDS: np.zeros((F, 0), np.int32),
                    fmt.LOGIT_BOTTOM_VALS: np.zeros((F, 0), np.float32),
                    fmt.LOGIT_HIST: np.zeros((F, s.bins), np.uint32), fmt.LOGIT_HIST_RANGE: np.zeros((F, 2), np.float32)})
    ids, cos = decoder_neighbours(directions, k=s.n_neighbours)
    out.update({fmt.NEIGHBOURS_DEC_IDS: ids, fmt.NEIGHBOURS_DEC_COS: cos})
    return out


def _decoder_map(directions, s: DashboardSettings):
    from saelab.dashboard.weights import decoder_map

    return decoder_map(directions, s.map_method, seed=s.seed)


def _token_index(latent: np.ndarray, token: np.ndarray, act: np.ndarray, V: int) -> dict[str, np.ndarray]:
    """Token → latents whose top examples peak on it: the strongest such peak and how many, strongest first."""
    if len(latent):
        key = token.astype(np.int64) * (int(latent.max()) + 1) + latent
        uniq, inv = np.unique(key, return_inverse=True)
        best = np.full(len(uniq), -np.inf)
        np.maximum.at(best, inv, act.astype(np.float64))
        hits = np.bincount(inv, minlength=len(uniq))
        tok, lat = uniq // (int(latent.max()) + 1), uniq % (int(latent.max()) + 1)
        order = np.lexsort((lat, -best, tok))
        tok, lat, best, hits = tok[order], lat[order], best[order], hits[order]
    else:
        tok = lat = hits = np.zeros(0, np.int64)
        best = np.zeros(0)
    offsets = np.zeros(V + 1, dtype=np.int64)
    np.cumsum(np.bincount(tok, minlength=V)[:V], out=offsets[1:])
    return {fmt.TOKEN_INDEX_OFFSETS: offsets, fmt.TOKEN_INDEX_LATENTS: lat.astype(np.int32),
            fmt.TOKEN_INDEX_ACTS: best.astype(np.float32), fmt.TOKEN_INDEX_HITS: hits.astype(np.int32)}


def _write_table(path: Path, cols: dict) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({k: np.asarray(v) for k, v in cols.items()}), path)
