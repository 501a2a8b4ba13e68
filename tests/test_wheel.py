"""A built wheel works without the source checkout: installed in a fresh venv, its `saelab` answers --help, serves
the explorer (whose script, pages and page code ship in the wheel) and trains an SAE on the embedded reference model
and stdlib corpus.

The fresh venv sees this environment's third-party packages through a .pth line (no downloads), but not its editable
saelab: a path listed in a .pth is only appended to sys.path, the .pth files inside it (the editable finder's) are not
run, so `import saelab` finds the wheel's copy, which the tests check.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import urllib.request
import venv
import zipfile
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from explorer_data import DENSE, explore_server, make_tiny_run  # noqa: E402

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]


def run(cmd, **kw) -> subprocess.CompletedProcess:
    done = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, **kw)
    assert done.returncode == 0, f"{cmd} exited {done.returncode}:\n{done.stdout}\n{done.stderr}"
    return done


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """The wheel built from a copy of the checkout (a build in place would leave build/ in it)."""
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    shutil.copytree(ROOT / "saelab", src / "saelab", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q",
         "-w", tmp / "dist", src])
    (path,) = (tmp / "dist").glob("saelab-*.whl")
    return path


@pytest.fixture(scope="module")
def installed(wheel, tmp_path_factory):
    """(the fresh venv, its bin/, the environment and working folder to run it in) with the wheel installed."""
    home = tmp_path_factory.mktemp("venv")
    env_dir = home / "env"
    venv.create(env_dir, with_pip=False, symlinks=True)  # pip below is this environment's, aimed at the new one
    python = env_dir / "bin" / "python"
    site = Path(run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], cwd=home)
                .stdout.strip())
    ours = {sysconfig.get_paths()[k] for k in ("purelib", "platlib")}
    (site / "dev_packages.pth").write_text("".join(p + "\n" for p in sorted(ours)))
    run([sys.executable, "-m", "pip", "--python", python, "install", "--no-deps", "--no-index", "-q", wheel])
    # no PYTHONPATH (it could point at the checkout); a working folder without a saelab/ in it (`python -m` and
    # `-c` put it first on sys.path)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    return env_dir, env_dir / "bin", env, home


def test_wheel_holds_the_app_and_the_runtime_data(wheel):
    """Every file of the explorer's script folder and of the embedded reference model and task data, as the
    checkout has them, is in the wheel, byte for byte."""
    names = set(zipfile.ZipFile(wheel).namelist())
    want = [p for d in ("saelab/explorer", "saelab/models/reference", "saelab/eval/task_data")
            for p in sorted((ROOT / d).rglob("*")) if p.is_file() and "__pycache__" not in p.parts
            and p.suffix != ".png" and p.name != "README.md"]
    assert any(p.name == "explore.py" for p in want) and any(p.name == "model.safetensors" for p in want)
    with zipfile.ZipFile(wheel) as z:
        for p in want:
            rel = p.relative_to(ROOT).as_posix()
            assert rel in names, f"{rel} is not in the wheel"
            assert z.read(rel) == p.read_bytes(), rel


def test_installed_saelab_is_the_wheel(installed):
    env_dir, bin_dir, env, home = installed
    probe = ("import json, sys, saelab; from saelab.cli.dashboard import explorer_script; "
             "print(json.dumps([saelab.__file__, str(explorer_script()), repr(sys.meta_path)]))")
    where, script, finders = json.loads(run([bin_dir / "python", "-c", probe], env=env, cwd=home).stdout)
    assert Path(where).is_relative_to(env_dir) and Path(script).is_relative_to(env_dir), (where, script)
    assert Path(script).is_file() and "Editable" not in finders
    out = run([bin_dir / "saelab", "--help"], env=env, cwd=home).stdout
    assert "explore" in out and "train" in out


def test_explore_from_the_wheel(installed, tmp_path_factory):
    """The wheel's `saelab explore` serves (Streamlit's health check and its page), and the wheel's script renders
    a tiny bundle's overview and feature page under AppTest in the fresh venv."""
    env_dir, bin_dir, env, home = installed
    tiny = make_tiny_run(tmp_path_factory.mktemp("explore"), tokens=600)
    with explore_server([bin_dir / "saelab", "explore", tiny], home / "server.log", env=env, cwd=home) as url:
        page = urllib.request.urlopen(url + "/", timeout=30).read().decode()
    assert '<div id="root">' in page
    probe = f"""
import json
from streamlit.testing.v1 import AppTest
from saelab.cli.dashboard import explorer_script

at = AppTest.from_file(str(explorer_script()), default_timeout=180)
at.run()
titles = [t.value for t in at.title]
at.query_params["latent"] = "{DENSE}"
at.switch_page("views/feature.py")
at.run()
print(json.dumps({{"overview": titles, "feature": [t.value for t in at.title],
                  "errors": [str(e.value) for e in [*at.exception, *at.error]]}}))
"""
    env = {**env, "SAELAB_EXPLORE": json.dumps([str(tiny)])}
    got = json.loads(run([bin_dir / "python", "-c", probe], env=env, cwd=home).stdout.strip().splitlines()[-1])
    assert got == {"overview": [f"Overview · {tiny.name}"], "feature": [f"Latent {DENSE}"], "errors": []}


def test_train_from_the_wheel(installed):
    """The embedded reference model and the stdlib corpus come with the wheel: a short training run works (a 20k-token
    cache, not the default 1M, to keep it short)."""
    env_dir, bin_dir, env, home = installed
    out = home / "run"
    done = run([bin_dir / "saelab", "train", "--tokens", "20k", "--cache-tokens", "20k", "--eval-tokens", "0",
                "--out", out, "--no-progress"], env=env, cwd=home)
    cfg = json.loads((out / "sae" / "cfg.json").read_text())
    assert cfg["hook_name"] == "blocks.2.hook_resid_pre" and "trained" in done.stdout
