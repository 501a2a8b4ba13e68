"""Per-latent statistics of active values in two streaming reads of the codes, in float64; dead latents (overall
and per Matryoshka group) from firing counts, and those counts streamed straight from the model for several SAEs.

Read 1 (`add_first`): count, sum, max, min, rows active. Read 2 (`add_second`, after `ranges()`): the central
sums Σ(v−μ)², Σ(v−μ)³, Σ(v−μ)⁴ around the exact mean (the two-pass algorithm: no cancellation), the activation
histogram on the final range, and per activation interval the number of active tokens in it ("contains %").

Conventions. Active means value != 0, and values are taken as they are (signed codes included). The histogram has
B equal bins on [lo, hi] with lo = min(0, min), hi = max(0, max), so a signed latent's histogram spans its
negative values; the intervals are NI equal bins on (0, max] (sae_vis's "quantile groups"; a signed latent's
negative side is shown by its histogram and its bottom examples, and its intervals' "contains" shares sum to its
share of positive values). Bin j of width w starting at a is (a + j·w, a + (j+1)·w], the first bin also holding
its left edge; values beyond an end (rounding) go to the end bin.
"""

from __future__ import annotations

from typing import Callable, Iterable, Sequence

import numpy as np
import torch


def bin_index(v: torch.Tensor, lo: torch.Tensor, width: torch.Tensor, n_bins: int) -> torch.Tensor:
    """Bin of each value v (float64) given its latent's lo and width (gathered per entry): ceil((v−lo)/w) − 1."""
    j = torch.ceil((v - lo) / width.clamp_min(1e-300)) - 1
    return j.clamp(0, n_bins - 1).long()


