"""Flag helpers shared by the commands: the model flags, flag tables → config overrides, counts and lists."""

from __future__ import annotations

import argparse


def _add_model_flags(p: argparse.ArgumentParser, defaults: bool = True) -> None:
    """--model/--device/--model-dtype; without defaults (None) when a --config file may set them instead."""
    p.add_argument("--model", default="reference" if defaults else None,
                   help="'reference' (embedded, default), a hub name such as gpt2, or a local model directory")
    p.add_argument("--device", default="cpu" if defaults else None, help="cpu, cuda[:N] or auto (default: cpu)")
    p.add_argument("--model-dtype", default="float32" if defaults else None,
                   help="float32 (default), float16 or bfloat16")




def _model_spec(args):
    """The --model/--device/--model-dtype flags, checked before anything is loaded."""
    from saelab.config import ModelSpec

    return ModelSpec(name=args.model, device=args.device, dtype=args.model_dtype)




def _add_table_flags(p: argparse.ArgumentParser, table: dict) -> None:
    for flag, (_, typ, help_) in table.items():
        p.add_argument(flag, type=typ, default=None, help=help_)


def _table_overrides(args, table: dict) -> dict:
    """Config overrides ({dotted key: value}) from the flags of a table; unset flags are None and ignored."""
    overrides = {key: getattr(args, flag[2:].replace("-", "_")) for flag, (key, _, _) in table.items()}
    overrides.update({"model.name": args.model, "model.device": args.device, "model.dtype": args.model_dtype})
    return overrides




def parse_count(text: str) -> int:
    """'20M' → 20_000_000, '500k' → 500_000, '1.5G', '4096'."""
    t = str(text).strip().lower().replace("_", "")
    mult = {"k": 10 ** 3, "m": 10 ** 6, "g": 10 ** 9, "b": 10 ** 9}.get(t[-1:], 1)
    try:
        return int(float(t[:-1] if mult > 1 else t) * mult)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a count: {text!r} (use e.g. 20M, 500k or 4096)") from None



def _int_list(text: str) -> list[int]:
    """'1,2,4' → [1, 2, 4] (argparse type: a bad value is a one-line usage error)."""
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None

