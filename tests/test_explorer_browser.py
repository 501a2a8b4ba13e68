"""The explorer in a real browser: Debian's chromium (headless, driven by Playwright; no browser download) against
a `saelab explore` server started here on a free localhost port.

Needs /usr/bin/chromium (`apt-get install -y chromium`) and the playwright Python package; .ci/run installs both.
Set SAELAB_SCREENSHOTS=DIR to keep the screenshots (the README's come from here); otherwise they go to tmp.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from explorer_data import explore_server, make_tiny_run  # noqa: E402

CHROMIUM = os.environ.get("SAELAB_CHROMIUM", "/usr/bin/chromium")
pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not Path(CHROMIUM).exists(), reason=f"no chromium at {CHROMIUM} "
                                                                      "(apt-get install -y chromium)")]
sync_api = pytest.importorskip("playwright.sync_api")
WAIT_MS = 180_000  # generous: CI and shared machines can be slow to compile plotly.js


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    run = make_tiny_run(tmp_path_factory.mktemp("browser"))
    with explore_server([sys.executable, "-m", "saelab.cli", "explore", str(run)],
                        tmp_path_factory.mktemp("log") / "server.log") as url:
        yield url, run


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=CHROMIUM, args=[
            "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
            "--disable-sync", "--no-first-run"])
        yield b
        b.close()


@pytest.fixture
def shots(tmp_path) -> Path:
    d = Path(os.environ.get("SAELAB_SCREENSHOTS") or tmp_path)
    d.mkdir(parents=True, exist_ok=True)
    return d


def normal(run) -> int:
    import saelab.dashboard as dash

    t = dash.open(run / "dashboard").table()
    return int(t[(~t["dead"]) & (~t["dense"]) & (t["n_rows"] >= 3)].index[0])


def test_feature_page_deep_link_chart_tokens_and_neighbour_click(server, browser, shots):
    import saelab.dashboard as dash

    url, run = server
    b = dash.open(run / "dashboard")
    t = b.table()
    i = normal(run)
    nb = next(n.latent for n in b.latent(i).neighbours_decoder if not t.loc[n.latent, "dead"])  # it has a chart
    page = browser.new_page(viewport={"width": 1400, "height": 2400})
    page.goto(f"{url}/feature?sae={run.name}&latent={i}")
    page.wait_for_selector(".js-plotly-plot .main-svg", timeout=WAIT_MS)  # the Plotly histogram is drawn
    page.wait_for_selector("span.xp-act", timeout=WAIT_MS)  # the highlighted tokens are on the page
    assert page.locator("h1").first.inner_text().strip() == f"Latent {i}"
    assert page.locator("span.xp-act").count() > 0
    title = page.locator("span.xp-act").first.get_attribute("title")
    assert "position" in title  # the hover tooltip: token, value, position
    page.screenshot(path=str(shots / "feature.png"))
    page.get_by_role("button", name=f"latent {nb} · cos").click()
    page.wait_for_function(f"() => document.querySelector('h1').innerText.trim() === 'Latent {nb}'",
                           timeout=WAIT_MS)
    page.wait_for_function(f"() => location.search.includes('latent={nb}')", timeout=WAIT_MS)
    assert f"latent={nb}" in page.url and f"latent={i}" not in page.url
    page.wait_for_selector(".js-plotly-plot .main-svg", timeout=WAIT_MS)
    assert "Traceback" not in page.content()
    page.reload()  # the URL alone restores the view
    page.wait_for_function(f"() => document.querySelector('h1') && "
                           f"document.querySelector('h1').innerText.trim() === 'Latent {nb}'", timeout=WAIT_MS)
    page.close()


def test_overview_and_prompt_pages(server, browser, shots):
    url, run = server
    page = browser.new_page(viewport={"width": 1400, "height": 1800})
    page.goto(f"{url}/?sae={run.name}")  # the default page lives at the root
    page.wait_for_selector(".js-plotly-plot .main-svg", timeout=WAIT_MS)
    page.wait_for_function("() => document.querySelectorAll('.js-plotly-plot').length >= 3", timeout=WAIT_MS)
    assert page.get_by_text("Page not found").count() == 0
    assert page.locator("h1").first.inner_text().strip() == f"Overview · {run.name}"
    page.screenshot(path=str(shots / "overview.png"))
    page.goto(f"{url}/prompt?sae={run.name}&pos=3&latent={normal(run)}")  # coloured by one latent
    page.wait_for_selector(".xp-ex", timeout=WAIT_MS)  # the model ran and the tokens are rendered
    assert page.locator("h1").first.inner_text().strip() == "Prompt view"
    page.wait_for_selector("[data-testid='stDataFrame']", timeout=WAIT_MS)
    page.screenshot(path=str(shots / "prompt.png"))
    assert "Traceback" not in page.content()
    page.close()
