"""The "optdiag" tab in TensorBoard: each run's training story, its verdicts and its curvature.

TensorBoard finds the plugin through the ``tensorboard_plugins`` entry point (pyproject.toml); nothing else
imports this package, so ``import optdiag`` never loads TensorBoard. docs/tensorboard-tab.md describes the tab.

Example::

    tensorboard --logdir lightning_logs    # then open the "optdiag" tab
"""

from optdiag.tensorboard_plugin.plugin import OptDiagPlugin

__all__ = ["OptDiagPlugin"]
