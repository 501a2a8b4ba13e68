"""Experiment tracking with Weights & Biases (`saelab train --wandb PROJECT`, `saelab.train(wandb=...)`), as SAELens
and sparsify users expect: one wandb run per SAE with the run's config (the training settings and the SAE as
built), the metrics stream that goes to `metrics.jsonl` (as `train/<name>` at each logged step), the training's
end state in the summary and, after the closing evaluation, its core metrics (`eval/<name>`). Under torchrun only
rank 0 logs; a sweep's SAEs are one wandb group.

wandb is imported only when asked for (it is slow to import); WANDB_MODE, WANDB_DIR, WANDB_ENTITY, … apply as
usual (WANDB_MODE=offline logs to disk for a later `wandb sync`).
"""

from __future__ import annotations

from saelab.errors import ConfigError


def require_wandb():
    """The wandb module, or a `ConfigError` that says how to get it."""
    try:
        import wandb
    except ImportError:
        raise ConfigError("--wandb: the wandb package is not installed",
                          hint="pip install 'saelab[wandb]' (or pip install wandb), or drop --wandb") from None
    return wandb


def _flat(d: dict, prefix: str) -> dict:
    """{'a': {'b': 1}} → {'<prefix>a/b': 1}; None (a NaN in the JSON) left out."""
    out = {}
    for key, value in d.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}/"))
        elif value is not None:
            out[f"{prefix}{key}"] = value
    return out


class WandbRun:
    """One SAE's wandb run: opened when its training starts, finished after the closing evaluation."""

    def __init__(self, project: str, name: str, config: dict, group: str | None = None):
        wandb = require_wandb()
        # several SAEs of a sweep train side by side: each its own run, none finishing another
        self.run = wandb.init(project=project, name=name, config=config, group=group, job_type="train",
                              reinit="create_new")

    def log(self, row: dict) -> None:
        """One line of metrics.jsonl, at its step."""
        self.run.log(_flat({k: v for k, v in row.items() if k != "step"}, "train/"), step=int(row["step"]))

    def summarize(self, values: dict, prefix: str) -> None:
        self.run.summary.update(_flat(values, prefix))

    def finish(self, evaluation: dict | None = None, failed: bool = False) -> None:
        if evaluation:
            self.summarize(evaluation, "eval/")
        self.run.finish(exit_code=1 if failed else 0)
