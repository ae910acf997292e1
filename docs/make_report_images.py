"""Regenerate the report screenshots of docs/analyzing-checkpoints.md from a real run, in headless Chromium.

Usage (from the repository root; a few minutes on a laptop CPU, Debian's ``chromium`` package on the PATH):

    python docs/make_report_images.py [REPORT_DIR]

It trains and analyses exactly as ``examples/analyze_checkpoints.py`` does (three checkpoints of a small tanh network),
then screenshots ``report.html``: its top (``docs/images/report-overview.png``) and the first checkpoint's section
(``docs/images/report-checkpoint.png``). Given ``REPORT_DIR`` holding a ``report.html`` already, it only
screenshots that one.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

IMAGES = Path(__file__).resolve().parent / "images"
WIDTH = 1200
# Starts the page at the element the URL's query names (?section=ID): what comes before it is removed, so that a
# screenshot (which shows the top of a page) shows that section.
SECTION = """<script>
const id = new URLSearchParams(location.search).get("section");
const target = id && document.getElementById(id);
while (target && target.previousElementSibling) target.previousElementSibling.remove();
</script>"""


def chromium() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found is None:
        sys.exit("no chromium on the PATH (Debian: apt-get install chromium)")
    return found


def screenshot(page: Path, out: Path, height: int, section: str | None = None) -> None:
    """The top ``height`` pixels of ``page`` in a window WIDTH wide, from ``section`` on (an element id), into
    ``out``."""
    with tempfile.TemporaryDirectory() as tmp:
        copy = Path(tmp) / "page.html"
        copy.write_text(page.read_text(encoding="utf-8").replace("</body>", SECTION + "</body>"), encoding="utf-8")
        url = copy.as_uri() + (f"?section={section}" if section else "")
        subprocess.run([chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                        f"--window-size={WIDTH},{height}", "--virtual-time-budget=5000", f"--screenshot={out}", url],
                       check=True, capture_output=True, timeout=120)
    print(f"wrote {out}")


def make_report(folder: Path) -> Path:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
    from analyze_checkpoints import Regressor, train  # the example's model and training, unchanged

    import optdiag

    checkpoints = train(folder / "ckpts")
    report = optdiag.analyze_checkpoint(checkpoints, model=Regressor, max_batches=4)
    print(report.summary())
    html_path, _ = report.write(folder / "report")
    return html_path


def main(args: list[str]) -> None:
    IMAGES.mkdir(exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        page = Path(args[0]) / "report.html" if args else make_report(Path(tmp))
        assert 'id="ckpt-0"' in page.read_text(encoding="utf-8"), f"{page} holds no checkpoint section"
        screenshot(page, IMAGES / "report-overview.png", 1640)
        screenshot(page, IMAGES / "report-checkpoint.png", 1900, section="ckpt-0")


if __name__ == "__main__":
    main(sys.argv[1:])
