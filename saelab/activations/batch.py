"""`Batch`: what every activation source yields and the trainer consumes."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class Batch:
    """One batch of training rows.

    acts: [B, d] float32 on the requested device (converted from the stored dtype).
    grads: [B, d] float32, the LM-loss gradient at the hook (see `saelab.activations.capture.GRAD_LOSS`), or None.
    tokens: [B] int64, the token id at each activation's position (provenance), or None.
    positions: [B, 2] int64, (global row index of the packed sequence, position in it), or None.
    targets: [B, d_out] float32, a transcoder's target hook at the same tokens (same rows, same order), or None.
    """

    acts: Tensor
    grads: Tensor | None = None
    tokens: Tensor | None = None
    positions: Tensor | None = None
    targets: Tensor | None = None

    def __len__(self) -> int:
        return self.acts.shape[0]

    def to(self, device) -> "Batch":
        mv = (lambda t: None if t is None else t.to(device))
        return Batch(mv(self.acts), mv(self.grads), mv(self.tokens), mv(self.positions), mv(self.targets))



class BatchSource:
    """What `ActivationCache` and `ActivationStream` share: iterating gives an endless stream of `Batch`es of
    exactly `batch_size` rows on `device`, cut from the row stream that the subclass's `_take(count)` hands out as
    pieces (acts, grads or None, tokens, positions, targets or None): a batch that straddles two shuffle windows
    comes in two. `target_hook`: a second hook read row for row with the first (a transcoder's target), or None."""

    batch_size: int
    device: torch.device
    with_grads: bool
    target_hook: str | None = None

    def _take(self, count: int) -> list[tuple[Tensor, Tensor | None, Tensor, Tensor]]:
        raise NotImplementedError

    def __iter__(self):
        def cat(xs):
            return xs[0] if len(xs) == 1 else torch.cat([x.to(xs[0].device) for x in xs])

        while True:
            pieces = self._take(self.batch_size)
            acts = cat([p[0] for p in pieces]).to(self.device)
            grads = cat([p[1] for p in pieces]).to(self.device) if self.with_grads else None
            tokens = cat([p[2] for p in pieces]).to(self.device, torch.int64)
            positions = cat([p[3] for p in pieces]).to(self.device, torch.int64)
            targets = cat([p[4] for p in pieces]).to(self.device) if self.target_hook else None
            yield Batch(acts=acts, grads=grads, tokens=tokens, positions=positions, targets=targets)
