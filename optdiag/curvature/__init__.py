"""The curvature core: Hessian-vector products and what is built on them. Depends on torch only."""

from optdiag._lazy import lazy_exports

_EXPORTS = {
    "CurvatureOperator": ".base",
    "MatrixOperator": ".base",
    "HessianOperator": ".operator",
    "supervised_loss": ".operator",
    "preserved_state": ".state",
    "rng_state": ".state",
    "replayed_rng": ".state",
    "BatchObjective": ".objective",
    "as_batch_list": ".batches",
    "batch_weights": ".batches",
    "sample_count": ".batches",
    "iter_tensors": ".batches",
    "first_tensor": ".batches",
    "map_tensors": ".batches",
    "move_batch": ".batches",
    "top_eigenvalues": ".lanczos",
    "power_iteration": ".lanczos",
    "lanczos_tridiagonal": ".lanczos",
    "EigenResult": ".lanczos",
    "hessian_trace": ".trace",
    "TraceResult": ".trace",
    "spectral_density": ".density",
    "DensityResult": ".density",
    "PreconditionedOperator": ".preconditioned",
    "epsilon_sharpness": ".sharpness",
    "sam_sharpness": ".sharpness",
    "adaptive_sharpness": ".sharpness",
    "SharpnessResult": ".sharpness",
    "gradient_noise_scale": ".noise",
    "NoiseScaleResult": ".noise",
    "estimate_gradient_noise_scale": ".noise",
    "gradient_is_zero": ".noise",
    "ZeroGradientTest": ".noise",
    "trainable_parameters": ".params",
    "flatten": ".params",
    "unflatten": ".params",
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
