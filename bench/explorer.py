"""Explorer budget on a large bundle: feature page server run (AppTest), finder filter, first load in Chromium until
the chart is drawn, and the app server's memory.

    python bench/explorer.py --bundle runs/x/dashboard          # a 65,536-latent bundle for the issue's budget
    python bench/explorer.py --bundle B --no-browser            # AppTest numbers only

Baselines measured in the same run, so the ratios hold on a loaded machine: the AppTest run of the feature page for
a latent id out of range (the app's shell: navigation, bundle lookup, one error message) for the page runs;
`Bundle.latent(i)` for the feature page's own data read; and in Chromium, the time until the page's heading
appears (Streamlit's shell and first script run) for the chart, and the floor under it: a bare page that only
loads the full plotly.js (the bundle Streamlit lazy-loads for any Plotly chart) and draws one bar chart. Memory is the streamlit server's peak RSS (VmHWM)
after the browser visited the overview, feature and finder pages (no model: the prompt page is not visited).
Budget (issue 14): feature page ≤ 300 ms, finder filter ≤ 500 ms, first chart ≤ 3 s, memory ≤ 1.5 GB.
Results: a table on stdout and bench/results/explorer.json (date, machine, torch version, load average).
"""

from __future__ import annotations

import argparse
import datetime
import functools
import http.server
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).parent))
from cache import device_name  # noqa: E402  (bench/cache.py)

BUDGET = {"feature_page_ms": 300, "finder_filter_ms": 500, "first_chart_s": 3.0, "memory_gb": 1.5}


def _median(xs):
    return statistics.median(xs) if xs else float("nan")


def apptest_runs(bundle_path: str, latents: list[int]) -> dict:
    from streamlit.testing.v1 import AppTest

    import saelab.dashboard as dash

    os.environ["SAELAB_EXPLORE"] = json.dumps([bundle_path])

    def page(name: str, expect_error: bool = False, **query):
        at = AppTest.from_file(str(ROOT / "saelab" / "explorer" / "app" / "explore.py"), default_timeout=600)
        at.run()
        for k, v in query.items():
            at.query_params[k] = str(v)
        at.switch_page(f"views/{name}.py")
        t = time.perf_counter()
        at.run()
        dt = time.perf_counter() - t
        assert not at.exception and bool(at.error) == expect_error, (at.exception, [e.value for e in at.error])
        return at, dt

    page("feature", latent=latents[0])  # first touch: imports, bundle open, table read (reported separately)
    shell = [page("feature", expect_error=True, latent=-1)[1] for _ in range(3)]  # shell + "no such latent"
    feature = [page("feature", latent=i)[1] for i in latents[1:]]
    b = dash.open(bundle_path)
    reads = []
    for i in latents[1:]:
        t = time.perf_counter()
        b.latent(i)
        reads.append(time.perf_counter() - t)
    # finder: filter live latents by a density range and a max activation, sort by max (the page's full run), and
    # the same query on the table alone
    from saelab.explorer.finder import filter_latents

    q = dict(kind="live", dmin=-3.5, dmax=-1.0, amin=0.5, sort="max", desc=1)
    finder = [page("finder", **q)[1] for _ in range(3)]
    tok = [page("finder", token=" return", sort="token_act")[1] for _ in range(2)]
    t = b.table()
    pure = []
    for _ in range(5):
        t0 = time.perf_counter()
        filter_latents(t, "live", (-3.5, -1.0), 0.5, None, None, None, "max", True)
        pure.append(time.perf_counter() - t0)
    return {"shell_ms": 1e3 * _median(shell), "feature_page_ms": 1e3 * _median(feature),
            "feature_page_max_ms": 1e3 * max(feature), "latent_read_ms": 1e3 * _median(reads),
            "finder_filter_ms": 1e3 * _median(finder), "finder_token_ms": 1e3 * _median(tok),
            "filter_only_ms": 1e3 * _median(pure), "n_feature_pages": len(feature)}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _children(pid: int) -> list[int]:
    out = []
    for task in Path(f"/proc/{pid}/task").glob("*/children"):
        out += [int(c) for c in task.read_text().split()]
    return out + [g for c in out for g in _children(c)]


