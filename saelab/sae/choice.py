"""Mutual Choice and Feature Choice SAEs (Ayonrinde 2024, arXiv 2411.02124): the SAE activation as an allocation of
token–latent matches by affinity z' = ReLU(pre), greedy by size.

* Mutual Choice (`mutual`): the k·B largest affinities of the whole batch×latent matrix. That *is* BatchTopK, so
  this class is BatchTopK under another name: the same selection code (`batch_topk_indices`), the same global
  inference threshold, the same SAELens export.
* Feature Choice (`feature_choice`): each latent i takes its m_i largest affinities among the batch's tokens,
  Σ m_i ≈ k·B, so a token has 0…many latents (a padded `SparseCode`). Capacities: uniform m_i = k·B/n (the remainder
  spread one each over the first latents), or Zipf-shaped m_i ∝ rank_i^(−s) by the latents' firing density (most
  used first), largest-remainder rounded, each within [1, B].

Research notes §5 say what is certain (the selections) and what is ours:
* `aux_zipf` (the default auxiliary loss) is OUR stand-in for the paper's aux_zipf_loss, whose formula was not
  recovered: keep an EMA of each latent's firing density d_i; its target is its capacity share d̂_i = m_i/B (flat
  for uniform capacities, Zipf for Zipf ones; Σ d̂ = k); latents with d_i < γ·d̂_i ("under-used") and dead ones
  reconstruct the detached residual with AuxK (top-k_aux by pre-activation). `aux="auxk"` is plain AuxK on the dead.
* Batch-independent inference is OUR recommendation: per-latent thresholds θ_i = EMA of latent i's cut in each
  batch, the midpoint of its m_i-th and (m_i+1)-th largest affinities (the boundary between kept and not kept;
  the m_i-th alone, the notes' suggestion, sets θ_i at the smallest kept value and fires ~20 % less often at
  inference on the tiny test model), used as a JumpReLU (SAELens: jumprelu + `threshold`); until a first batch
  has set them, `encode` uses per-token TopK. The EMA lags a model still training (held-out L0 11 instead of 32
  after 1M tokens on the reference model), so after the last step each θ_i is calibrated once, exactly, on
  `calibration_tokens` further training tokens: latent i's cut of that whole sample as if it were one batch.

Under torch.distributed "the batch" is the global one (as for BatchTopK): capacities are m_i of the global batch
k·B·world, each rank sends its per-latent top-m candidates to all ranks, every rank computes the same per-latent
cut-off (the global m_i-th largest) and keeps its own entries above it: the same matches as one process holding
every rank's rows (ties aside). The threshold and density statistics are reduced over ranks too.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from saelab.sae.architectures import (CALIBRATION_HELP, Architecture, auxk_loss, calibration_inputs, gather_rows,
                                      option, pack_rows, threshold_indices, topk_indices, world_size)
from saelab.sae.batchtopk import BatchTopK


class MutualChoice(BatchTopK):
    name = "mutual"
    help = "Mutual Choice (Ayonrinde 2024): global top k·B of the batch×latent matrix (= BatchTopK, same code)"


@dataclass
class FeatureChoiceOptions:
    capacity: str = option("uniform", "per-latent token capacity m_i: uniform (k·B/n) or zipf (∝ rank^-s by "
                                      "firing density)")
    zipf_exponent: float = option(1.0, "s of the Zipf capacities (capacity=zipf)")
    aux: str = option("aux_zipf", "auxiliary loss: aux_zipf (ours: AuxK on dead and under-used latents, see "
                                  "the module docs) or auxk (plain AuxK on dead latents)")
    underuse: float = option(0.5, "aux_zipf: a latent is under-used when its density < this × its capacity share")
    density_momentum: float = option(0.99, "EMA momentum of each latent's firing density")
    threshold_momentum: float = option(0.99, "EMA momentum of the per-latent inference thresholds")
    threshold_start_step: int = option(0, "first step whose batch enters the thresholds")
    calibration_tokens: int = option(65_536, CALIBRATION_HELP)

    def __post_init__(self):
        from saelab.config import check

        check(self.capacity in ("uniform", "zipf"), "capacity", f"must be uniform or zipf, got {self.capacity!r}")
        check(self.zipf_exponent > 0, "zipf_exponent", f"must be > 0, got {self.zipf_exponent}")
        check(self.aux in ("aux_zipf", "auxk"), "aux", f"must be aux_zipf or auxk, got {self.aux!r}")
        check(0 <= self.underuse <= 1, "underuse", f"must be in [0, 1], got {self.underuse}")
        for name in ("density_momentum", "threshold_momentum"):
            value = getattr(self, name)
            check(0 <= value < 1, name, f"must be in [0, 1), got {value}")
        check(self.threshold_start_step >= 0, "threshold_start_step", f"must be >= 0, got {self.threshold_start_step}")
        check(self.calibration_tokens >= 0, "calibration_tokens", f"must be >= 0, got {self.calibration_tokens}")


class FeatureChoice(Architecture):
    name = "feature_choice"
    help = "Feature Choice (Ayonrinde 2024): each latent takes its m_i best tokens of the batch (Σ m_i = k·B)"
    Options = FeatureChoiceOptions

    def init_state(self, sae) -> None:
        dev = sae.W_dec.device
        sae.register_buffer("threshold", torch.full((self.cfg.n_latents,), -1.0, device=dev))  # -1: not learned
        sae.register_buffer("density", torch.full((self.cfg.n_latents,), -1.0, device=dev))  # firing EMA; -1: unset

    # ------------------------------------------------------------------------------------------ selection
    def capacities(self, sae, batch: int) -> torch.Tensor:
        """m_i [n] (long) for a (global) batch of `batch` tokens."""
        return capacities(self.cfg.k * batch, batch, self.cfg.n_latents, self.opt.capacity, self.opt.zipf_exponent,
                          sae.density)

    def select(self, sae, pre, grad, k):
        world = world_size()
        m = self.capacities(sae, pre.shape[0] * world)
        idx, valid, self.last_cut = feature_choice_indices(pre, m, with_cut=True)  # the cut feeds θ (after_step)
        return idx, valid

    def select_inference(self, sae, pre, grad):
        if not bool((sae.threshold >= 0).any()):  # nothing learned yet
            return topk_indices(pre, self.cfg.k), None
        return threshold_indices(pre, _finite(sae.threshold))

    # ------------------------------------------------------------------------------------------ losses
    def aux_losses(self, sae, x_c, pre, err, dead_mask, losses):
        if self.cfg.aux_coef <= 0:
            return 0.0
        mask = dead_mask
        if self.opt.aux == "aux_zipf":
            under = self.underused(sae, pre.shape[0] * world_size())
            mask = under if mask is None else (mask | under)
        if mask is None:
            return 0.0
        aux = auxk_loss(sae, x_c, pre, err.detach(), mask, self.cfg.k_aux)
        if aux is None:
            return 0.0
        losses[self.opt.aux] = aux
        return self.cfg.aux_coef * aux

    def underused(self, sae, batch: int) -> torch.Tensor:
        """Latents firing below `underuse` × their capacity share m_i / B (our aux_zipf stand-in)."""
        target = self.capacities(sae, batch).to(sae.density.dtype) / batch
        return (sae.density >= 0) & (sae.density < self.opt.underuse * target)

    # ------------------------------------------------------------------------------------------ state
    @torch.no_grad()
    def after_step(self, sae, out, step: int) -> None:
        code = out.code.detach()
        n = self.cfg.n_latents
        active = code.values > 0
        counts = torch.zeros(n, device=code.values.device).index_add_(
            0, code.indices[active], torch.ones(int(active.sum()), device=code.values.device))
        tokens = torch.tensor(float(code.values.shape[0]), device=counts.device)
        if world_size() > 1:
            dist.all_reduce(counts)
            dist.all_reduce(tokens)
        mom = self.opt.density_momentum if bool((sae.density >= 0).all()) else 0.0  # the first batch sets it
        sae.density.mul_(mom).add_((1 - mom) * counts / tokens)
        if step < self.opt.threshold_start_step:
            return
        cut = getattr(self, "last_cut", None)  # this step's per-latent cut (the same on every rank)
        if cut is None:
            return
        cut = cut.clamp_min(0).to(sae.threshold.dtype)
        mom = self.opt.threshold_momentum if bool((sae.threshold >= 0).all()) else 0.0
        sae.threshold.mul_(mom).add_((1 - mom) * cut)
        self.last_cut = None

    @torch.no_grad()
    def calibrate(self, sae, draw) -> dict:
        """θ_i ← latent i's cut on N more training tokens (all ranks' under torch.distributed), exactly as training
        cuts a batch: with the capacities m_i of a batch of N tokens (Σ m_i = k·N), the midpoint of its m_i-th and
        (m_i+1)-th largest pre-activation, so the sample's mean L0 at inference is k. Column blocks keep the memory
        at N × 256 pre-activations whatever the capacities."""
        world = world_size()
        xs = calibration_inputs(sae, draw, self.opt.calibration_tokens)
        if not xs:
            return {}
        x_c = torch.cat(xs) - sae.b_dec
        n_tok = total = x_c.shape[0]
        if world > 1:  # ranks may hold different counts: agree on the global N
            t = torch.tensor(n_tok, device=x_c.device)
            dist.all_reduce(t)
            total = int(t)
        m = self.capacities(sae, total).to(x_c.device)
        cuts = torch.empty(self.cfg.n_latents, dtype=sae.threshold.dtype, device=x_c.device)
        old = _finite(sae.threshold)
        fired_old = fired_new = 0  # the sample's L0 under the EMA thresholds and the calibrated ones, for the record
        block = 256
        for lo in range(0, self.cfg.n_latents, block):
            hi = min(lo + block, self.cfg.n_latents)
            pre = torch.addmm(sae.b_enc[lo:hi], x_c, sae.W_enc[:, lo:hi])  # [N, block]
            mb = m[lo:hi]
            top = pre.topk(min(int(mb.max()) + 1, pre.shape[0]), dim=0, sorted=True).values
            if world > 1:
                top = gather_rows(top).topk(min(int(mb.max()) + 1, total), dim=0, sorted=True).values
            last = top.shape[0] - 1
            upper = top.gather(0, (mb - 1).clamp_max(last).unsqueeze(0)).squeeze(0)
            lower = top.gather(0, mb.clamp_max(last).unsqueeze(0)).squeeze(0)
            cuts[lo:hi] = torch.where(mb <= last, (upper + lower) / 2, upper).clamp_min(0)
            fired_old += int((pre > old[lo:hi]).sum())
            fired_new += int((pre > cuts[lo:hi]).sum())
        sae.threshold.copy_(cuts)
        return {"tokens": total, "l0_ema_thresholds": fired_old / n_tok, "l0_calibrated": fired_new / n_tok}

    def saelens_export(self, sae) -> dict:
        if not bool((sae.threshold >= 0).any()):
            return super().saelens_export(sae)
        big = torch.finfo(sae.threshold.dtype).max  # never fires (SAELens refuses inf)
        theta = torch.where(sae.threshold >= 0, sae.threshold, torch.full_like(sae.threshold, big))
        return {"architecture": "jumprelu", "cfg": {}, "tensors": {"threshold": theta.detach()}}


# -------------------------------------------------------------------------------------------------- shared pieces
def _finite(threshold: torch.Tensor) -> torch.Tensor:
    """Thresholds with the unlearned ones (−1) at +inf: such a latent never fires."""
    return torch.where(threshold >= 0, threshold, torch.full_like(threshold, float("inf")))


def capacities(total: int, batch: int, n: int, kind: str = "uniform", exponent: float = 1.0,
               density: torch.Tensor | None = None) -> torch.Tensor:
    """Per-latent capacities m_i (long [n]) summing to `total` (= k·B), each in [1, batch] (so the sum may move
    slightly when a clamp bites). uniform: total // n each, the remainder one each over the first latents; zipf:
    ∝ rank^(−s), rank 1 = the highest firing density (ties by index), largest-remainder rounding."""
    device = density.device if density is not None else "cpu"
    if kind == "uniform":
        m = torch.full((n,), total // n, dtype=torch.long, device=device)
        m[: total % n] += 1
    else:
        order = torch.argsort(-density.double(), stable=True) if density is not None else torch.arange(n)
        w = torch.arange(1, n + 1, dtype=torch.float64, device=device).pow(-exponent)
        share = w / w.sum() * total
        base = share.floor().long()
        rest = total - int(base.sum())
        base[torch.argsort(-(share - base), stable=True)[:rest]] += 1
        m = torch.empty(n, dtype=torch.long, device=device)
        m[order.to(device)] = base
    return m.clamp(1, batch)


def feature_choice_indices(pre: torch.Tensor, m: torch.Tensor, with_cut: bool = False):
    """Each latent (column) i keeps its m_i largest entries of the batch; packed per token (`pack_rows`):
    (indices, valid), plus with `with_cut` the per-latent cut [n] = the midpoint of its m_i-th and (m_i+1)-th
    largest values (the decision boundary between kept and not kept; the m_i-th when m_i is the whole batch).

    Under torch.distributed the batch is the global one: the cut-off of column i is the m_i-th largest of its
    values on all ranks (each rank contributes its own top m_i + 1), and each rank keeps its entries at or above
    it."""
    B, n = pre.shape
    m = m.to(pre.device)
    M = int(min(int(m.max()) + 1, B))
    top = pre.topk(M, dim=0, sorted=True)  # [M, n]: per column its M best tokens, descending
    ranked = top.values
    if world_size() > 1:
        pooled = gather_rows(top.values.contiguous())
        ranked = pooled.topk(min(int(m.max()) + 1, pooled.shape[0]), dim=0, sorted=True).values  # global ranking
        kth = ranked.gather(0, (m - 1).clamp_max(ranked.shape[0] - 1).unsqueeze(0))  # [1, n]: the m_i-th
        keep = (top.values >= kth) & (torch.arange(M, device=pre.device).unsqueeze(1) < m.unsqueeze(0))
    else:
        keep = torch.arange(M, device=pre.device).unsqueeze(1) < m.unsqueeze(0)
    rows = top.indices[keep]
    cols = torch.arange(n, device=pre.device).unsqueeze(0).expand(M, n)[keep]
    idx, valid = pack_rows(rows, cols, B)
    if not with_cut:
        return idx, valid
    last = ranked.shape[0] - 1
    hi = ranked.gather(0, (m - 1).clamp_max(last).unsqueeze(0)).squeeze(0)
    lo = ranked.gather(0, m.clamp_max(last).unsqueeze(0)).squeeze(0)
    cut = torch.where(m <= last, (hi + lo) / 2, hi)
    return idx, valid, cut.detach()


ARCHITECTURES = (MutualChoice, FeatureChoice)
