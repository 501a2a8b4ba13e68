"""Run a model once over a batch of packed rows and capture several hooks, optionally with LM-loss gradients.

Without gradients the forward stops right after the last block a requested hook needs (`stop_at_layer`), so no
layer is computed for nothing. With gradients the whole forward runs (the loss needs the logits) and one backward
pass, restricted to the hooked activations (`torch.autograd.grad`, no parameter gradients), gives every hook's
gradient at once.

The gradient loss (`GRAD_LOSS`) is the next-token cross-entropy summed over every predicted position of the batch
(targets are positions 1..T-1 of each row). A sum, not a mean, so a stored gradient does not depend on how many
rows happened to share its forward batch, and keeps per-token magnitude (a mean over 4096 tokens would push
float16 gradients into subnormals). The gradient of the batch-mean loss is this divided by the number of predicted
tokens of the batch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from saelab.errors import ConfigError
from saelab.models.loading import check_hook_names, hook_layer

GRAD_LOSS = {
    "loss": "next-token cross-entropy (natural log), logits in float32",
    "reduction": "sum over every predicted position of the forward batch: targets are tokens 1..T-1 of each row, "
                 "predicted from positions 0..T-2",
    "gradient": "d loss / d activation at the hook, one backward pass per forward batch; independent of batching "
                "because rows do not interact",
    "to_batch_mean": "divide by the number of predicted tokens, rows × (context_size - 1), of the batch you want",
    "last_position": "exactly 0 for hooks in the residual stream and after: position T-1 predicts nothing",
}


def grad_loss(logits: torch.Tensor, tokens: torch.Tensor, target_mask: torch.Tensor | None = None) -> torch.Tensor:
    """The loss whose gradient the cache stores (`GRAD_LOSS`): next-token cross-entropy, float32 logits, summed over
    the predicted positions (targets tokens[:, 1:]). `target_mask [B, T]` (for padded rows, not the cache's packed
    ones) keeps only the targets where it is True. Evaluators take the same gradient (`saelab.eval.splice`)."""
    z, t = logits[:, :-1].reshape(-1, logits.shape[-1]).float(), tokens[:, 1:].reshape(-1)
    if target_mask is None:
        return F.cross_entropy(z, t, reduction="sum")
    keep = target_mask[:, 1:].reshape(-1).to(z.device)
    return F.cross_entropy(z[keep], t[keep], reduction="sum")


def _is_embedding_stage(name: str) -> bool:
    return name in ("hook_embed", "hook_pos_embed", "hook_tokens") or name.startswith(("embed.", "pos_embed."))


def stop_layer(hooks: list[str], n_layers: int) -> int | None:
    """The earliest `stop_at_layer` at which every hook has fired, or None (run to the end): the one stopping rule
    of every truncated forward in saelab (`HookCapture`, `saelab.eval.splice.capture`).

    For a forward `model(tokens, stop_at_layer=s)` with the hooks added by `model.hooks(...)`: the bridge's block s
    fires its input hook (`blocks.s.hook_resid_pre`, alias `hook_in`) and then stops, so resid_pre (hook_in) of
    block L needs s = L and every other hook of block L (resid_mid, resid_post, attn/mlp out, attn.hook_z, ln*, …)
    s = L + 1; embedding hooks fire before block 0. Not for `run_with_hooks(stop_at_layer=s)`: it does not attach
    hooks on blocks >= s, so there block L's resid_pre would never fire.
    """
    need = 0
    for h in hooks:
        layer = hook_layer(h)
        if layer is None:
            if not _is_embedding_stage(h):
                return None  # ln_final, unembed, ...: the whole forward
        elif h in (f"blocks.{layer}.hook_resid_pre", f"blocks.{layer}.hook_in"):
            need = max(need, layer)  # the stopping block fires its input hook before it stops
        else:
            need = max(need, layer + 1)
    return need if need < n_layers else None


class HookCapture:
    """Capture `hooks` of `model` for batches of token rows; `kept_from` drops the first positions (BOS)."""

    def __init__(self, model, hooks: list[str], with_grads: bool = False, kept_from: int = 1):
        self.model = model
        self.hooks = check_hook_names(model, list(hooks))
        self.with_grads = with_grads
        self.kept_from = kept_from
        self.stop = None if with_grads else stop_layer(self.hooks, model.cfg.n_layers)
        self.device = next(iter(model.parameters())).device

    def probe(self, context_size: int) -> dict[str, int]:
        """d_in of every hook (trailing dims flattened), from a one-row forward; raises for non-[batch, pos, ...]
        hooks such as attention patterns."""
        tokens = torch.zeros(1, context_size, dtype=torch.long)
        acts, _ = self._run(tokens, for_probe=True)
        return {h: int(a.shape[-1]) for h, a in acts.items()}

    def _run(self, tokens: torch.Tensor, for_probe: bool = False):
        B, T = tokens.shape
        tokens = tokens.to(self.device)
        caps: dict[str, torch.Tensor] = {}  # the live tensors (the autograd inputs when taking gradients)
        rows: dict[str, torch.Tensor] = {}  # snapshots taken in the hook: [B × kept, d]
        bad: list[str] = []

        def make(name):
            def fn(t, hook):
                if t.dim() < 3 or t.shape[0] != B or t.shape[1] != T:
                    bad.append(f"hook {name!r} gives activations of shape {tuple(t.shape)}, not [batch, position, "
                               f"...] = [{B}, {T}, ...]; cache residual-stream, MLP or attention-output hooks "
                               f"instead (attention patterns are not per-token vectors)")
                    return t
                caps[name] = t
                rows[name] = self._snapshot(t)
                return t
            return fn

        fwd = [(h, make(h)) for h in self.hooks]
        grads = None
        if self.with_grads and not for_probe:
            with torch.enable_grad(), self.model.hooks(fwd_hooks=fwd):
                logits = self.model(tokens, return_type="logits")
            self._check_fired(caps, bad)
            loss = grad_loss(logits, tokens)
            inputs = [caps[h] for h in self.hooks]
            missing = [h for h, t in zip(self.hooks, inputs) if not t.requires_grad]
            if missing:
                raise ConfigError(f"hooks {missing} are not on the loss's autograd path; they have no gradient",
                                  hint="drop --with-grads or cache other hooks")
            got = torch.autograd.grad(loss, inputs, allow_unused=True)
            grads = {h: self._snapshot(torch.zeros_like(caps[h]) if g is None else g) for h, g in zip(self.hooks, got)}
        else:
            with torch.no_grad(), self.model.hooks(fwd_hooks=fwd):
                self.model(tokens, return_type=None, stop_at_layer=self.stop)
            self._check_fired(caps, bad)
        return rows, grads

    def _check_fired(self, caps, bad) -> None:
        if bad:
            raise ConfigError(bad[0])
        silent = [h for h in self.hooks if h not in caps]
        if silent:
            raise RuntimeError(f"hooks {silent} did not fire (stop_at_layer={self.stop}); this is a saelab bug")

    def _snapshot(self, t: torch.Tensor) -> torch.Tensor:
        """[B, T, ...] → [B × kept, d], a copy (the model may reuse its buffer later in the forward)."""
        x = t.detach()[:, self.kept_from:]
        x = x.reshape(x.shape[0] * x.shape[1], -1)
        return x.clone() if x.data_ptr() == t.data_ptr() else x

    def __call__(self, tokens: torch.Tensor) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor] | None]:
        """tokens [B, T] int64 → ({hook: acts [B × kept, d]}, {hook: grads} or None), on the model's device."""
        return self._run(tokens)
