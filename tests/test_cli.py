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
