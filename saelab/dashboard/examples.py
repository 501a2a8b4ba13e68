"""Choosing each latent's examples in a stream: top rows, rows sampled per activation interval, random rows.

An example is a (latent, row) pair: the whole held-out row, centred on the latent's peak in it (its largest value,
the earliest position on ties). Working with rows rather than tokens keeps one row from filling a latent's top
list with neighbouring tokens, and makes every interval example's peak lie in its interval.

* top: the k rows with the largest positive peak; ties go to the earlier row.
* interval: per activation interval (equal width on (0, max], see `stats`), k rows drawn uniformly without
  replacement from the rows whose peak lies in it.
* random: k rows drawn uniformly without replacement from the rows where the latent is active at all, each centred
  on its strongest activation (the largest |value|, so a row of a signed latent that only goes negative shows
  its trough).
* bottom (signed codes, e.g. AbsTopK): the k rows with the most negative trough (the row's smallest value, the
  earliest position on ties), centred on it; ties go to the earlier row. A signed latent stands for its decoder
  direction and its opposite, and a researcher wants both sides, as Neuronpedia lists the most positive and the
  most negative contexts: ranking by |value| alone would let one side crowd the other out.

Sampling is reservoir sampling by priority keys: every (latent, row) gets a uniform key from a hash of (seed, kind,
latent, row), and a group keeps its k largest keys, which is a uniform k-subset. The keys do not depend on how the
rows are chunked, so a resumed or re-chunked build draws the same examples.
"""

from __future__ import annotations

import numpy as np
import torch


def row_peaks(r0: int, ids: torch.Tensor, vals: torch.Tensor, T: int, n_latents: int):
    """Active entries of a chunk of whole rows and each (latent, row) peak.

    Returns (lat, val, peak_lat, peak_row, peak_pos, peak_val): the chunk's active entries, then per (latent, row)
    pair, sorted by latent then row, the row (global), the position of the peak in the row (1..T-1) and its value.
    A dense [n_latents × rows] scratch array replaces a sort (the chunk is a few hundred rows).
    """
    nz = ids >= 0
    tok = torch.arange(ids.shape[0]).unsqueeze(1).expand_as(ids)[nz]
    lat = ids[nz].long()
    val = vals[nz]
    rows_in_chunk = ids.shape[0] // (T - 1)
    key = lat * rows_in_chunk + tok // (T - 1)
    dense = torch.full((n_latents * rows_in_chunk,), -torch.inf, dtype=val.dtype)
    dense.scatter_reduce_(0, key, val, "amax")
    at_peak = val == dense[key]
    first = torch.full(dense.shape, torch.iinfo(torch.int64).max, dtype=torch.int64)
    first.scatter_reduce_(0, key[at_peak], tok[at_peak], "amin")
    uniq = torch.nonzero(first != torch.iinfo(torch.int64).max).squeeze(1)  # ascending: by latent, then row
    peak_lat = uniq // rows_in_chunk
    peak_row = uniq % rows_in_chunk + r0
    peak_pos = first[uniq] % (T - 1) + 1
    return lat, val, peak_lat, peak_row, peak_pos, dense[uniq]


def row_troughs(r0: int, ids: torch.Tensor, vals: torch.Tensor, T: int, n_latents: int):
    """(position, value) of each (latent, row) pair's smallest value (the earliest position on ties), in the pair
    order of `row_peaks` on the same chunk: its peaks of −vals."""
    *_, pos, neg = row_peaks(r0, ids, -vals, T, n_latents)
    return pos, -neg


_M1, _M2, _G = 0xBF58476D1CE4E5B9, 0x94D049BB133111EB, 0x9E3779B97F4A7C15


def uniform_keys(seed: int, stream: int, lat: torch.Tensor, row: torch.Tensor) -> torch.Tensor:
    """Deterministic uniform [0, 1) float64 per (latent, row): splitmix64 of the pair, seed and stream."""
    x = (lat.numpy().astype(np.uint64) << np.uint64(32)) ^ row.numpy().astype(np.uint64)
    with np.errstate(over="ignore"):
        x = x + np.uint64((seed * 0x632BE59BD9B4E019 + stream * _G) & 0xFFFFFFFFFFFFFFFF) + np.uint64(_G)
        x = (x ^ (x >> np.uint64(30))) * np.uint64(_M1)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(_M2)
        x = x ^ (x >> np.uint64(31))
    return torch.from_numpy((x >> np.uint64(11)).astype(np.float64) / float(1 << 53))


