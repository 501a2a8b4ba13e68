"""Training: the loop, checkpoints and exact resume."""

from saelab.training.trainer import TrainResult, lr_at, train

__all__ = ["train", "TrainResult", "lr_at"]
