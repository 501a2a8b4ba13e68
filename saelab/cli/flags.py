"""Flag helpers shared by the commands: the model flags and comma-separated lists. Each setting's flag, help and
default are declared once, on its config dataclass field (`saelab.settings`)."""

from __future__ import annotations

import argparse

from saelab.settings import add_flags


def _add_model_flags(p: argparse.ArgumentParser, defaults: bool = True) -> None:
    """--model/--device/--model-dtype (`ModelSpec`'s settings); without defaults (None) when a --config file may
    set them instead."""
    from saelab.config import ModelSpec

    add_flags(p, ModelSpec, defaults=defaults)


def _model_spec(args):
    """The --model/--device/--model-dtype flags, checked before anything is loaded."""
    from saelab.config import ModelSpec

    return ModelSpec(name=args.model, device=args.device, dtype=args.model_dtype)




def _int_list(text: str) -> list[int]:
    """'1,2,4' → [1, 2, 4] (argparse type: a bad value is a one-line usage error)."""
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None

