"""Reference gradients for tests, written with plain autograd and independent of saelab's helpers."""

import torch


def hook_activation_and_grad(model, rows, hook, loss):
    """(activation at `hook`, d loss(logits) / d activation) for `rows`, by a retained activation gradient."""
    box = {}

    def keep(act, hook):
        act.retain_grad()
        box["a"] = act
        return act

    with torch.enable_grad():
        loss(model.run_with_hooks(rows, fwd_hooks=[(hook, keep)])).backward()
    return box["a"].detach(), box["a"].grad.detach()


def next_token_ce(logits, rows, reduction="sum"):
    """The cache's LM loss: next-token cross-entropy over every predicted position."""
    return torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), rows[:, 1:].reshape(-1),
                                             reduction=reduction)
