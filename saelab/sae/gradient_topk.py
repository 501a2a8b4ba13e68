"""Gradient-TopK, g-SAE (Olmo et al. 2025): TopK whose *selection* also weighs each latent's first-order effect on
the language-model loss, score_i = z_i + β · z_i · |d_i · g| with g the LM-loss gradient at the hook (in the SAE's
normalised space), d_i the unit decoder direction of latent i (its row over the row's norm: rows are unit in
training, and a saved SAE has its input scale folded into them, so without this the loaded SAE's attribution
would be 1/input_scale times the trained one), z = ReLU(pre); the *values* stay the encoder's z on the chosen set.

Choices the paper leaves open (research notes §2), as options:
* `grad_norm="rms"` (default) divides |d_i · g| by its expected RMS over the batch, √(E_b ||g_b||² / d), so β is
  free of the gradient's scale (loss sum or mean, model, layer) and of d; "none" uses the raw gradient (the cache
  stores the gradient of the next-token CE summed over the forward batch's predicted positions).
* `beta=0` runs TopK's own selection, so it is TopK bit for bit.
* Inference: `encode(x, grad=g)` selects with the gradient (unless `inference_grads=False`); `encode(x)` without a
  gradient falls back to plain TopK, since a gradient needs next-token labels and an LM backward.

Cost: the exact scores need |W_dec g| for every latent, a second dense GEMM the size of the encoder's. With
`candidates=C` the selection is made among each token's top C·k pre-activations only (a sparse B·C·k·d gather-dot
instead of the GEMM): an approximation, exact whenever no latent outside them would win. On the reference model
(1M-token g-SAE, k 32, β 1) it is far from exact: C = 4 picks the exact set for 12 % of tokens (90 % of the
latents agree), C = 8 for 58 % (98 %). So the exact GEMM stays the default, at about twice a TopK step; no cheap
bound certifies the candidates (|d·g| ≤ ||g||, by Cauchy–Schwarz, is ~16× the typical |d·g| at d 256).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from saelab.kernels import ops_for
from saelab.kernels.topk_stream import streaming_topk
from saelab.settings import setting as option
from saelab.sae.topk import TopK, TopKOptions


@dataclass
class GradientTopKOptions(TopKOptions):
    beta: float = option(1.0, "weight of the gradient attribution in the selection score (0 = TopK)")
    grad_norm: str = option("rms", "rms: divide |d·g| by its batch RMS so beta is scale-free; none: raw gradient")
    candidates: int = option(0, "0: exact scores for every latent (a second dense GEMM); C > 0: choose among each "
                                "token's top C·k pre-activations only (cheaper, approximate)")
    inference_grads: bool = option(True, "encode(x, grad=g) selects with the gradient; False: always plain TopK")

    def __post_init__(self):
        from saelab.settings import check

        check(self.beta >= 0, "beta", f"must be >= 0, got {self.beta}")
        check(self.grad_norm in ("rms", "none"), "grad_norm", f"must be rms or none, got {self.grad_norm!r}")
        check(self.candidates >= 0, "candidates", f"must be >= 0, got {self.candidates}")


class GradientTopK(TopK):
    name = "gtopk"
    streams = True
    help = "gradient-TopK / g-SAE (Olmo et al. 2025): TopK selection by z + β·z·|W_dec g| (values stay z)"
    Options = GradientTopKOptions
    needs_grads = True

    def select(self, sae, pre, grad, k):
        if grad is None or self.opt.beta == 0:
            return super().select(sae, pre, grad, k)
        return gradient_topk_indices(pre, grad, sae.W_dec.detach(), k, self.opt.beta, self.opt.grad_norm,
                                     self.opt.candidates), None

    def select_streaming(self, sae, x_c, grad, k):
        if grad is None or self.opt.beta == 0:
            return super().select_streaming(sae, x_c, grad, k)
        W_dec, chunk = sae.W_dec.detach(), self.cfg.encoder_chunk
        C = min(self.cfg.n_latents, self.opt.candidates * k)
        if self.opt.candidates == 0 or C >= self.cfg.n_latents:
            key = gradient_key(grad, W_dec, self.opt.beta, self.opt.grad_norm)
            return *streaming_topk(x_c, sae.W_enc, sae.b_enc, k, chunk, key=key), None
        top_values, top_indices = streaming_topk(x_c, sae.W_enc, sae.b_enc, C, chunk)
        pos = candidate_positions(top_values, top_indices, grad, W_dec, k, self.opt.beta, self.opt.grad_norm)
        return top_values.gather(1, pos), top_indices.gather(1, pos), None

    def select_inference(self, sae, pre, grad):
        return self.select(sae, pre, grad if self.opt.inference_grads else None, self.cfg.k)

    def select_inference_streaming(self, sae, x_c, grad):
        return self.select_streaming(sae, x_c, grad if self.opt.inference_grads else None, self.cfg.k)


def attribution_scale(grad: torch.Tensor, grad_norm: str) -> torch.Tensor:
    """The divisor of |d·g|: √(E_b ||g_b||² / d) for "rms", 1 for "none"."""
    if grad_norm == "none":
        return grad.new_ones(())
    return (grad.pow(2).sum(-1).mean() / grad.shape[1]).sqrt().clamp_min(1e-30)


def gradient_scores(pre: torch.Tensor, att: torch.Tensor, beta: float) -> torch.Tensor:
    """pre + β·ReLU(pre)·att: the paper's z + β·z·att where pre > 0; a negative pre-activation keeps its value, so
    it still ranks below every positive one, exactly as in TopK."""
    return pre + beta * pre.clamp_min(0) * att


def gradient_topk_indices(pre: torch.Tensor, grad: torch.Tensor, W_dec: torch.Tensor, k: int, beta: float,
                          grad_norm: str = "rms", candidates: int = 0) -> torch.Tensor:
    """Indices [B, k] of the top-k gradient scores: exact over all latents (candidates=0), or among each token's
    top candidates·k pre-activations. |d_i · g| is taken along each decoder row's unit direction."""
    n = pre.shape[1]
    C = min(n, candidates * k)
    if candidates == 0 or C >= n:
        return gradient_key(grad, W_dec, beta, grad_norm)(pre, 0, n).topk(k, dim=-1, sorted=False).indices
    top = pre.topk(C, dim=-1, sorted=False)
    return top.indices.gather(1, candidate_positions(top.values, top.indices, grad, W_dec, k, beta, grad_norm))


