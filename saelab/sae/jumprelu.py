"""JumpReLU, inference only: latent i is active where its pre-activation exceeds its own threshold θ_i, with value
the pre-activation. This is how SAELens saves BatchTopK, Matryoshka-BatchTopK and JumpReLU SAEs, and a plain ReLU
("standard") SAE is the case θ = 0; saelab loads all of them as this architecture. Not trainable here.
"""

from __future__ import annotations

import torch

from saelab.sae.architectures import Architecture, threshold_indices


class JumpReLU(Architecture):
    name = "jumprelu"
    help = "JumpReLU inference (imported SAELens JumpReLU / BatchTopK / ReLU SAEs); not trainable"
    trainable = False

    def init_state(self, sae) -> None:
        sae.register_buffer("threshold", torch.zeros(self.cfg.n_latents, device=sae.W_dec.device))

    def select_inference(self, sae, pre, grad):
        return threshold_indices(pre, sae.threshold.clamp_min(0))

    def select(self, sae, pre, grad, k):
        return self.select_inference(sae, pre, grad)

    def values(self, pre_selected):
        return pre_selected.relu()  # selected entries exceed θ ≥ 0; padding gathers anything and is masked

    def saelens_export(self, sae) -> dict:
        return {"architecture": "jumprelu", "cfg": {}, "tensors": {"threshold": sae.threshold.detach()}}


ARCHITECTURE = JumpReLU
