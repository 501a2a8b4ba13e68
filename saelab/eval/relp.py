"""RelP propagation rules (Rezaei Jafari et al. 2025, arXiv 2508.21258) as forward hooks on a TransformerBridge.

With the rules in place, one ordinary backward pass returns LRP "propagation coefficients" R̃ instead of the gradient;
RelP(n) = (a_clean − a_corrupted) · R̃ then costs exactly what attribution patching costs (two forwards, one backward).
The forward values are unchanged (bit for bit: every rule is "value + exact zero", or a detach). Rules (evals notes §4):

* LN-rule (LayerNorm / RMSNorm, Ali et al. 2022): the scale σ is a constant, y = (x − μ)/σ.detach()·w + b. Hook:
  `*.hook_scale` → detach. Relevance is conserved through the norm (Σ x·R̃_x = Σ (y − b)·R̃_y); the true gradient
  gives Σ x·∂y/∂x = 0 (a norm is scale invariant).
* AH-rule (attention, Ali et al. 2022; optional, off by default as in the RelP demo): the softmax pattern is a
  constant, so attention is linear in V. Hook: `*.attn.hook_pattern` → detach.
* Identity rule (GELU/SiLU/… activations, Jafari et al. 2024): y = x_s · (φ(x)/x_s).detach() with
  x_s = x + ε·sign(x) (sign(0) := 1), so the coefficient is φ(x)/x_s and the relevance x·R̃_x = φ(x)·R̃_y passes
  through unchanged. Hooks: `blocks.L.mlp.hook_pre` (φ's input) and `blocks.L.mlp.hook_post` (its output).
* Half rule (gated MLPs, y = φ(g)·h; Jafari 2024 / Arras 2019): y = y/2 + (y/2).detach(), so each factor receives
  half the relevance. With the identity rule too, the coefficients are y/(2 g_s) for the gate pre-activation g and
  y/(2 h_s) for the linear branch h (hooks `mlp.hook_pre`, `mlp.hook_pre_linear`, `mlp.hook_post`).
* LRP-0/ε on linear maps: the plain gradient (linear maps need no rule); ε (default 1e-6) is the stabiliser above.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from saelab.errors import ModelError


@dataclass(frozen=True)
class RelPRules:
    """Which rules are on. The default is the RelP demo's configuration (LN, Identity, Half; AH off)."""

    layernorm: bool = True
    attention: bool = False
    identity: bool = True
    half: bool = True
    eps: float = 1e-6

    @classmethod
    def parse(cls, text: str) -> "RelPRules":
        """'ln,identity,half' (any of ln, attn, identity, half; 'none' for none) → rules."""
        names = {s.strip() for s in text.split(",") if s.strip()} - {"none"}
        unknown = names - {"ln", "attn", "identity", "half"}
        if unknown:
            from saelab.errors import ConfigError

            raise ConfigError(f"relp rules: unknown rule(s) {sorted(unknown)}; use a comma list of ln, attn, "
                              f"identity, half (or none)")
        return cls(layernorm="ln" in names, attention="attn" in names, identity="identity" in names,
                   half="half" in names)

    @property
    def label(self) -> str:
        on = [n for n, v in (("ln", self.layernorm), ("attn", self.attention), ("identity", self.identity),
                             ("half", self.half)) if v]
        return ",".join(on) or "none"


def stabilise(x: torch.Tensor, eps: float) -> torch.Tensor:
    """x + ε·sign(x), with sign(0) := 1, so a ratio y/x_s is finite everywhere."""
    return x + eps * torch.where(x >= 0, torch.ones_like(x), -torch.ones_like(x))


class RatioRule(torch.autograd.Function):
    """Forward: returns `y` unchanged. Backward: input i receives grad · share · y / x_i,s (the LRP relevance/input
    ratio), and `y`'s own graph is cut. share = 1 is the identity rule; 1/2 per factor is identity + half rule."""

    @staticmethod
    def forward(ctx, y, share, eps, *inputs):
        ctx.share, ctx.eps = share, eps
        ctx.save_for_backward(y, *inputs)
        return y.clone()

    @staticmethod
    def backward(ctx, grad):
        y, *inputs = ctx.saved_tensors
        grads = [grad * (ctx.share * y / stabilise(x, ctx.eps)) for x in inputs]
        return (None, None, None, *grads)


def _detach(act, hook):
    return act.detach()


def _halve(act, hook):
    return act / 2 + (act / 2).detach()


def rule_hooks(model, rules: RelPRules) -> tuple[list, dict]:
    """Forward hooks implementing `rules` on `model`, and a dict that counts which rule hooks fired (check it after
    the forward with `check_fired`)."""
    names = set(model.hook_dict.keys())
    n_layers = int(model.cfg.n_layers)
    fired: dict[str, int] = {}
    hooks: list = []

    def counted(kind, fn):
        def wrapped(act, hook):
            fired[kind] = fired.get(kind, 0) + 1
            return fn(act, hook)
        return wrapped

    if rules.layernorm:
        for n in sorted(names):
            if n.endswith("hook_scale"):
                hooks.append((n, counted("ln", _detach)))
    if rules.attention:
        for n in sorted(names):
            if n.endswith("attn.hook_pattern"):
                hooks.append((n, counted("attn", _detach)))
    if rules.identity or rules.half:
        for layer in range(n_layers):
            pre, lin, post = (f"blocks.{layer}.mlp.hook_pre", f"blocks.{layer}.mlp.hook_pre_linear",
                              f"blocks.{layer}.mlp.hook_post")
            if pre not in names or post not in names:
                continue
            gated = lin in names
            if rules.identity:
                box: dict = {}

                def keep(act, hook, box=box, key="pre"):
                    box[key] = act
                    return act

                def ratio(act, hook, box=box, gated=gated):
                    inputs = [box.pop("pre")] + ([box.pop("lin")] if gated else [])
                    share = 0.5 if (gated and rules.half) else 1.0
                    return RatioRule.apply(act, share, rules.eps, *inputs)

                hooks.append((pre, keep))
                if gated:
                    hooks.append((lin, lambda act, hook, box=box: keep(act, hook, box, "lin")))
                hooks.append((post, counted("identity", ratio)))
            elif gated:  # half rule alone: halve the gradient into both factors of φ(g)·h
                hooks.append((post, counted("half", _halve)))
    return hooks, fired


def check_fired(rules: RelPRules, fired: dict) -> None:
    """A rule whose hooks never fired would silently give the plain gradient: refuse instead."""
    wanted = {"ln": rules.layernorm, "attn": rules.attention, "identity": rules.identity}
    missing = [k for k, on in wanted.items() if on and not fired.get(k)]
    if missing:
        raise ModelError(f"RelP: the {', '.join(missing)} rule's hooks did not fire in this model",
                         hint="the model hides those intermediate activations; try model.enable_compatibility_mode() "
                              "or switch the rule off (--relp-rules)")


__all__ = ["RelPRules", "RatioRule", "rule_hooks", "check_fired", "stabilise"]
