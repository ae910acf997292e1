"""Lightning callbacks: glue between the training loop, the curvature core, the diagnosis and the sinks.

They subclass ``pytorch_lightning.Callback`` and, when the ``lightning`` package is installed, also
``lightning.pytorch.Callback``, so the same class works with either Trainer.
"""

from optdiag._lazy import lazy_exports

_EXPORTS = {
    "GradientNormMonitor": ".gradient_norm",
    "HessianMonitor": ".hessian",
    "StallDiagnoser": ".stall",
    "TriageMonitor": ".triage",
    "ConditioningMonitor": ".conditioning",
    "OptDiag": ".bundle",
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
