"""`SparseAutoencoder`: parameters, input normalisation, encode → `SparseCode`, decode, losses, save/load.

Layout follows SAELens: `W_enc [d_in, n_latents]`, `b_enc [n]`, `W_dec [n, d_in]`, `b_dec [d_in]`. `W_enc` is
stored column-major (it is the transpose of a contiguous `[n, d_in]` tensor) so each latent's encoder vector is
contiguous for the sparse encoder backward.

Training forward (one dense GEMM): pre = (x̃ − b_dec) W_enc + b_enc over all latents without autograd; the
architecture (`saelab.sae.architectures`) selects indices; the selected values get their gradient through
`encoder_values` (sparse), the reconstruction through `sparse_decode` (sparse). x̃ is the normalised input.
With `encoder_chunk` > 0 (TopK-style and batch-level selections) the GEMM and the selection run block by block
instead (`saelab.kernels.topk_stream`, `saelab.sae.batch_select`), in training and in `encode`, so neither holds
[B, n]; same codes, values and gradients.

Per-token normalisations (layer_norm, constant_norm_rescale) return their statistics with the code
(`SparseCode.norm`), so `decode` depends only on its argument, never on an earlier `encode` call.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn

from saelab.config import SAEConfig
from saelab.kernels import sparse_decode
from saelab.sae.architectures import get_architecture
from saelab.sae.code import SparseCode
from saelab.sae.latent_shard import LatentShard, random_rows
from saelab.sae.saelens import load_weights, read_sae_folder, save_sae
from saelab.sae.transcoder import init_state as init_transcoder_state
from saelab.sae.transcoder import init_target, reconstruction_goal, skip_term
from saelab.sae.transcoder import reset as reset_transcoder


@dataclass
class SAEOutput:
    x_hat: torch.Tensor  # reconstruction, in the input's (raw) space
    code: SparseCode
    losses: dict[str, torch.Tensor] = field(default_factory=dict)  # "loss" is the total to minimise


class SparseAutoencoder(nn.Module):
    def __init__(self, cfg: SAEConfig, device: str | torch.device = "cpu", shard: LatentShard | None = None):
        """`shard`: this module is one shard of a latent-parallel SAE (`saelab.sae.latent_shard`), cfg.n_latents
        of its latents."""
        super().__init__()
        if not cfg.d_in:
            raise ValueError("SAEConfig.d_in must be set (the activation width) before building the SAE")
        self.cfg = cfg
        self.shard = shard
        if cfg.target_hook and not cfg.d_out:
            raise ValueError("SAEConfig.d_out must be set (the target hook's width) before building a transcoder")
        self.arch = get_architecture(cfg.architecture)(cfg)
        d, n, d_out = cfg.d_in, cfg.n_latents, cfg.d_out or cfg.d_in  # a transcoder's decoder writes d_out wide
        dtype = getattr(torch, cfg.dtype)
        self.W_enc = nn.Parameter(torch.empty(n, d, device=device, dtype=dtype).T)
        self.b_enc = nn.Parameter(torch.zeros(n, device=device, dtype=dtype))
        self.W_dec = nn.Parameter(torch.empty(n, d_out, device=device, dtype=dtype))
        self.b_dec = nn.Parameter(torch.zeros(d_out, device=device, dtype=dtype))
        init_transcoder_state(self)  # a transcoder's b_in (and W_skip): `saelab.sae.transcoder`
        # E||x̃ − E x̃||² in normalised space: the fixed denominator of the normalised MSE (set from data stats;
        # fixed rather than per batch so the loss is a plain mean over tokens and splits across ranks exactly)
        self.register_buffer("loss_normalizer", torch.ones((), device=device, dtype=torch.float32))
        self.arch.init_state(self)  # the architecture's buffers (e.g. a threshold) join the state_dict
        self.reset_parameters()

    # ------------------------------------------------------------------------------------------ init & hygiene
    @torch.no_grad()
    def reset_parameters(self, seed: int | None = None) -> None:
        """Tied init: unit-norm random decoder rows, encoder = decoder transpose (a copy), zero biases. A transcoder
        whose target is narrower or wider than its input draws unit-norm encoder rows of their own."""
        gen = torch.Generator(device="cpu").manual_seed(seed) if seed is not None else None
        w = random_rows(self, self.W_dec.shape[1], gen)
        w /= w.norm(dim=1, keepdim=True)
        self.W_dec.copy_(w)
        if w.shape[1] != self.d_in:
            w = random_rows(self, self.d_in, gen)
            w /= w.norm(dim=1, keepdim=True)
        self.W_enc.copy_(w.T)
        self.b_enc.zero_()
        self.b_dec.zero_()
        reset_transcoder(self)
        self.arch.init_parameters(self)

    @torch.no_grad()
    def init_from_data_(self, x: torch.Tensor, mean_sq_norm: float | None = None, var_total: float | None = None,
                        median_samples: int = 32768, target: torch.Tensor | None = None,
                        target_stats: dict | None = None) -> None:
        """Data-dependent init on a sample of raw activations: the fixed input scale (E||x̃||² = d_in), the loss
        normaliser E||x̃ − E x̃||², and b_dec = geometric median of the sample (OpenAI, dictionary_learning).
        `mean_sq_norm` / `var_total` (raw space, e.g. from cache statistics) override the sample's estimates.
        A transcoder also takes its target's rows of the same tokens (`target`) and their statistics
        (`target_stats`: mean_sq_norm, var_total): the normaliser and b_dec are the target's, b_in the input's
        median (`saelab.sae.transcoder`)."""
        x = self._check_input(x).float()
        msn = float(mean_sq_norm) if mean_sq_norm is not None else float(x.pow(2).sum(-1).mean())
        var = float(var_total) if var_total is not None else float((x - x.mean(0)).pow(2).sum(-1).mean())
        if self.cfg.normalize == "scale":
            self.cfg.input_scale = math.sqrt(self.d_in / max(msn, 1e-12))
        x_norm, _ = self.normalize_input(x[:median_samples])
        if self.cfg.target_hook:
            ts = target_stats or {}
            y_norm = init_target(self, target, ts.get("mean_sq_norm"), ts.get("var_total"), median_samples)
            self.b_in.copy_(geometric_median(x_norm).to(self.b_in.dtype))
        else:
            y_norm = x_norm
            if self.cfg.normalize == "scale":
                self.loss_normalizer.fill_(var * self.cfg.input_scale ** 2)
            elif self.cfg.normalize in ("layer_norm", "constant_norm_rescale"):
                self.loss_normalizer.fill_(float((x_norm - x_norm.mean(0)).pow(2).sum(-1).mean()))
            else:
                self.loss_normalizer.fill_(var)
        self.b_dec.copy_(geometric_median(y_norm).to(self.b_dec.dtype))
        self.arch.init_from_data(self, x_norm, y_norm)

    @torch.no_grad()
    def normalize_decoder_(self) -> None:
        """Unit-norm decoder rows (a no-op for architectures whose decoder norms are free: `unit_decoder`)."""
        if self.arch.unit_decoder:
            self.W_dec /= self.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-12)

    @torch.no_grad()
    def remove_parallel_grad_(self) -> None:
        """Project out of each decoder row's gradient its component along the row (unit-norm constraint)."""
        if self.W_dec.grad is None or not self.arch.unit_decoder:
            return
        w, g = self.W_dec, self.W_dec.grad
        # row dot products and one fused update: no [n, d] temporaries (4 of them before: 4 GB at n 2^20, d 256)
        along = torch.linalg.vecdot(g, w) / torch.linalg.vecdot(w, w).clamp_min(1e-12)
        g.addcmul_(w, along.unsqueeze(1), value=-1)

    # ------------------------------------------------------------------------------------------ normalisation
    @property
    def n_latents(self) -> int:
        return self.cfg.n_latents

    @property
    def d_in(self) -> int:
        return self.cfg.d_in

    @property
    def b_pre(self) -> torch.Tensor:
        """The bias the encoder subtracts from its input (x_c = x̃ − b_pre): an SAE's b_dec, a transcoder's b_in."""
        return self.b_in if self.cfg.target_hook else self.b_dec

    @property
    def output_scale(self) -> float:
        """normalize "scale": the fixed factor of the decoder's side, the input's for an SAE, the target's for a
        transcoder."""
        return self.cfg.target_scale if self.cfg.target_hook else self.cfg.input_scale

    def decoder_rows(self) -> torch.Tensor:
        """[n_latents, d_out]: what one unit of each latent adds to the output in raw activation space (d_in for an
        SAE; a transcoder's rows live at its target hook): W_dec with "scale" undone. A folder loaded from disk has its
        scales folded in already; a per-token normalisation has no fixed raw direction (its rows are returned as
        trained: callers that need raw directions refuse it, `saelab.eval.splice.decoder_directions`)."""
        w = self.W_dec.detach()
        return w / self.output_scale if self.cfg.normalize == "scale" and self.output_scale != 1.0 else w

    def normalize_input(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple | None]:
        """(x̃, per-token statistics or None): x̃ = (x − shift) / scale for the per-token normalisations."""
        mode = self.cfg.normalize
        if mode == "layer_norm":
            mu = x.mean(-1, keepdim=True)
            # OpenAI's and SAELens's convention: ε only on the way in, x̂·σ + μ on the way out
            sigma = x.std(-1, keepdim=True, unbiased=self.cfg.ln_unbiased)
            return (x - mu) / (sigma + self.cfg.ln_eps), (mu, sigma)
        if mode == "constant_norm_rescale":  # SAELens: x·√d/||x||
            scale = x.norm(dim=-1, keepdim=True) / math.sqrt(self.d_in)
            return x / scale, (torch.zeros_like(scale), scale)
        if mode == "scale" and self.cfg.input_scale != 1.0:
            return x * self.cfg.input_scale, None
        return x, None

    def denormalize_output(self, x_hat: torch.Tensor, norm: tuple | None = None) -> torch.Tensor:
        if self.cfg.normalize in ("layer_norm", "constant_norm_rescale"):
            if norm is None:
                raise ValueError(f"{self.cfg.normalize} SAE: decode needs each token's normalisation statistics; "
                                 f"decode a SparseCode made by this SAE's encode (it carries them in .norm)")
            shift, scale = norm
            return x_hat * scale + shift
        if self.cfg.normalize == "scale" and self.output_scale != 1.0:
            return x_hat / self.output_scale
        return x_hat

    def grad_to_normalized(self, grad: torch.Tensor | None, norm: tuple | None) -> torch.Tensor | None:
        """An LM-loss gradient w.r.t. raw x, expressed w.r.t. x̃ (for per-token normalisations, dL/dx̃ ≈ scale·g,
        ignoring the small term through the statistics themselves)."""
        if grad is None:
            return None
        grad = grad.to(self.W_dec.dtype)
        if norm is not None:
            return grad * norm[1]
        if self.cfg.normalize == "scale" and self.output_scale != 1.0:
            return grad / self.output_scale
        return grad

    # ------------------------------------------------------------------------------------------ encode / decode
    def preacts(self, x_norm: torch.Tensor) -> torch.Tensor:
        """Dense pre-activations [B, n]: the one dense GEMM of a step."""
        return torch.addmm(self.b_enc, x_norm - self.b_pre, self.W_enc)

    @torch.no_grad()
    def encode(self, x: torch.Tensor, grad: torch.Tensor | None = None) -> SparseCode:
        """Sparse code of raw activations x [B, d_in] by the architecture's inference rule (no autograd).
        `grad` (the LM-loss gradient at the hook, [B, d_in]) is used only by gradient-aware architectures."""
        x_norm, norm = self.normalize_input(self._check_input(x))
        pre = self.preacts(x_norm) if self.arch.needs_preacts and not self.cfg.encoder_chunk else None
        code = self.arch.code_inference(self, pre, self.grad_to_normalized(grad, norm), x_c=x_norm - self.b_pre)
        code.norm = norm
        return code

    def decode(self, code: SparseCode, x: torch.Tensor | None = None) -> torch.Tensor:
        """Reconstruction in raw activation space (differentiable in the code's values and W_dec); a transcoder's
        output at its target hook. `x`: the raw input rows the code was made from, which a skip-transcoder's output
        depends on (W_skip·x); ignored otherwise."""
        out = sparse_decode(code.indices, code.values, self.W_dec) + self.b_dec
        if self.cfg.skip:
            out = out + skip_term(self, None if x is None else self.normalize_input(self._check_input(x))[0])
        return self.denormalize_output(out, code.norm)

    def _check_input(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 2 or x.shape[1] != self.d_in:
            raise ValueError(f"SAE expects activations [batch, {self.d_in}] (d_in of hook {self.cfg.hook_name!r}), "
                             f"got {tuple(x.shape)}; flatten [batch, pos, d] inputs with x.reshape(-1, d)")
        return x.to(self.W_dec.dtype)

    # ------------------------------------------------------------------------------------------ training forward
    def forward(self, x: torch.Tensor, grad: torch.Tensor | None = None,
                dead_mask: torch.Tensor | None = None, target: torch.Tensor | None = None) -> SAEOutput:
        """Reconstruction and losses of a training step. `grad` (LM-loss gradient at the hook; a transcoder's: at
        its target hook) is for gradient-aware architectures; `dead_mask [n]` (bool) enables the AuxK loss on those
        latents; `target` [B, d_out]: a transcoder's target activations of the same tokens (its loss's goal)."""
        if not self.arch.trainable:
            raise ValueError(f"architecture {self.arch.name!r} is inference-only (an imported SAE); it cannot be "
                             f"trained")
        x_norm, norm = self.normalize_input(self._check_input(x))
        x_c = x_norm - self.b_pre  # b_pre (an SAE's b_dec) gets gradient through the encoder too
        with torch.no_grad():  # with the streaming encoder (encoder_chunk) the architecture computes it in blocks
            dense = self.arch.needs_preacts and not self.cfg.encoder_chunk
            pre = torch.addmm(self.b_enc, x_c, self.W_enc) if dense else None
        g = self.grad_to_normalized(grad, norm)
        code = self.arch.code_train(self, x_c, pre, g)
        goal, skip = reconstruction_goal(self, x_norm, target)  # an SAE's: x̃ itself
        x_hat_norm, losses = self.arch.losses(self, goal, x_c, pre, code, g, dead_mask)
        if skip is not None:
            x_hat_norm = x_hat_norm + skip
        code.norm = norm
        return SAEOutput(self.denormalize_output(x_hat_norm, norm), code, losses)

    def after_step(self, out: SAEOutput, step: int) -> None:
        """The architecture's state update after an optimizer step (e.g. BatchTopK's threshold EMA)."""
        self.arch.after_step(self, out, step)

    # ------------------------------------------------------------------------------------------ save / load
    def save(self, path: str | Path, extra: dict | None = None, metadata: dict | None = None) -> Path:
        """Write `cfg.json` + `sae_weights.safetensors` (SAELens layout) + `saelab.json` (see `saelab.sae.saelens`);
        `metadata`: SAELens metadata fields the caller knows and the SAE does not (the run's: its hook's layer)."""
        return save_sae(self, path, extra, metadata)

    @classmethod
    def load(cls, path: str | Path, device: str | torch.device = "cpu") -> "SparseAutoencoder":
        """Load a saelab or SAELens folder from safetensors + JSON only; nothing is unpickled (`load_sae`)."""
        return load_sae(path, device=device)


def load_sae(path: str | Path, device: str | torch.device = "cpu") -> SparseAutoencoder:
    """A `SparseAutoencoder` from a saelab folder or a SAELens-saved one: `saelab.sae.saelens` reads the folder, the
    SAE is built from its config and given its weights; a `SAEFileError` names the file for anything missing,
    broken or inconsistent."""
    folder = read_sae_folder(path)
    return load_weights(SparseAutoencoder(folder.cfg, device=device), folder)


def geometric_median(x: torch.Tensor, max_iter: int = 100, tol: float = 1e-5) -> torch.Tensor:
    """Weiszfeld's algorithm: the point minimising the sum of Euclidean distances to the rows of x."""
    x = x.double()
    y = x.mean(0)
    for _ in range(max_iter):
        w = 1.0 / (x - y).norm(dim=1).clamp_min(1e-8)
        y_new = (w[:, None] * x).sum(0) / w.sum()
        if (y_new - y).norm() <= tol * max(1.0, float(y.norm())):
            return y_new.float()
        y = y_new
    return y.float()
