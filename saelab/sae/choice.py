"""Mutual Choice and Feature Choice SAEs (Ayonrinde 2024, arXiv 2411.02124): the SAE activation as an allocation of
token–latent matches by affinity z' = ReLU(pre), greedy by size.

* Mutual Choice (`mutual`): the k·B largest affinities of the whole batch×latent matrix. That *is* BatchTopK, so
  this class is BatchTopK under another name: the same selection code (`batch_topk_indices`), the same global
  inference threshold, the same SAELens export.
* Feature Choice (`feature_choice`): each latent i takes its m_i largest affinities among the batch's tokens, with
  Σ m_i = k·B exactly, so a token has 0…many latents (a padded `SparseCode`).

Capacities (`capacities`). The paper sets the per-feature constraints by a Zipf law over features ranked by use
(feature densities of SAEs follow Zipf except in the rare tail). Here, by default (`capacity="zipf"`):
* **usage** ranks the latents. It must be a measure the capacities do not decide: under feature choice a latent
  fires on exactly its m_i tokens, so its own firing density only reproduces whatever order the capacities started
  in. A latent's usage is instead its share of the batch's *mutual-choice* matches: on how many of the batch's
  tokens its affinity is among the k·B largest of the batch (what it would take if allocation were free), divided
  by the batch size, as an EMA over steps (`usage_momentum`; the first batch sets it). Σ usage = k. It is a buffer
  (`usage`), so checkpoints carry it and a resumed run continues bit-exactly.
* **Zipf shares** by rank r (1 = most used): m ∝ r^(−s), water-filled into [lo, B] (lo = 1 when k·B ≥ n, so no
  latent is shut out, else 0): the excess of a latent clamped at the batch size B goes to the others in proportion
  to their Zipf weights (and a latent lifted to 1 takes its share from them), then largest-remainder rounding to
  integers whose sum is k·B exactly. The by-rank vector depends only on (k·B, B, n, s) and is cached; each step
  only re-sorts the latents by usage.
* `capacity="uniform"`: m_i = k·B // n each, the remainder one each over the first latents (every latent is forced
  to the same density k/n).

Selection is per latent: a top-m_i over the batch dimension, the columns grouped by capacity (powers of two) so that
a latent with a large capacity does not make every column's sort that deep. Where a latent's m_i-th and (m_i+1)-th
largest affinities are equal (identical activation rows are common: the same token after the same prefix), it takes
those above the tie and then the tied tokens in batch order, first come first served, so it keeps exactly m_i and the
choice does not depend on how a sort orders equal values.

Auxiliary loss `aux_zipf`. The paper's aux_zipf_loss generalises AuxK from dead to dead *and under-utilised*
features, the under-utilised ones being those whose density falls below the Zipf curve (its low tail). Its exact
formula is not in any source we could read (research notes §5; no code was released), so this is OUR version of it:
a latent is under-used when its usage (above) is below `underuse` × its Zipf target share m_i / B; dead and
under-used latents reconstruct the detached residual with AuxK (top-k_aux by pre-activation). Usage, not firing
density, is what makes this non-trivial under feature choice: the firing density of a latent with positive
affinities always equals its capacity share. `aux="auxk"` is plain AuxK on the dead.

Batch-independent inference is OUR recommendation: per-latent thresholds θ_i = EMA of latent i's cut in each batch,
the midpoint of its m_i-th and (m_i+1)-th largest affinities (the boundary between kept and not kept; the m_i-th
alone, the notes' suggestion, sets θ_i at the smallest kept value and fires ~20 % less often at inference on the
tiny test model), used as a JumpReLU (SAELens: jumprelu + `threshold`); until a first batch has set them, `encode`
uses per-token TopK. The EMA lags a model still training, so after the last step each θ_i is calibrated once,
exactly, on `calibration_tokens` further training tokens: latent i's cut of that whole sample as if it were one
batch.

Under torch.distributed "the batch" is the global one (as for BatchTopK): capacities are m_i of the global batch
k·B·world, each rank sends its per-latent top-m candidates to all ranks, every rank computes the same per-latent
cut-off (the global m_i-th largest) and keeps its own entries above it, and of the entries tied at it the first in
the global batch's order (rank 0's rows first, as one process holding the ranks' batches side by side): the same
matches as that process, ties included. Usage counts and the threshold statistics are reduced over ranks too.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.distributed as dist

from saelab.distributed import rank_world
from saelab.kernels.topk_stream import streaming_topk
from saelab.sae.architectures import (Architecture, ThresholdOptions, auxk_loss, calibration_inputs, gather_rows,
                                      pack_rows, threshold_indices, topk_indices)
from saelab.settings import setting as option
from saelab.sae.batch_select import Blocks, batch_topk_entries, packed, preact_blocks, threshold_streaming
from saelab.sae.batchtopk import BatchTopK


class MutualChoice(BatchTopK):
    name = "mutual"
    help = "Mutual Choice (Ayonrinde 2024): global top k·B of the batch×latent matrix (= BatchTopK, same code)"


@dataclass
class AllocationOptions:
    """Feature choice's own options: how the batch's k·B matches are shared out, and its auxiliary loss."""

    capacity: str = option("zipf", "per-latent token capacity m_i (Σ m_i = k·B exactly): zipf (m_i ∝ rank^-s over "
                                   "latents ranked by usage, i.e. their share of the batch's mutual-choice "
                                   "matches; each ≤ B, the excess redistributed) or uniform (k·B/n each)")
    zipf_exponent: float = option(0.0, "s of the Zipf capacities m_i ∝ rank^-s (capacity=zipf); 0 (default): "
                                       "fitted to the usage at every step (least squares of log usage on log rank "
                                       "over the most-used half of the latents)")
    aux: str = option("aux_zipf", "auxiliary loss: aux_zipf (AuxK on dead latents and on under-used ones, whose "
                                  "usage is below --underuse × their capacity share m_i/B; our version of the "
                                  "paper's aux_zipf_loss) or auxk (plain AuxK on dead latents)")
    underuse: float = option(0.5, "aux_zipf: a latent is under-used when its usage < this × its capacity share m_i/B")
    usage_momentum: float = option(0.95, "EMA momentum of each latent's usage (its share of the batch's "
                                         "mutual-choice matches), which ranks the Zipf capacities; 0.95 averages "
                                         "about the last 20 steps")

    def __post_init__(self):
        from saelab.settings import check

        check(self.capacity in ("uniform", "zipf"), "capacity", f"must be uniform or zipf, got {self.capacity!r}")
        check(0 <= self.zipf_exponent <= 10, "zipf_exponent",
              f"must be in [0, 10] (0: fitted to the usage), got {self.zipf_exponent}")
        check(self.aux in ("aux_zipf", "auxk"), "aux", f"must be aux_zipf or auxk, got {self.aux!r}")
        check(0 <= self.underuse <= 1, "underuse", f"must be in [0, 1], got {self.underuse}")
        check(0 <= self.usage_momentum < 1, "usage_momentum", f"must be in [0, 1), got {self.usage_momentum}")


@dataclass
class FeatureChoiceOptions(ThresholdOptions, AllocationOptions):
    """Its own options, then the thresholds' (a dataclass lists the fields of its last base first), each checked
    in that order."""

    def __post_init__(self):
        AllocationOptions.__post_init__(self)
        ThresholdOptions.__post_init__(self)


class FeatureChoice(Architecture):
    name = "feature_choice"
    help = ("Feature Choice (Ayonrinde 2024): each latent takes its m_i best tokens of the batch (Σ m_i = k·B, "
            "Zipf by usage)")
    Options = FeatureChoiceOptions
    streams = True  # usage and each latent's top m_i over the batch, block by block (`feature_choice_entries`)

    def init_state(self, sae) -> None:
        dev = sae.W_dec.device
        sae.register_buffer("threshold", torch.full((self.cfg.n_latents,), -1.0, device=dev))  # -1: not learned
        sae.register_buffer("usage", torch.full((self.cfg.n_latents,), -1.0, device=dev))  # usage EMA; -1: unset
        self.step_usage = self.step_capacity = self.last_cut = None  # this step's, committed by after_step

    @property
    def tracks_usage(self) -> bool:
        return self.opt.capacity == "zipf" or self.opt.aux == "aux_zipf"

    # ------------------------------------------------------------------------------------------ selection
    def capacities(self, sae, batch: int, usage: torch.Tensor | None = None, l0: float | None = None) -> torch.Tensor:
        """m_i [n] (long) for a (global) batch of `batch` tokens summing to l0·batch (default l0 = k), ranked by
        `usage` (default: the SAE's)."""
        total = self.cfg.k * batch if l0 is None else max(1, round(l0 * batch))
        return capacities(total, batch, self.cfg.n_latents, self.opt.capacity, self.opt.zipf_exponent,
                          sae.usage if usage is None else usage)

    def select(self, sae, pre, grad, k):
        rows, cols, _ = self.allocate(sae, lambda: [(0, pre)], pre.shape[0])
        return pack_rows(rows, cols, pre.shape[0])

    @torch.no_grad()  # as `select`'s dense pre: the selection records no autograd graph (the values get theirs later)
    def select_streaming(self, sae, x_c, grad, k):
        first: list = []
        rows, cols, vals = self.allocate(sae, preact_blocks(x_c, sae.W_enc, sae.b_enc, self.cfg.encoder_chunk, first),
                                         x_c.shape[0])
        return packed(rows, cols, vals, first[0], self.cfg.n_latents)

    def allocate(self, sae, blocks: Blocks, rows: int):
        """The batch's matches (rows, columns, values) from its pre-activation blocks (`rows` tokens on this rank):
        usage, then capacities, then each latent's top m_i (two passes over the blocks with the streaming encoder)."""
        batch = rows * rank_world()[1]
        usage = None
        if self.tracks_usage:  # this batch's usage enters the EMA before it ranks this batch's capacities
            usage = self.updated_usage(sae, batch_topk_entries(blocks, self.cfg.k), batch)
        m = self.capacities(sae, batch, usage)
        self.step_usage, self.step_capacity = usage, m
        rows, cols, vals, self.last_cut = feature_choice_entries(blocks, m)  # the cut feeds θ (after_step)
        return rows, cols, vals

    @torch.no_grad()
    def updated_usage(self, sae, mutual: tuple, batch: int) -> torch.Tensor:
        """The usage EMA with this batch in it (not yet stored): each latent's share of the batch's mutual-choice
        matches `mutual` (rows, columns, values of the k·B largest affinities of the (global) batch × latent matrix:
        `batch_topk_entries`)."""
        _, cols, vals = mutual
        counts = torch.bincount(cols[vals > 0], minlength=self.cfg.n_latents).to(sae.usage.dtype)  # 0 is no match
        if rank_world()[1] > 1:
            dist.all_reduce(counts)
        mom = self.opt.usage_momentum if bool((sae.usage >= 0).all()) else 0.0  # the first batch sets it
        return sae.usage * mom + counts * ((1 - mom) / batch)

    def select_inference(self, sae, pre, grad):
        if not bool((sae.threshold >= 0).any()):  # nothing learned yet
            return topk_indices(pre, self.cfg.k), None
        return threshold_indices(pre, _finite(sae.threshold))

    def select_inference_streaming(self, sae, x_c, grad):
        chunk = self.cfg.encoder_chunk
        if not bool((sae.threshold >= 0).any()):
            return *streaming_topk(x_c, sae.W_enc, sae.b_enc, self.cfg.k, chunk), None
        return threshold_streaming(x_c, sae.W_enc, sae.b_enc, _finite(sae.threshold), chunk)

    # ------------------------------------------------------------------------------------------ losses
    def aux_losses(self, sae, x_c, pre, err, dead_mask, losses):
        if self.cfg.aux_coef <= 0:
            return 0.0
        mask = dead_mask
        if self.opt.aux == "aux_zipf" and self.step_usage is not None:
            under = self.underused(self.step_usage, self.step_capacity, x_c.shape[0] * rank_world()[1])
            mask = under if mask is None else (mask | under)
        if mask is None:
            return 0.0
        aux = auxk_loss(sae, x_c, pre, err.detach(), mask, self.cfg.k_aux, chunk=self.cfg.encoder_chunk)
        if aux is None:
            return 0.0
        losses[self.opt.aux] = aux
        return self.cfg.aux_coef * aux

    def underused(self, usage: torch.Tensor, m: torch.Tensor, batch: int) -> torch.Tensor:
        """Latents whose usage is below `underuse` × their capacity share m_i / B (aux_zipf)."""
        return usage < self.opt.underuse * m.to(usage.dtype) / batch

    # ------------------------------------------------------------------------------------------ state
    @torch.no_grad()
    def after_step(self, sae, out, step: int) -> None:
        if self.step_usage is not None:
            sae.usage.copy_(self.step_usage)
            self.step_usage = self.step_capacity = None
        cut = self.last_cut  # this step's per-latent cut (the same on every rank)
        self.last_cut = None
        if step < self.opt.threshold_start_step or cut is None:
            return
        cut = cut.clamp_min(0).to(sae.threshold.dtype)
        mom = self.opt.threshold_momentum if bool((sae.threshold >= 0).all()) else 0.0
        sae.threshold.mul_(mom).add_((1 - mom) * cut)

    calibrates = True

    @torch.no_grad()
    def calibrate(self, sae, draw, target_l0: float | None = None, tokens: int | None = None) -> dict:
        """θ_i ← latent i's cut on N more training tokens (all ranks' under torch.distributed), exactly as training
        cuts a batch: with the capacities m_i of a batch of N tokens (Σ m_i = L·N, L = target_l0 or k, ranked by the
        trained usage), the midpoint of its m_i-th and (m_i+1)-th largest pre-activation, so the sample's mean L0 at
        inference is L. Column blocks of similar capacity keep the memory at N × 256 pre-activations and each sort
        shallow."""
        world = rank_world()[1]
        xs = calibration_inputs(sae, draw, self.opt.calibration_tokens if tokens is None else tokens)
        if not xs:
            return {}
        x_c = torch.cat(xs) - sae.b_pre
        n_tok = total = x_c.shape[0]
        if world > 1:  # ranks may hold different counts: agree on the global N
            t = torch.tensor(n_tok, device=x_c.device)
            dist.all_reduce(t)
            total = int(t)
        m = self.capacities(sae, total, l0=target_l0).to(x_c.device)
        cuts = torch.empty(self.cfg.n_latents, dtype=sae.threshold.dtype, device=x_c.device)
        old = _finite(sae.threshold)
        fired_old = fired_new = 0  # the sample's L0 under the EMA thresholds and the calibrated ones, for the record
        for group in capacity_groups(m):
            for cols in group.split(256):
                pre = torch.addmm(sae.b_enc[cols], x_c, sae.W_enc[:, cols])  # [N, block]
                _, ranked = column_tops(pre, m[cols])
                cuts[cols] = column_cut(ranked, m[cols]).clamp_min(0)
                fired_old += int((pre > old[cols]).sum())
                fired_new += int((pre > cuts[cols]).sum())
        sae.threshold.copy_(cuts)
        return {"tokens": total, "l0_ema_thresholds": fired_old / n_tok, "l0_calibrated": fired_new / n_tok}

    def saelens_export(self, sae) -> dict:
        if not bool((sae.threshold >= 0).any()):
            return super().saelens_export(sae)
        big = torch.finfo(sae.threshold.dtype).max  # never fires (SAELens refuses inf)
        theta = torch.where(sae.threshold >= 0, sae.threshold, torch.full_like(sae.threshold, big))
        return {"architecture": "jumprelu", "cfg": {}, "tensors": {"threshold": theta.detach()}}


# -------------------------------------------------------------------------------------------------- capacities
def _finite(threshold: torch.Tensor) -> torch.Tensor:
    """Thresholds with the unlearned ones (−1) at +inf: such a latent never fires."""
    return torch.where(threshold >= 0, threshold, torch.full_like(threshold, float("inf")))


def capacities(total: int, batch: int, n: int, kind: str = "zipf", exponent: float = 0.0,
               usage: torch.Tensor | None = None) -> torch.Tensor:
    """Per-latent capacities m_i (long [n]) summing to exactly `total` (= k·B), each in [lo, batch] with lo = 1 when
    total ≥ n, else 0. zipf: `zipf_by_rank` over the latents ranked by `usage` (most used first, ties by index),
    with the exponent `exponent`, or 0: `fitted_exponent(usage)`; without a usage yet (None or unset, −1) the
    capacities are uniform. uniform: total // n each, the remainder one each over the first latents."""
    if not 0 <= total <= n * batch:
        raise ValueError(f"{total} matches cannot be spread over {n} latents of at most {batch} tokens each")
    device = usage.device if usage is not None else "cpu"
    if kind == "uniform" or usage is None or bool((usage < 0).any()):
        m = torch.full((n,), total // n, dtype=torch.long, device=device)
        m[: total % n] += 1
        return m
    order = torch.argsort(-usage, stable=True)
    m = torch.empty(n, dtype=torch.long, device=device)
    m[order] = zipf_by_rank(total, batch, n, float(exponent) or fitted_exponent(usage)).to(device)
    return m


def fitted_exponent(usage: torch.Tensor) -> float:
    """The Zipf exponent s of the usage: minus the least-squares slope of log usage against log rank over the
    most-used half of the latents (those with usage > 0; the paper finds Zipf fits feature densities except in the
    rare tail), clamped to [0, 3] and rounded to 0.01 (so the by-rank capacities come from a small cache). 1 when
    fewer than two latents are used."""
    u = usage.detach().double().cpu().sort(descending=True).values[: max(2, usage.numel() // 2)]
    rank = torch.arange(1, u.numel() + 1, dtype=torch.float64)
    used = u > 0
    if int(used.sum()) < 2:
        return 1.0
    x, y = rank[used].log(), u[used].log()
    x = x - x.mean()
    slope = float((x * (y - y.mean())).sum() / x.pow(2).sum())
    return round(min(max(-slope, 0.0), 3.0), 2)


@functools.lru_cache(maxsize=16)
def zipf_by_rank(total: int, batch: int, n: int, exponent: float) -> torch.Tensor:
    """Capacities by rank (index 0 = rank 1), long [n], non-increasing, each in [lo, batch] (lo = 1 if total ≥ n
    else 0), summing to exactly `total`: the shares clamp(λ·r^(−s), lo, batch), λ set so they sum to `total`
    (water-filling: what a clamped latent cannot take goes to the others in proportion to their Zipf weights), then
    rounded by largest remainder (ties to the better rank). Read-only: it is cached."""
    lo, hi = (1.0 if total >= n else 0.0), float(batch)
    w = torch.arange(1, n + 1, dtype=torch.float64).pow(-exponent)

    def filled(lam: float) -> torch.Tensor:
        return (lam * w).clamp(lo, hi)

    a, b = 0.0, hi / float(w[-1])  # Σ filled(a) = n·lo ≤ total ≤ n·hi = Σ filled(b)
    for _ in range(200):  # bisection on λ: Σ filled(λ) is continuous and non-decreasing
        mid = (a + b) / 2
        if mid in (a, b):
            break
        if float(filled(mid).sum()) <= total:
            a = mid
        else:
            b = mid
    share = filled(a)  # Σ share ≤ total, within float error of it
    base = share.floor()
    rest = total - int(base.sum())
    frac = torch.where(base < hi, share - base, torch.full_like(share, -1.0))  # a latent at the batch size is full
    order = torch.argsort(-frac, stable=True)
    if not 0 <= rest <= int((base < hi).sum()):
        raise AssertionError(f"zipf_by_rank: cannot round {total} over {n} latents (rest {rest})")
    base[order[:rest]] += 1
    return base.long()


# -------------------------------------------------------------------------------------------------- selection
def capacity_groups(m: torch.Tensor) -> list[torch.Tensor]:
    """The latent indices in groups whose capacities share a power of two (m in [2^(j−1), 2^j)), so that each group's
    per-column top-m sort is at most twice as deep as any of its columns needs."""
    key = torch.where(m > 0, torch.log2(m.double()).floor().long() + 1, torch.zeros_like(m)).cpu()
    return [(key == j).nonzero().squeeze(1).to(m.device) for j in key.unique().tolist()]


def column_tops(pre: torch.Tensor, m: torch.Tensor, depth: int | None = None):
    """Per column its top `depth` (default min(max m_i + 1, B)) entries (local `torch.return_types.topk`,
    descending) and the global ranking of its values (under torch.distributed every rank's top entries pooled and
    re-ranked, else the local values)."""
    top = pre.topk(depth or min(int(m.max()) + 1, pre.shape[0]), dim=0, sorted=True)
    ranked = top.values
    if rank_world()[1] > 1:
        pooled = gather_rows(top.values.contiguous())
        ranked = pooled.topk(min(int(m.max()) + 1, pooled.shape[0]), dim=0, sorted=True).values
    return top, ranked


def column_bounds(ranked: torch.Tensor, m: torch.Tensor):
    """Per column its m_i-th and (m_i+1)-th largest values (of `ranked`, each column's top values, descending) and
    where both exist (1 ≤ m_i < the column's length): (upper, lower, inside)."""
    last = ranked.shape[0] - 1
    upper = ranked.gather(0, (m - 1).clamp(0, last).unsqueeze(0)).squeeze(0)
    lower = ranked.gather(0, m.clamp_max(last).unsqueeze(0)).squeeze(0)
    return upper, lower, (m >= 1) & (m <= last)


def column_cut(ranked: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """Per column the midpoint of its m_i-th and (m_i+1)-th largest values (the boundary between kept and not
    kept): the m_i-th when m_i is the whole batch, the largest when m_i = 0 (nothing passes it)."""
    upper, lower, inside = column_bounds(ranked, m)
    return torch.where(inside, (upper + lower) / 2, upper)


def tied_rows(pre: torch.Tensor, cut: torch.Tensor, need: torch.Tensor):
    """(rows, columns) of the entries of `pre` [B, c] equal to their column's `cut` that a column keeps: its first
    `need` of them in the order of the (global) batch, i.e. under torch.distributed after the ties on lower ranks."""
    tie = pre == cut
    before = 0
    if rank_world()[1] > 1:  # each rank's tie counts per column; the ranks below this one's come first
        counts = gather_rows(tie.sum(0, keepdim=True).to(pre.dtype))
        before = counts[: rank_world()[0]].sum(0)
    return (tie & (tie.cumsum(0) + before <= need)).nonzero(as_tuple=True)


def feature_choice_entries(blocks: Blocks, m: torch.Tensor):
    """Each latent (column) i keeps its m_i largest entries of the batch, from the batch's pre-activation blocks
    (`saelab.sae.batch_select`): (rows, columns, values) of the matches, unordered, and the per-latent cut [n]
    (`column_cut`). A column's top entries depend on its values and on the sort depth alone, and the depth is its
    capacity group's however the columns are blocked, so blocks give the dense path's matches, ties included.

    A column whose m_i-th largest value is tied with its (m_i+1)-th keeps the entries above that value and then the
    first of the tied ones in row order (`tied_rows`: a mask over the block's column, not the sort's arbitrary pick),
    so it keeps exactly m_i, the same on every path.

    Under torch.distributed the batch is the global one, rank 0's rows first: the cut-off of column i is the m_i-th
    largest of its values on all ranks (each rank contributes its own top m_i + 1), each rank keeps its entries
    above it, and the tied ones go to the lower ranks first."""
    rows, cols, vals = [], [], []
    cut = None
    for s, pre in blocks():
        B, e = pre.shape[0], s + pre.shape[1]
        if cut is None:  # each group's columns and sort depth: its largest capacity + 1
            m = m.to(pre.device)
            groups = [(group, int(m[group].max()) + 1) for group in capacity_groups(m)]
            cut = torch.empty(m.numel(), dtype=pre.dtype, device=pre.device)
        for group, depth in groups:
            lo, hi = torch.searchsorted(group, torch.tensor([s, e], device=group.device)).tolist()
            if lo == hi:
                continue
            here, mg = group[lo:hi], m[group[lo:hi]]
            sub = pre if hi - lo == pre.shape[1] else pre.index_select(1, here - s)
            top, ranked = column_tops(sub, mg, min(depth, B))
            keep = torch.arange(top.values.shape[0], device=pre.device).unsqueeze(1) < mg.unsqueeze(0)
            kth, after, inside = column_bounds(ranked, mg)
            if rank_world()[1] > 1:  # at or above the global m_i-th largest
                keep &= top.values >= kth
            tied = (inside & (kth == after)).nonzero().squeeze(1)
            if tied.numel():  # the m_i-th place is shared: above it all, at it the first tokens (`tied_rows`)
                t = kth[tied]
                keep[:, tied] = top.values[:, tied] > t
                r, c = tied_rows(sub[:, tied], t, mg[tied] - (ranked[:, tied] > t).sum(0))
                rows.append(r)
                cols.append(here[tied][c])
                vals.append(t[c])
            rows.append(top.indices[keep])
            cols.append(here.unsqueeze(0).expand_as(keep)[keep])
            vals.append(top.values[keep])
            cut[here] = column_cut(ranked, mg)
    return torch.cat(rows), torch.cat(cols), torch.cat(vals), cut


def feature_choice_indices(pre: torch.Tensor, m: torch.Tensor, with_cut: bool = False):
    """`feature_choice_entries` of the dense pre-activations [B, n], packed per token (`pack_rows`): (indices,
    valid), plus with `with_cut` the per-latent cut [n]."""
    rows, cols, _, cut = feature_choice_entries(lambda: [(0, pre)], m)
    idx, valid = pack_rows(rows, cols, pre.shape[0])
    return (idx, valid, cut) if with_cut else (idx, valid)


ARCHITECTURES = (MutualChoice, FeatureChoice)
