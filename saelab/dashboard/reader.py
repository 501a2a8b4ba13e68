"""Read a dashboard bundle: `open(path)` → `Bundle`; `bundle.latent(i)` → everything one latent's page shows.

The public API (stable; the explorer app and the notebooks are written against it):

    b = saelab.dashboard.open("runs/x/dashboard")
    b.manifest                       dict: schema version, model, hook, SAE hash, corpus, tokens, settings, files
    b.n_latents, b.vocab (list[str]), b.tokens (memory-mapped int32 [rows, tokens_per_row])
    b.hooks                          "HOOK" of an SAE, "IN → OUT" of a transcoder (reads IN, its decoder writes OUT)
    b.table()                        pandas DataFrame, one row per latent: statistics, map_x/map_y, scores
    lat = b.latent(i)                `Latent`: stats, histograms, examples by kind, logits, neighbours, scores
    lat.top / lat.intervals / lat.random, lat.examples("top")
    lat.bottom                       signed codes (b.signed_codes, e.g. AbsTopK): the most negative rows
    ex.tokens, ex.acts               the example's whole row: token ids and the latent's activation at each position
    ex.window(16)                    (start, stop) of a ±16-token window around the peak, clipped to the row
    b.token_text(ids), b.token_id("def")
    b.latents_for_token("def")       latents whose top examples peak on that token, strongest first
    b.decoder_map()                  ([F, 2] coordinates, method name)
    b.to_neuronpedia(i)              one latent as Neuronpedia-style feature JSON (a dict)

Arrays are memory-mapped, and one latent's examples are one Parquet row group read, so a page costs
milliseconds whatever the bundle size. Cache the `Bundle` once per process (e.g. `st.cache_resource`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import numpy as np

from saelab.dashboard import format as fmt
from saelab.errors import DataError


# ================================================================================================ what a page shows
@dataclass
class LatentStats:
    """Statistics of one latent's active values (value != 0, taken as they are) over the bundle's tokens."""

    n_active: int  # tokens where the latent is active
    density: float  # n_active / scored tokens
    max: float
    min: float
    mean: float
    var: float  # population variance
    skew: float  # NaN when var == 0
    kurtosis: float  # excess kurtosis (normal = 0); NaN when var == 0
    dead: bool  # never active on the bundle's tokens
    dense: bool  # density > manifest["settings"]["dense_threshold"]
    n_rows: int  # rows where the latent is active at least once


@dataclass
class Example:
    """One context: a whole held-out row, with the latent's activation at every position."""

    kind: str  # "top" | "interval" | "random" | "bottom" (signed codes: the most negative rows)
    bin: int  # interval index for kind "interval", else -1
    rank: int  # order within its kind (and bin): 0 = first shown
    row: int  # row of `Bundle.tokens`
    pos: int  # position of the latent's peak in the row (the token the example is centred on)
    # the peak activation: the latent's largest value on this row; for "bottom" its smallest (negative) value, for
    # "random" the one of largest |value|
    act: float
    tokens: np.ndarray  # int32 [tokens_per_row]
    acts: np.ndarray  # float32 [tokens_per_row]; 0 where inactive (and at position 0, BOS, never scored)

    def window(self, half_width: int | None) -> tuple[int, int]:
        """(start, stop) of the ±half_width-token window around `pos`, clipped to the row; None = whole row."""
        if half_width is None:
            return 0, len(self.tokens)
        return max(0, self.pos - half_width), min(len(self.tokens), self.pos + half_width + 1)


@dataclass
class Interval:
    """One activation interval (sae_vis "quantile group"): lo < peak <= hi."""

    index: int
    lo: float
    hi: float
    contains: float  # share of the latent's active tokens whose value is in (lo, hi] (sums to ~1 over intervals)
    n_rows: int  # rows whose peak lies in the interval: the population its examples are sampled from
    examples: list[Example] = field(default_factory=list)


@dataclass
class TokenEffect:
    token: int
    text: str
    value: float


@dataclass
class Neighbour:
    latent: int
    value: float  # decoder cosine, or co-activation Jaccard
    count: int = 0  # co-activation: tokens where both are active (0 for decoder neighbours)


