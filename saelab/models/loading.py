"""Load a language model as a TransformerLens v4 `TransformerBridge`, and check hook names against it."""

from __future__ import annotations

import difflib
import hashlib
import json
import os
import re
from pathlib import Path

import torch

from saelab.errors import ConfigError, ModelError

REFERENCE = "reference"
_LAYER = re.compile(r"^blocks\.(\d+)\.")
_HOOK_SWITCHES = ("use_attn_result", "use_split_qkv_input", "use_hook_mlp_in", "use_attn_in")  # hooks they turn on
WEIGHT_FILES = ("*.safetensors", "pytorch_model*.bin")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt", "spiece.model")
_FAMILIES = "gpt2, gpt_neox, llama, gemma2, qwen2, mistral"
_MODEL_HINT = ("use the embedded model (--model reference), a hub name such as gpt2, or a local directory holding a "
               "transformers model (config.json + weights + tokenizer)")


def reference_dir() -> Path:
    return Path(__file__).resolve().parent / "reference"


def resolve_model_path(name: str) -> str:
    """'reference' → the embedded model's directory; a local folder → its absolute path; else a hub name.

    A local folder always wins and goes on as an absolute path: TransformerLens reads a bare name such as
    `pythia-70m` (what `./pythia-70m` becomes) as an alias of a hub model and would load that instead."""
    from saelab.hub import looks_like_path

    if name == REFERENCE:
        path = reference_dir()
        if not (path / "model.safetensors").exists():
            raise ModelError(f"the embedded reference model is missing from {path}",
                             hint=f"reinstall saelab or rebuild it with `saelab reference train --out {path}`")
        return str(path)
    local = Path(name).expanduser()
    if local.exists():
        check_model_dir(name, local)
        return str(local.resolve())
    if looks_like_path(name):  # a path, not 'org/name'
        raise ModelError(f"model {name!r}: no such local directory", hint=_MODEL_HINT)
    return name


def model_id(name: str) -> str:
    """What runs, caches and SAEs record as their model: 'reference', a local folder's absolute path, or the hub name
    as given. Later commands load the model from it, from any working directory, and never mistake a folder for a
    hub model of the same name."""
    return name if name == REFERENCE else resolve_model_path(name)


def _first_match(path: Path, patterns: tuple[str, ...]) -> Path | None:
    return next((p for pattern in patterns for p in sorted(path.glob(pattern))), None)


