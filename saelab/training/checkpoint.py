"""Atomic training checkpoints: tensors in safetensors, everything else in JSON (nothing is pickled).

A checkpoint is a directory `checkpoints/step-NNNNNNNN/` written under a temporary name and renamed when
complete, so a run killed at any moment leaves either the previous checkpoint or the new one, never half of one.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

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


def save_checkpoint(run_dir: Path, step: int, tensors: dict[str, torch.Tensor], meta: dict,
                    keep: int | None = 2) -> Path:
    """Write checkpoint `step` atomically, then keep the newest `keep` (None: prune nothing)."""
    from safetensors.torch import save_file

    def write(folder: Path) -> None:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(folder / STATE_TENSORS))
        (folder / STATE_JSON).write_text(json.dumps(meta))

    root = RunDir(run_dir).checkpoints
    root.mkdir(parents=True, exist_ok=True)
    # the temporary name does not match step-*, so an unfinished checkpoint is never listed
    final = write_dir_atomic(root / f"step-{step:08d}", write, tmp=root / f".tmp-step-{step:08d}")
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


def load_checkpoint(path: Path) -> tuple[dict[str, torch.Tensor], dict]:
    from safetensors.torch import load_file

    try:
        return load_file(str(path / STATE_TENSORS)), json.loads((path / STATE_JSON).read_text())
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
