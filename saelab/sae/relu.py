"""ReLU SAE with the decoder-norm-weighted L1 penalty (Anthropic, "Circuits Updates – April 2024"):

    f = ReLU((x̃ − b_dec)·W_enc + b_enc),   x̂ = f·W_dec + b_dec,
    loss = (‖x̃ − x̂‖² + λ·Σ_i f_i·‖W_dec,i‖) / E‖x̃ − E x̃‖²

λ rises linearly from 0 over the first `l1_warmup_fraction` of the steps; the decoder rows are not renormalised
(the penalty's ‖W_dec,i‖ factor is what stops the SAE shrinking f by growing the decoder); the decoder rows start
as random directions of norm 0.1 with W_enc = W_decᵀ and b_enc = 0. The loss is Anthropic's divided by a constant
(saelab's FVU denominator), so λ is in their units: inputs are scaled to E‖x̃‖² = d_in as theirs are.
Two departures, both saelab's conventions for every architecture: b_dec starts at the geometric median of the first
batch and is subtracted before encoding (Anthropic: 0, not subtracted), which changes nothing but b_enc's offset;
no AuxK (the recipe has none; latents silent for the dead window are reported, not revived).

The code of a ReLU SAE has no fixed k: a latent is active where its pre-activation is positive. `Support` holds
that set. While it is sparse (at most `DENSE_FRACTION` of the batch's B·n entries) it is packed into rows of K
slots (`saelab.sae.code.PackedRows`: a token with more than K latents continues on overflow rows, so a few wide
tokens do not pad the whole batch) and the step runs on the sparse kernels as TopK's does: padded slots have value
0, read no row and get no gradient; the step's values stay in that layout, and the SparseCode it returns lists them
per token. Early in training (λ still
warming up) about half of all latents are active, where the sparse kernels would do more work than dense GEMMs, so
a dense support runs the step as plain matrix products and its `SparseCode` lists every latent (indices
0..n−1, zeros where inactive). Both are ordinary SparseCodes, so "active = value ≠ 0", L0 and dead-latent counting
hold unchanged; inference always packs (a trained SAE is sparse).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from saelab.kernels import encoder_values, sparse_decode
from saelab.sae.architectures import Architecture, DenseEncoder, fvu, threshold_indices
from saelab.sae.code import PackedRows, SparseCode
from saelab.settings import setting as option

# the densest support the sparse kernels run; above it the dense path is faster. Packed / dense step time at d 256,
# n 4096, B 4096 (2 CPU threads, the two interleaved) with 2, 4, 6, 8, 12 % of the entries active: ReLU 0.61, 0.92,
# 0.99, 1.02, 1.12; Gated (two decodes) 0.39, 0.65, 0.77, 0.78, 0.97
DENSE_FRACTION = 0.06
DECODER_INIT_NORM = 0.1  # Anthropic's (and SAELens's) initial decoder row norm

L1_HELP = ("λ of the sparsity penalty λ·Σ_i a_i·‖W_dec,i‖ (a: the code; Gated: ReLU(π_gate)) in Anthropic's units: "
           "the loss is (‖x̃ − x̂‖² + λ·Σ_i a_i·‖W_dec,i‖) / E‖x̃ − E x̃‖², their loss over a constant, on inputs "
           "scaled to E‖x̃‖² = d_in as theirs are. A latent pays where the residual along its decoder direction "
           "exceeds λ/2, so equal sparsity takes λ ∝ √d_in: Anthropic's ≈ 5 suits wider models than the reference "
           "(d_in 256), where 500k tokens (batch 1024, --lr 1e-3) gave L0 141 of 4096 latents at FVU 0.16 with "
           "λ 2 (Gated: see README)")
WARMUP_HELP = "λ rises linearly from 0 over this fraction of the training steps (Anthropic: 0.05)"


@dataclass
class ReLUOptions:
    l1_coef: float = option(2.0, L1_HELP)
    l1_warmup_fraction: float = option(0.05, WARMUP_HELP)

    def __post_init__(self):
        from saelab.settings import check

        check(self.l1_coef >= 0, "l1_coef", f"must be >= 0, got {self.l1_coef}")
        check(0 <= self.l1_warmup_fraction <= 1, "l1_warmup_fraction",
              f"must be in [0, 1], got {self.l1_warmup_fraction}")


@dataclass
class Support:
    """The latents each token may use, {pre > 0} (JumpReLU's: {pre > θ − ε/2}): packed in kernel rows (`indices
    [R, K]`, `valid`; `rows` their layout, with overflow rows of wide tokens after the B tokens' own; None: row b is
    token b) or every latent (`indices` None: the dense path). Its methods run one piece of a step on either path;
    the step's values are [R, K] packed, [B, n] dense, and `code` lists them per token."""

    indices: torch.Tensor | None
    valid: torch.Tensor | None
    n: int
    rows: PackedRows | None = None

    @classmethod
    def positive(cls, pre: torch.Tensor, dense_ok: bool = True) -> "Support":
        return cls.above(pre, 0.0, dense_ok)

    @classmethod
    def above(cls, pre: torch.Tensor, threshold: torch.Tensor | float, dense_ok: bool = True) -> "Support":
        """{pre > threshold} (a scalar or one per latent [n]; JumpReLU's support is pre > θ − ε/2)."""
        rows, cols = (pre > threshold).nonzero(as_tuple=True)  # one pass: the count, and the packed support
        if dense_ok and rows.numel() > DENSE_FRACTION * pre.numel():
            return cls(None, None, pre.shape[1])
        packed = PackedRows.pack(rows, cols, pre.shape[0])
        return cls(packed.indices, packed.valid, pre.shape[1], packed)

    @property
    def dense(self) -> bool:
        return self.indices is None

    def preacts(self, sae, x_c: torch.Tensor, pre: torch.Tensor) -> torch.Tensor:
        """The pre-activations on the support, with the encoder's gradient (each use of them here is 0 at or below
        the support's threshold: a ReLU, the gate, JumpReLU's step)."""
        if self.dense:
            return DenseEncoder.apply(pre, x_c.detach(), sae.W_enc.T, sae.b_enc, sae.b_pre)
        x_rows = x_c if self.rows is None else self.rows.token_rows(x_c)
        return encoder_values(x_rows, sae.W_enc, sae.b_enc, self.indices, self.gather(pre))

    def gather(self, pre: torch.Tensor) -> torch.Tensor:
        """Pre-activations on the support, without gradient."""
        if self.dense:
            return pre
        return pre.gather(1, self.indices) if self.rows is None else self.rows.gather(pre)

    def per_latent(self, t: torch.Tensor) -> torch.Tensor:
        """A per-latent vector [n] at each slot (differentiable): [R, K] packed, [n] (broadcast) dense. By
        index_select, whose backward is an index_add: 60× faster than an embedding of [n, 1] rows (its backward
        sorts the B·K indices), measured at B 4096, K 92, n 4096."""
        return t if self.dense else t.index_select(0, self.indices.reshape(-1)).view(self.indices.shape)

    def mask(self, values: torch.Tensor) -> torch.Tensor:
        """Zero the padded slots (their index is a stand-in; value 0 means inactive and no gradient)."""
        return values if self.valid is None else values * self.valid

    def decode(self, values: torch.Tensor, W_dec: torch.Tensor) -> torch.Tensor:
        """Σ values·W_dec per token, [B, d]."""
        if self.dense:
            return values @ W_dec
        out = sparse_decode(self.indices, values, W_dec)
        return out if self.rows is None else self.rows.sum_tokens(out)

    def token_mean(self, t: torch.Tensor) -> torch.Tensor:
        """E_tokens Σ_slots t of a tensor in the step's layout."""
        n_tokens = t.shape[0] if self.dense or self.rows is None else self.rows.n_tokens
        return t.sum() / n_tokens

    def code(self, values: torch.Tensor) -> SparseCode:
        """The step's values as a per-token SparseCode (differentiable)."""
        if self.dense:
            every = torch.arange(self.n, device=values.device).expand(values.shape[0], self.n)
            return SparseCode(every, values)
        if self.rows is None:
            return SparseCode(self.indices, values)
        return SparseCode(self.rows.code_indices, self.rows.code_values(values))


def weighted_l1(support: Support, values: torch.Tensor, W_dec: torch.Tensor) -> torch.Tensor:
    """E_tokens Σ_i values_i·‖W_dec,i‖ (values ≥ 0, zero off the support; in the support's layout)."""
    return support.token_mean(values * support.per_latent(W_dec.norm(dim=1)))


class ReLU(Architecture):
    name = "relu"
    help = ("ReLU SAE with the decoder-norm-weighted L1 penalty, λ warm-up and a free decoder (Anthropic, April "
            "2024); saved for SAELens as 'standard'")
    Options = ReLUOptions
    unit_decoder = False

    def __init__(self, cfg):
        super().__init__(cfg)
        self.l1_scale = 1.0  # λ's warm-up factor (begin_step); 1 outside the trainer
        self.support: Support | None = None  # code_train's, for losses of the same step
        self.step_values: torch.Tensor | None = None  # the step's code values in the support's layout

    @torch.no_grad()
    def init_parameters(self, sae) -> None:
        sae.W_dec.mul_(DECODER_INIT_NORM)
        sae.W_enc.mul_(DECODER_INIT_NORM)  # still W_decᵀ where the init tied them

    def begin_step(self, step: int, steps: int) -> None:
        warm = self.opt.l1_warmup_fraction * steps
        self.l1_scale = min(1.0, (step + 1) / warm) if warm > 0 else 1.0

    def l1_coef(self) -> float:
        """λ at this step."""
        return self.opt.l1_coef * self.l1_scale

    def select(self, sae, pre, grad, k):
        return threshold_indices(pre, 0.0)

    def select_inference(self, sae, pre, grad):
        return threshold_indices(pre, 0.0)

    def code_train(self, sae, x_c, pre, grad, k=None) -> SparseCode:
        self.support = s = Support.positive(pre)
        self.step_values = s.mask(s.preacts(sae, x_c, pre).relu())
        return s.code(self.step_values)

    def losses(self, sae, x_norm, x_c, pre, code, grad, dead_mask):
        s, values = self.support, self.step_values
        self.step_values = None
        x_hat = s.decode(values, sae.W_dec) + sae.b_dec
        losses = {"fvu": fvu(x_norm - x_hat, sae.loss_normalizer),
                  "l1": weighted_l1(s, values, sae.W_dec) / sae.loss_normalizer}
        losses["loss"] = losses["fvu"] + self.l1_coef() * losses["l1"]
        return x_hat, losses

    def saelens_export(self, sae) -> dict:
        return {"architecture": "standard", "cfg": {}, "tensors": {}}


ARCHITECTURE = ReLU