@dataclass
class TokenLatent:
    latent: int
    act: float  # the strongest top-example peak of the latent on this token
    hits: int  # how many of the latent's top examples peak on this token


@dataclass
class Latent:
    index: int
    stats: LatentStats
    hist_counts: np.ndarray  # uint32 [B]: active values per bin
    hist_edges: np.ndarray  # float32 [B + 1]
    top: list[Example]
    intervals: list[Interval]
    random: list[Example]
    logits_top: list[TokenEffect]  # most promoted tokens, largest first
    logits_bottom: list[TokenEffect]  # most suppressed tokens, most negative first
    logit_hist_counts: np.ndarray  # uint32 [B]: vocabulary tokens per logit-effect bin (sums to V)
    logit_hist_edges: np.ndarray  # float32 [B + 1]
    neighbours_decoder: list[Neighbour]
    neighbours_coact: list[Neighbour]
    map_xy: tuple[float, float]
    scores: dict[str, float]  # evaluator scores joined by latent id (only those this latent has)
    bottom: list[Example] = field(default_factory=list)  # signed codes: the most negative rows, most negative first

    def examples(self, kind: str) -> list[Example]:
        """All examples of one kind ("top", "interval" — every interval in order —, "random" or "bottom")."""
        if kind == "top":
            return self.top
        if kind == "random":
            return self.random
        if kind == "bottom":
            return self.bottom
        if kind == "interval":
            return [e for iv in self.intervals for e in iv.examples]
        raise DataError(f"example kind {kind!r} does not exist; use one of {fmt.EXAMPLE_KINDS}")


