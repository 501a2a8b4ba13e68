"""Gated SAE (Rajamanoharan et al. 2024, arXiv 2404.16014): which latents fire and how strongly are two paths that
share their encoder directions.

    π_gate = (x̃ − b_dec)·W_gate + b_gate                       W_gate is the SAE's W_enc, b_gate its b_enc
    π_mag  = (x̃ − b_dec)·W_mag + b_mag,  W_mag = exp(r_mag) ⊙ W_gate   (the r_mag tie: one scale per latent)
    f      = 1[π_gate > 0] ⊙ ReLU(π_mag),   x̂ = f·W_dec + b_dec
    loss   = (‖x̃ − x̂‖² + λ·Σ_i ReLU(π_gate)_i·‖W_dec,i‖ + ‖x̃ − (ReLU(π_gate)·W̄_dec + b̄_dec)‖²) / E‖x̃ − E x̃‖²

The Heaviside gate passes no gradient, so the gate path learns only from the sparsity penalty and the auxiliary
reconstruction, which decodes ReLU(π_gate) through a frozen copy of the decoder (W̄, b̄: detached) so that it trains
the gate without pulling the decoder. π_mag needs no second GEMM: it is exp(r_mag)·(π_gate − b_gate) + b_mag on the
gate's support, where alone f can be non-zero.

The paper keeps decoder rows at unit norm; SAELens 6.54 instead weighs the penalty by the decoder norms and leaves
them free, as Anthropic's ReLU recipe does, and so does saelab (decoder rows start at norm 0.1, not renormalised;
λ warm-up; λ in the same units as the `relu` architecture's). With free norms the decoder must be frozen in both
gate terms or in neither (the paper's first author, on the Alignment Forum): SAELens 6.54 uses the live decoder in
both; saelab keeps the paper's frozen decoder in the auxiliary loss, so the norms in the penalty are frozen too.

The gate's support {π_gate > 0} runs packed or dense exactly as a ReLU SAE's does (`relu.Support`).
SAELens sees the SAE as its "gated" architecture: W_enc, b_gate, r_mag, b_mag, W_dec, b_dec.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from saelab.sae.architectures import fvu, on_support
from saelab.sae.code import SparseCode
from saelab.sae.relu import ReLU, Support, weighted_l1


class Gated(ReLU):
    name = "gated"
    help = ("Gated SAE (Rajamanoharan et al. 2024): a gate path picks the latents, a magnitude path (W_mag = "
            "exp(r_mag)·W_gate) sets their values; decoder-norm-weighted penalty on the gate, auxiliary loss")

    def init_state(self, sae) -> None:
        for name in ("r_mag", "b_mag"):
            sae.register_parameter(name, nn.Parameter(torch.zeros(self.cfg.n_latents, dtype=sae.W_dec.dtype,
                                                                  device=sae.W_dec.device)))

    @torch.no_grad()
    def init_parameters(self, sae) -> None:
        super().init_parameters(sae)
        sae.r_mag.zero_()
        sae.b_mag.zero_()

    def magnitudes(self, sae, s: Support, gate: torch.Tensor) -> torch.Tensor:
        """π_mag on the support from π_gate there: exp(r_mag)·(x_c·W_gate) + b_mag."""
        return s.per_latent(sae.r_mag.exp()) * (gate - s.per_latent(sae.b_enc)) + s.per_latent(sae.b_mag)

    def code_train(self, sae, x_c, pre, grad, k=None) -> SparseCode:
        self.support = s = Support.positive(pre)
        self.gate = gate = s.preacts(sae, x_c, pre)
        self.step_values = s.mask(self.magnitudes(sae, s, gate).relu() * (gate > 0))
        return s.code(self.step_values)

    @torch.no_grad()
    def code_inference(self, sae, pre, grad, x_c=None) -> SparseCode:
        s = Support.positive(pre, dense_ok=False)
        return s.code(s.mask(self.magnitudes(sae, s, s.gather(pre)).relu()))

    def support_values(self, sae, x_norm, code) -> torch.Tensor:
        """ReLU(π_mag) on the code's support: ∂value/∂π_gate = exp(r_mag) where active, not 1."""
        s = Support(code.indices, None, self.cfg.n_latents)
        return on_support(code, self.magnitudes(sae, s, sae.preacts(x_norm).gather(1, code.indices)).relu())

    def losses(self, sae, x_norm, x_c, pre, code, grad, dead_mask):
        s, gate, values = self.support, self.support.mask(self.gate.relu()), self.step_values
        x_hat = s.decode(values, sae.W_dec) + sae.b_dec
        frozen = sae.W_dec.detach()
        x_aux = s.decode(gate, frozen) + sae.b_dec.detach()
        losses = {"fvu": fvu(x_norm - x_hat, sae.loss_normalizer),
                  "l1": weighted_l1(s, gate, frozen) / sae.loss_normalizer,
                  "aux_fvu": fvu(x_norm.detach() - x_aux, sae.loss_normalizer)}  # trains the gate alone
        losses["loss"] = losses["fvu"] + self.l1_coef() * losses["l1"] + losses["aux_fvu"]
        self.gate = self.step_values = None
        return x_hat, losses

    def saelens_export(self, sae) -> dict:
        return {"architecture": "gated", "cfg": {}, "rename": {"b_enc": "b_gate"},
                "tensors": {"r_mag": sae.r_mag.detach(), "b_mag": sae.b_mag.detach()}}


ARCHITECTURE = Gated
