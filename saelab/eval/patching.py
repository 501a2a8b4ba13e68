"""Component-level patching on a contrast-pair task: activation patching (the ground truth), attribution patching,
RelP and integrated gradients, for residual stream / attention output / MLP output per layer × position and for
each attention head.

Conventions (evals notes §4 and §6)
-----------------------------------
Metric: m(x) = (LD(x) − LD_r) / (LD_c − LD_r), LD the logit difference of `tasks.logit_diff` averaged over the
pairs, LD_c / LD_r its clean / corrupted values, so m = 0 on the corrupted run and 1 on the clean run.
Every method estimates the *denoising* effect of component n (patch its clean activation into the corrupted run):
    activation patching  AP(n)   = m(x_r | do(a_n = a_n(x_c)))                 (one patched copy per component)
    attribution patching AtP(n)  = Σ (a_n(x_c) − a_n(x_r)) · ∂m/∂a_n |_{x_r}     (2 forwards + 1 backward in all)
    RelP                 RelP(n) = Σ (a_n(x_c) − a_n(x_r)) · R̃_n |_{x_r}        (same, R̃ from `relp` rules)
    integrated gradients IG(n)   = Σ (a_n(x_c) − a_n(x_r)) · (1/S) Σ_{k<S} ∂m/∂a_n |_{a = a_r + (k/S)(a_c − a_r)}
The sums run over the component's elements and over the pairs (a component is patched in every pair at once).
IG interpolates the whole activation of one hook (all positions) at once, as Marks et al. do per submodule: one
forward + backward of S·N rows per hook.

Components ("sites"): `resid` blocks.L.hook_resid_pre, `attn` blocks.L.hook_attn_out, `mlp` blocks.L.hook_mlp_out
— one component per (layer, position); `head` blocks.L.attn.hook_z — one component per (layer, head), all positions.
Results are [n_layers, n_positions] (or [n_layers, n_heads]) tensors per kind.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch

from saelab.errors import DataError
from saelab.eval.relp import RelPRules, check_fired, rule_hooks
from saelab.eval.tasks import TaskBatch, logit_diff

KINDS = ("resid", "attn", "mlp", "head")
SITE_HOOKS = {"resid": "blocks.{L}.hook_resid_pre", "attn": "blocks.{L}.hook_attn_out",
              "mlp": "blocks.{L}.hook_mlp_out", "head": "blocks.{L}.attn.hook_z"}
METHODS = ("activation", "attribution", "relp", "ig")


@dataclass(frozen=True)
class Site:
    """One hook whose components are positions (`axis='pos'`) or heads (`axis='head'`, activation [.., L, H, d])."""

    kind: str
    layer: int
    hook: str
    axis: str = "pos"

    def n_components(self, length: int, n_heads: int) -> int:
        return n_heads if self.axis == "head" else length

    def mask(self, j: int, rest: tuple) -> torch.Tensor:
        """Bool mask broadcastable to one row's activation shape `rest`, True on component j."""
        if self.axis == "head":
            m = torch.zeros(1, rest[1], *([1] * (len(rest) - 2)), dtype=torch.bool)
            m[0, j] = True
        else:
            m = torch.zeros(rest[0], *([1] * (len(rest) - 1)), dtype=torch.bool)
            m[j] = True
        return m

    def reduce(self, d: torch.Tensor) -> torch.Tensor:
        """Per-element attribution of one row's shape → per-component sums."""
        if self.axis == "head":
            return d.transpose(0, 1).reshape(d.shape[1], -1).sum(1)
        return d.reshape(d.shape[0], -1).sum(1)


