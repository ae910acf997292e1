"""Regenerate the demo figures used by docs/demo.md and docs/reading-a-diagnosis.md from real demo runs.

Usage (from the repository root, about two minutes on a laptop CPU):

    python docs/make_demo_figures.py            # every scenario
    python docs/make_demo_figures.py saddle     # just one

Each scenario is trained with ``optdiag.OptDiag`` exactly as ``optdiag demo`` does; the figure is written to
``docs/images/demo-<scenario>.png`` and the printed report to ``docs/images/demo-<scenario>.txt``.
"""

from __future__ import annotations

import os
import sys
import tempfile

from optdiag.demo.figures import figure_to_png, scenario_figure
from optdiag.demo.runner import format_result, run_scenario
from optdiag.demo.scenarios import SCENARIOS

IMAGES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "images")


def main(names: list[str]) -> int:
    os.makedirs(IMAGES, exist_ok=True)
    with tempfile.TemporaryDirectory() as logs:
        for name in names or list(SCENARIOS):
            result = run_scenario(name, logs)
            report = format_result(result)
            print(report, flush=True)
            with open(os.path.join(IMAGES, f"demo-{name}.png"), "wb") as handle:
                handle.write(figure_to_png(scenario_figure(result), dpi=80))
            with open(os.path.join(IMAGES, f"demo-{name}.txt"), "w", encoding="utf-8") as handle:
                handle.write(report + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
