"""TopK (Gao et al. 2024): keep the k largest pre-activations of each token. The default of every seam hook."""

from __future__ import annotations

from dataclasses import dataclass

from saelab.kernels.topk_stream import relu_key
from saelab.sae.architectures import Architecture, fvu, topk_indices
from saelab.sae.latent_shard import reconstruct, total_latents
from saelab.settings import setting as option


@dataclass
class TopKOptions:
    relu_before_topk: bool = option(False, "rank ReLU'd pre-activations (dictionary_learning); the non-zero set is "
                                           "the same, only which index pads differs when < k are positive")
    multi_topk: bool = option(False, "add the multi-TopK loss L(4k)/8 (Gao et al.) so the SAE stays good at a "
                                     "larger k at test time")


class TopK(Architecture):
    name = "topk"
    help = "TopK (Gao et al. 2024): the k largest pre-activations of each token"
    Options = TopKOptions

    streams = True
    latent_sharding = "token"

    def select(self, sae, pre, grad, k):
        return topk_indices(pre.clamp_min(0) if self.opt.relu_before_topk else pre, k), None

    def stream_key(self, sae, grad):
        return relu_key if self.opt.relu_before_topk else None

    def losses(self, sae, x_norm, x_c, pre, code, grad, dead_mask):
        x_hat, losses = super().losses(sae, x_norm, x_c, pre, code, grad, dead_mask)
        if self.opt.multi_topk:
            code4 = self.code_train(sae, x_c, pre, grad, min(4 * self.cfg.k, total_latents(sae)))
            err4 = x_norm - reconstruct(sae, code4.indices, code4.values)
            losses["multi_topk_fvu"] = fvu(err4, sae.loss_normalizer)
            losses["loss"] = losses["loss"] + losses["multi_topk_fvu"] / 8
        return x_hat, losses


ARCHITECTURE = TopK