def model_sites(model, kinds=KINDS) -> list[Site]:
    """The sites of `kinds` for every layer of `model` (hooks that the model lacks are left out)."""
    names = set(model.hook_dict.keys())
    out = []
    for kind in kinds:
        if kind not in SITE_HOOKS:
            from saelab.errors import ConfigError

            raise ConfigError(f"components: unknown kind {kind!r}; use any of {list(KINDS)}")
        for layer in range(int(model.cfg.n_layers)):
            hook = SITE_HOOKS[kind].format(L=layer)
            if hook in names:
                out.append(Site(kind, layer, hook, "head" if kind == "head" else "pos"))
    return out


# ================================================================================================ metric
@dataclass(frozen=True)
class Baseline:
    """LD on the clean and the corrupted prompts (means over pairs): the two ends of the normalised metric."""

    ld_clean: float
    ld_corrupted: float

    def normalise(self, ld: torch.Tensor) -> torch.Tensor:
        return (ld - self.ld_corrupted) / (self.ld_clean - self.ld_corrupted)


def mean_ld(logits: torch.Tensor, batch: TaskBatch) -> torch.Tensor:
    """Mean LD per stacked copy: logits of c·N rows → [c]."""
    return logit_diff(logits, batch.answer, batch.wrong).view(-1, batch.n_pairs).mean(1)


def baseline(model, batch: TaskBatch) -> Baseline:
    with torch.no_grad():
        ld_c = float(mean_ld(model(batch.clean), batch)[0])
        ld_r = float(mean_ld(model(batch.corrupted), batch)[0])
    if not math.isfinite(ld_c - ld_r) or abs(ld_c - ld_r) < 1e-6:
        raise DataError(f"task {batch.name!r}: clean and corrupted prompts give the same logit difference "
                        f"({ld_c:.4g} vs {ld_r:.4g}); there is nothing to patch",
                        hint="use pairs whose answers differ (the model must prefer `answer` on clean prompts)")
    return Baseline(ld_c, ld_r)


# ================================================================================================ hooks
def capture(model, tokens: torch.Tensor, hooks: list[str], extra: list | None = None,
            grad: bool = False) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """(logits, {hook: activation}) of one forward. With `grad`, activations stay in the autograd graph (made
    differentiable leaves where the model has no trainable parameters upstream)."""
    acts: dict[str, torch.Tensor] = {}

    def keeper(name):
        def keep(act, hook):
            if grad and not act.requires_grad:
                act = act.detach().requires_grad_(True)
            acts[name] = act if grad else act.detach()
            return act
        return keep

    # extra (rule) hooks first, so a captured activation is the one the rules produced at a shared hook point
    fwd = list(extra or []) + [(h, keeper(h)) for h in hooks]
    with torch.set_grad_enabled(grad):
        logits = model.run_with_hooks(tokens, fwd_hooks=fwd)
    missing = [h for h in hooks if h not in acts]
    if missing:
        raise RuntimeError(f"hooks {missing} did not fire in the forward pass")
    return logits, acts


def _unique_hooks(sites: list[Site]) -> list[str]:
    return list(dict.fromkeys(s.hook for s in sites))


