"""`Batch`: what every activation source yields and the trainer consumes."""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor


@dataclass
class Batch:
    """One batch of training rows.

    acts: [B, d] float32 on the requested device (converted from the stored dtype).
    grads: [B, d] float32, the LM-loss gradient at the hook (see `saelab.activations.capture.GRAD_LOSS`), or None.
    tokens: [B] int64, the token id at each activation's position (provenance), or None.
    positions: [B, 2] int64, (global row index of the packed sequence, position in it), or None.
    """

    acts: Tensor
    grads: Tensor | None = None
    tokens: Tensor | None = None
    positions: Tensor | None = None

    def __len__(self) -> int:
        return self.acts.shape[0]

    def to(self, device) -> "Batch":
        mv = (lambda t: None if t is None else t.to(device))
        return Batch(mv(self.acts), mv(self.grads), mv(self.tokens), mv(self.positions))