def gradient_key(grad: torch.Tensor, W_dec: torch.Tensor, beta: float, grad_norm: str):
    """The exact gradient scores of latents s:e from their pre-activations [B, e − s] (a `streaming_topk` key; the
    dense selection is this key over all latents): one GEMM of the gradient with those decoder rows."""
    g = grad.to(W_dec.dtype)
    denom = attribution_scale(grad, grad_norm) * W_dec.norm(dim=1).clamp_min(1e-30)
    return lambda pre, s, e: gradient_scores(pre, (g @ W_dec[s:e].T).abs() / denom[s:e], beta)


def candidate_positions(top_values: torch.Tensor, top_indices: torch.Tensor, grad: torch.Tensor,
                        W_dec: torch.Tensor, k: int, beta: float, grad_norm: str) -> torch.Tensor:
    """Positions [B, k] in each token's candidates (its top pre-activations and their latents) of the k best
    gradient scores, the attributions by a sparse gather-dot."""
    att = ops_for(top_indices, grad, W_dec).gather_dot(top_indices, grad.to(W_dec.dtype).contiguous(), W_dec)
    row_norm = W_dec.norm(dim=1).clamp_min(1e-30)
    scores = gradient_scores(top_values, att.abs() / (attribution_scale(grad, grad_norm) * row_norm[top_indices]), beta)
    return scores.topk(k, dim=-1, sorted=False).indices


ARCHITECTURE = GradientTopK