class LatentStatistics:
    def __init__(self, n_latents: int, bins: int = 50, n_intervals: int = 10):
        F = n_latents
        self.n_latents, self.bins, self.n_intervals = F, bins, n_intervals
        self.count = torch.zeros(F, dtype=torch.int64)
        self.sum = torch.zeros(F, dtype=torch.float64)
        self.max = torch.full((F,), -torch.inf, dtype=torch.float64)
        self.min = torch.full((F,), torch.inf, dtype=torch.float64)
        self.n_rows = torch.zeros(F, dtype=torch.int64)
        self.m2 = torch.zeros(F, dtype=torch.float64)
        self.m3 = torch.zeros(F, dtype=torch.float64)
        self.m4 = torch.zeros(F, dtype=torch.float64)
        self.hist = torch.zeros(F * bins, dtype=torch.int64)
        self.interval_tokens = torch.zeros(F * n_intervals, dtype=torch.int64)
        self.interval_rows = torch.zeros(F * n_intervals, dtype=torch.int64)

    # ------------------------------------------------------------------------------------------ read 1
    def add_first(self, lat: torch.Tensor, val: torch.Tensor, peak_lat: torch.Tensor) -> None:
        """Active entries of a chunk (latent ids, values) and the latent of each (latent, row) peak in it."""
        v = val.double()
        self.count += torch.bincount(lat, minlength=self.n_latents)
        self.sum.index_add_(0, lat, v)
        self.max.scatter_reduce_(0, lat, v, "amax")
        self.min.scatter_reduce_(0, lat, v, "amin")
        self.n_rows += torch.bincount(peak_lat, minlength=self.n_latents)

    def ranges(self) -> None:
        """Fix the histogram and interval ranges from read 1 (call once, before read 2)."""
        alive = self.count > 0
        self.mean = torch.where(alive, self.sum / self.count.clamp_min(1), 0.0)
        self.hist_lo = torch.where(alive, self.min.clamp(max=0.0), 0.0)
        self.hist_hi = torch.where(alive, self.max.clamp(min=0.0), 0.0)
        self.hist_width = (self.hist_hi - self.hist_lo) / self.bins
        self.interval_max = torch.where(alive, self.max.clamp(min=0.0), 0.0)
        self.interval_width = self.interval_max / self.n_intervals

    # ------------------------------------------------------------------------------------------ read 2
    def add_second(self, lat: torch.Tensor, val: torch.Tensor, peak_lat: torch.Tensor, peak: torch.Tensor) -> None:
        """The same chunk again: active entries, then the (latent, row) peaks (counted per interval)."""
        v = val.double()
        d = v - self.mean[lat]
        d2 = d * d
        self.m2.index_add_(0, lat, d2)
        self.m3.index_add_(0, lat, d2 * d)
        self.m4.index_add_(0, lat, d2 * d2)
        hb = bin_index(v, self.hist_lo[lat], self.hist_width[lat], self.bins)
        self.hist += torch.bincount(lat * self.bins + hb, minlength=self.hist.numel())
        pos = v > 0
        ib = self.interval_of(lat[pos], v[pos])
        self.interval_tokens += torch.bincount(lat[pos] * self.n_intervals + ib,
                                               minlength=self.interval_tokens.numel())
        up = peak > 0
        pb = self.interval_of(peak_lat[up], peak[up])
        self.interval_rows += torch.bincount(peak_lat[up] * self.n_intervals + pb,
                                             minlength=self.interval_rows.numel())

    def interval_of(self, lat: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Interval of positive values v of latents lat."""
        return bin_index(v.double(), torch.zeros_like(v, dtype=torch.float64), self.interval_width[lat],
                         self.n_intervals)

    # ------------------------------------------------------------------------------------------ results
    def finish(self, n_tokens: int, dense_threshold: float) -> dict[str, np.ndarray]:
        """Columns of the per-latent table plus the histogram and interval arrays."""
        n = self.count.double()
        alive = self.count > 0
        var = torch.where(alive, self.m2 / n.clamp_min(1), 0.0)
        has_var = var > 1e-12 * self.mean.abs().clamp_min(1e-30) ** 2
        safe = var.clamp_min(1e-300)
        skew = torch.where(has_var, self.m3 / n.clamp_min(1) / safe.pow(1.5), torch.nan)
        kurt = torch.where(has_var, self.m4 / n.clamp_min(1) / (safe * safe) - 3.0, torch.nan)
        density = n / max(n_tokens, 1)
        edges = (torch.arange(self.n_intervals + 1, dtype=torch.float64)[None, :] * self.interval_width[:, None])
        edges[:, -1] = self.interval_max  # the last edge is exactly the max
        nan = torch.full_like(n, torch.nan)
        return {
            "n_active": self.count.numpy(),
            "density": density.numpy(),
            "max": torch.where(alive, self.max, nan).numpy(),
            "min": torch.where(alive, self.min, nan).numpy(),
            "mean": torch.where(alive, self.mean, nan).numpy(),
            "var": torch.where(alive, var, nan).numpy(),
            "skew": skew.numpy(),
            "kurtosis": kurt.numpy(),
            "dead": (~alive).numpy(),
            "dense": (density > dense_threshold).numpy(),
            "n_rows": self.n_rows.numpy(),
            "act_hist": self.hist.view(self.n_latents, self.bins).numpy().astype(np.uint32),
            "act_hist_range": torch.stack([self.hist_lo, self.hist_hi], 1).float().numpy(),
            "intervals": edges.float().numpy(),
            "interval_rows": self.interval_rows.view(self.n_latents, self.n_intervals).numpy(),
            "interval_contains": (self.interval_tokens.view(self.n_latents, self.n_intervals).double()
                                  / n.clamp_min(1)[:, None]).float().numpy(),
        }


# ================================================================================================ dead latents
def group_ends(sae) -> list[int] | None:
    """Ends of the nested groups of a Matryoshka SAE with fixed prefixes (latents [0, e₁), [e₁, e₂), …, [.., n));
    None for other architectures and for sampled prefixes (no fixed groups)."""
    arch = sae.arch
    if not hasattr(arch, "prefix_ends") or getattr(arch.opt, "random_prefixes", 0):
        return None
    return [int(e) for e in arch.prefix_ends()]


def dead_latents(n_active: np.ndarray, n_tokens: int, window: str, ends: Sequence[int] | None = None) -> dict:
    """Latents never active in a window of n_tokens tokens, from each latent's firing count `n_active` [F].

    `window` names where the count was made (it is part of what "dead" means: a window of N tokens cannot tell a
    latent of density below 1/N from a dead one). With Matryoshka group ends, also per group:
        {"window", "n_tokens", "n_latents", "n_dead", "frac_dead", "lowest_visible_density",
         "groups": [{"latents": [start, end], "n_dead", "frac_dead"}, ...]}
    """
    dead = np.asarray(n_active) == 0
    F = int(dead.size)
    out = {"window": window, "n_tokens": int(n_tokens), "n_latents": F, "n_dead": int(dead.sum()),
           "frac_dead": float(dead.mean()) if F else float("nan"),
           "lowest_visible_density": 1.0 / n_tokens if n_tokens else float("nan")}
    if ends:
        starts = [0, *ends[:-1]]
        out["groups"] = [{"latents": [int(a), int(b)], "n_dead": int(dead[a:b].sum()),
                          "frac_dead": float(dead[a:b].mean())} for a, b in zip(starts, ends)]
    return out


def dashboard_window(n_tokens: int, rows_from: str) -> str:
    """The name of a dashboard pass's window, as its dead-latent report states it."""
    return f"the dashboard's window: {n_tokens:,} tokens of {rows_from}"


def format_dead(d: dict) -> str:
    """One line: '12 dead (0.29 %) in <window>; by group: 0 %, 0 %, 1.2 %, ...'."""
    text = f"{d['n_dead']:,} dead ({100 * d['frac_dead']:.2f} %) in {d['window']}"
    if d.get("groups"):
        text += "; by Matryoshka group " + ", ".join(
            f"[{g['latents'][0]}, {g['latents'][1]}) {100 * g['frac_dead']:.1f} %" for g in d["groups"])
    return text


@torch.no_grad()
def firing_counts(rows: Iterable[np.ndarray], n_rows: int, capture: Callable, encoders: Sequence[Callable],
                  n_latents: Sequence[int], batch_rows: int = 32, progress: bool = False) -> tuple[list[np.ndarray], int]:
    """Each SAE's per-latent firing count over the first n_rows rows, without writing codes: one model pass
    (`capture(tokens [B, T]) → acts`, as the dashboard's pass calls it) and every encoder on the same activations.
    Active is `active_entries`'s (value != 0), as in the dashboard's codes. Returns (counts per SAE, tokens)."""
    from itertools import islice

    from tqdm.auto import tqdm

    from saelab.data.packing import batched_rows
    from saelab.eval.core import active_entries

    counts = [torch.zeros(F, dtype=torch.int64) for F in n_latents]
    n_tok = 0
    bar = tqdm(total=n_rows, unit="row", desc="firing counts", disable=not progress)
    for batch in batched_rows(islice(rows, n_rows), batch_rows):
        acts = capture(torch.from_numpy(batch))
        n_tok += acts.shape[0]
        for c, encode, F in zip(counts, encoders, n_latents):
            c += torch.bincount(active_entries(encode(acts), F)[1].cpu(), minlength=F)
        bar.update(batch.shape[0])
    bar.close()
    return [c.numpy() for c in counts], n_tok
