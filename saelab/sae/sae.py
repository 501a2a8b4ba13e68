"""`SparseAutoencoder`: parameters, input normalisation, encode → `SparseCode`, decode, losses, save/load.

Layout follows SAELens: `W_enc [d_in, n_latents]`, `b_enc [n]`, `W_dec [n, d_in]`, `b_dec [d_in]`. `W_enc` is
stored column-major (it is the transpose of a contiguous `[n, d_in]` tensor) so each latent's encoder vector is
contiguous for the sparse encoder backward.

Training forward (one dense GEMM): pre = (x̃ − b_dec) W_enc + b_enc over all latents without autograd; the
architecture selects indices; the selected values get their gradient through `encoder_values` (sparse), the
reconstruction through `sparse_decode` (sparse). x̃ is the normalised input.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn as nn

from saelab.config import SAEConfig, from_dict
from saelab.kernels import encoder_values, sparse_decode
from saelab.sae import topk
from saelab.sae.code import SparseCode

ARCHITECTURES = {"topk": topk}
WEIGHTS_FILE = "sae_weights.safetensors"
CFG_FILE = "cfg.json"
SAELAB_FILE = "saelab.json"
LN_EPS = 1e-5


@dataclass
class SAEOutput:
    x_hat: torch.Tensor  # reconstruction, in the input's (raw) space
    code: SparseCode
    losses: dict[str, torch.Tensor] = field(default_factory=dict)  # "loss" is the total to minimise


class SparseAutoencoder(nn.Module):
    def __init__(self, cfg: SAEConfig, device: str | torch.device = "cpu"):
        super().__init__()
        if not cfg.d_in:
            raise ValueError("SAEConfig.d_in must be set (the activation width) before building the SAE")
        self.cfg = cfg
        self.arch = ARCHITECTURES[cfg.architecture]
        d, n = cfg.d_in, cfg.n_latents
        dtype = getattr(torch, cfg.dtype)
        self.W_enc = nn.Parameter(torch.empty(n, d, device=device, dtype=dtype).T)
        self.b_enc = nn.Parameter(torch.zeros(n, device=device, dtype=dtype))
        self.W_dec = nn.Parameter(torch.empty(n, d, device=device, dtype=dtype))
        self.b_dec = nn.Parameter(torch.zeros(d, device=device, dtype=dtype))
        # E||x̃ − E x̃||² in normalised space: the fixed denominator of the normalised MSE (set from data stats;
        # fixed rather than per batch so the loss is a plain mean over tokens and splits across ranks exactly)
        self.register_buffer("loss_normalizer", torch.ones((), device=device, dtype=torch.float32))
        self._ln_state: tuple[torch.Tensor, torch.Tensor] | None = None
        self.reset_parameters()

    # ------------------------------------------------------------------------------------------ init & hygiene
    @torch.no_grad()
    def reset_parameters(self, seed: int | None = None) -> None:
        """Tied init: unit-norm random decoder rows, encoder = decoder transpose (a copy), zero biases."""
        gen = torch.Generator(device="cpu").manual_seed(seed) if seed is not None else None
        w = torch.randn(self.cfg.n_latents, self.cfg.d_in, generator=gen, dtype=torch.float32)
        w /= w.norm(dim=1, keepdim=True)
        self.W_dec.copy_(w)
        self.W_enc.copy_(w.T)
        self.b_enc.zero_()
        self.b_dec.zero_()

    @torch.no_grad()
    def init_from_data_(self, x: torch.Tensor, mean_sq_norm: float | None = None, var_total: float | None = None,
                        median_samples: int = 32768) -> None:
        """Data-dependent init on a sample of raw activations: the fixed input scale (E||x̃||² = d_in), the loss
        normaliser E||x̃ − E x̃||², and b_dec = geometric median of the sample (OpenAI, dictionary_learning).
        `mean_sq_norm` / `var_total` (raw space, e.g. from cache statistics) override the sample's estimates."""
        x = self._check_input(x).float()
        msn = float(mean_sq_norm) if mean_sq_norm is not None else float(x.pow(2).sum(-1).mean())
        var = float(var_total) if var_total is not None else float((x - x.mean(0)).pow(2).sum(-1).mean())
        if self.cfg.normalize == "scale":
            self.cfg.input_scale = math.sqrt(self.d_in / max(msn, 1e-12))
        x_norm = self.normalize_input(x[:median_samples])
        if self.cfg.normalize == "scale":
            self.loss_normalizer.fill_(var * self.cfg.input_scale ** 2)
        elif self.cfg.normalize == "layer_norm":
            self.loss_normalizer.fill_(float((x_norm - x_norm.mean(0)).pow(2).sum(-1).mean()))
        else:
            self.loss_normalizer.fill_(var)
        self.b_dec.copy_(geometric_median(x_norm).to(self.b_dec.dtype))

    @torch.no_grad()
    def normalize_decoder_(self) -> None:
        self.W_dec /= self.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-12)

    @torch.no_grad()
    def remove_parallel_grad_(self) -> None:
        """Project out of each decoder row's gradient its component along the row (unit-norm constraint)."""
        if self.W_dec.grad is None:
            return
        w, g = self.W_dec, self.W_dec.grad
        g -= (g * w).sum(1, keepdim=True) * w / (w * w).sum(1, keepdim=True).clamp_min(1e-12)

    # ------------------------------------------------------------------------------------------ normalisation
    @property
    def n_latents(self) -> int:
        return self.cfg.n_latents

    @property
    def d_in(self) -> int:
        return self.cfg.d_in

    def normalize_input(self, x: torch.Tensor) -> torch.Tensor:
        if self.cfg.normalize == "layer_norm":
            mu = x.mean(-1, keepdim=True)
            sigma = x.std(-1, keepdim=True, unbiased=False) + LN_EPS
            self._ln_state = (mu, sigma)
            return (x - mu) / sigma
        if self.cfg.normalize == "scale" and self.cfg.input_scale != 1.0:
            return x * self.cfg.input_scale
        return x

    def denormalize_output(self, x_hat: torch.Tensor) -> torch.Tensor:
        if self.cfg.normalize == "layer_norm":
            if self._ln_state is None:
                raise RuntimeError("layer_norm SAE: call encode() before decode() (it keeps each token's μ, σ)")
            mu, sigma = self._ln_state
            return x_hat * sigma + mu
        if self.cfg.normalize == "scale" and self.cfg.input_scale != 1.0:
            return x_hat / self.cfg.input_scale
        return x_hat

    # ------------------------------------------------------------------------------------------ encode / decode
    def preacts(self, x_norm: torch.Tensor) -> torch.Tensor:
        """Dense pre-activations [B, n]: the one dense GEMM of a step."""
        return torch.addmm(self.b_enc, x_norm - self.b_dec, self.W_enc)

    def _values(self, pre: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        return pre.gather(1, indices).relu()

    @torch.no_grad()
    def encode(self, x: torch.Tensor, k: int | None = None) -> SparseCode:
        """Sparse code of raw activations x [B, d_in] (inference: no autograd)."""
        x_norm = self.normalize_input(self._check_input(x))
        pre = self.preacts(x_norm)
        idx = self.arch.select(pre, self.cfg, k=k)
        return SparseCode(idx, self._values(pre, idx))

    def decode(self, code: SparseCode) -> torch.Tensor:
        """Reconstruction in raw activation space (differentiable in the code's values and W_dec)."""
        return self.denormalize_output(sparse_decode(code.indices, code.values, self.W_dec) + self.b_dec)

    def _check_input(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 2 or x.shape[1] != self.d_in:
            raise ValueError(f"SAE expects activations [batch, {self.d_in}] (d_in of hook {self.cfg.hook_name!r}), "
                             f"got {tuple(x.shape)}; flatten [batch, pos, d] inputs with x.reshape(-1, d)")
        return x.to(self.W_dec.dtype)

    # ------------------------------------------------------------------------------------------ training forward
    def forward(self, x: torch.Tensor, grad: torch.Tensor | None = None,
                dead_mask: torch.Tensor | None = None) -> SAEOutput:
        """Reconstruction and losses. `grad` (LM-loss gradient at the hook) is for gradient-TopK only;
        `dead_mask [n]` (bool) enables the AuxK loss on those latents."""
        x_norm = self.normalize_input(self._check_input(x))
        x_c = x_norm - self.b_dec  # b_dec gets gradient through the encoder too
        with torch.no_grad():
            pre = torch.addmm(self.b_enc, x_c, self.W_enc)
        code = self._encode_train(x_c, pre, grad, self.cfg.k)
        x_hat_norm = sparse_decode(code.indices, code.values, self.W_dec) + self.b_dec
        err = x_norm - x_hat_norm
        fvu = err.pow(2).sum(-1).mean() / self.loss_normalizer
        losses = {"fvu": fvu}
        loss = fvu
        if self.cfg.multi_topk:
            code4 = self._encode_train(x_c, pre, grad, min(4 * self.cfg.k, self.n_latents))
            err4 = x_norm - (sparse_decode(code4.indices, code4.values, self.W_dec) + self.b_dec)
            losses["multi_topk_fvu"] = err4.pow(2).sum(-1).mean() / self.loss_normalizer
            loss = loss + losses["multi_topk_fvu"] / 8
        if dead_mask is not None and self.cfg.aux_coef > 0 and bool(dead_mask.any()):
            losses["auxk"] = self._auxk_loss(x_c, pre, err.detach(), dead_mask)
            loss = loss + self.cfg.aux_coef * losses["auxk"]
        losses["loss"] = loss
        return SAEOutput(self.denormalize_output(x_hat_norm), code, losses)

    def _encode_train(self, x_c, pre, grad, k) -> SparseCode:
        idx = self.arch.select(pre, self.cfg, k=k, grad=grad)
        vals = encoder_values(x_c, self.W_enc, self.b_enc, idx, pre.gather(1, idx))
        return SparseCode(idx, vals.relu())

    def _auxk_loss(self, x_c, pre, err, dead_mask) -> torch.Tensor:
        """AuxK (Gao et al.): the top-k_aux dead latents reconstruct the residual, normalised by its variance."""
        dead = dead_mask.nonzero().squeeze(1)
        k_aux = min(self.cfg.k_aux, dead.numel())
        # only the dead columns are ranked: cheap when few latents are dead
        local = pre.index_select(1, dead).topk(k_aux, dim=-1, sorted=False).indices
        idx = dead[local]
        vals = encoder_values(x_c, self.W_enc, self.b_enc, idx, pre.gather(1, idx)).relu()
        e_hat = sparse_decode(idx, vals, self.W_dec)
        denom = (err - err.mean(0)).pow(2).sum(-1).mean().clamp_min(1e-12)
        return torch.nan_to_num((err - e_hat).pow(2).sum(-1).mean() / denom, 0.0)

    # ------------------------------------------------------------------------------------------ save / load
    def folded_state(self) -> dict[str, torch.Tensor]:
        """Weights that act on raw activations: a fixed input scale s is folded in (x̃ = s·x), as SAELens does:
        W_enc ← s·W_enc, W_dec ← W_dec / s, b_dec ← b_dec / s (the code values are unchanged)."""
        s = self.cfg.input_scale if self.cfg.normalize == "scale" else 1.0
        return {
            "W_enc": (self.W_enc.detach() * s).contiguous(),
            "b_enc": self.b_enc.detach().contiguous(),
            "W_dec": (self.W_dec.detach() / s).contiguous(),
            "b_dec": (self.b_dec.detach() / s).contiguous(),
        }

    def save(self, path: str | Path, extra: dict | None = None) -> Path:
        """Write `cfg.json` + `sae_weights.safetensors` (SAELens layout) + `saelab.json`."""
        from safetensors.torch import save_file

        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        save_file(self.folded_state(), str(path / WEIGHTS_FILE))
        cfg = self.cfg
        normalize = "layer_norm" if cfg.normalize == "layer_norm" else "none"
        layer = _hook_layer(cfg.hook_name)
        saelens = {
            "architecture": cfg.architecture, "d_in": cfg.d_in, "d_sae": cfg.n_latents, "k": cfg.k,
            "dtype": cfg.dtype, "device": "cpu", "apply_b_dec_to_input": True,
            "normalize_activations": normalize, "rescale_acts_by_decoder_norm": False, "reshape_activations": "none",
            "model_name": cfg.model_name, "hook_name": cfg.hook_name, "hook_layer": layer,
            "metadata": {"model_name": cfg.model_name, "hook_name": cfg.hook_name, "hook_layer": layer,
                         "sae_lens_training_version": None, "saelab": True},
        }
        (path / CFG_FILE).write_text(json.dumps(saelens, indent=2))
        saved_cfg = asdict(cfg)
        saved_cfg.update(normalize=normalize if cfg.normalize != "layer_norm" else "layer_norm", input_scale=1.0)
        info = {"format": 1, "sae": saved_cfg, "folded_input_scale": cfg.input_scale if cfg.normalize == "scale" else None}
        info.update(extra or {})
        (path / SAELAB_FILE).write_text(json.dumps(info, indent=2, default=_json_default))
        return path

    @classmethod
    def load(cls, path: str | Path, device: str | torch.device = "cpu") -> "SparseAutoencoder":
        """Load from `cfg.json` (+ `saelab.json` when present) and safetensors only; nothing is unpickled."""
        from safetensors.torch import load_file

        path = Path(path)
        weights = path / WEIGHTS_FILE
        if not weights.exists():
            found = sorted(p.name for p in path.iterdir()) if path.is_dir() else []
            raise FileNotFoundError(f"{path}: no {WEIGHTS_FILE} (found {found}); saelab loads SAEs only from "
                                    f"safetensors + JSON, never from pickles (.pt/.pkl)")
        if (path / SAELAB_FILE).exists():
            cfg = from_dict(SAEConfig, json.loads((path / SAELAB_FILE).read_text())["sae"])
        else:  # a plain SAELens TopK SAE
            raw = json.loads((path / CFG_FILE).read_text())
            meta = raw.get("metadata") or {}
            if raw.get("architecture", "topk") not in ARCHITECTURES:
                raise ValueError(f"{path}: architecture {raw.get('architecture')!r} is not supported by saelab "
                                 f"(supported: {sorted(ARCHITECTURES)})")
            norm = raw.get("normalize_activations", "none")
            cfg = SAEConfig(architecture=raw.get("architecture", "topk"), d_in=raw["d_in"], n_latents=raw["d_sae"],
                            k=raw.get("k") or raw.get("activation_fn_kwargs", {}).get("k", 32),
                            hook_name=raw.get("hook_name") or meta.get("hook_name", ""),
                            model_name=raw.get("model_name") or meta.get("model_name", ""),
                            normalize="layer_norm" if norm == "layer_norm" else "none")
        sae = cls(cfg, device=device)
        state = load_file(str(weights), device=str(device))
        expect = {"W_enc": (cfg.d_in, cfg.n_latents), "b_enc": (cfg.n_latents,), "W_dec": (cfg.n_latents, cfg.d_in),
                  "b_dec": (cfg.d_in,)}
        for name, shape in expect.items():
            if name not in state or tuple(state[name].shape) != shape:
                got = tuple(state[name].shape) if name in state else "missing"
                raise ValueError(f"{weights}: {name} should be {shape} for d_in={cfg.d_in}, "
                                 f"n_latents={cfg.n_latents}, got {got}")
        with torch.no_grad():
            for name in expect:
                getattr(sae, name).copy_(state[name])
        return sae


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


def _hook_layer(hook_name: str) -> int | None:
    from saelab.models.loading import hook_layer

    return hook_layer(hook_name)


def _json_default(o):
    if isinstance(o, torch.Tensor):
        return o.tolist()
    if isinstance(o, float) and not math.isfinite(o):
        return None
    return str(o)
