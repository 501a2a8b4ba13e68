"""Core metrics of an SAE at one hook: reconstruction, sparsity, latent density, and the LM loss with it spliced in.

Conventions (stated once, used everywhere in this module)
---------------------------------------------------------
Tokens. A *position* is special when it is position 0 of its row (the BOS every packed row starts with — and the
attention sink of any row) or its token id is in `special_token_ids` (default: the tokenizer's BOS, EOS and PAD
ids, as SAEBench does; for GPT-2-style tokenizers these are one id, so document separators are excluded too).
With `exclude_special=False` no position is special.

* Reconstruction / sparsity / density metrics are over the non-special positions ("tokens", `n_tokens`).
* The splice (SAE), zero ablation and mean ablation replace the hooked activation at exactly the non-special
  positions and leave special positions unchanged, so a zero-reconstruction SAE and zero ablation give identical
  logits (loss recovered exactly 0) and an identity SAE gives the clean logits (ΔCE = KL = 0 exactly).
* CE and KL are means over *predictions*: the prediction made at position t (of token t+1) counts when both t
  and t+1 are non-special (`n_predictions`). So predictions made from BOS (unaffected by any splice) and
  predictions of BOS/EOS/PAD are left out of every CE and KL mean alike. The last position has no target and is
  never counted.

Reconstruction (x = raw activation, x̂ = sae.decode(sae.encode(x)), sums accumulated in float64, so nothing depends
on the batch size):
    MSE                      = E_t ‖x_t − x̂_t‖²                         (sum over dims, mean over tokens)
    mse_per_dim[j]           = E_t (x_tj − x̂_tj)²
    explained_variance (EV)  = 1 − E_t‖x_t − x̂_t‖² / (E_t‖x_t‖² − ‖E_t x_t‖²)   (centred; FVU = 1 − EV)
    explained_variance_uncentred = 1 − E_t‖x_t − x̂_t‖² / E_t‖x_t‖²      (≈ SAEBench v0.6 "explained_variance")
    cossim                   = E_t x_t·x̂_t / (max(‖x_t‖, ε) max(‖x̂_t‖, ε)),  ε = 1e-8  (0 when x̂_t = 0)
    l2_ratio                 = E_t ‖x̂_t‖ / max(‖x_t‖, ε)
    relative_reconstruction_bias γ = E_t‖x̂_t‖² / E_t[x_t·x̂_t]   (ratio of global means; γ < 1 = shrinkage)
    l2_norm_in / l2_norm_out = E_t ‖x_t‖ / E_t ‖x̂_t‖
Sparsity. A latent is active on a token where its value is != 0 (not > 0: some architectures allow signed values;
padding entries of a `SparseCode` have value 0; repeated indices in a token are summed first, as `to_dense` does).
    l0 = E_t #active;  l1 = E_t Σ_i |f_ti|;  l0_hist[k] = #tokens with exactly k active latents;
    l0_quantiles["pQ"] = smallest k with (#tokens with L0 <= k) >= Q % of tokens (exact, from the histogram).
    density_i = #tokens where i is active / n_tokens;  dead: density 0;  dense: density > dense_threshold (0.1).
    log10_density_hist: counts of live latents in log10-density bins (edges from floor(log10(1/n_tokens)) to 0,
    10 per decade; dead latents are counted apart as n_dead) — ready for a Plotly bar chart.
Activations of per-head hooks ([B, L, H, d_head]) are flattened to [B·L, H·d_head] before the SAE sees them.
Downstream (natural log, nats):
    ce_clean, ce_sae, ce_zero_ablation, ce_mean_ablation = mean next-token cross-entropy over the counted
        predictions, with the hooked activation unchanged / spliced / set to 0 / set to the mean activation
        (mean over the non-special positions of the evaluation rows, unless given).
    delta_ce = ce_sae − ce_clean
    loss_recovered_zero = (ce_zero − ce_sae) / (ce_zero − ce_clean);  loss_recovered_mean likewise with ce_mean.
    kl_sae / kl_zero / kl_mean = mean over counted predictions of KL(p_clean ‖ p_patched) = Σ_v p_c (log p_c − log p_p).
A ratio with a zero denominator is NaN in `CoreMetrics` and null in `to_dict()`.

Transcoders (`sae.cfg.target_hook`: the encoder reads `hook_name`, the decoder writes the target hook). Every metric
compares with the target: x above is the target's activation and x̂ the transcoder's output (from the input hook's
activation of the same token), so FVU, MSE, cosine, ... are against the target; CE_sae runs the model with the input
hook read and the target hook replaced by the output (zero and mean ablation replace the target hook too: its mean).
`CoreMetrics.target_hook` names it, and the report says "target: <hook>".

SAEs with two inference rules. A g-SAE (`gtopk`) selects its latents with the LM-loss gradient g at the hook, as it
was trained to; `encode(x)` without g falls back to plain TopK. Its core metrics are measured under both rules on the
same tokens: per batch one full forward and one backward of the clean LM loss to the hook (the gradient the
activation cache stores: next-token CE summed over the batch's predicted positions, `lm_loss_grad`), then
x̂ = decode(encode(x, grad=g)) for the headline numbers (`rule` "with gradient") and decode(encode(x)) for
`topk_fallback` (a `CoreMetrics` of its own, `rule` "TopK fallback"). Clean, zero- and mean-ablation numbers are
shared. With `grad_norm="rms"` the gradient's scale is its RMS over the batch's scored tokens, so a g-SAE's numbers
depend slightly on `batch_rows` (as its training selection depends on the training batch).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, Iterable, Sequence

import numpy as np
import torch

from saelab.eval.splice import (FALLBACK_RULE, GRAD_RULE, as_rows, batches, capture, corpus_rows, default_special_ids,
                                infers_with_grad, lm_loss_grad, prediction_mask, replace_rows, run_with_replacement,
                                sae_reconstruct, special_mask, target_hook)
from saelab.models.loading import model_device

if TYPE_CHECKING:  # only the `indices` / `values` of a code are read here
    from saelab.sae.code import SparseCode

EPS = 1e-8
L0_QUANTILES = (0.01, 0.1, 0.25, 0.5, 0.75, 0.9, 0.99)


# ================================================================================================ sparse codes
def active_entries(code: SparseCode, n_latents: int | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(token index, latent index, value) of every active entry of `code`: value != 0 after summing repeated
    indices within a token (the `to_dense` semantics). Padding (value 0) is dropped."""
    idx, val = code.indices.detach(), code.values.detach()
    B, K = idx.shape
    nz = val != 0
    dup = False
    if K > 1:
        # pads (value 0) get distinct negative keys so they never look like repeats
        keyed = torch.where(nz, idx, -1 - torch.arange(K, device=idx.device).expand(B, K))
        s = keyed.sort(dim=1).values
        dup = bool((s[:, 1:] == s[:, :-1]).any())
    if not dup:
        rows = torch.arange(B, device=idx.device).unsqueeze(1).expand(B, K)[nz]
        return rows, idx[nz], val[nz]
    n = int(n_latents) if n_latents is not None else int(idx.max()) + 1
    keys = (torch.arange(B, device=idx.device).unsqueeze(1) * n + idx)[nz]
    uniq, inv = torch.unique(keys, return_inverse=True)
    summed = torch.zeros(uniq.shape[0], dtype=val.dtype, device=val.device).index_add_(0, inv, val[nz])
    keep = summed != 0
    return (uniq // n)[keep], (uniq % n)[keep], summed[keep]


# ================================================================================================ accumulators
class ReconstructionStats:
    """Streaming float64 accumulator of the reconstruction, sparsity and density metrics.

    Feed it the non-special tokens only: `update(x [N, d], x_hat [N, d], code)` (code may be None for a
    reconstruction without a sparse code; then sparsity/density metrics are absent). `compute()` returns a dict of
    plain numbers and lists. Results do not depend on how the tokens are split into batches (up to float64
    rounding). The trainer can reuse it on held-out activations without a model.
    """

    def __init__(self, n_latents: int | None = None, dense_threshold: float = 0.1, bins_per_decade: int = 10):
        self.n_latents = n_latents
        self.dense_threshold = float(dense_threshold)
        self.bins_per_decade = int(bins_per_decade)
        self.n = 0
        self.d: int | None = None
        self.shift: torch.Tensor | None = None  # first token: variance is shift-invariant, sums stay small
        self.sum_xc = self.sum_sq_err_dim = None
        self.sum_sq_xc = self.sum_sq_x = self.sum_sq_err = 0.0
        self.sum_dot = self.sum_sq_xhat = self.sum_cos = self.sum_l2_ratio = 0.0
        self.sum_norm_x = self.sum_norm_xhat = 0.0
        self.has_code = False
        self.sum_l1 = 0.0
        self.l0_hist = torch.zeros(1, dtype=torch.int64)
        self.latent_counts: torch.Tensor | None = None

    @torch.no_grad()
    def update(self, x: torch.Tensor, x_hat: torch.Tensor, code: SparseCode | None = None) -> None:
        if x.dim() != 2 or x.shape != x_hat.shape:
            raise ValueError(f"x and x_hat must both be [N, d]; got {tuple(x.shape)} and {tuple(x_hat.shape)}")
        if code is not None and code.indices.shape[0] != x.shape[0]:
            raise ValueError(f"code has {code.indices.shape[0]} tokens, x has {x.shape[0]}")
        if x.shape[0] == 0:
            return
        x = x.detach().to("cpu", torch.float64)
        xh = x_hat.detach().to("cpu", torch.float64)
        if self.d is None:
            self.d = x.shape[1]
            self.shift = x[0].clone()
            self.sum_xc = torch.zeros(self.d, dtype=torch.float64)
            self.sum_sq_err_dim = torch.zeros(self.d, dtype=torch.float64)
        elif x.shape[1] != self.d:
            raise ValueError(f"width changed from {self.d} to {x.shape[1]}")
        xc = x - self.shift
        err = x - xh
        nx, nxh = x.norm(dim=1), xh.norm(dim=1)
        dot = (x * xh).sum(1)
        self.n += x.shape[0]
        self.sum_xc += xc.sum(0)
        self.sum_sq_xc += float(xc.pow(2).sum())
        self.sum_sq_x += float(nx.pow(2).sum())
        self.sum_sq_err_dim += err.pow(2).sum(0)
        self.sum_sq_err += float(err.pow(2).sum())
        self.sum_dot += float(dot.sum())
        self.sum_sq_xhat += float(nxh.pow(2).sum())
        self.sum_cos += float((dot / (nx.clamp_min(EPS) * nxh.clamp_min(EPS))).sum())
        self.sum_l2_ratio += float((nxh / nx.clamp_min(EPS)).sum())
        self.sum_norm_x += float(nx.sum())
        self.sum_norm_xhat += float(nxh.sum())
        if code is not None:
            self._update_code(code, x.shape[0])

    def _update_code(self, code: SparseCode, n_tok: int) -> None:
        self.has_code = True
        rows, lat, val = active_entries(code, self.n_latents)
        rows, lat, val = rows.cpu(), lat.cpu(), val.cpu()
        l0 = torch.bincount(rows, minlength=n_tok)
        h = torch.bincount(l0)
        self.l0_hist = _pad(self.l0_hist, h.numel())
        self.l0_hist[: h.numel()] += h
        self.sum_l1 += float(val.double().abs().sum())
        n_lat = self.n_latents if self.n_latents is not None else (int(lat.max()) + 1 if lat.numel() else 0)
        c = torch.bincount(lat, minlength=n_lat)
        if self.latent_counts is None:
            self.latent_counts = torch.zeros(c.numel(), dtype=torch.int64)
        else:  # grows only when n_latents is unknown
            self.latent_counts = _pad(self.latent_counts, c.numel())
        self.latent_counts[: c.numel()] += c

    def merge(self, other: "ReconstructionStats") -> "ReconstructionStats":
        """Fold another accumulator (e.g. from another rank) into this one."""
        if other.n == 0:
            return self
        if self.n == 0:
            self.__dict__.update({k: (v.clone() if torch.is_tensor(v) else v) for k, v in other.__dict__.items()})
            return self
        # re-express other's shifted sums around our shift: Σ(x−a) = Σ(x−b) + n(b−a); Σ‖x−a‖² likewise
        delta = other.shift - self.shift
        self.sum_sq_xc += other.sum_sq_xc + 2 * float(delta @ other.sum_xc) + other.n * float(delta @ delta)
        self.sum_xc += other.sum_xc + other.n * delta
        self.n += other.n
        self.sum_sq_err_dim += other.sum_sq_err_dim
        for k in ("sum_sq_x", "sum_sq_err", "sum_dot", "sum_sq_xhat", "sum_cos", "sum_l2_ratio", "sum_norm_x",
                  "sum_norm_xhat", "sum_l1"):
            setattr(self, k, getattr(self, k) + getattr(other, k))
        if other.has_code:
            self.has_code = True
            n = max(self.l0_hist.numel(), other.l0_hist.numel())
            self.l0_hist = _pad(self.l0_hist, n) + _pad(other.l0_hist, n)
            if self.latent_counts is None:
                self.latent_counts = other.latent_counts.clone()
            else:
                n = max(self.latent_counts.numel(), other.latent_counts.numel())
                self.latent_counts = _pad(self.latent_counts, n) + _pad(other.latent_counts, n)
        return self

    def compute(self) -> dict[str, Any]:
        n = self.n
        if n == 0:
            raise ValueError("ReconstructionStats: no tokens were accumulated")
        mean_c = self.sum_xc / n
        var_total = self.sum_sq_xc / n - float(mean_c @ mean_c)  # E‖x‖² − ‖E x‖², computed around the shift
        mse = self.sum_sq_err / n
        ev = 1.0 - _div(mse, var_total)
        out: dict[str, Any] = {
            "n_tokens": n,
            "explained_variance": ev,
            "fvu": 1.0 - ev,
            "explained_variance_uncentred": 1.0 - _div(mse, self.sum_sq_x / n),
            "mse": mse,
            "mse_per_dim": (self.sum_sq_err_dim / n).tolist(),
            "total_variance": var_total,
            "cossim": self.sum_cos / n,
            "l2_ratio": self.sum_l2_ratio / n,
            "l2_norm_in": self.sum_norm_x / n,
            "l2_norm_out": self.sum_norm_xhat / n,
            "relative_reconstruction_bias": _div(self.sum_sq_xhat, self.sum_dot),
        }
        if self.has_code:
            out.update(self._sparsity(n))
        return out

    def _sparsity(self, n: int) -> dict[str, Any]:
        hist = self.l0_hist.double()
        values = torch.arange(hist.numel(), dtype=torch.float64)
        l0 = float((hist * values).sum() / n)
        l0_var = float((hist * (values - l0).pow(2)).sum() / n)
        cdf = hist.cumsum(0) / n
        quantiles = {f"p{round(q * 100)}": int(torch.searchsorted(cdf, torch.tensor(q - 1e-12, dtype=torch.float64)))
                     for q in L0_QUANTILES}
        counts = self.latent_counts if self.latent_counts is not None else torch.zeros(0, dtype=torch.int64)
        n_lat = counts.numel()
        density = counts.double() / n
        dead = counts == 0
        dense = density > self.dense_threshold
        alive = density[~dead]
        # log10-density histogram of live latents; the lowest possible density is 1/n
        lo = math.floor(math.log10(1.0 / n) * self.bins_per_decade - 1e-9) / self.bins_per_decade
        n_bins = max(1, round(-lo * self.bins_per_decade))
        edges = np.linspace(lo, 0.0, n_bins + 1)
        h, _ = np.histogram(alive.log10().numpy(), bins=edges)
        total_density = float(density.sum())
        return {
            "l0": l0,
            "l0_std": math.sqrt(max(l0_var, 0.0)),
            "l0_min": int(torch.nonzero(self.l0_hist)[0]) if bool(self.l0_hist.any()) else 0,
            "l0_max": int(torch.nonzero(self.l0_hist)[-1]) if bool(self.l0_hist.any()) else 0,
            "l0_quantiles": quantiles,
            "l0_hist": self.l0_hist.tolist(),  # l0_hist[k] = number of tokens with exactly k active latents
            "l1": self.sum_l1 / n,
            "n_latents": n_lat,
            "n_dead": int(dead.sum()),
            "frac_dead": _div(float(dead.sum()), n_lat),
            "dead_window": f"core eval's held-out window: {n:,} tokens",  # what "dead" was counted on
            "n_dense": int(dense.sum()),
            "frac_dense": _div(float(dense.sum()), n_lat),
            "dense_threshold": self.dense_threshold,
            "frac_density_over_1pct": _div(float((density > 0.01).sum()), n_lat),
            "normalized_density_over_1pct": _div(float(density[density > 0.01].sum()), total_density),
            "latent_density": density.tolist(),
            "log10_density_hist": {"edges": edges.tolist(), "counts": [int(c) for c in h],
                                   "n_dead": int(dead.sum())},
        }


class DownstreamStats:
    """Streaming float64 sums of per-prediction CE (clean / SAE / zero / mean) and KL(clean ‖ patched).

    Per batch: `begin(logits_clean, tokens, pred_mask)`, then `add(kind, logits)` for kind in the SAE kinds
    (`sae_kinds`, default just "sae"; a g-SAE also has its fallback rule) and zero/mean, one at a time (so only two
    [B, L, V] logit tensors are alive at once). `pred_mask [B, L-1]` is True where the prediction at t (of token
    t+1) counts.
    """

    def __init__(self, sae_kinds: Sequence[str] = ("sae",)):
        self.n = 0
        self.kinds = ("clean", *sae_kinds, "zero", "mean")
        self.ce = {k: 0.0 for k in self.kinds}
        self.kl = {k: 0.0 for k in self.kinds if k != "clean"}
        self._batch = None

    def begin(self, logits_clean: torch.Tensor, tokens: torch.Tensor, pred_mask: torch.Tensor) -> None:
        m = pred_mask.to(logits_clean.device)
        target = tokens[:, 1:].unsqueeze(-1).to(logits_clean.device)
        z = logits_clean[:, :-1].float()
        lse = _rowwise(z, _logsumexp)
        p = torch.stack([(z[i] - lse[i].unsqueeze(-1)).exp_() for i in range(z.shape[0])])
        self.n += int(m.sum())
        self._batch = (z, p, p.sum(-1), target, m)
        # KL(p_c ‖ p) = H(p_c, p) − H(p_c, p_c), with H(p_c, p) = logsumexp(z)·Σp_c − p_c·z: one dot product per
        # variant and no [B, L, V] temporaries; identical logits give exactly 0
        self._self_cross, _ = self._terms("clean", z)

    def _terms(self, kind: str, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Adds the batch's CE of `kind`; returns the cross-entropy H(p_c, p) [B, L-1] and logsumexp of z.
        Row by row so that each row's [L-1, V] block is reused from cache (twice as fast on a CPU)."""
        _, p_clean, p_sum, target, m = self._batch
        lse = _rowwise(z, _logsumexp)
        dot = torch.stack([(p_clean[i].unsqueeze(1) @ z[i].unsqueeze(2)).reshape(-1) for i in range(z.shape[0])])
        self.ce[kind] += float((lse - z.gather(-1, target).squeeze(-1))[m].double().sum())
        return lse * p_sum - dot, lse

    def add(self, kind: str, logits: torch.Tensor) -> None:
        if self._batch is None:
            raise RuntimeError("DownstreamStats.add before begin")
        z_clean, p_clean, _, _, m = self._batch
        z = logits[:, :-1].float()
        cross, lse = self._terms(kind, z)
        kl = cross - self._self_cross
        if not bool(torch.isfinite(kl[m]).all()):  # -inf logits (masked vocab entries): 0 · log 0 = 0
            lp_clean = z_clean - z_clean.logsumexp(-1, keepdim=True)
            kl = torch.where(p_clean > 0, p_clean * (lp_clean - (z - lse.unsqueeze(-1))), 0.0).sum(-1)
        self.kl[kind] += float(kl[m].double().sum())

    def end(self) -> None:
        self._batch = self._self_cross = None

    def compute(self, sae_kind: str = "sae") -> dict[str, Any]:
        """The metrics with `sae_kind`'s sums as the SAE's (ce_sae, delta_ce, loss recovered, kl_sae)."""
        n = self.n
        ce = {k: _div(v, n) for k, v in self.ce.items()}
        kl = {k: _div(v, n) for k, v in self.kl.items()}
        return {
            "n_predictions": n,
            "ce_clean": ce["clean"],
            "ce_sae": ce[sae_kind],
            "ce_zero_ablation": ce["zero"],
            "ce_mean_ablation": ce["mean"],
            "delta_ce": ce[sae_kind] - ce["clean"],
            "loss_recovered_zero": _div(ce["zero"] - ce[sae_kind], ce["zero"] - ce["clean"]),
            "loss_recovered_mean": _div(ce["mean"] - ce[sae_kind], ce["mean"] - ce["clean"]),
            "kl_sae": kl[sae_kind],
            "kl_zero": kl["zero"],
            "kl_mean": kl["mean"],
        }


def reconstruction_metrics(x: torch.Tensor, x_hat: torch.Tensor, code: SparseCode | None = None,
                           n_latents: int | None = None, dense_threshold: float = 0.1) -> dict[str, Any]:
    """One-shot `ReconstructionStats` on tensors already in memory (x, x_hat [N, d]; tokens to exclude removed)."""
    stats = ReconstructionStats(n_latents, dense_threshold)
    stats.update(x, x_hat, code)
    return stats.compute()


# ================================================================================================ result
@dataclass
class CoreMetrics:
    """Everything `evaluate_core` measures; see the module docstring for exact definitions."""

    hook_name: str
    n_rows: int
    context_size: int
    n_tokens: int  # non-special positions scored for reconstruction / sparsity / density
    n_predictions: int  # next-token predictions counted in CE / KL means (0: downstream skipped)
    exclude_special: bool
    special_token_ids: list[int]
    # reconstruction
    explained_variance: float
    fvu: float
    explained_variance_uncentred: float
    mse: float
    total_variance: float
    cossim: float
    l2_ratio: float
    l2_norm_in: float
    l2_norm_out: float
    relative_reconstruction_bias: float
    # sparsity and density
    n_latents: int
    l0: float
    l0_std: float
    l0_min: int
    l0_max: int
    l1: float
    n_dead: int
    frac_dead: float
    n_dense: int
    frac_dense: float
    dense_threshold: float
    frac_density_over_1pct: float
    normalized_density_over_1pct: float
    # downstream (NaN when skipped)
    ce_clean: float = math.nan
    ce_sae: float = math.nan
    ce_zero_ablation: float = math.nan
    ce_mean_ablation: float = math.nan
    delta_ce: float = math.nan
    loss_recovered_zero: float = math.nan
    loss_recovered_mean: float = math.nan
    kl_sae: float = math.nan
    kl_zero: float = math.nan
    kl_mean: float = math.nan
    # distributions
    l0_quantiles: dict[str, int] = field(default_factory=dict)
    l0_hist: list[int] = field(default_factory=list)
    log10_density_hist: dict[str, Any] = field(default_factory=dict)
    latent_density: list[float] = field(default_factory=list)
    mse_per_dim: list[float] = field(default_factory=list)
    dead_window: str = ""  # the tokens n_dead was counted on (never active there; rarer latents look dead too)
    # an SAE with two inference rules (g-SAE): these numbers' rule ("with gradient"), and the other rule's metrics
    rule: str = ""
    topk_fallback: "CoreMetrics | None" = None
    target_hook: str = ""  # a transcoder's: what the reconstruction metrics and the splice compare with

    def to_dict(self, per_latent: bool = True) -> dict[str, Any]:
        """JSON-serialisable (numbers, lists, dicts; NaN → None). `per_latent=False` drops `latent_density`.
        `rule` and `topk_fallback` (nested, the same keys) appear only for an SAE with two inference rules."""
        d = asdict(self)
        if not self.target_hook:
            del d["target_hook"]
        if self.topk_fallback is None:
            del d["topk_fallback"]
            if not self.rule:
                del d["rule"]
        else:
            d["topk_fallback"] = self.topk_fallback.to_dict(per_latent)
        if not per_latent:
            d.pop("latent_density")
        return _json_clean(d)

    def _repr_html_(self) -> str:  # Jupyter: the headline numbers as a table
        from saelab.display import grid_html, table_html

        fields = [("explained variance", "explained_variance"), ("FVU", "fvu"), ("L0", "l0"),
                  ("dead latents", "n_dead"), ("dense latents", "n_dense"), ("cosine similarity", "cossim")]
        if self.n_predictions:
            fields += [("CE clean (nats)", "ce_clean"), ("CE with SAE (nats)", "ce_sae"), ("ΔCE (nats)", "delta_ce"),
                       ("KL (nats)", "kl_sae"), ("loss recovered (zero abl.)", "loss_recovered_zero"),
                       ("loss recovered (mean abl.)", "loss_recovered_mean")]
        target = f" → target: {self.target_hook}" if self.target_hook else ""
        title = f"core metrics · {self.hook_name}{target} · {self.n_tokens:,} held-out tokens"
        if self.topk_fallback is None:
            return table_html([(label, getattr(self, k)) for label, k in fields], title=title)
        return grid_html(["", self.rule, self.topk_fallback.rule],
                         [[label, getattr(self, k), getattr(self.topk_fallback, k)] for label, k in fields], title)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "CoreMetrics":
        names = {f for f in cls.__dataclass_fields__} - {"topk_fallback"}
        m = cls(**{k: (math.nan if v is None else v) for k, v in d.items() if k in names})
        if d.get("topk_fallback"):
            m.topk_fallback = cls.from_dict(d["topk_fallback"])
        return m


# ================================================================================================ entry points
# The splice/capture plumbing (rows, special masks, hooked forwards) lives in `saelab.eval.splice`, shared with
# probing, steering and patching; `special_mask`, `prediction_mask` and `default_special_ids` stay importable here.
@torch.no_grad()
def hook_activation_mean(model, rows, hook_name: str, special_token_ids: Iterable[int] | None = None,
                         exclude_special: bool = True, batch_rows: int = 16) -> torch.Tensor:
    """Float64 mean [d] of the (flattened) hook activation over the non-special positions of `rows` — the
    mean-ablation value `evaluate_core` uses when it is not given one."""
    rows = as_rows(rows)
    specials = default_special_ids(model) if special_token_ids is None else list(special_token_ids)
    total, count = None, 0
    for _, tok, spec in batches(rows, batch_rows, model_device(model), specials, exclude_special):
        _, acts = capture(model, tok, hook_name)
        x = acts[hook_name].reshape(*tok.shape, -1)[~spec].double()
        total = x.sum(0) if total is None else total + x.sum(0)
        count += x.shape[0]
    if not count:
        raise ValueError("no non-special positions in the rows")
    return (total / count).cpu()


@torch.no_grad()
def evaluate_core(model, sae, rows=None, corpus=None, split: str = "validation", n_tokens: int | None = 65_536,
                  context_size: int = 128, batch_rows: int = 16, dense_threshold: float = 0.1,
                  exclude_special: bool = True, n_ce_tokens: int | None = None,
                  special_token_ids: Sequence[int] | None = None, mean_activation: torch.Tensor | None = None,
                  hook_name: str | None = None, progress: bool = False,
                  keep_bytes: int = 512 * 2 ** 20) -> CoreMetrics:
    """Core metrics of `sae` at its hook (`sae.cfg.hook_name`, or `hook_name`) on held-out text.

    rows: token ids — a [N, L] tensor/array or an iterable of [B, L] batches (packed rows, BOS first); default:
        packed rows of `context_size` from `corpus` (default `CorpusSpec()`, the standard library), `split`.
    n_tokens: budget in row positions (BOS included): the first ceil(n_tokens / L) rows are used (None: all rows).
    n_ce_tokens: positions of those rows (from the first) also used for CE/KL, which costs four full forwards per
        batch; None: all of them; 0: skip the downstream metrics.
    mean_activation: the mean-ablation value [d] (flattened hook width); None: the mean over the non-special
        positions of all evaluation rows, computed in a first pass (a forward truncated after the hook) that also
        gathers the reconstruction metrics.
    special_token_ids: ids excluded wherever they occur (default: tokenizer BOS/EOS/PAD); position 0 of every row
        is always excluded. `exclude_special=False` counts every position.
    keep_bytes: the first pass keeps each batch's reconstruction x̂ for the CE pass (instead of encoding again)
        while they fit in this many bytes.

    The SAE protocol: `sae.encode(x [N, d]) -> SparseCode`, `sae.decode(code) -> [N, d]` (raw activation space),
    `sae.n_latents`, `sae.cfg.hook_name`. Exact definitions are in this module's docstring.

    Cost: a pass of forwards truncated after the hook (reconstruction metrics and the mean), then per batch of
    CE rows four full forwards (clean, SAE, zero, mean); the SAE is not run again on rows whose activation and
    x̂ the first pass kept (`keep_bytes`). A g-SAE (`infers_with_grad`) is scored under both its rules (module
    docstring): its first pass runs full forwards with one backward each, and the CE pass one more forward (the
    fallback's splice).
    """
    from saelab.data.corpus import CorpusSpec

    hook = hook_name or getattr(getattr(sae, "cfg", None), "hook_name", "")
    if not hook:
        raise ValueError("no hook name: the SAE's cfg.hook_name is empty; pass hook_name=")
    out_hook = target_hook(sae) or hook  # where x̂ is compared and spliced in: a transcoder's target
    if batch_rows < 1:
        raise ValueError(f"batch_rows must be >= 1, got {batch_rows}")
    if rows is None:
        if n_tokens is None:
            raise ValueError("n_tokens=None (all rows) needs explicit rows; a corpus can be unbounded")
        rows = corpus_rows(model, corpus if corpus is not None else CorpusSpec(), split, context_size,
                           max(1, math.ceil(n_tokens / context_size)))
    else:
        rows = as_rows(rows, n_tokens)
    n_rows, L = rows.shape
    if L < 2:
        raise ValueError(f"rows must have at least 2 positions, got {L}")
    ce_rows = n_rows if n_ce_tokens is None else min(n_rows, math.ceil(n_ce_tokens / L))
    specials = default_special_ids(model) if special_token_ids is None else sorted(int(i) for i in special_token_ids)
    dev = model_device(model)
    with_grad = infers_with_grad(sae)
    kinds = ("sae", "fallback") if with_grad else ("sae",)  # the SAE's rule (with gradient), its TopK fallback
    recon = {kind: ReconstructionStats(getattr(sae, "n_latents", None), dense_threshold) for kind in kinds}
    down = DownstreamStats(kinds)

    def batches_of(start, stop):
        """Batches of rows[start:stop], split at ce_rows so both passes cut the CE rows alike."""
        for lo, hi in ((start, min(stop, ce_rows)), (max(start, ce_rows), stop)):
            yield from batches(rows, batch_rows, dev, specials, exclude_special, start=lo, stop=hi)

    def forward(tok, full: bool):
        """(clean logits, or None when truncated after the hooks; the input activation [b, L, ...]; the activation
        x̂ is compared with, the target's for a transcoder; the LM-loss gradient there, for a g-SAE only, which needs
        the full forward)."""
        if with_grad:
            logits, out, grad = lm_loss_grad(model, tok, out_hook)
            return logits, out if out_hook == hook else capture(model, tok, hook)[1][hook], out, grad
        logits, acts = capture(model, tok, list(dict.fromkeys([hook, out_hook])), stop_at_layer=None if full else "auto")
        return logits, acts[hook], acts[out_hook], None

    def reconstruct(act, out, grad, keep):
        """The compared rows y [n, d] at the kept positions (x itself for an SAE, the target's for a transcoder) and
        {kind: (code, x̂)} from the input rows x: the g-SAE's own rule gets the gradient."""
        x = act.reshape(*keep.shape, -1)[keep]
        y = out.reshape(*keep.shape, -1)[keep]
        g = None if grad is None else grad.reshape(*keep.shape, -1)[keep]
        return y, {kind: sae_reconstruct(sae, x, g if kind == "sae" else None) for kind in kinds}

    from tqdm.auto import tqdm

    bar = tqdm(total=n_rows + ce_rows if (mean_activation is None and ce_rows) else n_rows, unit="row",
               desc="core eval", disable=not progress)
    kept: dict[int, tuple[torch.Tensor, dict]] = {}  # first row of a batch → (activation, {kind: x̂})

    def act_pass(start_row: int, keep_for_ce: bool):
        """Forwards over rows[start_row:] (truncated after the hook unless the SAE needs the gradient):
        reconstruction stats (and the activation mean); keeps each CE batch's activation and x̂ for the CE pass
        while they fit in keep_bytes."""
        total, count, held = None, 0, 0
        for i, tok, spec in batches_of(start_row, n_rows):
            _, act, out, grad = forward(tok, full=False)
            x, codes = reconstruct(act, out, grad, ~spec)
            for kind, (code, x_hat) in codes.items():
                recon[kind].update(x, x_hat, code)
            x_hats = {kind: x_hat for kind, (_, x_hat) in codes.items()}
            size = out.numel() * out.element_size() + sum(v.numel() * v.element_size() for v in x_hats.values())
            if keep_for_ce and i < ce_rows and held + size <= keep_bytes:
                kept[i] = (out, x_hats)
                held += size
            xd = x.double().sum(0)
            total = xd if total is None else total + xd
            count += x.shape[0]
            bar.update(tok.shape[0])
        return None if not count else total / count

    recon_done = False
    mean = None
    if ce_rows and mean_activation is None:
        mean = act_pass(0, keep_for_ce=True)
        recon_done = True
        if mean is None:
            raise ValueError("no non-special positions in the evaluation rows")
    elif mean_activation is not None:
        mean = torch.as_tensor(mean_activation).reshape(-1)

    if ce_rows:
        for i, tok, spec in batches_of(0, ce_rows):
            keep = ~spec
            if i in kept:
                out, x_hats = kept.pop(i)
                logits_clean = model(tok)  # out is bitwise the activation of this forward
            else:
                logits_clean, act, out, grad = forward(tok, full=True)
                x, codes = reconstruct(act, out, grad, keep)
                if not recon_done:
                    for kind, (code, x_hat) in codes.items():
                        recon[kind].update(x, x_hat, code)
                x_hats = {kind: x_hat for kind, (_, x_hat) in codes.items()}
            down.begin(logits_clean, tok, prediction_mask(spec))
            del logits_clean
            for kind, value in (*x_hats.items(), ("zero", torch.zeros(())), ("mean", mean)):
                down.add(kind, run_with_replacement(model, tok, out_hook,
                                                    replace_rows(out, keep, value.to(out.device))))
            down.end()
            bar.update(tok.shape[0])
    if not recon_done and ce_rows < n_rows:
        act_pass(ce_rows, keep_for_ce=False)
    bar.close()

    def metrics(kind: str) -> CoreMetrics:
        r = recon[kind].compute()
        if not recon[kind].has_code:
            raise ValueError("the SAE produced no SparseCode")
        d = down.compute(kind) if ce_rows else {}
        fields = CoreMetrics.__dataclass_fields__
        values = {k: v for k, v in {**r, **d}.items() if k in fields}
        values["n_predictions"] = d.get("n_predictions", 0)
        return CoreMetrics(hook_name=hook, n_rows=n_rows, context_size=L, exclude_special=exclude_special,
                           special_token_ids=list(specials) if exclude_special else [],
                           target_hook=target_hook(sae), **values)

    result = metrics("sae")
    if with_grad:
        result.rule = GRAD_RULE
        result.topk_fallback = metrics("fallback")
        result.topk_fallback.rule = FALLBACK_RULE
    return result


# ================================================================================================ formatting
def format_core(m: CoreMetrics) -> str:
    """A short human-readable table of the headline numbers; for an SAE with two inference rules (g-SAE) a column
    per rule, its own first."""
    ms = [m] if m.topk_fallback is None else [m, m.topk_fallback]
    cols = [_core_lines(x) for x in ms]
    target = f" → target: {m.target_hook}" if m.target_hook else ""
    head = (f"core metrics  {m.hook_name}{target}  ({m.n_tokens:,} tokens, {m.n_predictions:,} predictions, "
            f"{m.n_latents:,} latents)")
    if len(cols) == 1:
        return "\n".join([head] + [f"  {label:<21}{value}" for label, value in cols[0]])
    width = max(len(v) for _, v in cols[0]) + 3
    lines = [head, f"  {'':<21}{m.rule:<{width}}{m.topk_fallback.rule}"]
    lines += [f"  {label:<21}{a:<{width}}{b}" for (label, a), (_, b) in zip(*cols)]
    return "\n".join(lines)


def _core_lines(m: CoreMetrics) -> list[tuple[str, str]]:
    """(label, value text) of each headline line of `format_core`."""

    def f(v, spec=".4f"):
        return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, spec)

    q = m.l0_quantiles
    lines = [
        ("explained variance", f"{f(m.explained_variance)}   (FVU {f(m.fvu)}; uncentred EV "
                               f"{f(m.explained_variance_uncentred)})"),
        ("MSE", f"{f(m.mse, '.6g')}   (total variance {f(m.total_variance, '.6g')})"),
        ("cosine / l2 ratio", f"{f(m.cossim)} / {f(m.l2_ratio)}   (shrinkage γ {f(m.relative_reconstruction_bias)})"),
        ("L0", f"{f(m.l0, '.2f')}   (p10 {q.get('p10', 'n/a')}, median {q.get('p50', 'n/a')}, "
               f"p90 {q.get('p90', 'n/a')}, max {m.l0_max})"),
        ("dead latents", f"{m.n_dead:,} ({f(100 * m.frac_dead, '.2f')} %) never active in these {m.n_tokens:,} tokens"),
        ("dense latents", f"{m.n_dense:,} ({f(100 * m.frac_dense, '.2f')} %, density > {m.dense_threshold:g})"),
    ]
    if m.n_predictions:
        lines += [
            ("CE clean / SAE", f"{f(m.ce_clean)} / {f(m.ce_sae)} nats   (ΔCE {'+' if m.delta_ce >= 0 else ''}"
                               f"{f(m.delta_ce)})"),
            ("CE zero / mean abl.", f"{f(m.ce_zero_ablation)} / {f(m.ce_mean_ablation)} nats"),
            ("loss recovered", f"{f(m.loss_recovered_zero)} (zero abl.) / {f(m.loss_recovered_mean)} (mean abl.)"),
            ("KL SAE / zero / mean", f"{f(m.kl_sae)} / {f(m.kl_zero)} / {f(m.kl_mean)} nats"),
        ]
    return lines


# ================================================================================================ helpers
def _div(a: float, b: float) -> float:
    return a / b if b != 0 else math.nan


def _logsumexp(z: torch.Tensor) -> torch.Tensor:
    m = z.amax(-1, keepdim=True)
    m = torch.where(torch.isfinite(m), m, 0.0)  # a row of -inf stays -inf, +inf stays +inf
    return (z - m).exp_().sum(-1).log_() + m.squeeze(-1)


def _rowwise(z: torch.Tensor, fn) -> torch.Tensor:
    """fn applied to each z[i] (a block that fits in cache), stacked."""
    return torch.stack([fn(z[i]) for i in range(z.shape[0])])


def _pad(t: torch.Tensor, n: int) -> torch.Tensor:
    return torch.cat([t, t.new_zeros(n - t.numel())]) if t.numel() < n else t


def _json_clean(v):
    if isinstance(v, dict):
        return {str(k): _json_clean(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_json_clean(x) for x in v]
    if isinstance(v, float):
        return None if (math.isnan(v) or math.isinf(v)) else v
    if isinstance(v, (np.floating, np.integer)):
        return _json_clean(v.item())
    if torch.is_tensor(v):
        return _json_clean(v.tolist())
    return v


__all__ = ["CoreMetrics", "ReconstructionStats", "DownstreamStats", "evaluate_core", "format_core",
           "reconstruction_metrics", "hook_activation_mean", "special_mask", "prediction_mask", "active_entries",
           "default_special_ids"]
