"""SAE feature level: attribution to SAE latents and error nodes, sparse feature circuits, faithfulness/completeness.

Nodes (Marks et al. 2024): for each spliced SAE (one per hook) and position t, every latent (t, i) and one error
node (t, err). With the error term kept, the splice x = x̂(f) + e = b + Σ_i f_i d_i + e is the identity map, in value
and in Jacobian, so the model's output is unchanged and the coefficient (gradient, or RelP coefficient) of a node is
the coefficient c of the hook activation projected on the node's direction:
    latent (t, i): c_t · d_i         error (t): c_t                (d_i: decoder row in raw activation space)
Each estimator of `patching` then decomposes exactly over the nodes of a hook:
    IE(t, i) = Σ_pairs (f_c − f_r)_{t,i} · (c_t · d_i)        IE(t, err) = Σ_pairs (e_c − e_r)_t · c_t
with c the gradient at x_r (attribution patching), the RelP coefficient at x_r, or the mean gradient along the
straight line from x_r to x_c (IG; interpolating all latents and the error of a hook jointly is interpolating the
hook activation, since decoding is affine). Activation patching of a node adds its clean-minus-corrupted
contribution (Δf_{t,i} d_i, or Δe_t) to the corrupted run's activation at position t.

Transcoders (read one hook, write another: `sae.cfg.target_hook`): the latents are read from the input hook and
write the target hook, so their nodes live at the target: the splice replaces the target's value y by the
transcoder's output plus the error, y = x̂(f(x_in)) + e with e = y − x̂ (d_i: decoder rows in the target's space,
d_out wide), and every coefficient above is taken at the target hook. A skip-transcoder's linear term W_skip·x_in
is part of x̂ but no node: it is a function of the input hook, recomputed from it wherever the input changes.

Edges u → d between nodes of two spliced hooks (upstream before downstream): IE(u→d) = Σ_pairs ∇_d m · ∂d/∂u · Δu,
one vector–Jacobian product per downstream node (d = f_j(x_down) at its position, or the error there), with the
upstream activation as the differentiated input: ∂d/∂(upstream latent i) = ∂d/∂x_up · d_i. (x_up: where the
upstream latents write; a downstream transcoder's latents are functions of its input hook, its error of both.)

Faithfulness of a circuit C (a set of nodes; evals notes §4): F(C) = (m(C) − m(∅)) / (m(M) − m(∅)) on the clean
prompts, m(C) the mean logit difference with every node outside C mean-ablated (latent values and error vectors
replaced by their mean over the task's clean and corrupted prompts at the same position), m(∅) with all nodes
ablated, m(M) the model. Completeness: F of the complement (C ablated, the rest kept); 0 is complete.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from saelab.errors import ConfigError, SAEFileError
from saelab.eval.patching import (Baseline, baseline, capture, hook_coefficients, last_position_hooks, mean_ld,
                                   pearson)
from saelab.eval.relp import RelPRules, check_fired, rule_hooks
from saelab.eval.splice import decoder_directions, target_hook
from saelab.eval.tasks import TaskBatch


@dataclass
class SAENodes:
    """Node values of one spliced SAE on a task: dense latents f [N, L, n_latents] and error e [N, L, d] for the
    clean and the corrupted prompts; D the raw-space decoder rows [n_latents, d]; bias the raw-space decoder bias.
    `hook`: where the nodes live (the latents write), `read`: the hook the SAE encodes; the same hook for an SAE, a
    transcoder's target and input hooks (d: the target's width)."""

    hook: str
    read: str
    sae: object
    D: torch.Tensor
    bias: torch.Tensor
    f_clean: torch.Tensor
    f_corrupt: torch.Tensor
    e_clean: torch.Tensor
    e_corrupt: torch.Tensor

    @property
    def n_latents(self) -> int:
        return self.D.shape[0]


def check_sae(model, sae) -> None:
    """Refuse an SAE made for another model or width, or at a hook the model lacks."""
    cfg = sae.cfg
    for what, hook in (("hook", cfg.hook_name), ("target hook", target_hook(sae))):
        if hook and hook not in model.hook_dict:
            raise SAEFileError(f"the SAE's {what} {hook!r} does not exist in this model")
    if getattr(cfg, "normalize", "none") not in ("scale", "none"):
        raise SAEFileError(f"SAE normalisation {cfg.normalize!r} rescales each token, so its latents have no fixed "
                           f"raw-space direction to attribute through", hint="use an SAE with normalize scale/none")
    want = getattr(model, "saelab_model_id", None)
    have = getattr(cfg, "model_name", "") or ""
    if want and have and have != want:
        raise SAEFileError(f"the SAE was trained on model {have!r}, not {want!r}",
                           hint=f"pass --model {have}, or an SAE trained on {want}")


def dense_codes(sae, act: torch.Tensor, target: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(f [B, L, n_latents] dense latent values, e [B, L, d] error) of the activation at the hook the SAE reads
    [B, L, *rest]: e = x − x̂ for an SAE; a transcoder's e = target − x̂ [B, L, d_out], `target` the activation at
    its target hook (x̂ its output, a skip-transcoder's W_skip·x included)."""
    B, L = act.shape[:2]
    x = act.reshape(B * L, -1)
    writes = bool(target_hook(sae))
    if writes == (target is None):
        raise ValueError("dense_codes: a transcoder's error needs its target hook's activation (target=), an SAE's "
                         "is its own input's")
    code = sae.encode(x)  # the architecture's selection; encode itself is not differentiable
    if x.requires_grad and torch.is_grad_enabled():
        # active values as a function of x with the support held fixed, by the architecture's own value function
        # (Gated: ∂value/∂pre = exp(r_mag), not 1): the Jacobian edges need; the values themselves are unchanged
        from saelab.sae.code import SparseCode

        values = sae.arch.support_values(sae, sae.normalize_input(x)[0], code)
        code = SparseCode(code.indices, values, code.norm)
    x_hat = sae.decode(code, x) if writes else sae.decode(code)
    f = code.to_dense(sae.cfg.n_latents)
    y = target.reshape(B * L, -1) if writes else x
    return f.view(B, L, -1), (y - x_hat).view(B, L, -1)


