"""Post-hoc analysis: load checkpoints safely, measure curvature and sharpness, classify the point, draw the loss
landscape and write a report (``optdiag analyze`` on the command line).

Example:
    >>> import optdiag
    >>> report = optdiag.analyze_checkpoint("last.ckpt", model=MyModule)  # doctest: +SKIP
    >>> report.write("optdiag-report")  # doctest: +SKIP
"""

from optdiag._lazy import lazy_exports

_EXPORTS = {
    "analyze_checkpoint": ".analyze",
    "AnalysisReport": ".analyze",
    "AnalysisSettings": ".analyze",
    "CheckpointAnalysis": ".analyze",
    "load_checkpoint": ".loading",
    "LoadedCheckpoint": ".loading",
    "filter_normalized_direction": ".landscape",
    "loss_slice": ".landscape",
    "loss_surface": ".landscape",
    "linear_interpolation": ".landscape",
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
