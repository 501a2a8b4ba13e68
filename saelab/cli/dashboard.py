"""`saelab dashboard` (build a bundle) and `saelab explore` (the explorer on bundles)."""

from __future__ import annotations

import argparse
import json
import sys

from saelab.settings import add_flags, flag_values


# ---- dashboard
def add_dashboard(sub) -> None:
    p = sub.add_parser(
        "dashboard", help="build a run's dashboard bundle (every latent's stats, examples, logits, neighbours)",
        description="One streaming pass of held-out rows (of the SAE's training corpus: its validation split, then "
                    "train rows the SAE never trained on) through the model, stopped at the SAE's hook, then every "
                    "latent's statistics, "
                    "activation histogram, top / interval / random examples, logit lens, decoder and co-activation "
                    "neighbours, token index, decoder map and the run's evaluator scores, written as a bundle "
                    "(memory-mapped arrays + Parquet + manifest.json) that `saelab explore` and "
                    "saelab.dashboard.open() read. Resumable: rerunning continues a killed build.",
        epilog="examples:\n  saelab dashboard runs/reference-blocks.2.hook_resid_pre-topk-k32\n"
               "  saelab dashboard runs/x --tokens 200k --out /tmp/x-dash",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", help="a run directory (with sae/ and config.yaml) or an SAE directory (cfg.json)")
    from saelab.api import DashboardRunSettings

    add_flags(p, DashboardRunSettings, defaults=True)
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def run_dashboard(args) -> int:
    from saelab.api import DashboardRunSettings, dashboard
    from saelab.dashboard.run import summary

    bundle = dashboard(args.run, **flag_values(args, DashboardRunSettings), progress=not args.no_progress)
    print(summary(bundle.path))
    return 0


# ---- explore
def add_explore(sub) -> None:
    p = sub.add_parser(
        "explore", help="open the feature explorer (Streamlit + Plotly) on dashboard bundles",
        description="Start the local feature explorer: overview, a page per latent, finder, prompt view, steering "
                    "and compare, reading the bundles `saelab dashboard` wrote. Offline; bound to 127.0.0.1 unless "
                    "--host says otherwise. Every view is a deep link (the URL holds its state).",
        epilog="examples:\n  saelab explore                      every bundle under runs/\n"
               "  saelab explore runs/a runs/b        two runs (compare them on the Compare page)\n"
               "  saelab explore runs/a/dashboard --port 8600",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("paths", nargs="*", help="run folders, dashboard bundles or folders of runs (default: runs/)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8501, help="port (default 8501)")
    p.add_argument("--open", action="store_true", help="open a browser tab as well")


def explorer_script():
    """The explorer's Streamlit entry script inside the installed saelab (a path: the CLI never imports the app)."""
    from pathlib import Path

    return Path(__file__).resolve().parents[1] / "explorer" / "app" / "explore.py"


def run_explore(args) -> int:
    import os
    import subprocess
    from pathlib import Path

    from saelab.settings import check
    from saelab.errors import DataError

    check(0 < args.port < 65536, "--port", f"must be in 1..65535, got {args.port}")
    paths = args.paths or ["runs"]
    for p in paths:
        if not Path(p).exists():
            raise DataError(f"{p} does not exist", hint="pass a run folder with a bundle (build one with "
                                                        "`saelab dashboard RUN`) or a bundle folder")
    env = {**os.environ, "SAELAB_EXPLORE": json.dumps([str(Path(p).resolve()) for p in paths])}
    cmd = [sys.executable, "-m", "streamlit", "run", str(explorer_script()), "--server.address", args.host,
           "--server.port", str(args.port), "--server.headless", str(not args.open).lower(),
           "--browser.gatherUsageStats", "false", "--client.showErrorDetails", "none",
           "--server.fileWatcherType", "none", "--client.toolbarMode", "minimal"]
    print(f"explorer   http://{args.host}:{args.port}  ({', '.join(paths)}; Ctrl+C stops it)", flush=True)
    if hasattr(os, "execve"):  # become the server: a signal to this process (Ctrl+C, terminate) reaches it
        os.execve(sys.executable, cmd, env)
    return subprocess.call(cmd, env=env)
