"""The `saelab` command: help pages, and the model commands (`info`, `hooks`) on the embedded model."""

import json
import re
import subprocess
import sys

import pytest

from saelab.cli import main
from saelab.models import reference_dir


def run_cli(capsys, *argv):
    """`main(argv)` → (exit code, stdout, stderr); argparse's SystemExit (for --help) becomes its code."""
    try:
        code = main(list(argv))
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("argv, expect", [
    (["--help"], ["info", "hooks", "reference"]),
    (["info", "--help"], ["--model", "--rows", "--dataset"]),
    (["hooks", "--help"], ["--model", "--grep"]),
    (["reference", "train", "--help"], ["--out", "--steps", "--seed"]),
])
def test_help_pages(capsys, argv, expect):
    code, out, _ = run_cli(capsys, *argv)
    assert code == 0
    for word in expect:
        assert word in out


def test_module_entry_point():
    r = subprocess.run([sys.executable, "-m", "saelab.cli", "--help"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "usage: saelab" in r.stdout


def test_bad_usage_exits_2(capsys):
    code, _, err = run_cli(capsys)
    assert code == 2 and "usage" in err
    code, _, err = run_cli(capsys, "reference", "train")  # --out is required
    assert code == 2 and "--out" in err


@pytest.mark.filterwarnings("ignore:skipped .* not valid UTF-8:UserWarning")
def test_info(capsys):
    code, out, err = run_cli(capsys, "info", "--rows", "2")
    assert code == 0, err
    assert re.search(r"model\s+reference: \d+ layers, d_model \d+", out), out
    assert "blocks.0.hook_resid_pre" in out and "middle residual stream" in out
    m = re.search(r"held-out\s+([\d.]+) nats/token, ([\d.]+) bits/byte over ([\d,]+) tokens", out)
    assert m, out
    nats, bpb, tokens = float(m[1]), float(m[2]), int(m[3].replace(",", ""))
    assert tokens == 2 * 127 and 0 < bpb < 20 and 0 < nats < 12


def test_hooks(capsys):
    code, out, err = run_cli(capsys, "hooks", "--grep", "hook_resid_post")
    assert code == 0, err
    n_layers = json.loads((reference_dir() / "config.json").read_text())["n_layer"]
    assert out.split() == [f"blocks.{i}.hook_resid_post" for i in range(n_layers)]


def test_model_errors_are_one_line(capsys):
    code, out, err = run_cli(capsys, "hooks", "--model", "./no/such/model/dir")
    assert code == 2 and out == ""
    assert err.startswith("saelab hooks: error: model './no/such/model/dir': no such local directory")
    assert "Traceback" not in err


# ------------------------------------------------------------------------------------------ settings declared once
def _subparsers():
    import argparse

    from saelab.cli import build_parser

    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices


# command → (its API function, flags whose API keyword has another name)
API_OF = {"info": ("info", {}), "hooks": ("hooks", {}), "calibrate": ("calibrate", {}),
          "dashboard": ("dashboard", {}), "steer": ("steer", {}), "bench": ("bench_synthetic", {}),
          "patch": ("patch", {"method": "methods"})}


@pytest.mark.parametrize("command", ["info", "hooks", "eval", "calibrate", "dashboard", "patch", "steer", "bench"])
def test_each_flag_states_its_default_once_and_the_api_has_the_same(command):
    """Every flag with a default says it once in its help, and the notebook API's keyword defaults to the same value
    (the flag, its help and the API default come from one declaration)."""
    import inspect

    import saelab.api  # its functions (the package saelab.dashboard, once imported, hides saelab.dashboard)

    parser = _subparsers()[command]
    api = inspect.signature(getattr(saelab.api, API_OF[command][0])).parameters if command in API_OF else {}
    for action in parser._actions:
        if not action.option_strings or action.help is None or action.dest == "help":
            continue
        if action.default not in (None, False, "", []):
            assert action.help.count("(default ") == 1, (action.option_strings, action.help)
        name = API_OF.get(command, ("", {}))[1].get(action.dest, action.dest)
        if name in api and action.default is not None:
            want = api[name].default
            got = action.default
            assert (list(got) if isinstance(got, tuple) else got) == (list(want) if isinstance(want, tuple)
                                                                        else want), (command, name)
