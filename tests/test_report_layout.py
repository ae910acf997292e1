"""The HTML report fits the page: every table in a wrapper that scrolls sideways rather than widen the page, the
suggestion tables wrap their text in fixed columns; checked in headless Chromium at a wide and a narrow window."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess

import pytest

from optdiag.analysis import analyze_checkpoint
from tests import fixtures_analysis as fx

FAST = dict(max_batches=3, resolution=5, surface_resolution=3, trace_hvp=30, density_runs=1, density_steps=6)
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")

# Appended to a copy of the page: measures the layout once it has loaded and writes the numbers into the DOM.
PROBE = """<script>
window.addEventListener("load", () => {
  const root = document.documentElement;
  const prose = [...document.querySelectorAll("table.prose")];
  const out = {
    scrollWidth: root.scrollWidth, innerWidth: window.innerWidth, tables: document.querySelectorAll("table").length,
    unwrapped: [...document.querySelectorAll("table")].filter(t => !t.parentElement.classList.contains("table-wrap")).length,
    prose: prose.length,
    proseTooWide: prose.filter(t => t.scrollWidth > t.parentElement.clientWidth + 1).length,
  };
  const node = document.createElement("pre");
  node.id = "layout-probe";
  node.textContent = JSON.stringify(out);
  document.body.appendChild(node);
});
</script>"""


@pytest.fixture(scope="module")
def page(tmp_path_factory):
    """A real report: the two-layer linear net at its saddle (a verdict with suggestions) and after two steps."""
    folder = tmp_path_factory.mktemp("layout")
    zero = {"net.0.weight": fx.torch.zeros(2, 3), "net.1.weight": fx.torch.zeros(2, 2)}
    paths = [fx.write_lightning_checkpoint(folder / "saddle.ckpt", hidden=2, weights=zero, steps=3),
             fx.write_lightning_checkpoint(folder / "trained.ckpt", hidden=2, steps=2)]
    report = analyze_checkpoint(paths, model=fx.LinearNet, **FAST)
    html_path, _ = report.write(folder / "report")
    return html_path


def test_every_table_sits_in_a_scrolling_wrapper_and_suggestions_wrap(page):
    html = page.read_text(encoding="utf-8")
    assert ".table-wrap { max-width: 100%; overflow-x: auto; }" in html
    assert "table.prose { table-layout: fixed; width: 100%; }" in html
    assert html.count("<table") == html.count('<div class="table-wrap"><table') > 0
    suggestions = re.search(r'<table class="prose">(<colgroup>.*?</colgroup>)<thead><tr><th class="text">target</th>',
                            html)
    assert suggestions, "the saddle's suggestions are in a fixed-layout table"
    assert suggestions.group(1).count("<col ") == 6


def _layout(page, tmp_path, width: int) -> dict:
    probed = tmp_path / f"probed-{width}.html"
    probed.write_text(page.read_text(encoding="utf-8").replace("</body>", PROBE + "</body>"), encoding="utf-8")
    done = subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", f"--window-size={width},900",
                           "--virtual-time-budget=5000", "--dump-dom", probed.as_uri()],
                          capture_output=True, text=True, timeout=120)
    found = re.search(r'<pre id="layout-probe">(.*?)</pre>', done.stdout)
    assert found, done.stderr[-2000:]
    return json.loads(found.group(1).replace("&quot;", '"'))


@pytest.mark.parametrize("width", [1280, 700])
def test_the_page_never_scrolls_sideways_in_chromium(page, tmp_path, width):
    if CHROMIUM is None:
        if os.environ.get("OPTDIAG_REQUIRE_BROWSER"):
            pytest.fail("OPTDIAG_REQUIRE_BROWSER is set but there is no chromium")
        pytest.skip("no chromium on this machine (CI installs it)")
    layout = _layout(page, tmp_path, width)
    assert layout["innerWidth"] == width
    assert layout["scrollWidth"] <= layout["innerWidth"], layout  # nothing widens the page
    assert layout["tables"] > 5 and layout["unwrapped"] == 0
    assert layout["prose"] >= 1 and layout["proseTooWide"] == 0  # suggestions wrap instead of scrolling