def _group(sites: list[Site], values: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    """Per-site component vectors → {kind: [n_layers_of_kind, n]}."""
    out: dict[str, list] = {}
    for s, v in zip(sites, values):
        out.setdefault(s.kind, []).append(v.detach().float().cpu())
    return {k: torch.stack(v) for k, v in out.items()}


# ================================================================================================ activation patching
@torch.no_grad()
def activation_patching(model, batch: TaskBatch, sites: list[Site], base: Baseline | None = None,
                        max_rows: int = 512, batched: bool = True,
                        progress: Callable[[int], None] | None = None) -> dict[str, torch.Tensor]:
    """Ground truth: the normalised metric with each component's clean activation patched into the corrupted run.

    batched (default): each forward holds `max_rows // n_pairs` patched copies of the corrupted prompts and
    unembeds the last position only (the metric reads nothing else). batched=False: the reference loop, one full
    forward per component. (TransformerBridge's `start_at_layer` still runs the blocks before the start, so
    nothing is gained by starting later.)"""
    base = base or baseline(model, batch)
    N = batch.n_pairs
    n_heads = int(model.cfg.n_heads)
    _, clean = capture(model, batch.clean, _unique_hooks(sites))
    comps = [(i, j) for i, s in enumerate(sites) for j in range(s.n_components(batch.length, n_heads))]
    last_only = last_position_hooks(model) if batched else []
    per_fwd = max(1, max_rows // N) if batched else 1
    effects = torch.empty(len(comps))
    for start in range(0, len(comps), per_fwd):
        chunk = comps[start:start + per_fwd]
        c = len(chunk)
        masks: dict[str, torch.Tensor] = {}
        for k, (i, j) in enumerate(chunk):
            s = sites[i]
            rest = tuple(clean[s.hook].shape[1:])
            if s.hook not in masks:
                masks[s.hook] = torch.zeros(c, *rest, dtype=torch.bool, device=clean[s.hook].device)
            masks[s.hook][k] |= s.mask(j, rest).to(masks[s.hook].device)
        fwd = [(h, _patcher(m, clean[h], c, N)) for h, m in masks.items()] + last_only
        logits = model.run_with_hooks(batch.corrupted.repeat(c, 1), fwd_hooks=fwd)
        effects[start:start + c] = base.normalise(mean_ld(logits, batch)).float().cpu()
        if progress:
            progress(c)
    values, k = [], 0
    for s in sites:
        n = s.n_components(batch.length, n_heads)
        values.append(effects[k:k + n])
        k += n
    return _group(sites, values)


def last_position_hooks(model) -> list:
    """A hook that keeps only the last position before the unembedding (the metric reads nothing else); [] for a
    model without `unembed.hook_in`."""
    if "unembed.hook_in" not in model.hook_dict:
        return []
    return [("unembed.hook_in", lambda act, hook: act[:, -1:])]


def _patcher(mask: torch.Tensor, clean: torch.Tensor, c: int, n: int):
    """Hook: in copy k of the c stacked corrupted batches, elements where mask[k] take the clean activation."""
    def patch(act, hook):
        a = act.view(c, n, *act.shape[1:])
        return torch.where(mask[:, None], clean[None].to(act.dtype), a).view(act.shape)
    return patch


# ================================================================================================ gradient methods
GRADIENT_METHODS = ("attribution", "relp", "ig")


def hook_coefficients(model, batch: TaskBatch, hooks: list[str], base: Baseline, method: str,
                      rules: RelPRules | None = None, steps: int = 10, max_rows: int = 1024,
                      progress: Callable[[int], None] | None = None):
    """(coef, clean, corrupt): {hook: coefficient of m at the hook activation, activation-shaped} and the clean
    and corrupted activations. The coefficient is the gradient at x_r ('attribution'), the RelP coefficient at x_r
    ('relp', two forwards + one backward for all hooks), or the mean gradient over `steps` points of the straight
    line from x_r to x_c, left Riemann sum ('ig', one forward + backward of steps·N rows per hook)."""
    if method not in GRADIENT_METHODS:
        from saelab.errors import ConfigError

        raise ConfigError(f"method: {method!r} is not a gradient method; use one of {list(GRADIENT_METHODS)}")
    _, clean = capture(model, batch.clean, hooks)
    if method in ("attribution", "relp"):
        rules = (rules or RelPRules()) if method == "relp" else None
        extra, fired = rule_hooks(model, rules) if rules is not None else ([], {})
        logits, acts = capture(model, batch.corrupted, hooks, extra=extra, grad=True)
        if rules is not None:
            check_fired(rules, fired)
        metric = base.normalise(mean_ld(logits, batch)).sum()
        grads = torch.autograd.grad(metric, [acts[h] for h in hooks], allow_unused=True)
        coef = {h: (torch.zeros_like(acts[h]) if g is None else g).detach() for h, g in zip(hooks, grads)}
        return coef, clean, {h: a.detach() for h, a in acts.items()}
    _, corrupt = capture(model, batch.corrupted, hooks)
    last = last_position_hooks(model)
    N = batch.n_pairs
    per_fwd = max(1, max_rows // N)
    coef = {}
    for h in hooks:
        a_c, a_r = clean[h], corrupt[h]
        gsum = torch.zeros_like(a_r)
        for k0 in range(0, steps, per_fwd):
            alphas = torch.arange(k0, min(steps, k0 + per_fwd), dtype=a_r.dtype, device=a_r.device) / steps
            s = alphas.numel()
            x = a_r[None] + alphas.view((s,) + (1,) * a_r.dim()) * (a_c - a_r)[None]
            x = x.reshape(s * N, *a_r.shape[1:]).detach().requires_grad_(True)
            fwd = [(h, lambda act, hook, x=x: x.to(act.dtype))] + last
            with torch.enable_grad():
                logits = model.run_with_hooks(batch.corrupted.repeat(s, 1), fwd_hooks=fwd)
                (g,) = torch.autograd.grad(base.normalise(mean_ld(logits, batch)).sum(), x)
            gsum += g.view(s, N, *a_r.shape[1:]).sum(0)
            if progress:
                progress(s)
        coef[h] = gsum / steps
    return coef, clean, corrupt


def gradient_attribution(model, batch: TaskBatch, sites: list[Site], base: Baseline | None = None,
                         method: str = "attribution", rules: RelPRules | None = None, steps: int = 10,
                         max_rows: int = 1024, progress: Callable[[int], None] | None = None
                         ) -> dict[str, torch.Tensor]:
    """Σ (a_c − a_r) · coefficient for every component (`hook_coefficients` gives the coefficient)."""
    base = base or baseline(model, batch)
    coef, clean, corrupt = hook_coefficients(model, batch, _unique_hooks(sites), base, method, rules, steps,
                                             max_rows, progress)
    contrib = {h: ((clean[h] - corrupt[h]) * g).sum(0) for h, g in coef.items()}
    return _group(sites, [s.reduce(contrib[s.hook]) for s in sites])


def attribution_patching(model, batch, sites, base=None):
    """AtP: the first-order Taylor estimate with the true gradient (2 forwards + 1 backward)."""
    return gradient_attribution(model, batch, sites, base, "attribution")


def relp(model, batch, sites, base=None, rules: RelPRules = RelPRules()):
    """RelP: the same estimate with LRP propagation coefficients (`relp.RelPRules`), same cost."""
    return gradient_attribution(model, batch, sites, base, "relp", rules)


def integrated_gradients(model, batch, sites, base=None, steps: int = 10, max_rows: int = 1024, progress=None):
    """IG with `steps` points per hook (the expensive reference estimator)."""
    return gradient_attribution(model, batch, sites, base, "ig", steps=steps, max_rows=max_rows, progress=progress)


# ================================================================================================ agreement
def pearson(x: torch.Tensor, y: torch.Tensor) -> float | None:
    """Pearson r of two flattened tensors (float64); None when either is constant."""
    x, y = x.flatten().double(), y.flatten().double()
    x, y = x - x.mean(), y - y.mean()
    den = float(x.norm() * y.norm())
    return float((x * y).sum()) / den if den > 0 else None


def agreement(results: dict[str, dict[str, torch.Tensor]], truth: str = "activation") -> dict[str, dict]:
    """{method: {kind: Pearson r against `truth`}} for every estimator in `results`."""
    out = {}
    for method, per_kind in results.items():
        if method == truth:
            continue
        out[method] = {k: pearson(v, results[truth][k]) for k, v in per_kind.items() if k in results[truth]}
    return out


__all__ = ["KINDS", "METHODS", "Site", "model_sites", "Baseline", "baseline", "mean_ld", "capture",
           "activation_patching", "hook_coefficients", "gradient_attribution", "attribution_patching", "relp", "integrated_gradients",
           "pearson", "agreement"]
