"""One small config dataclass per command, validated when built, loadable from YAML/JSON, overridable by flags.

`load_config(TrainConfig, "run.yaml", overrides={"k": 64})` reads a file, applies flag overrides on top and
builds the dataclass; any invalid value raises one `ConfigError` that names the field.
"""

from __future__ import annotations

import dataclasses
import json
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from saelab.data.corpus import CorpusSpec

T = TypeVar("T")
DTYPES = ("float32", "float16", "bfloat16")


class ConfigError(ValueError):
    """A config value is invalid; the message names the field and says what is allowed."""


def check(cond: bool, field_name: str, message: str) -> None:
    if not cond:
        raise ConfigError(f"{field_name}: {message}")


@dataclass
class ModelSpec:
    """Which language model: 'reference' (embedded), a hub name such as 'gpt2', or a local directory."""

    name: str = "reference"
    device: str = "cpu"
    dtype: str = "float32"

    def __post_init__(self):
        check(bool(self.name), "model.name", "must be 'reference', a hub name or a local path")
        check(self.dtype in DTYPES, "model.dtype", f"must be one of {DTYPES}, got {self.dtype!r}")
        check(self.device == "cpu" or self.device.startswith(("cuda", "mps")) or self.device == "auto",
              "model.device", f"must be cpu, cuda[:N], mps or auto, got {self.device!r}")

    def resolved_device(self) -> str:
        if self.device != "auto":
            return self.device
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"


def _field_types(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _build(tp: Any, value: Any, path: str) -> Any:
    """Turn plain JSON/YAML values into `tp`, recursing into nested dataclasses."""
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp) and isinstance(value, dict):
        return from_dict(tp, value, path)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        return _build(args[0], value, path) if len(args) == 1 else value
    if origin is list and isinstance(value, str):
        return [v.strip() for v in value.split(",") if v.strip()]
    if origin is tuple and isinstance(value, list):
        return tuple(value)
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    return value


def from_dict(cls: type[T], data: dict, path: str = "") -> T:
    """Build a config dataclass from a dict; unknown keys are an error naming the key."""
    types = _field_types(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        where = f" in {path}" if path else ""
        raise ConfigError(f"{path + '.' if path else ''}{unknown[0]}: unknown field{where}; valid fields are {sorted(names)}")
    kwargs = {k: _build(types[k], v, f"{path + '.' if path else ''}{k}") for k, v in data.items()}
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{path or cls.__name__}: {e}") from e


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def read_file(path: str | Path) -> dict:
    path = Path(path)
    text = path.read_text()
    if path.suffix in (".yaml", ".yml"):
        import yaml

        data = yaml.safe_load(text) or {}
    else:
        data = json.loads(text)
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a config file must hold a mapping of field names to values")
    return data


def merge(base: dict, overrides: dict) -> dict:
    """Overrides win; nested dicts merge; dotted keys ('model.name') address nested fields."""
    out = json.loads(json.dumps(base))
    for key, value in overrides.items():
        if value is None:
            continue
        parts = key.split(".")
        node = out
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        if isinstance(value, dict) and isinstance(node.get(parts[-1]), dict):
            node[parts[-1]] = merge(node[parts[-1]], value)
        else:
            node[parts[-1]] = value
    return out


def load_config(cls: type[T], path: str | Path | None = None, overrides: dict | None = None) -> T:
    data = read_file(path) if path else {}
    return from_dict(cls, merge(data, overrides or {}))


def save_config(cfg: Any, path: str | Path) -> None:
    path = Path(path)
    data = to_dict(cfg)
    if path.suffix in (".yaml", ".yml"):
        import yaml

        path.write_text(yaml.safe_dump(data, sort_keys=False))
    else:
        path.write_text(json.dumps(data, indent=2))


__all__ = ["ConfigError", "ModelSpec", "CorpusSpec", "check", "from_dict", "to_dict", "load_config", "save_config",
           "merge", "read_file", "field"]
