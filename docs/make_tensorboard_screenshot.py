"""Regenerate docs/images/tensorboard-tab.png (the optdiag tab) and docs/images/tensorboard-custom-scalars.png (the
optdiag custom-scalars panels) from TensorBoard on a real run, in headless Chromium.

Usage (from the repository root; needs Chromium on PATH, about half a minute):

    python docs/make_tensorboard_screenshot.py                   # both
    python docs/make_tensorboard_screenshot.py custom_scalars    # only the custom-scalars panels

The run is the demo's saddle scenario (``optdiag demo --scenario saddle``: two saddles, then a minimum), trained
with ``optdiag.OptDiag`` and a TensorBoardLogger into a temporary logdir, served by ``tensorboard`` on a loopback
port; the screenshot is TensorBoard's own page with the optdiag tab open.
"""

from __future__ import annotations

import os
import sys
import tempfile

from optdiag.demo.runner import run_scenario
from optdiag.tensorboard_plugin.local import chromium, tensorboard_server

IMAGES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "images")
#: dashboard -> (image, window size)
PAGES = {"optdiag": ("tensorboard-tab.png", "1400,1450"),
         "custom_scalars": ("tensorboard-custom-scalars.png", "1400,1600")}


def main(dashboards: list[str]) -> int:
    dashboards = dashboards or list(PAGES)
    with tempfile.TemporaryDirectory() as logdir:
        result = run_scenario("saddle", logdir)
        print("verdicts:", ", ".join(f"{d.kind} at step {d.step}" for d in result.runs[0].diagnoses))
        with tensorboard_server(logdir) as base:
            for dashboard in dashboards:
                name, size = PAGES[dashboard]
                image = os.path.join(IMAGES, name)
                chromium(f"--window-size={size}", "--virtual-time-budget=15000", f"--screenshot={image}",
                         f"{base}/#{dashboard}")
                print("wrote", image)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
