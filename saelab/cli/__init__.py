"""The `saelab` command. Parses flags into a config, calls the library, prints a short summary; no logic of its own.

Each subcommand is a pair: `add_<name>(subparsers)` declares its flags, `run_<name>(args)` runs it.
"""

from __future__ import annotations

import argparse
import sys

# each command's pair add_<name>(subparsers) / run_<name>(args), found by name below
from saelab.cli.model import add_info, run_info, add_hooks, run_hooks, add_reference, run_reference  # noqa: F401
from saelab.cli.train import add_train, run_train  # noqa: F401
from saelab.cli.eval import add_eval, run_eval, add_calibrate, run_calibrate  # noqa: F401
from saelab.cli.cache import add_cache, run_cache  # noqa: F401
from saelab.cli.dashboard import add_dashboard, run_dashboard, add_explore, run_explore  # noqa: F401
from saelab.cli.patch import add_patch, run_patch  # noqa: F401
from saelab.cli.steer import add_steer, run_steer  # noqa: F401
from saelab.cli.bench import add_bench, run_bench  # noqa: F401
from saelab.cli.doctor import add_doctor, run_doctor  # noqa: F401


COMMANDS = ["info", "hooks", "reference", "train", "eval", "cache", "dashboard", "patch", "explore", "steer", "bench",
            "doctor", "calibrate"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="saelab",
        description="Train, evaluate and explore sparse autoencoders on language-model activations. "
                    "Every command works offline on the embedded reference model and the standard-library corpus.")
    parser.add_argument("--debug", action="store_true",
                        help="on an error, print the full traceback as well (for bug reports); also SAELAB_DEBUG=1")
    sub = parser.add_subparsers(dest="command", required=True)
    mod = sys.modules[__name__]
    for name in COMMANDS:
        getattr(mod, f"add_{name}")(sub)
    return parser


def _command_label(args) -> str:
    """'cache verify', 'reference train', 'train': what the user ran, for the first word of an error line."""
    words = [args.command]
    if getattr(args, "reference_cmd", None):
        words.append(args.reference_cmd)
    if args.command == "cache" and getattr(args, "action", "write") != "write":
        words.append(args.action)
    return " ".join(words)


def report_error(label: str, error, debug: bool = False) -> None:
    """The error boundary's output: `saelab <cmd>: error: <message>` and `hint: <hint>` on stderr, one line each
    (a multi-line message is joined with '; '); with `debug`, the traceback first."""
    import traceback

    if debug:
        traceback.print_exception(error)
    message = "; ".join(line.strip() for line in error.message.splitlines() if line.strip())
    print(f"saelab {label}: error: {message}", file=sys.stderr)
    if error.hint:
        print(f"hint: {' '.join(error.hint.split())}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    """Run one command. A `SaelabError` (a user's mistake) prints one line (+ a hint) and exits 2; any other
    exception is a bug: its traceback is printed and the exit code is 1. `--debug` / SAELAB_DEBUG=1 print the
    traceback of a `SaelabError` too."""
    import os
    import traceback

    from saelab.errors import SaelabError

    args = build_parser().parse_args(argv)
    label = _command_label(args)
    debug = args.debug or os.environ.get("SAELAB_DEBUG", "").strip() not in ("", "0")
    try:
        return getattr(sys.modules[__name__], f"run_{args.command}")(args) or 0
    except SaelabError as e:
        from saelab.distributed import reports

        if reports(e):  # under torchrun, an error every rank shares is printed once, by rank 0
            report_error(label, e, debug)
        return 2
    except KeyboardInterrupt:
        print(f"saelab {label}: interrupted", file=sys.stderr)
        return 130
    except Exception:  # noqa: BLE001 -- not a user error: a bug, shown in full
        traceback.print_exc()
        print(f"saelab {label}: internal error (a bug in saelab, not in your input); please report it with the "
              f"traceback above", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
