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
from contextlib import contextmanager
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

    batched (default): components whose clean activation equals the corrupted one in every pair (positions before
    the first corrupted token) are no-ops, effect exactly 0, and are not run. The others go layer by layer, up to
    `max_rows // n_pairs` patched copies of the corrupted prompts per forward: the forward runs the N corrupted
    prompts once up to the layer, where the batch becomes the c copies (`_repeat_batch_from`; the blocks before
    it would compute the same rows c times), and unembeds the last position only (the metric reads nothing else).
    A model whose forward does not take the batch growing mid-forward runs all c copies from the embedding.
    batched=False: the reference loop, one full forward per component."""
    base = base or baseline(model, batch)
    N = batch.n_pairs
    n_heads = int(model.cfg.n_heads)
    hooks = _unique_hooks(sites)
    _, clean = capture(model, batch.clean, hooks)
    comps = [(i, j) for i, s in enumerate(sites) for j in range(s.n_components(batch.length, n_heads))]
    effects = torch.zeros(len(comps))
    if batched:
        last_only = last_position_hooks(model)
        corrupt_logits, corrupt = capture(model, batch.corrupted, hooks, extra=last_only)
        # a component equal in the clean and the corrupted run of every pair patches nothing: effect exactly 0
        changed = [s.reduce((clean[s.hook] != corrupt[s.hook]).any(0).float()) > 0 for s in sites]
        live = [k for k, (i, j) in enumerate(comps) if changed[i][j]]
        if progress and len(live) < len(comps):
            progress(len(comps) - len(live))
        grow = _grows_mid_forward(model, batch, last_only, corrupt_logits)
        chunks = _chunks(live, [sites[comps[k][0]].layer for k in live] if grow else None, max(1, max_rows // N))
    else:
        last_only, grow, chunks = [], False, [[k] for k in range(len(comps))]  # the reference: nothing skipped
    for chunk in chunks:
        patched = [comps[k] for k in chunk]
        layer = min(sites[i].layer for i, _ in patched) if grow else None
        effects[chunk] = _patched_effects(model, batch, base, sites, patched, clean, layer, last_only)
        if progress:
            progress(len(chunk))
    values, k = [], 0
    for s in sites:
        n = s.n_components(batch.length, n_heads)
        values.append(effects[k:k + n])
        k += n
    return _group(sites, values)


def _chunks(order: list[int], layers: list[int] | None, per_fwd: int) -> list[list[int]]:
    """`order` cut into forwards of at most per_fwd components. With `layers` (each component's block) sorted and
    cut by layer, so that each forward starts as late as its components allow."""
    if layers is None:
        return [order[k:k + per_fwd] for k in range(0, len(order), per_fwd)]
    by_layer: dict[int, list[int]] = {}
    for k, layer in sorted(zip(order, layers), key=lambda t: t[1]):
        by_layer.setdefault(layer, []).append(k)
    return [g[k:k + per_fwd] for g in by_layer.values() for k in range(0, len(g), per_fwd)]


def _patched_effects(model, batch: TaskBatch, base: Baseline, sites: list[Site], patched: list[tuple[int, int]],
                     clean: dict[str, torch.Tensor], layer: int | None, last_only: list) -> torch.Tensor:
    """Normalised metric of c = len(patched) corrupted runs, copy k with component patched[k] clean: one forward
    of c stacked copies, from `layer` on (None: from the embedding)."""
    c, N = len(patched), batch.n_pairs
    masks: dict[str, torch.Tensor] = {}
    for k, (i, j) in enumerate(patched):
        s = sites[i]
        rest = tuple(clean[s.hook].shape[1:])
        if s.hook not in masks:
            masks[s.hook] = torch.zeros(c, *rest, dtype=torch.bool, device=clean[s.hook].device)
        masks[s.hook][k] |= s.mask(j, rest).to(masks[s.hook].device)
    patch = [(h, _patcher(m, clean[h], c, N)) for h, m in masks.items()] + last_only
    if layer is None:
        logits = model.run_with_hooks(batch.corrupted.repeat(c, 1), fwd_hooks=patch)
    else:
        with _repeat_batch_from(model, layer, c, N) as grow:
            logits = model.run_with_hooks(batch.corrupted, fwd_hooks=grow + patch)  # grow first: same hook point
    return base.normalise(mean_ld(logits, batch)).float().cpu()


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


def _repeat_rows(x, c: int, n: int):
    """x with its batch of n rows stacked c times (copy k = rows k·n..(k+1)·n): tensors of ≥ 2 dims whose first
    is n, inside tuples and lists too; anything else as it is."""
    if torch.is_tensor(x):
        return x.repeat(c, *[1] * (x.dim() - 1)) if x.dim() >= 2 and x.shape[0] == n else x
    if type(x) in (tuple, list):
        return type(x)(_repeat_rows(v, c, n) for v in x)
    return x


@contextmanager
def _repeat_batch_from(model, layer: int, c: int, n: int):
    """Inside, a forward of n rows becomes c stacked copies (c·n rows) at `blocks.{layer}.hook_resid_pre`; yields
    the hook that does it. Every batch-shaped input of the blocks from `layer` on (the attention mask the model
    built for n rows) is stacked too, by a pre-hook on the block modules; models whose blocks are not modules
    called with their inputs need the hook alone."""
    def pre(module, args, kwargs):
        return _repeat_rows(args, c, n), {k: _repeat_rows(v, c, n) for k, v in kwargs.items()}

    blocks = list(getattr(model, "blocks", []))[layer:]
    handles = [b.register_forward_pre_hook(pre, with_kwargs=True) for b in blocks if isinstance(b, torch.nn.Module)]
    try:
        # the residual arrives stacked already where the block's pre-hook ran (c·n rows: left as it is)
        yield [(f"blocks.{layer}.hook_resid_pre", lambda act, hook: _repeat_rows(act, c, n))]
    finally:
        for h in handles:
            h.remove()


def _grows_mid_forward(model, batch: TaskBatch, last_only: list, plain: torch.Tensor) -> bool:
    """Whether this model's forward gives, for the corrupted prompts grown at block 0 to 2 copies, their plain
    logits `plain` (run with the hooks `last_only`) twice. Checked once per `activation_patching` call."""
    if "blocks.0.hook_resid_pre" not in model.hook_dict:
        return False
    try:
        with _repeat_batch_from(model, 0, 2, batch.n_pairs) as grow:
            grown = model.run_with_hooks(batch.corrupted, fwd_hooks=grow + last_only)
    except (RuntimeError, ValueError, IndexError):  # a shape the model built for n rows that the pre-hook missed
        return False
    tol = max(1e-4, 8 * torch.finfo(plain.dtype).eps)  # a batch of another size rounds differently
    return grown.shape == (2 * plain.shape[0], *plain.shape[1:]) and torch.allclose(
        grown, plain.repeat(2, *[1] * (plain.dim() - 1)), rtol=tol, atol=tol)


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
