"""optdiag: why did my loss stop going down, and what should I change?

The curvature core (``HessianOperator``, ``top_eigenvalues``, ...) needs only torch; the Lightning callbacks
(``OptDiag``, ``HessianMonitor``, ...) load Lightning on first use.

Example:
    >>> import optdiag, pytorch_lightning as pl
    >>> trainer = pl.Trainer(callbacks=[optdiag.OptDiag()])  # doctest: +SKIP
"""

from optdiag._lazy import lazy_exports

__version__ = "0.1.0"

_EXPORTS = {
    # curvature core (torch only)
    "CurvatureOperator": "optdiag.curvature",
    "MatrixOperator": "optdiag.curvature",
    "HessianOperator": "optdiag.curvature",
    "FiniteDifferenceOperator": "optdiag.curvature",
    "PreconditionedOperator": "optdiag.curvature",
    "supervised_loss": "optdiag.curvature",
    "top_eigenvalues": "optdiag.curvature",
    "power_iteration": "optdiag.curvature",
    "hessian_trace": "optdiag.curvature",
    "spectral_density": "optdiag.curvature",
    "epsilon_sharpness": "optdiag.curvature",
    "sam_sharpness": "optdiag.curvature",
    "adaptive_sharpness": "optdiag.curvature",
    "critical_sharpness": "optdiag.curvature",
    "gradient_noise_scale": "optdiag.curvature",
    "estimate_gradient_noise_scale": "optdiag.curvature",
    "gradient_is_zero": "optdiag.curvature",
    "EigenResult": "optdiag.curvature",
    "TraceResult": "optdiag.curvature",
    "DensityResult": "optdiag.curvature",
    "SharpnessResult": "optdiag.curvature",
    "CriticalSharpnessResult": "optdiag.curvature",
    "NoiseScaleResult": "optdiag.curvature",
    # diagnosis (numbers in, verdicts out)
    "Diagnosis": "optdiag.diagnosis",
    "Suggestion": "optdiag.diagnosis",
    "Finding": "optdiag.diagnosis",
    "Recommendation": "optdiag.diagnosis",
    "OptimizerSpec": "optdiag.diagnosis",
    "stability_threshold": "optdiag.diagnosis",
    # Lightning callbacks
    "GradientNormMonitor": "optdiag.callbacks",
    "HessianMonitor": "optdiag.callbacks",
    "StallDiagnoser": "optdiag.callbacks",
    "OptDiag": "optdiag.callbacks",
    "TriageMonitor": "optdiag.callbacks",
    "ConditioningMonitor": "optdiag.callbacks",
    # post-hoc analysis
    "analyze_checkpoint": "optdiag.analysis",
    "AnalysisReport": "optdiag.analysis",
    # errors
    "OptDiagError": "optdiag.errors",
    "UsageError": "optdiag.errors",
    "NotTwiceDifferentiableError": "optdiag.errors",
    "NonFiniteError": "optdiag.errors",
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
