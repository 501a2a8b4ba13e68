"""AbsTopK ("AbsTopK: Rethinking Sparse Autoencoders for Bidirectional Features", arXiv 2510.00404; ICLR 2026): keep
the k pre-activations of each token that are largest in magnitude, with their signs (no ReLU), so one latent can
stand for a direction and its opposite.

    idx = top-k of |pre| per token,   f = pre on idx (signed),   x̂ = f·W_dec + b_dec

Codes are signed: "active" is value ≠ 0 everywhere in saelab (the sparse kernels read a row for any non-zero value
and give every slot its value gradient). AuxK ranks the dead latents by |pre| and keeps their signs too, as SAELens's
AbsTopK does. SAELens 6.54 has the architecture (`abstopk`, a TopK-family config with k), so it is saved as that.
"""

from __future__ import annotations

from saelab.kernels.topk_stream import abs_key
from saelab.sae.architectures import Architecture, topk_indices


class AbsTopK(Architecture):
    name = "abstopk"
    help = "AbsTopK (arXiv 2510.00404): the k largest |pre-activations| of each token, values keep their sign"
    signed_codes = True
    streams = True

    def select(self, sae, pre, grad, k):
        return topk_indices(pre.abs(), k), None

    def stream_key(self, sae, grad):
        return abs_key

    def values(self, pre_selected):
        return pre_selected

    def saelens_export(self, sae) -> dict:
        return {"architecture": "abstopk", "cfg": {"k": self.cfg.k}, "tensors": {}}


ARCHITECTURE = AbsTopK
