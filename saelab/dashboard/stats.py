"""Per-latent statistics of active values in two streaming reads of the codes, in float64.

Read 1 (`add_first`): count, sum, max, min, rows active. Read 2 (`add_second`, after `ranges()`): the central
sums Σ(v−μ)², Σ(v−μ)³, Σ(v−μ)⁴ around the exact mean (the two-pass algorithm: no cancellation), the activation
histogram on the final range, and per activation interval the number of active tokens in it ("contains %").

Conventions. Active means value != 0, and values are taken as they are (signed codes included). The histogram has
B equal bins on [lo, hi] with lo = min(0, min), hi = max(0, max); the intervals are NI equal bins on (0, max]
(sae_vis's "quantile groups"). Bin j of width w starting at a is (a + j·w, a + (j+1)·w], the first bin also holding
its left edge; values beyond an end (rounding) go to the end bin.
"""

from __future__ import annotations

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
