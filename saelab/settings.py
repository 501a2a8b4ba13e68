"""Settings declared once: a config dataclass's field carries its help text and flag, and the command line, the
notebook API and `--help` are generated from it.

    tokens: int = setting(2_000_000, "training tokens", parse=parse_count)
    hook_name: str = setting("", "the hook the SAE reads", flag="--hook", default_text="the middle residual stream")

`add_flags(parser, TrainConfig)` adds one flag per declared field, recursing into nested dataclasses (`model.*`,
`corpus.*`, `sae.*`), each help ending in its default once; `overrides_from_args(args, TrainConfig)` and
`overrides_from_kwargs(TrainConfig, {"hook": ..., "tokens": "2M"}, "saelab.train")` turn what a user gave into
config overrides ({dotted key: value}) for `saelab.config.load_config`. A setting's keyword name is its flag's
(`--n-latents` → n_latents, `--hook` → hook), except a flag that turns a setting off (`--keep-bos`), whose keyword
is the field's own name (exclude_bos). Standard library only, so every layer may declare settings.
"""

from __future__ import annotations

import argparse
import dataclasses
import typing
from dataclasses import dataclass
from typing import Any, Callable

from saelab.errors import ConfigError

MULTIPLIERS = {"k": 10 ** 3, "m": 10 ** 6, "g": 10 ** 9, "b": 10 ** 9}


class TextError(ConfigError, argparse.ArgumentTypeError):
    """Text that is not a setting's value. A `ConfigError` in the API; as an argparse `type`, the flag's one-line
    usage error."""


class CountError(TextError):
    """Not a count."""


def check(cond: bool, field_name: str, message: str) -> None:
    """A setting's check when its dataclass is built: unless `cond`, a `ConfigError` "<field_name>: <message>"."""
    if not cond:
        raise ConfigError(f"{field_name}: {message}")


def parse_count(text: str) -> int:
    """'20M' → 20_000_000, '500k' → 500_000, '1.5G', '4096'."""
    t = str(text).strip().lower().replace("_", "")
    mult = MULTIPLIERS.get(t[-1:], 1)
    try:
        return int(float(t[:-1] if mult > 1 else t) * mult)
    except ValueError:
        raise CountError(f"not a count: {text!r} (use e.g. 20M, 500k or 4096)") from None


def as_count(value: Any, name: str) -> int:
    """A count given as a number or as text ('2M'); a `ConfigError` that names `name` otherwise."""
    if isinstance(value, int):
        return value
    try:
        return parse_count(value)
    except CountError as e:
        raise ConfigError(f"{name}: {e.message}") from None


def parse_ints(text: str) -> list[int]:
    """'1,2,4' → [1, 2, 4]."""
    try:
        return [int(v) for v in str(text).split(",") if v.strip()]
    except ValueError:
        raise TextError(f"expected comma-separated integers, got {text!r}") from None


def format_count(n: int) -> str:
    """20_000_000 → '20M', 500_000 → '500k', 65_536 → '65536': how a count default reads in `--help`."""
    for suffix, mult in (("G", 10 ** 9), ("M", 10 ** 6), ("k", 10 ** 3)):
        if n and n % mult == 0:
            return f"{n // mult}{suffix}"
    return str(n)


def setting(default: Any, help: str, *, flag: str | None = None, default_text: str | None = None,
            parse: Callable[[str], Any] | None = None, choices: tuple | None = None, metavar: str | None = None,
            negate: bool = False, repeat: bool = False):
    """A config dataclass field with its `--help` text (without the default: the help appends "(default X)").

    flag: the command-line flag when it is not `--<field-name>` ("--hook" for hook_name); default_text: the default
    as a user should read it when the raw value is a placeholder ("16 × d_in" for n_latents 0); parse: text → value
    for flags and keyword strings (`parse_count`); choices: the values argparse accepts; negate: a bool whose flag
    turns it off (`--keep-bos` for exclude_bos); repeat: a list given by repeating its flag (`--alpha 2 --alpha 4`;
    not given: the default)."""
    meta = {"help": help, "flag": flag, "default_text": default_text, "parse": parse, "choices": choices,
            "metavar": metavar, "negate": negate or None, "repeat": repeat or None}
    meta = {k: v for k, v in meta.items() if v is not None}
    if isinstance(default, (list, dict)):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


@dataclass(frozen=True)
class Flag:
    """One declared setting of a config class, as the command line and the API see it."""

    key: str  # the dotted config key: "sae.k"
    name: str  # keyword argument and argparse dest: "k", "hook", "model_dtype"
    option: str  # the flag: "--k", "--hook", "--model-dtype"
    field: dataclasses.Field
    type: Any  # the field's type

    @property
    def default(self) -> Any:
        f = self.field
        return f.default if f.default is not dataclasses.MISSING else f.default_factory()

    @property
    def meta(self):
        return self.field.metadata

    def help(self, show_default: bool = True, note: str = "") -> str:
        """The help text, with "(default X)" once; `%` escaped for argparse."""
        text = note + self.meta["help"]
        if show_default:
            shown = self.meta.get("default_text")
            if shown is None:
                shown = format_count(self.default) if self.meta.get("parse") is parse_count else str(self.default)
            text += f" (default {shown})"
        return text.replace("%", "%%")