class GroupTopK:
    """For each of G groups, the k items with the largest score seen so far (ties: the item added first).

    Items carry a payload of int64/float columns. Memory is G·k slots, whatever the number of items.
    """

    def __init__(self, n_groups: int, k: int, payload: dict[str, torch.dtype]):
        self.n_groups, self.k = n_groups, k
        self.score = torch.full((n_groups, k), -torch.inf, dtype=torch.float64)
        self.payload = {name: torch.zeros((n_groups, k), dtype=dt) for name, dt in payload.items()}

    def update(self, group: torch.Tensor, score: torch.Tensor, **payload: torch.Tensor) -> None:
        """Offer items (group ids, scores, payload columns). Items of a group are expected in arrival order."""
        if group.numel() == 0 or self.k == 0:
            return
        score = score.double()
        # only items above their group's current k-th best can enter (after a few chunks, almost none)
        live = score > self.score[group, -1]
        if not bool(live.all()):
            group, score = group[live], score[live]
            payload = {n: c[live] for n, c in payload.items()}
            if group.numel() == 0:
                return
        order = torch.sort(score, descending=True, stable=True).indices
        order = order[torch.sort(group[order], stable=True).indices]  # by group, then score desc, then arrival
        g = group[order]
        new_group = torch.ones_like(g, dtype=torch.bool)
        new_group[1:] = g[1:] != g[:-1]
        starts = torch.nonzero(new_group).squeeze(1)
        run_id = torch.cumsum(new_group.long(), 0) - 1
        rank = torch.arange(g.numel()) - starts[run_id]
        keep = rank < self.k
        order, g, rank = order[keep], g[keep], rank[keep]
        touched = g[new_group[keep]]  # the groups offered something, ascending
        local = torch.searchsorted(touched, g)
        cand_score = torch.full((touched.numel(), self.k), -torch.inf, dtype=torch.float64)
        cand_score[local, rank] = score[order]
        both = torch.cat([self.score[touched], cand_score], 1)  # the kept items first: they arrived earlier
        pick = torch.sort(both, dim=1, descending=True, stable=True).indices[:, :self.k]
        self.score[touched] = both.gather(1, pick)
        for name, col in payload.items():
            cand = torch.zeros((touched.numel(), self.k), dtype=self.payload[name].dtype)
            cand[local, rank] = col[order].to(cand.dtype)
            self.payload[name][touched] = torch.cat([self.payload[name][touched], cand], 1).gather(1, pick)

    def items(self) -> dict[str, np.ndarray]:
        """Every filled slot: group, rank (0 = largest score), score and payload columns, sorted by group, rank."""
        filled = torch.isfinite(self.score)
        g, r = torch.nonzero(filled, as_tuple=True)
        out = {"group": g.numpy(), "rank": r.numpy(), "score": self.score[g, r].numpy()}
        out.update({n: p[g, r].numpy() for n, p in self.payload.items()})
        return out


class ExampleSampler:
    """The three kinds of examples of every latent, fed with the (latent, row) peaks of each chunk."""

    PAYLOAD = {"row": torch.int64, "pos": torch.int64, "act": torch.float32}

    def __init__(self, n_latents: int, n_top: int = 20, n_intervals: int = 10, per_interval: int = 5,
                 n_random: int = 10, seed: int = 0):
        self.n_latents, self.n_intervals, self.seed = n_latents, n_intervals, seed
        self.top = GroupTopK(n_latents, n_top, self.PAYLOAD)
        self.random = GroupTopK(n_latents, n_random, self.PAYLOAD)
        self.interval = GroupTopK(n_latents * n_intervals, per_interval, self.PAYLOAD)
        self.bottom = GroupTopK(n_latents, n_top, self.PAYLOAD)  # filled only by negative values

    def add_first(self, lat, row, pos, peak, trough_pos=None, trough=None) -> None:
        """Read 1: top, bottom and random examples (they need no activation range). `trough_pos`, `trough`: each
        (latent, row) pair's smallest value and its position, given when the chunk holds negative values."""
        up = peak > 0
        self.top.update(lat[up], peak[up], row=row[up], pos=pos[up], act=peak[up])
        if trough is not None:
            down = trough < 0
            self.bottom.update(lat[down], -trough[down], row=row[down], pos=trough_pos[down], act=trough[down])
            deeper = -trough > peak  # the row's strongest activation is its trough
            pos, peak = torch.where(deeper, trough_pos, pos), torch.where(deeper, trough, peak)
        self.random.update(lat, uniform_keys(self.seed, 1, lat, row), row=row, pos=pos, act=peak)

    def add_second(self, lat, row, pos, peak, interval_of) -> None:
        """Read 2: interval examples; `interval_of(lat, peak)` is the interval of a positive peak."""
        ok = peak > 0
        lat, row, pos, peak = lat[ok], row[ok], pos[ok], peak[ok]
        group = lat * self.n_intervals + interval_of(lat, peak)
        self.interval.update(group, uniform_keys(self.seed, 2, lat, row), row=row, pos=pos, act=peak)

    def examples(self) -> dict[str, np.ndarray]:
        """All chosen examples as columns: latent, kind (0 top, 1 interval, 2 random, 3 bottom: the index in
        `format.EXAMPLE_KINDS`), bin, rank, row, pos, act; sorted by latent, kind, bin, rank."""
        parts = []
        for kind, store in enumerate((self.top, self.interval, self.random, self.bottom)):
            it = store.items()
            if kind == 1:
                latent, b = it["group"] // self.n_intervals, it["group"] % self.n_intervals
            else:
                latent, b = it["group"], np.full(len(it["group"]), -1)
            parts.append({"latent": latent, "kind": np.full(len(latent), kind), "bin": b, "rank": it["rank"],
                          "row": it["row"], "pos": it["pos"], "act": it["act"]})
        cols = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
        order = np.lexsort((cols["rank"], cols["bin"], cols["kind"], cols["latent"]))
        return {k: v[order] for k, v in cols.items()}


