"""BatchTopK (Bussmann, Leask, Nanda 2024): the k·B largest pre-activations of the whole batch, so a token uses as
many latents as it needs and the batch's mean L0 is exactly k. Inference is batch-independent: a JumpReLU at a
global threshold θ learned during training as an EMA of the smallest value kept in each batch (dictionary_learning);
until θ is learned (θ < 0), `encode` falls back to per-token TopK. SAELens sees it as JumpReLU + `threshold`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from saelab.sae.architectures import Architecture, batch_topk_indices, option, threshold_indices, topk_indices


@dataclass
class BatchTopKOptions:
    threshold_momentum: float = option(0.99, "EMA momentum of the inference threshold θ (dictionary_learning uses "
                                             "0.999 over 10^5 steps; 0.99 averages the last ~100 steps)")
    threshold_start_step: int = option(0, "first step whose batch minimum enters θ")

    def __post_init__(self):
        from saelab.config import check

        check(0 <= self.threshold_momentum < 1, "threshold_momentum", f"must be in [0, 1), got {self.threshold_momentum}")
        check(self.threshold_start_step >= 0, "threshold_start_step", f"must be >= 0, got {self.threshold_start_step}")


class BatchTopK(Architecture):
    name = "batchtopk"
    help = "BatchTopK (Bussmann et al. 2024): top k·B over the batch; inference by a learned global threshold"
    Options = BatchTopKOptions

    def init_state(self, sae) -> None:
        # one value per latent (all equal here) so the buffer is SAELens's JumpReLU `threshold` as it is; -1: unset
        sae.register_buffer("threshold", torch.full((self.cfg.n_latents,), -1.0, device=sae.W_dec.device))

    def select(self, sae, pre, grad, k):
        return batch_topk_indices(pre, k)

    def select_inference(self, sae, pre, grad):
        if float(sae.threshold[0]) < 0:  # not learned yet
            return topk_indices(pre, self.cfg.k), None
        return threshold_indices(pre, sae.threshold)

    @torch.no_grad()
    def after_step(self, sae, out, step: int) -> None:
        if step < self.opt.threshold_start_step:
            return
        kept = out.code.values.detach()
        m = kept[kept > 0].min() if bool((kept > 0).any()) else kept.new_tensor(float("inf"))
        if dist.is_available() and dist.is_initialized():  # the batch is global: its minimum too
            dist.all_reduce(m, op=dist.ReduceOp.MIN)
        if not torch.isfinite(m):
            return
        if float(sae.threshold[0]) < 0:
            sae.threshold.fill_(float(m))
        else:
            mom = self.opt.threshold_momentum
            sae.threshold.mul_(mom).add_((1 - mom) * m.to(sae.threshold.dtype))

    def saelens_export(self, sae) -> dict:
        if float(sae.threshold[0]) < 0:  # θ not learned yet: inference is TopK, so tell SAELens the same
            return super().saelens_export(sae)
        return {"architecture": "jumprelu", "cfg": {}, "tensors": {"threshold": sae.threshold.detach()}}


ARCHITECTURE = BatchTopK