def flags(cls: type, prefix: str = "") -> list[Flag]:
    """Every field declared with `setting` in `cls` and in its nested config dataclasses, in declaration order."""
    types = typing.get_type_hints(cls)
    out: list[Flag] = []
    for f in dataclasses.fields(cls):
        tp = types[f.name]
        if dataclasses.is_dataclass(tp):
            out += flags(tp, f"{prefix}{f.name}.")
        elif "help" in f.metadata:
            option = f.metadata.get("flag") or "--" + f.name.replace("_", "-")
            name = f.name if f.metadata.get("negate") else option[2:].replace("-", "_")
            out.append(Flag(prefix + f.name, name, option, f, tp))
    return out


def add_flag(parser, flag: Flag, *, defaults: bool = False, options: bool = False, note: str = ""):
    """Add one setting's flag to an argparse parser or group. defaults False: every flag defaults to None, so a
    --config file's value is not overridden by a default; True: the field's default. A bool is an on-switch
    (`store_true`) or, with `negate`, an off-switch. `options`: an architecture's option, whose text goes unparsed to
    its options dataclass (which checks it and names the field), a bool as a `--x/--no-x` pair."""
    default = flag.default if defaults else None
    kw: dict[str, Any] = {"dest": flag.name, "default": default}
    if flag.type is bool and options:
        kw.update(action=argparse.BooleanOptionalAction, help=flag.help(note=note))
    elif flag.type is bool:
        kw.update(action="store_const", const=not flag.meta.get("negate"), help=flag.help(False, note))
    else:
        parse = flag.meta.get("parse") or (flag.type if flag.type in (int, float) and not options else None)
        kw.update(help=flag.help(note=note), metavar=flag.meta.get("metavar") or flag.name.upper())
        if flag.meta.get("repeat"):  # one value per flag; argparse would append to a default list, so None
            kw.update(action="append", default=None)
            item = typing.get_args(flag.type)
            parse = flag.meta.get("parse") or (item[0] if item and item[0] in (int, float) else None)
        if parse is not None:
            kw["type"] = parse
        if "choices" in flag.meta:
            kw["choices"] = flag.meta["choices"]
            if "metavar" not in flag.meta:
                del kw["metavar"]  # argparse shows the choices: {a,b,c}
    return parser.add_argument(flag.option, **kw)


def add_flags(parser, cls: type, *, defaults: bool = False, options: bool = False,
              listed: dict[str, list[str]] | None = None) -> None:
    """One flag per declared setting of `cls` (see `add_flag`). `listed`: dotted key → the values to name first in
    that flag's help (e.g. the registered architectures, known only where the registry may be imported)."""
    for flag in flags(cls):
        names = (listed or {}).get(flag.key)
        note = f"{', '.join(names[:-1])} or {names[-1]}; " if names else ""
        add_flag(parser, flag, defaults=defaults, options=options, note=note)


def overrides_from_kwargs(cls: type, kwargs: dict, where: str) -> dict:
    """{dotted config key: value} from keyword settings named like the flags (`n_latents=`, `hook=`); text is
    parsed where the setting declares how (tokens="2M"); an unknown name is a `ConfigError` listing the known ones.
    None values are left out (not given)."""
    table = {f.name: f for f in flags(cls)}
    out = {}
    for name, value in kwargs.items():
        if name not in table:
            raise ConfigError(f"{where}: unknown setting {name!r}", hint=f"use one of {', '.join(sorted(table))}")
        flag = table[name]
        parse = flag.meta.get("parse")
        if value is None:
            continue
        if parse is parse_count:
            value = as_count(value, name)
        elif parse is not None and isinstance(value, str):
            try:
                value = parse(value)
            except (ConfigError, argparse.ArgumentTypeError, ValueError) as e:
                raise ConfigError(f"{name}: {e}") from None
        out[flag.key] = value
    return out


def flag_values(args: argparse.Namespace, cls: type) -> dict:
    """The settings of `cls` given on the command line, by keyword name (flags not given are None and left out)."""
    return {f.name: getattr(args, f.name) for f in flags(cls) if getattr(args, f.name, None) is not None}


def overrides_from_args(args: argparse.Namespace, cls: type) -> dict:
    """{dotted config key: value} from the flags `add_flags(parser, cls)` added; flags not given are left out."""
    return overrides_from_kwargs(cls, flag_values(args, cls), "flags")


__all__ = ["setting", "check", "parse_count", "parse_ints", "as_count", "format_count", "TextError", "CountError", "Flag",
           "flags", "add_flag", "add_flags", "overrides_from_kwargs", "overrides_from_args", "flag_values"]
