"""An SAE against planted ground truth: decoder recovery, absorption, code recovery, dead latents.

* recovery: per true feature the best |cosine| of a decoder row; `mean_max_cos` and `recovered` (fraction ≥ 0.9);
* `absorption` (MP-SAE paper, Table 1): the mean cosine of each true child's best-matching latent with the true
  parent direction (0: the child latent is the child; high: it absorbed its parent). The latent is oriented along
  its child first: with signed codes (MP's `select` max/abs) −(child + parent) is the same absorbed latent as
  child + parent, and unoriented cosines of the two would cancel in the mean;
* `code_f1`: per true feature, the F1 of "its best-matching latent is active" against "the feature fires";
* `dead`: fraction of latents active on no row.
"""

from __future__ import annotations

import torch

from saelab.synthetic.generator import PlantedData


@torch.no_grad()
def score(sae, data: PlantedData, batch: int = 4096) -> dict:
    W = sae.W_dec.detach().float()
    if sae.cfg.normalize == "scale" and sae.cfg.input_scale != 1.0:
        W = W / sae.cfg.input_scale  # raw-space rows (direction only matters here)
    cos = torch.nn.functional.normalize(W, dim=1) @ data.features.T  # [n_latents, n_true]
    best = cos.abs().max(0)
    match = best.indices  # best latent per true feature
    active = torch.zeros(data.x.shape[0], sae.cfg.n_latents, dtype=torch.bool)
    for s in range(0, data.x.shape[0], batch):
        code = sae.encode(data.x[s:s + batch])
        rows = torch.arange(code.indices.shape[0]).unsqueeze(1).expand_as(code.indices)
        on = code.values != 0
        active[s + rows[on], code.indices[on]] = True
    fires = data.codes > 0
    pred = active[:, match]
    tp = (pred & fires).sum(0).float()
    f1 = 2 * tp / (pred.sum(0) + fires.sum(0)).clamp_min(1).float()
    children = (data.parent >= 0).nonzero().squeeze(1)
    absorb = None
    if children.numel():
        own = cos[match[children], children].sign()  # orient each child's latent along the child
        absorb = own * cos[match[children]].gather(1, data.parent[children].unsqueeze(1)).squeeze(1)
    return {"mean_max_cos": float(best.values.mean()), "recovered": float((best.values >= 0.9).float().mean()),
            "absorption": float(absorb.mean()) if absorb is not None else float("nan"),
            "code_f1": float(f1.mean()), "dead": float((~active.any(0)).float().mean()),
            "l0": float(active.sum(1).float().mean())}