# ================================================================================================ the bundle
class Bundle:
    """A finished dashboard bundle on disk (read-only)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.manifest = fmt.read_manifest(self.path)
        self.n_latents = int(self.manifest["sae"]["n_latents"])
        self.settings = self.manifest["settings"]
        # values may be negative (AbsTopK and other signed codes): pages show the bottom examples and a red side
        self.signed_codes = bool(self.manifest["sae"].get("signed_codes", False))
        # a transcoder's latents read one hook and write another (decoder directions, logit lens: the target's)
        sae = self.manifest["sae"]
        self.target_hook = sae.get("target_hook") or None
        self.hooks = f"{sae['hook_name']} → {self.target_hook}" if self.target_hook else sae["hook_name"]

    # ---------------------------------------------------------------------------------------- lazy file handles
    def _npy(self, name: str) -> np.ndarray:
        return np.load(self.path / name, mmap_mode="r")

    @cached_property
    def tokens(self) -> np.ndarray:
        return self._npy(fmt.TOKENS)

    @cached_property
    def vocab(self) -> list[str]:
        return json.loads((self.path / fmt.VOCAB).read_text())

    @cached_property
    def _token_lookup(self) -> dict[str, int]:
        return {t: i for i, t in reversed(list(enumerate(self.vocab)))}  # first id wins for duplicates

    @cached_property
    def _arrays(self) -> dict[str, np.ndarray]:
        names = [fmt.ACT_HIST, fmt.ACT_HIST_RANGE, fmt.INTERVALS, fmt.INTERVAL_CONTAINS, fmt.INTERVAL_ROWS,
                 fmt.EXAMPLES_OFFSETS, fmt.LOGIT_TOP_IDS, fmt.LOGIT_TOP_VALS, fmt.LOGIT_BOTTOM_IDS,
                 fmt.LOGIT_BOTTOM_VALS, fmt.LOGIT_HIST, fmt.LOGIT_HIST_RANGE, fmt.NEIGHBOURS_DEC_IDS,
                 fmt.NEIGHBOURS_DEC_COS, fmt.COACT_IDS, fmt.COACT_COUNTS, fmt.COACT_JACCARD, fmt.DECODER_MAP,
                 fmt.TOKEN_INDEX_OFFSETS, fmt.TOKEN_INDEX_LATENTS, fmt.TOKEN_INDEX_ACTS, fmt.TOKEN_INDEX_HITS]
        return {n: self._npy(n) for n in names}

    @cached_property
    def _examples_file(self):
        import pyarrow.parquet as pq

        return pq.ParquetFile(self.path / fmt.EXAMPLES)

    @cached_property
    def _row_group_starts(self) -> np.ndarray:
        md = self._examples_file.metadata
        return np.cumsum([0] + [md.row_group(g).num_rows for g in range(md.num_row_groups)])

    @cached_property
    def _table(self):
        import pandas as pd

        df = pd.read_parquet(self.path / fmt.LATENTS)
        scores = self.path / fmt.SCORES
        if scores.exists():
            df = df.merge(pd.read_parquet(scores), on="latent", how="left")
        return df.set_index("latent", drop=False)

    # ---------------------------------------------------------------------------------------- public API
    def table(self):
        """pandas DataFrame, one row per latent (index = latent id): n_active, density, max, min, mean, var, skew,
        kurtosis, dead, dense, n_rows, map_x, map_y, and any evaluator score columns. For filtering and sorting."""
        return self._table

    def latent(self, i: int) -> Latent:
        """Everything one latent's page shows."""
        i = self.check_latent(i)
        a = self._arrays
        row = self._table.loc[i]
        stats = LatentStats(n_active=int(row["n_active"]), density=float(row["density"]), max=float(row["max"]),
                            min=float(row["min"]), mean=float(row["mean"]), var=float(row["var"]),
                            skew=float(row["skew"]), kurtosis=float(row["kurtosis"]), dead=bool(row["dead"]),
                            dense=bool(row["dense"]), n_rows=int(row["n_rows"]))
        lo, hi = (float(v) for v in a[fmt.ACT_HIST_RANGE][i])
        hist = np.asarray(a[fmt.ACT_HIST][i])
        llo, lhi = (float(v) for v in a[fmt.LOGIT_HIST_RANGE][i])
        lhist = np.asarray(a[fmt.LOGIT_HIST][i])
        examples = self._read_examples(i)
        edges = np.asarray(a[fmt.INTERVALS][i], dtype=np.float32)
        intervals = [Interval(j, float(edges[j]), float(edges[j + 1]), float(a[fmt.INTERVAL_CONTAINS][i, j]),
                              int(a[fmt.INTERVAL_ROWS][i, j]), [e for e in examples if e.kind == "interval" and
                                                                 e.bin == j])
                     for j in range(len(edges) - 1)]
        base = {"latent", "n_active", "density", "max", "min", "mean", "var", "skew", "kurtosis", "dead", "dense",
                "n_rows", "map_x", "map_y"}
        scores = {k: _plain(v) for k, v in row.items() if k not in base and not _missing(v)}
        return Latent(
            index=i, stats=stats, hist_counts=hist, hist_edges=np.linspace(lo, hi, len(hist) + 1, dtype=np.float32),
            top=[e for e in examples if e.kind == "top"], intervals=intervals,
            random=[e for e in examples if e.kind == "random"], bottom=[e for e in examples if e.kind == "bottom"],
            logits_top=self._effects(a[fmt.LOGIT_TOP_IDS][i], a[fmt.LOGIT_TOP_VALS][i]),
            logits_bottom=self._effects(a[fmt.LOGIT_BOTTOM_IDS][i], a[fmt.LOGIT_BOTTOM_VALS][i]),
            logit_hist_counts=lhist, logit_hist_edges=np.linspace(llo, lhi, len(lhist) + 1, dtype=np.float32),
            neighbours_decoder=[Neighbour(int(j), float(c)) for j, c in
                                zip(a[fmt.NEIGHBOURS_DEC_IDS][i], a[fmt.NEIGHBOURS_DEC_COS][i]) if j >= 0],
            neighbours_coact=[Neighbour(int(j), float(v), int(n)) for j, v, n in
                              zip(a[fmt.COACT_IDS][i], a[fmt.COACT_JACCARD][i], a[fmt.COACT_COUNTS][i]) if j >= 0],
            map_xy=(float(row["map_x"]), float(row["map_y"])), scores=scores)

    def check_latent(self, i) -> int:
        """i as a latent id of this bundle; DataError naming the valid range otherwise (e.g. an id from a URL)."""
        try:
            i = int(i)
        except (TypeError, ValueError):
            raise DataError(f"latent {i!r} is not an integer") from None
        if not 0 <= i < self.n_latents:
            raise DataError(f"latent {i} does not exist: this SAE has latents 0..{self.n_latents - 1}")
        return i

    def token_text(self, ids) -> list[str]:
        """Display strings of token ids (Ġ → space and Ċ → ↵ already applied)."""
        return [self.vocab[int(t)] for t in np.atleast_1d(ids)]

    def token_id(self, text: str) -> int | None:
        """The token id whose display string is exactly `text` (e.g. "def", " def"), or None."""
        return self._token_lookup.get(text)

    def latents_for_token(self, token: int | str, limit: int | None = None) -> list[TokenLatent]:
        """Latents whose top examples peak on `token` (an id or a display string), strongest peak first. Needs no
        model: it is the bundle's inverted token index."""
        tid = self.token_id(token) if isinstance(token, str) else int(token)
        if tid is None or not 0 <= tid < len(self.vocab):
            return []
        a = self._arrays
        s, e = int(a[fmt.TOKEN_INDEX_OFFSETS][tid]), int(a[fmt.TOKEN_INDEX_OFFSETS][tid + 1])
        if limit is not None:
            e = min(e, s + limit)
        return [TokenLatent(int(l), float(v), int(h)) for l, v, h in
                zip(a[fmt.TOKEN_INDEX_LATENTS][s:e], a[fmt.TOKEN_INDEX_ACTS][s:e], a[fmt.TOKEN_INDEX_HITS][s:e])]

    def decoder_map(self) -> tuple[np.ndarray, str]:
        """([F, 2] float32 coordinates of the decoder directions, the method: "umap" or "pca")."""
        return self._arrays[fmt.DECODER_MAP], self.manifest["settings"]["map_method"]

    def to_neuronpedia(self, i: int) -> dict:
        """One latent as a Neuronpedia-style feature dict (the fields of its `/api/feature` JSON we can fill)."""
        from saelab.dashboard.export import neuronpedia_feature

        return neuronpedia_feature(self, self.latent(i))

    # ---------------------------------------------------------------------------------------- helpers
    def _effects(self, ids, vals) -> list[TokenEffect]:
        return [TokenEffect(int(t), self.vocab[int(t)], float(v)) for t, v in zip(ids, vals)]

    def _read_examples(self, i: int) -> list[Example]:
        off = self._arrays[fmt.EXAMPLES_OFFSETS]
        s, e = int(off[i]), int(off[i + 1])
        if e <= s:
            return []
        starts = self._row_group_starts
        g = int(np.searchsorted(starts, s, side="right")) - 1  # a latent never spans row groups
        t = self._examples_file.read_row_group(g).slice(s - int(starts[g]), e - s).to_pydict()
        out = []
        T = self.tokens.shape[1]
        for k in range(e - s):
            row = int(t["row"][k])
            acts = np.zeros(T, dtype=np.float32)
            acts[np.asarray(t["act_pos"][k], dtype=np.int64)] = np.asarray(t["act_val"][k], dtype=np.float32)
            out.append(Example(kind=t["kind"][k], bin=int(t["bin"][k]), rank=int(t["rank"][k]), row=row,
                               pos=int(t["pos"][k]), act=float(t["act"][k]),
                               tokens=np.asarray(self.tokens[row]), acts=acts))
        return out

    def __repr__(self) -> str:
        m = self.manifest
        return (f"Bundle({str(self.path)!r}: {self.n_latents:,} latents of {self.hooks} on "
                f"{m['model']['name']}, {m['corpus']['tokens']:,} tokens)")


def _plain(v):
    return v.item() if hasattr(v, "item") else v


def _missing(v) -> bool:
    """A score the latent does not have (NaN / None after the left join)."""
    try:
        return v is None or bool(v != v)
    except (TypeError, ValueError):
        return False


def open(path: str | Path) -> Bundle:  # noqa: A001  (the documented entry point: saelab.dashboard.open)
    """Open a finished dashboard bundle (a folder with manifest.json)."""
    return Bundle(path)