def check_model_dir(name: str, path: Path) -> None:
    """A local model folder holds a readable config.json of an architecture transformers knows, weights and a
    tokenizer: what can be checked in milliseconds, before TransformerLens is imported or anything is written."""
    if not path.is_dir() or not (path / "config.json").exists():
        what = "a file" if not path.is_dir() else "a directory without config.json"
        raise ModelError(f"model {name!r}: {what}, not a transformers model directory", hint=_MODEL_HINT)
    try:
        config = json.loads((path / "config.json").read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelError(f"model {name!r}: config.json is not valid JSON ({e})", hint=_MODEL_HINT) from None
    if not isinstance(config, dict):
        raise ModelError(f"model {name!r}: config.json is not a JSON object", hint=_MODEL_HINT)
    if _first_match(path, WEIGHT_FILES) is None:
        raise ModelError(f"model {name!r}: the folder has no weights ({', '.join(WEIGHT_FILES)})",
                         hint="save the model into it with model.save_pretrained(folder)")
    if _first_match(path, TOKENIZER_FILES) is None:
        raise ModelError(f"model {name!r}: the folder has no tokenizer ({', '.join(TOKENIZER_FILES)})",
                         hint="save the model's tokenizer into it with tokenizer.save_pretrained(folder)")
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

    model_type = config.get("model_type")
    if model_type not in CONFIG_MAPPING_NAMES:
        close = difflib.get_close_matches(str(model_type), sorted(CONFIG_MAPPING_NAMES), n=3, cutoff=0.6)
        mean = f"; did you mean {', '.join(close)}?" if close else ""
        what = (" has no model_type" if model_type is None
                else f"'s model_type {model_type!r} is not one transformers knows")
        raise ModelError(f"model {name!r}: config.json{what} (architectures {config.get('architectures')}){mean}",
                         hint=f"set model_type in config.json to the model's family ({_FAMILIES}, …)")


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
    from transformers.utils import logging as hf_logging

    logging.getLogger("transformers").setLevel(logging.ERROR)
    bar = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # transformers' "Loading weights" bar: a blink on stderr for every command
    try:
        bridge = TransformerBridge.boot_transformers(path, device=str(device), dtype=torch_dtype)
    except (OSError, ValueError, KeyError, NotImplementedError) as e:  # unreadable files, unsupported architecture
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        hint = _MODEL_HINT
        if first.startswith("Could not determine supported architecture"):  # its first line lists ~200 of them
            first = f"TransformerLens has no adapter for its architecture ({_architecture(path)})"
            hint = "use a model of a family TransformerLens supports: TransformerBridge.list_supported_models()"
        raise ModelError(f"model {name!r} cannot be loaded: {first}", hint=hint) from e
    finally:
        if bar:
            hf_logging.enable_progress_bar()
    bridge.eval()
    bridge.saelab_model_id = model_id(name)  # recorded in manifests and SAEs: 'reference', a folder's path, a hub name
    # what was loaded: the folder, or the hub model TransformerLens resolved the name to (it maps aliases such as
    # pythia-70m to EleutherAI/pythia-70m)
    bridge.saelab_model_source = bridge.cfg.model_name if Path(path) != reference_dir() else REFERENCE
    return bridge


def model_device(model) -> torch.device:
    """The device a model's inputs go to: its first parameter's (the embedding's). The parameters are the truth:
    `cfg.device` is a record that a move around TransformerBridge's own `.to` (torch.nn.Module.to, or moving
    `original_model`) leaves stale. Something without parameters: its `cfg.device`, else the CPU."""
    try:
        return next(model.parameters()).device
    except (AttributeError, StopIteration):
        dev = getattr(getattr(model, "cfg", None), "device", None)
        return torch.device(dev if dev is not None else "cpu")


def _architecture(path: str) -> str:
    """'model_type X, architectures [...]' from a local folder's config.json, else the hub name."""
    config = Path(path) / "config.json"
    if not config.is_file():
        return path
    data = json.loads(config.read_text())
    return f"model_type {data.get('model_type')!r}, architectures {data.get('architectures')}"


def model_fingerprint(name: str) -> str:
    """sha256 of the weight files of local models (the reference included), else the hub name."""
    path = Path(resolve_model_path(name))
    if path.is_dir():
        h = hashlib.sha256()
        for f in sorted({f for pattern in WEIGHT_FILES for f in path.glob(pattern)}):
            with open(f, "rb") as fh:  # in chunks: large local models do not fit in RAM twice
                for chunk in iter(lambda: fh.read(1 << 24), b""):
                    h.update(chunk)
        return h.hexdigest()
    return name


def hook_names(model) -> list[str]:
    """Every hook name that carries an activation in this model, canonical and TransformerLens-style aliases,
    sorted."""
    return sorted(_firing(model))


def _firing(model) -> set[str]:
    """The names in `model.hook_dict` whose hook point a forward pass reaches, found once per model by a 2-token
    forward. TransformerLens also lists hooks a family never reaches (rotary models' hook_pos_embed, GPT-2's fused
    attn.qkv) and hooks reached only when switched on (hook_mlp_in, hook_attn_in, attn.hook_result)."""
    switches = tuple(getattr(model.cfg, f, None) for f in _HOOK_SWITCHES)
    found, was = getattr(model, "_saelab_firing", (None, None))
    if found is None or was != switches:
        points = {id(p): p for p in model.hook_dict.values()}
        seen: set[int] = set()
        handles = [p.register_forward_hook(lambda module, args, out: seen.add(id(module))) for p in points.values()]
        try:
            with torch.no_grad():
                model(torch.zeros(1, 2, dtype=torch.long, device=next(model.parameters()).device))
        finally:
            for h in handles:
                h.remove()
        found = {name for name, p in model.hook_dict.items() if id(p) in seen}
        model._saelab_firing = (found, switches)
    return found


def default_hook_name(model) -> str:
    """The hook `saelab cache` and `saelab train` use when none is given: the middle residual stream,
    `blocks.{n_layers // 2}.hook_resid_pre`. `model`: a loaded model, or a model name or folder (its config is read;
    nothing is loaded)."""
    if isinstance(model, (str, Path)):
        from transformers import AutoConfig

        try:
            hf = AutoConfig.from_pretrained(locate_model(str(model)))
        except (OSError, ValueError) as e:
            raise ModelError(f"model {str(model)!r}: its config cannot be read ({str(e).splitlines()[0]})") from e
        n_layers = getattr(hf, "num_hidden_layers", None) or getattr(hf, "n_layer")
    else:
        n_layers = model.cfg.n_layers
    return f"blocks.{n_layers // 2}.hook_resid_pre"


def hook_layer(hook_name: str) -> int | None:
    """The block index a hook lives in (`blocks.3.hook_resid_post` → 3), or None outside the blocks."""
    m = _LAYER.match(hook_name)
    return int(m.group(1)) if m else None


def check_hook_names(model, hooks: list[str] | str) -> list[str]:
    """Raise a `ModelError` naming the closest valid hooks for any name the model does not have or never reaches."""
    hooks = [hooks] if isinstance(hooks, str) else list(hooks)
    valid = _firing(model)
    for h in hooks:
        if h not in valid:
            close = difflib.get_close_matches(h, sorted(valid), n=5, cutoff=0.5)
            mean = f"; did you mean {', '.join(close)}?" if close else ""
            if h.endswith("hook_resid_mid") and getattr(model.cfg, "parallel_attn_mlp", False):
                mean = (" (attention and MLP read the same residual stream in parallel, so there is none between "
                        f"them){mean}")
            n_layers = getattr(model.cfg, "n_layers", "?")
            loaded = getattr(model, "saelab_model_id", None)
            what = ("is listed by TransformerLens but carries no activation in this model's forward pass"
                    if h in model.hook_dict else "does not exist in this model")
            raise ModelError(f"hook {h!r} {what} ({n_layers} layers){mean}",
                             hint=f"list them all with `saelab hooks --model {loaded or '...'}` or "
                                  f"saelab.hook_names(model)")
    return hooks