def _vm(pid: int, key: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    return 0


def browser_runs(bundle_path: str, latents: list[int], chromium: str) -> dict:
    from playwright.sync_api import sync_playwright

    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen([sys.executable, "-m", "saelab.cli", "explore", bundle_path, "--port", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(600):
            try:
                if urllib.request.urlopen(url + "/_stcore/health", timeout=5).read() == b"ok":
                    break
            except OSError:
                time.sleep(0.5)
        name = Path(bundle_path).parent.name if Path(bundle_path).name == "dashboard" else Path(bundle_path).name
        with sync_playwright() as pw:
            b = pw.chromium.launch(executable_path=chromium, args=["--no-sandbox", "--disable-gpu",
                                                                   "--disable-background-networking",
                                                                   "--disable-component-update", "--no-first-run"])
            warm = b.new_page()  # the server's first session: imports and opens the bundle (not the budget)
            warm.goto(f"{url}/feature?sae={name}&latent={latents[0]}")
            warm.wait_for_selector(".js-plotly-plot .main-svg", timeout=600_000)
            warm.close()
            heading, chart = [], []
            floor = plotly_floor(b, 3)
            for i in latents[1:4]:
                ctx = b.new_context(viewport={"width": 1400, "height": 1200})  # fresh context: empty HTTP cache
                page = ctx.new_page()
                t = time.perf_counter()
                page.goto(f"{url}/feature?sae={name}&latent={i}")
                page.wait_for_selector(f"h1:has-text('Latent {i}')", timeout=600_000)
                heading.append(time.perf_counter() - t)
                page.wait_for_selector(".js-plotly-plot .main-svg", timeout=600_000)
                chart.append(time.perf_counter() - t)
                ctx.close()
            page = b.new_page()
            for path in (f"?sae={name}", f"finder?sae={name}&sort=max"):
                page.goto(f"{url}/{path}")
                page.wait_for_selector("h1", timeout=600_000)
                page.wait_for_timeout(3000)
            b.close()
        server = [c for c in _children(proc.pid) if "streamlit" in Path(f"/proc/{c}/cmdline").read_text()]
        pid = server[0] if server else proc.pid
        return {"first_heading_s": _median(heading), "first_chart_s": _median(chart), "first_chart_max_s": max(chart),
                "plotly_floor_s": floor,
                "memory_gb": _vm(pid, "VmHWM") / 2**30, "memory_now_gb": _vm(pid, "VmRSS") / 2**30}
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def plotly_floor(browser, repeats: int) -> float:
    """The floor under "first chart": a bare page over local HTTP that loads the same full plotly.js bundle the
    app's chart needs (Streamlit lazy-loads its own copy, ~4.7 MB) and draws one 60-bar chart, in a fresh browser
    context each time; no Streamlit, no websocket, no Python. Median seconds until the chart's SVG is there."""
    import plotly.graph_objects as go

    with tempfile.TemporaryDirectory() as tmp:
        go.Figure(go.Bar(x=list(range(60)), y=[(i * 37) % 61 for i in range(60)])).write_html(
            str(Path(tmp) / "bar.html"), include_plotlyjs="directory")  # plotly.min.js beside it, one <script src>
        handler = functools.partial(_QuietHandler, directory=tmp)
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        times = []
        try:
            for _ in range(repeats):
                ctx = browser.new_context(viewport={"width": 1400, "height": 1200})
                page = ctx.new_page()
                t = time.perf_counter()
                page.goto(f"http://127.0.0.1:{server.server_address[1]}/bar.html")
                page.wait_for_selector(".js-plotly-plot .main-svg", timeout=600_000)
                times.append(time.perf_counter() - t)
                ctx.close()
        finally:
            server.shutdown()
    return _median(times)


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bundle", required=True, help="a dashboard bundle folder")
    ap.add_argument("--pages", type=int, default=8, help="feature pages timed (random live latents)")
    ap.add_argument("--no-browser", action="store_true")
    ap.add_argument("--chromium", default="/usr/bin/chromium")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "explorer.json"))
    args = ap.parse_args()
    import numpy as np
    import torch

    import saelab.dashboard as dash

    b = dash.open(args.bundle)
    live = np.flatnonzero(~b.table()["dead"].to_numpy())
    latents = [int(i) for i in np.random.default_rng(0).choice(live, args.pages + 1, replace=False)]
    load0 = os.getloadavg()
    res = apptest_runs(args.bundle, latents)
    if not args.no_browser:
        res.update(browser_runs(args.bundle, latents, args.chromium))
    res["feature_page_vs_shell"] = res["feature_page_ms"] / res["shell_ms"]
    if "first_chart_s" in res:
        res["chart_vs_heading"] = res["first_chart_s"] / res["first_heading_s"]
        res["chart_vs_plotly_floor"] = res["first_chart_s"] / res["plotly_floor_s"]
    rows = [("feature page run (AppTest)", f"{res['feature_page_ms']:.0f} ms", "≤ 300 ms",
             f"{res['feature_page_vs_shell']:.2f}× shell ({res['shell_ms']:.0f} ms); latent read "
             f"{res['latent_read_ms']:.1f} ms; max {res['feature_page_max_ms']:.0f} ms"),
            ("finder filter (AppTest)", f"{res['finder_filter_ms']:.0f} ms", "≤ 500 ms",
             f"filter alone {res['filter_only_ms']:.1f} ms; token search page {res['finder_token_ms']:.0f} ms")]
    if "first_chart_s" in res:
        rows += [("first load → chart (Chromium)", f"{res['first_chart_s']:.2f} s", "≤ 3 s",
                  f"heading at {res['first_heading_s']:.2f} s; chart/heading {res['chart_vs_heading']:.2f}×; "
                  f"max {res['first_chart_max_s']:.2f} s"),
                 ("bare plotly.js page → chart", f"{res['plotly_floor_s']:.2f} s", "(floor)",
                  f"the app's first chart is {res['chart_vs_plotly_floor']:.2f}× this page alone"),
                 ("server memory (peak RSS)", f"{res['memory_gb']:.2f} GB", "≤ 1.5 GB",
                  f"now {res['memory_now_gb']:.2f} GB")]
    load1 = os.getloadavg()
    print(f"explorer on {b!r}")
    print(f"machine: {device_name('cpu')}; load average {load0[0]:.1f} → {load1[0]:.1f}")
    for r in rows:
        print(f"  {r[0]:32s} {r[1]:>10s}   budget {r[2]:9s}  {r[3]}")
    out = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "machine": device_name("cpu"), "cpus": os.cpu_count(), "torch": torch.__version__,
           "load_average_start": load0, "load_average_end": load1, "bundle": str(args.bundle),
           "n_latents": b.n_latents, "tokens": b.manifest["corpus"]["tokens"], "budget": BUDGET,
           "within_budget": {k: res[k] <= v for k, v in BUDGET.items() if k in res}, "results": res}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
