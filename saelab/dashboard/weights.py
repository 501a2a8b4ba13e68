"""Views computed from the weights alone: logit lens, decoder-cosine neighbours, the 2-D decoder map.

Logit lens (sae_vis / Neuronpedia convention, as TransformerLens's `fold_ln` + `center_unembed` would give): the
direct effect of a decoder direction d on the logits is ((d − mean(d)) ⊙ γ) W_U, centred over the vocabulary —
the final LayerNorm's centring and gain γ are applied, its per-token 1/σ scale (positive, the same for every
token) is dropped and so is its bias (the same for every latent). With RMSNorm there is no centring of d. Centring
over the vocabulary changes no logit difference, hence no probability.
"""

from __future__ import annotations

import numpy as np
import torch

from saelab.dashboard.stats import bin_index


def unembed_of(model) -> tuple[torch.Tensor, torch.Tensor | None, bool]:
    """(W_U [d_model, V] float32, final-norm gain γ [d_model] or None, whether the final norm centres (LayerNorm)).
    The gain is what the norm multiplies by: its weight, or 1 + weight where TransformerLens says the family's RMSNorm
    is offset (Gemma)."""
    W_U = model.W_U.detach().float().cpu()
    gain = None
    ln = getattr(model, "ln_final", None)
    for obj in (ln, getattr(ln, "_original_component", None)):
        w = getattr(obj, "weight", None) if obj is not None else None
        if isinstance(w, torch.Tensor) and w.shape == (W_U.shape[0],):
            gain = w.detach().float().cpu()
            if getattr(model.cfg, "rmsnorm_uses_offset", False):  # Gemma's RMSNorm multiplies by 1 + w
                gain = gain + 1
            break
    centres = str(getattr(model.cfg, "normalization_type", "LN") or "").upper().startswith("LN")
    return W_U, gain, centres


def logit_effects(directions: torch.Tensor, W_U: torch.Tensor, gain: torch.Tensor | None, centre: bool) -> torch.Tensor:
    """[n, V] direct logit effect of each direction (see the module docstring)."""
    d = directions.float()
    if centre:
        d = d - d.mean(1, keepdim=True)
    if gain is not None:
        d = d * gain
    out = d @ W_U
    return out - out.mean(1, keepdim=True)


def logit_lens(directions: torch.Tensor, W_U, gain, centre: bool, n_logits: int = 10, bins: int = 50,
               chunk: int = 1024) -> dict[str, np.ndarray]:
    """Top and bottom tokens of each direction's logit effect and a B-bin histogram of it over the vocabulary
    (range [min, max] of the latent's effects, the `stats` bin convention)."""
    F, V = directions.shape[0], W_U.shape[1]
    n = min(n_logits, V)
    out = {"logit_top_ids": np.zeros((F, n), np.int32), "logit_top_vals": np.zeros((F, n), np.float32),
           "logit_bottom_ids": np.zeros((F, n), np.int32), "logit_bottom_vals": np.zeros((F, n), np.float32),
           "logit_hist": np.zeros((F, bins), np.uint32), "logit_hist_range": np.zeros((F, 2), np.float32)}
    for a in range(0, F, chunk):
        eff = logit_effects(directions[a:a + chunk], W_U, gain, centre)
        b = a + eff.shape[0]
        top = eff.topk(n, dim=1)
        bot = eff.topk(n, dim=1, largest=False)
        out["logit_top_ids"][a:b], out["logit_top_vals"][a:b] = top.indices.numpy(), top.values.numpy()
        out["logit_bottom_ids"][a:b], out["logit_bottom_vals"][a:b] = bot.indices.numpy(), bot.values.numpy()
        lo, hi = bot.values[:, :1].double(), top.values[:, :1].double()
        j = bin_index(eff.double(), lo, (hi - lo) / bins, bins)
        rows = torch.arange(eff.shape[0]).unsqueeze(1) * bins
        out["logit_hist"][a:b] = torch.bincount((rows + j).reshape(-1), minlength=eff.shape[0] * bins) \
            .view(-1, bins).numpy().astype(np.uint32)
        out["logit_hist_range"][a:b] = torch.cat([lo, hi], 1).float().numpy()
    return out


def decoder_neighbours(directions: torch.Tensor, k: int = 10, chunk: int = 1024) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k decoder-cosine neighbours of every latent (itself excluded), by blocked matmul:
    (ids int32 [F, k], cosines float32 [F, k]); a zero decoder row has cosine 0 with everything."""
    F = directions.shape[0]
    kk = min(k, F - 1)
    ids = np.full((F, k), -1, np.int32)
    cos = np.zeros((F, k), np.float32)
    if kk <= 0:
        return ids, cos
    unit = directions.float() / directions.float().norm(dim=1, keepdim=True).clamp_min(1e-12)
    for a in range(0, F, chunk):
        sims = unit[a:a + chunk] @ unit.T
        r = torch.arange(sims.shape[0])
        sims[r, r + a] = -torch.inf
        top = sims.topk(kk, dim=1)
        ids[a:a + sims.shape[0], :kk] = top.indices.numpy()
        cos[a:a + sims.shape[0], :kk] = top.values.numpy()
    return ids, cos


def decoder_map(directions: torch.Tensor, method: str = "auto", seed: int = 0) -> tuple[np.ndarray, str]:
    """2-D coordinates of the unit decoder directions: UMAP (cosine metric) when `umap-learn` is installed and
    method is "auto" or "umap", else PCA (the top two principal components). Returns (coords [F, 2], method)."""
    unit = directions.float() / directions.float().norm(dim=1, keepdim=True).clamp_min(1e-12)
    F = unit.shape[0]
    if method in ("auto", "umap") and F > 3:
        try:
            import umap  # optional dependency
        except ImportError:
            if method == "umap":
                from saelab.errors import ConfigError

                raise ConfigError("decoder map method 'umap' needs umap-learn", hint="pip install umap-learn, "
                                  "or use --map pca") from None
        else:
            xy = umap.UMAP(n_components=2, metric="cosine", random_state=seed).fit_transform(unit.numpy())
            return np.asarray(xy, dtype=np.float32), "umap"
    centred = unit - unit.mean(0, keepdim=True)
    if F < 2:
        return np.zeros((F, 2), np.float32), "pca"
    _, _, V = torch.linalg.svd(centred.double(), full_matrices=False)
    xy = (centred.double() @ V[:2].T).float()
    # sign convention: the largest-magnitude coordinate of each component is positive (deterministic output)
    flip = torch.sign(xy.gather(0, xy.abs().argmax(0, keepdim=True))).clamp_min(0) * 2 - 1
    xy = xy * flip
    out = np.zeros((F, 2), np.float32)
    out[:, :xy.shape[1]] = xy.numpy()
    return out, "pca"
