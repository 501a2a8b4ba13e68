"""A run folder's layout, worked out in one place: what `saelab train` writes where, and what every later stage
(eval, steer, patch, dashboard, the explorer, the Python API) reads from it.

    RUN/config.yaml        the run's TrainConfig
    RUN/metrics.jsonl      the training log, one JSON object per logged step
    RUN/sae/               the trained SAE (cfg.json, sae_weights.safetensors, saelab.json)
    RUN/checkpoints/       step-NNNNNNNN/ checkpoints
    RUN/cache/             the activation cache training made (when none was given)
    RUN/eval/              core.json, probing.json, steering_scores.parquet, steer_sweep_<latents>.json/.html,
                           patching/
    RUN/dashboard/         the dashboard bundle

A bare SAE directory (cfg.json at its top, as SAELens saves one) stands in for a run: its SAE is the folder itself,
and eval/ and dashboard/ go inside it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from saelab.errors import SAEFileError

NOT_A_RUN = "neither a run directory (with sae/) nor an SAE directory (with cfg.json)"


@dataclass(frozen=True)
class RunDir:
    """The paths of one run folder. `RunDir(path)` lays out a run (training writes one); `RunDir.open(path)` reads
    a run or a bare SAE directory that must already hold an SAE."""

    path: Path
    bare: bool = False  # a bare SAE directory given instead of a run: the SAE is the folder itself

    def __post_init__(self):
        object.__setattr__(self, "path", Path(self.path))

    @classmethod
    def open(cls, path, hint: str = "", missing: str = NOT_A_RUN, file: str = NOT_A_RUN) -> RunDir:
        """The run (or bare SAE directory) at `path`, or SAEFileError "<path>: <what>" naming what is wrong:
        `missing` for a path that does not exist, `file` for a plain file, NOT_A_RUN for a folder without an SAE."""
        path = Path(path)
        run = cls(path, bare=not (path / "sae").is_dir())
        if not cls.is_sae(run.sae):
            what = missing if not path.exists() else file if not path.is_dir() else NOT_A_RUN
            raise SAEFileError(f"{path}: {what}", hint=hint)
        return run

    @staticmethod
    def is_run(path) -> bool:
        """Whether `path` looks like a run folder training wrote (its sae/ or its training log is there)."""
        run = RunDir(path)
        return run.sae.is_dir() or run.metrics.exists()

    @classmethod
    def entries(cls) -> frozenset[str]:
        """The names training writes at the top of a run folder (a folder holding none of them is no run's)."""
        run = cls(Path())
        return frozenset(p.name for p in (run.config, run.metrics, run.sae, run.checkpoints, run.cache, run.eval))

    @staticmethod
    def is_sae(path) -> bool:
        """Whether `path` holds an SAE (its cfg.json, in saelab's and SAELens's layout)."""
        return (Path(path) / "cfg.json").exists()

    # ---------------------------------------------------------------------------------------------- training
    @property
    def config(self) -> Path:
        return self.path / "config.yaml"

    @property
    def metrics(self) -> Path:
        return self.path / "metrics.jsonl"

    @property
    def sae(self) -> Path:
        return self.path if self.bare else self.path / "sae"

    @property
    def checkpoints(self) -> Path:
        return self.path / "checkpoints"

    @property
    def cache(self) -> Path:
        return self.path / "cache"

    # ---------------------------------------------------------------------------------------------- evaluation
    @property
    def eval(self) -> Path:
        return self.path / "eval"

    @property
    def core(self) -> Path:
        return self.eval / "core.json"

    @property
    def probing(self) -> Path:
        return self.eval / "probing.json"

    @property
    def steering_scores(self) -> Path:
        return self.eval / "steering_scores.parquet"

    def steer_sweep(self, latents) -> Path:
        """RUN/eval/steer_sweep_<latents>.json (the .html beside it: `.with_suffix(".html")`)."""
        return self.eval / ("steer_sweep_" + "_".join(str(f) for f in latents) + ".json")

    @property
    def patching(self) -> Path:
        return self.eval / "patching"

    # ---------------------------------------------------------------------------------------------- dashboard
    @property
    def dashboard(self) -> Path:
        return self.path / "dashboard"


__all__ = ["RunDir", "NOT_A_RUN"]
