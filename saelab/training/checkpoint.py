"""Atomic training checkpoints: tensors in safetensors, everything else in JSON (nothing is pickled).

A checkpoint is a directory `checkpoints/step-NNNNNNNN/` written under a temporary name and renamed when
complete, so a run killed at any moment leaves either the previous checkpoint or the new one, never half of one.
A latent-parallel run's checkpoint holds one tensors file per shard of latents (`tensors_file`), all written into
the folder before it is renamed (`saelab.training.latent_parallel`).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Callable

import torch

from saelab.files import write_dir_atomic
from saelab.rundir import RunDir

STATE_TENSORS = "state.safetensors"
STATE_JSON = "state.json"


def optimizer_to_flat(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    sd = opt.state_dict()
    tensors, scalars = {}, {}
    for pid, st in sd["state"].items():
        for name, value in st.items():
            if isinstance(value, torch.Tensor):
                tensors[f"opt.{pid}.{name}"] = value.detach().contiguous()
            else:
                scalars[f"{pid}.{name}"] = value
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def optimizer_from_flat(opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    state: dict[int, dict] = {}
    for key, value in tensors.items():
        if key.startswith("opt."):
            _, pid, name = key.split(".", 2)
            state.setdefault(int(pid), {})[name] = value
    for key, value in meta["scalars"].items():
        pid, name = key.split(".", 1)
        state.setdefault(int(pid), {})[name] = value
    opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
    # a file holds tensors row-major; a state tensor laid out unlike its parameter (the column-major W_enc) sends
    # every later step down the optimizer's strided path (5x slower Adam), so restore the parameter's layout
    for group in opt.param_groups:
        for p in group["params"]:
            for name, value in opt.state.get(p, {}).items():
                if isinstance(value, torch.Tensor) and value.shape == p.shape and value.stride() != p.stride():
                    opt.state[p][name] = torch.empty_like(p, dtype=value.dtype).copy_(value)


def tensors_file(shard: int = 0) -> str:
    """The tensors file of a checkpoint (of latent shard `shard` of a latent-parallel run: shard 0's is the one
    file of any other run)."""
    return STATE_TENSORS if shard == 0 else f"state.shard-{shard}.safetensors"


def staging_dir(run_dir: Path, step: int) -> Path:
    """Where checkpoint `step` is written before its rename; the name does not match step-*, so an unfinished
    checkpoint is never listed."""
    return RunDir(run_dir).checkpoints / f".tmp-step-{step:08d}"


def write_tensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))


def save_checkpoint(run_dir: Path, step: int, tensors: dict[str, torch.Tensor], meta: dict,
                    keep: int | None = 2, also: Callable[[Path], None] | None = None) -> Path:
    """Write checkpoint `step` atomically, then keep the newest `keep` (None: prune nothing). `also(folder)`: more
    files written into the folder before it is renamed (the other shards' of a latent-parallel run)."""
    def write(folder: Path) -> None:
        write_tensors(folder / STATE_TENSORS, tensors)
        (folder / STATE_JSON).write_text(json.dumps(meta))
        if also is not None:
            also(folder)

    root = RunDir(run_dir).checkpoints
    root.mkdir(parents=True, exist_ok=True)
    final = write_dir_atomic(root / f"step-{step:08d}", write, tmp=staging_dir(run_dir, step))
    if keep is not None:
        prune_checkpoints(run_dir, keep)
    return final


def prune_checkpoints(run_dir: Path, keep: int) -> None:
    for old in sorted(RunDir(run_dir).checkpoints.glob("step-*"))[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def checkpoint_steps(run_dir: Path) -> dict[int, Path]:
    """The complete checkpoints of a run, by step, oldest first."""
    root = RunDir(run_dir).checkpoints
    done = sorted(p for p in root.glob("step-*") if p.name[len("step-"):].isdigit() and (p / STATE_JSON).exists()
                  and (p / STATE_TENSORS).exists())
    return {int(p.name[len("step-"):]): p for p in done}


def latest_checkpoint(run_dir: Path) -> Path | None:
    done = list(checkpoint_steps(run_dir).values())
    return done[-1] if done else None


def load_checkpoint(path: Path, shard: int = 0) -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors, metadata) of a checkpoint; a latent-parallel run's shard `shard`'s tensors."""
    from safetensors.torch import load_file

    try:
        return load_file(str(path / tensors_file(shard))), json.loads((path / STATE_JSON).read_text())
    except Exception as e:  # a damaged file: say which, and what to do
        raise RuntimeError(f"checkpoint {path} is unreadable ({e}); delete that directory to resume from the one "
                           f"before it, or start afresh without --resume") from e


def rng_state(device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """The CPU generator's state, and the current CUDA device's when training there."""
    out = {"rng": torch.get_rng_state()}
    if torch.device(device).type == "cuda":
        out["rng_cuda"] = torch.cuda.get_rng_state(torch.device(device))
    return out


def set_rng_state(tensors: dict[str, torch.Tensor], device: str | torch.device = "cpu") -> None:
    torch.set_rng_state(tensors["rng"].to(torch.uint8))
    if "rng_cuda" in tensors and torch.device(device).type == "cuda":
        torch.cuda.set_rng_state(tensors["rng_cuda"].to(torch.uint8).cpu(), torch.device(device))