class RowActivations:
    """Read 3: the latent's activations on each example row, kept sparsely (the positions where it is active)."""

    def __init__(self, latent: np.ndarray, row: np.ndarray, n_latents: int):
        self.n_latents = n_latents
        key = np.unique(row.astype(np.int64) * n_latents + latent.astype(np.int64))  # (row, latent) pairs
        self.pair_row, self.pair_lat = key // n_latents, key % n_latents
        self._pair, self._pos, self._val = [], [], []

    def add(self, r0: int, ids: torch.Tensor, vals: torch.Tensor, T: int) -> None:
        rows_in_chunk = ids.shape[0] // (T - 1)
        a, b = np.searchsorted(self.pair_row, [r0, r0 + rows_in_chunk])
        if a == b:
            return
        # the chunk's example pairs in a dense [rows, latents] map of pair numbers (-1: not an example)
        slot = torch.full((rows_in_chunk * self.n_latents,), -1, dtype=torch.int64)
        slot[torch.from_numpy((self.pair_row[a:b] - r0) * self.n_latents + self.pair_lat[a:b])] = \
            torch.arange(a, b, dtype=torch.int64)
        nz = ids >= 0
        tok = torch.arange(ids.shape[0]).unsqueeze(1).expand_as(ids)[nz]
        pair = slot[(tok // (T - 1)) * self.n_latents + ids[nz].long()]
        hit = pair >= 0
        self._pair.append(pair[hit].numpy())
        self._pos.append((tok[hit] % (T - 1) + 1).numpy().astype(np.int16))
        self._val.append(vals[nz][hit].numpy().astype(np.float32))

    def lists(self, latent: np.ndarray, row: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(offsets [E+1], positions, values) for the examples (latent[e], row[e]) in the given order."""
        pair = np.concatenate(self._pair) if self._pair else np.zeros(0, np.int64)
        pos = np.concatenate(self._pos) if self._pos else np.zeros(0, np.int16)
        val = np.concatenate(self._val) if self._val else np.zeros(0, np.float32)
        order = np.lexsort((pos, pair))  # by pair, then position
        pair, pos, val = pair[order], pos[order], val[order]
        n_pairs = len(self.pair_row)
        start = np.searchsorted(pair, np.arange(n_pairs))
        length = np.diff(np.append(start, len(pair)))
        keys = self.pair_row * self.n_latents + self.pair_lat
        ex_pair = np.searchsorted(keys, row.astype(np.int64) * self.n_latents + latent.astype(np.int64))
        ex_len = length[ex_pair]
        offsets = np.zeros(len(latent) + 1, dtype=np.int64)
        np.cumsum(ex_len, out=offsets[1:])
        gather = np.repeat(start[ex_pair] - offsets[:-1], ex_len) + np.arange(offsets[-1])
        return offsets, pos[gather], val[gather]


@torch.no_grad()
def top_examples(model, sae, latent: int, n: int = 10, corpus=None, tokens: int = 65_536, context_size: int = 128,
                 batch_rows: int = 32, negative: bool = False) -> list:
    """Without a bundle: the n held-out rows where `latent` peaks highest (one pass of `tokens` tokens through the
    model up to the SAE's hook), as the reader's `Example`s (kind "top"), strongest first; BOS is never scored.
    `negative`: the rows where it is most negative (signed codes), kind "bottom", most negative first."""
    import math

    from saelab.dashboard.reader import Example
    from saelab.data.corpus import CorpusSpec
    from saelab.eval.splice import capture, corpus_rows
    from saelab.models.loading import model_device

    rows = corpus_rows(model, corpus if corpus is not None else CorpusSpec(), "validation", context_size,
                       max(1, math.ceil(tokens / context_size)))
    dev, hook = model_device(model), sae.cfg.hook_name
    acts = torch.zeros(rows.shape, dtype=torch.float32)
    for i in range(0, rows.shape[0], batch_rows):
        tok = rows[i:i + batch_rows].to(dev)
        _, cache = capture(model, tok, hook)
        x = cache[hook][:, 1:].reshape(-1, sae.cfg.d_in)
        code = sae.encode(x)
        hit = (code.indices == latent) & (code.values != 0)
        val = (code.values * hit).sum(1).float().cpu()
        acts[i:i + tok.shape[0], 1:] = val.reshape(tok.shape[0], -1)
    sign = -1 if negative else 1
    peak, pos = (sign * acts).max(1)  # the trough of -acts for `negative`
    order = [int(r) for r in torch.argsort(-peak, stable=True)[:n] if peak[r] > 0]
    return [Example(kind="bottom" if negative else "top", bin=-1, rank=j, row=r, pos=int(pos[r]),
                    act=sign * float(peak[r]), tokens=rows[r].numpy().astype(np.int32), acts=acts[r].numpy())
            for j, r in enumerate(order)]