def site_codes(sae, acts: dict, read: str, hook: str) -> tuple[torch.Tensor, torch.Tensor]:
    """`dense_codes` of the activations `acts` captured at the hook the SAE reads and (a transcoder's) writes."""
    return dense_codes(sae, acts[read], acts[hook] if hook != read else None)


def decoder_bias(sae, D: torch.Tensor) -> torch.Tensor:
    """The raw-space output of the empty code [d] (a skip-transcoder's, for a zero input: its W_skip·x is no
    constant)."""
    from saelab.sae.code import SparseCode

    p = next(sae.parameters())
    code = SparseCode(torch.zeros(1, 1, dtype=torch.long, device=p.device), torch.zeros(1, 1, dtype=p.dtype,
                                                                                         device=p.device))
    x0 = torch.zeros(1, sae.cfg.d_in, dtype=p.dtype, device=p.device)
    return (sae.decode(code, x0) if target_hook(sae) else sae.decode(code))[0].float().to(D.device)


@torch.no_grad()
def sae_nodes(model, batch: TaskBatch, saes: list) -> list[SAENodes]:
    for sae in saes:
        check_sae(model, sae)
    reads = [s.cfg.hook_name for s in saes]
    hooks = [target_hook(s) or s.cfg.hook_name for s in saes]  # where each one's nodes live
    wanted = list(dict.fromkeys(reads + hooks))
    _, clean = capture(model, batch.clean, wanted)
    _, corrupt = capture(model, batch.corrupted, wanted)
    out = []
    for sae, r, h in zip(saes, reads, hooks):
        D = decoder_directions(sae).float()
        fc, ec = site_codes(sae, clean, r, h)
        fr, er = site_codes(sae, corrupt, r, h)
        out.append(SAENodes(h, r, sae, D, decoder_bias(sae, D), fc, fr, ec, er))
    return out


