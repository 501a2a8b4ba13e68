"""Load a language model as a TransformerLens v4 `TransformerBridge`, and check hook names against it."""

from __future__ import annotations

import difflib
import hashlib
import os
import re
from pathlib import Path

import torch

from saelab.errors import ConfigError, ModelError

REFERENCE = "reference"
_LAYER = re.compile(r"^blocks\.(\d+)\.")
_MODEL_HINT = ("use the embedded model (--model reference), a hub name such as gpt2, or a local directory holding a "
               "transformers model (config.json + weights + tokenizer)")


def reference_dir() -> Path:
    return Path(__file__).resolve().parent / "reference"


def resolve_model_path(name: str) -> str:
    """'reference' → the embedded model's directory; a local path stays; anything else is a hub name."""
    from saelab.hub import looks_like_path

    if name == REFERENCE:
        path = reference_dir()
        if not (path / "model.safetensors").exists():
            raise ModelError(f"the embedded reference model is missing from {path}",
                             hint=f"reinstall saelab or rebuild it with `saelab reference train --out {path}`")
        return str(path)
    local = Path(name).expanduser()
    if local.exists():
        if not local.is_dir() or not (local / "config.json").exists():
            what = "a file" if not local.is_dir() else "a directory without config.json"
            raise ModelError(f"model {name!r}: {what}, not a transformers model directory", hint=_MODEL_HINT)
        return str(local)
    if looks_like_path(name):  # a path, not 'org/name'
        raise ModelError(f"model {name!r}: no such local directory", hint=_MODEL_HINT)
    return name


def _check_hub(name: str) -> None:
    """With no network and nothing cached, fail at once instead of retrying for minutes."""
    from huggingface_hub import try_to_load_from_cache

    from saelab.hub import hub_reachable

    cached = try_to_load_from_cache(name, "config.json")
    if isinstance(cached, str):
        os.environ.setdefault("HF_HUB_OFFLINE", "1")  # use the local copy, ask nothing of the network
        return
    if not hub_reachable():
        raise ModelError(f"model {name!r} is not a local path and the Hugging Face hub cannot be reached from this "
                         f"machine (no network)", hint=_MODEL_HINT)


def locate_model(name: str) -> str:
    """`resolve_model_path`, and for a hub name a `ModelError` at once when the hub is unreachable and nothing is
    cached: everything about a model that can be checked without loading it."""
    path = resolve_model_path(name)
    if not Path(path).exists():
        _check_hub(path)
    return path


def parse_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    try:
        out = getattr(torch, dtype)
    except AttributeError:
        out = None
    if not isinstance(out, torch.dtype):
        raise ConfigError(f"dtype: unknown dtype {dtype!r}; use float32, float16 or bfloat16")
    return out


def load_model(name: str = REFERENCE, device: str | torch.device = "cpu", dtype: str | torch.dtype = "float32"):
    """A `TransformerBridge` for the embedded reference model, a hub name or a local model directory."""
    import logging

    path = locate_model(name)  # before importing TransformerLens (seconds): an offline machine fails at once
    torch_dtype = parse_dtype(dtype)
    from transformer_lens.model_bridge import TransformerBridge
    logging.getLogger("transformers").setLevel(logging.ERROR)
    try:
        bridge = TransformerBridge.boot_transformers(path, device=str(device), dtype=torch_dtype)
    except (OSError, ValueError, KeyError, NotImplementedError) as e:  # unreadable files, unsupported architecture
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ModelError(f"model {name!r} cannot be loaded: {first}", hint=_MODEL_HINT) from e
    bridge.eval()
    bridge.saelab_model_id = name  # what the user asked for, recorded in manifests
    return bridge


def model_fingerprint(name: str) -> str:
    """sha256 of the weights file for local models (the reference included), else the hub name."""
    path = Path(resolve_model_path(name))
    if path.is_dir():
        h = hashlib.sha256()
        for f in sorted(path.glob("*.safetensors")):
            with open(f, "rb") as fh:  # in chunks: large local models do not fit in RAM twice
                for chunk in iter(lambda: fh.read(1 << 24), b""):
                    h.update(chunk)
        return h.hexdigest()
    return name


def hook_names(model) -> list[str]:
    """Every hook name the model accepts, canonical and TransformerLens-style aliases, sorted."""
    return sorted(model.hook_dict.keys())


def hook_layer(hook_name: str) -> int | None:
    """The block index a hook lives in (`blocks.3.hook_resid_post` → 3), or None outside the blocks."""
    m = _LAYER.match(hook_name)
    return int(m.group(1)) if m else None


def check_hook_names(model, hooks: list[str] | str) -> list[str]:
    """Raise a `ModelError` naming the closest valid hooks for any name the model does not have."""
    hooks = [hooks] if isinstance(hooks, str) else list(hooks)
    valid = set(model.hook_dict.keys())
    for h in hooks:
        if h not in valid:
            close = difflib.get_close_matches(h, sorted(valid), n=5, cutoff=0.5)
            mean = f"; did you mean {', '.join(close)}?" if close else ""
            n_layers = getattr(model.cfg, "n_layers", "?")
            model_id = getattr(model, "saelab_model_id", None)
            raise ModelError(f"hook {h!r} does not exist in this model ({n_layers} layers){mean}",
                             hint=f"list them all with `saelab hooks --model {model_id or '...'}` or "
                                  f"saelab.hook_names(model)")
    return hooks