# ================================================================================================ coefficients
def node_effects(nodes: SAENodes, coef: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(latent IE [L, n_latents], error IE [L]) from the hook coefficient c [N, L, *rest]."""
    c = coef.reshape(*coef.shape[:2], -1).float()
    lat = ((nodes.f_clean - nodes.f_corrupt) * (c @ nodes.D.T)).sum(0)
    err = ((nodes.e_clean - nodes.e_corrupt) * c).sum((0, 2))
    return lat, err


# ================================================================================================ ground truth
def changed_nodes(nodes: SAENodes) -> tuple[torch.Tensor, torch.Tensor]:
    """(latent nodes [n, 2] as (position, latent) whose value differs in some pair, error positions [m] whose
    error differs): every other node has activation-patching effect exactly 0."""
    lat = (nodes.f_clean != nodes.f_corrupt).any(0).nonzero()
    err = (nodes.e_clean != nodes.e_corrupt).any(0).any(-1).nonzero()[:, 0]
    return lat, err


@torch.no_grad()
def node_activation_patching(model, batch: TaskBatch, nodes: SAENodes, latents: torch.Tensor,
                             errors: torch.Tensor, base: Baseline, max_rows: int = 512, progress=None
                             ) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalised metric with each node's clean contribution patched into the corrupted run (batched copies).
    latents [n, 2] (position, latent), errors [m] positions → (effects [n], effects [m])."""
    N, L = batch.n_pairs, batch.length
    d = nodes.D.shape[1]
    jobs = [("lat", int(p), int(i)) for p, i in latents.tolist()] + [("err", int(p), -1) for p in errors.tolist()]
    per_fwd = max(1, max_rows // N)
    eff = torch.empty(len(jobs))
    last = last_position_hooks(model)
    dF = nodes.f_clean - nodes.f_corrupt
    dE = nodes.e_clean - nodes.e_corrupt
    for k0 in range(0, len(jobs), per_fwd):
        chunk = jobs[k0:k0 + per_fwd]
        c = len(chunk)
        delta = torch.zeros(c, N, L, d)
        for k, (kind, p, i) in enumerate(chunk):
            delta[k, :, p] = dF[:, p, i, None] * nodes.D[i] if kind == "lat" else dE[:, p]

        def add(act, hook, delta=delta, c=c):
            return (act.reshape(c, N, L, d) + delta.to(act.dtype)).reshape(act.shape)

        logits = model.run_with_hooks(batch.corrupted.repeat(c, 1), fwd_hooks=[(nodes.hook, add)] + last)
        eff[k0:k0 + c] = base.normalise(mean_ld(logits, batch)).float()
        if progress:
            progress(c)
    n = latents.shape[0]
    return eff[:n], eff[n:]


# ================================================================================================ edges
def edges(model, batch: TaskBatch, up: SAENodes, down: SAENodes, down_nodes: list[tuple[int, int]],
          up_nodes: list[tuple[int, int]], base: Baseline, method: str = "attribution",
          rules: RelPRules | None = None) -> torch.Tensor:
    """IE(u→d) [len(down_nodes), len(up_nodes)] by vector–Jacobian products on the corrupted run; nodes are
    (position, latent) with latent −1 for the error node."""
    if method not in ("attribution", "relp"):
        raise ConfigError(f"edges: method {method!r}; use attribution or relp")
    extra, fired = rule_hooks(model, rules or RelPRules()) if method == "relp" else ([], {})
    box: dict = {}

    def leaf(act, hook):
        box["up"] = act.detach().requires_grad_(True)
        return box["up"]

    def grab(name):  # keyed by the name asked for (a bridge's hook may carry another, aliased name)
        def keep(act, hook):
            box[name] = act
            return act
        return keep

    grabs = [(h, grab(h)) for h in dict.fromkeys((down.read, down.hook))]  # a transcoder reads one, writes another
    with torch.enable_grad():
        logits = model.run_with_hooks(batch.corrupted, fwd_hooks=[(up.hook, leaf)] + grabs + extra)
        if method == "relp":
            check_fired(rules or RelPRules(), fired)
        metric = base.normalise(mean_ld(logits, batch)).sum()
        x_down = box[down.hook]
        (g_down,) = torch.autograd.grad(metric, x_down, retain_graph=True)
        g_down = g_down.reshape(*x_down.shape[:2], -1)
        f_down, e_down = site_codes(down.sae, box, down.read, down.hook)
        dF, dE = up.f_clean - up.f_corrupt, up.e_clean - up.e_corrupt
        out = torch.zeros(len(down_nodes), len(up_nodes))
        for r, (t, j) in enumerate(down_nodes):
            if j >= 0:  # ∇_d m = c_t · d_j; d = f_j at position t
                s = (f_down[:, t, j] * (g_down[:, t] @ down.D[j])).sum()
            else:
                s = (e_down[:, t] * g_down[:, t]).sum()
            if not s.requires_grad:
                continue
            (G,) = torch.autograd.grad(s, box["up"], retain_graph=True)
            G = G.reshape(*G.shape[:2], -1).float()
            for col, (tu, i) in enumerate(up_nodes):
                out[r, col] = ((dF[:, tu, i] * (G[:, tu] @ up.D[i])).sum() if i >= 0
                               else (dE[:, tu] * G[:, tu]).sum())
    return out.detach()


# ================================================================================================ faithfulness
@torch.no_grad()
def faithfulness_curve(model, batch: TaskBatch, all_nodes: list[SAENodes], scores: list[tuple[torch.Tensor,
                       torch.Tensor]], sizes: list[int] | None = None, max_rows: int = 512) -> dict:
    """Faithfulness and completeness of the top-n nodes by |score| (over all spliced SAEs) for each n in `sizes`.
    scores: per SAE (latent IE [L, n_latents], error IE [L])."""
    flat = torch.cat([torch.cat([lat.flatten(), err]) for lat, err in scores]).abs()
    n_total = flat.numel()
    n_nonzero = int((flat > 0).sum())
    if sizes is None:
        sizes = sorted({0, *[min(n_nonzero, 2 ** k) for k in range(int(math.log2(max(1, n_nonzero))) + 1)],
                        n_nonzero})
    order = torch.argsort(flat, descending=True, stable=True)
    N = batch.n_pairs
    means = []
    for nd in all_nodes:
        means.append(((torch.cat([nd.f_clean, nd.f_corrupt]).mean(0)), torch.cat([nd.e_clean, nd.e_corrupt]).mean(0)))

    def keep_masks(n, complement):
        keep = torch.zeros(n_total, dtype=torch.bool)
        keep[order[:n]] = True
        if complement:
            keep = ~keep
        out, k = [], 0
        for nd in all_nodes:
            L, n_lat = nd.f_clean.shape[1], nd.n_latents
            lat = keep[k:k + L * n_lat].view(L, n_lat)
            k += L * n_lat
            err = keep[k:k + L]
            k += L
            out.append((lat, err))
        return out

    # every run: one mask set; batched as stacked copies of the clean prompts
    runs = [keep_masks(n_total, False), keep_masks(0, False)]
    runs += [keep_masks(n, False) for n in sizes] + [keep_masks(n, True) for n in sizes]
    lds = []
    per_fwd = max(1, max_rows // N)
    for start in range(0, len(runs), per_fwd):
        chunk = runs[start:start + per_fwd]
        c = len(chunk)

        def make(idx, nd):
            f_mean, e_mean = means[idx]
            lat_keep = torch.stack([m[idx][0] for m in chunk])  # [c, L, n_lat]
            err_keep = torch.stack([m[idx][1] for m in chunk])  # [c, L]
            box = {}

            def read(act, hook):  # a transcoder's input, as this (ablated) run computes it
                box[nd.read] = act
                return act

            def ablate(act, hook):
                B, L = act.shape[:2]
                box[nd.hook] = act
                f, e = site_codes(nd.sae, box, nd.read, nd.hook)
                f = f.view(c, N, L, -1)
                e = e.view(c, N, L, -1)
                f_new = torch.where(lat_keep[:, None], f, f_mean[None, None])
                e_new = torch.where(err_keep[:, None, :, None], e, e_mean[None, None])
                # act = x̂ + e: swap the ablated nodes' values (the rest of x̂, a skip term included, stays live)
                x = act.reshape(c, N, L, -1).float() + (f_new - f) @ nd.D + (e_new - e)
                return x.reshape(act.shape).to(act.dtype)
            return ([(nd.read, read)] if nd.read != nd.hook else []) + [(nd.hook, ablate)]

        fwd = [h for i, nd in enumerate(all_nodes) for h in make(i, nd)] + last_position_hooks(model)
        logits = model.run_with_hooks(batch.clean.repeat(c, 1), fwd_hooks=fwd)
        lds.append(mean_ld(logits, batch).float())
    lds = torch.cat(lds)
    m_full, m_empty = float(lds[0]), float(lds[1])
    den = m_full - m_empty
    k = len(sizes)
    faith = [(float(v) - m_empty) / den if den else None for v in lds[2:2 + k]]
    compl = [(float(v) - m_empty) / den if den else None for v in lds[2 + k:2 + 2 * k]]
    return {"sizes": list(sizes), "faithfulness": faith, "completeness": compl, "m_full": m_full,
            "m_empty": m_empty, "n_nodes": n_total, "n_nonzero": n_nonzero}


# ================================================================================================ all together
def feature_attribution(model, batch: TaskBatch, saes: list, methods=("activation", "attribution", "relp", "ig"),
                        rules: RelPRules = RelPRules(), ig_steps: int = 10, max_ap_nodes: int = 2000,
                        base: Baseline | None = None, seed: int = 0, progress=None) -> dict:
    """Node effects of every method at every SAE, their Pearson r against activation patching (over the nodes
    patched), and the per-node tables. Activation patching runs on every node whose value changes between clean
    and corrupted prompts (all others have effect 0), or on a seeded uniform sample of `max_ap_nodes` of them."""
    base = base or baseline(model, batch)
    nodes = sae_nodes(model, batch, saes)
    hooks = [n.hook for n in nodes]
    est = {}
    for method in methods:
        if method == "activation":
            continue
        coef, _, _ = hook_coefficients(model, batch, hooks, base, method, rules, ig_steps)
        est[method] = [node_effects(nd, coef[nd.hook]) for nd in nodes]
    out = {"hooks": hooks, "estimates": est, "nodes": nodes, "truth": None}
    if "activation" in methods:
        gen = torch.Generator().manual_seed(seed)
        truth = []
        for nd in nodes:
            lat, err = changed_nodes(nd)
            if lat.shape[0] + err.shape[0] > max_ap_nodes:
                keep = max(0, max_ap_nodes - err.shape[0])
                lat = lat[torch.randperm(lat.shape[0], generator=gen)[:keep]]
            ap_lat, ap_err = node_activation_patching(model, batch, nd, lat, err, base, progress=progress)
            truth.append({"latents": lat, "errors": err, "ap_latents": ap_lat, "ap_errors": ap_err})
        out["truth"] = truth
        corr = {}
        for method, per_sae in est.items():
            xs, ys = [], []
            for (lat_ie, err_ie), t in zip(per_sae, truth):
                xs += [lat_ie[t["latents"][:, 0], t["latents"][:, 1]], err_ie[t["errors"]]]
                ys += [t["ap_latents"], t["ap_errors"]]
            corr[method] = {"sae_latents": pearson(torch.cat(xs), torch.cat(ys))}
        out["correlation"] = corr
    return out


__all__ = ["SAENodes", "check_sae", "dense_codes", "site_codes", "decoder_bias", "sae_nodes", "node_effects",
           "changed_nodes", "node_activation_patching", "edges", "faithfulness_curve", "feature_attribution"]
