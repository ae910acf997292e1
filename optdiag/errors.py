"""Exceptions shared by every layer (no dependencies, so the curvature core may import it)."""

from __future__ import annotations


class OptDiagError(Exception):
    """Base class of optdiag's own errors."""


class UsageError(OptDiagError, ValueError):
    """Bad input from the user: a wrong argument, file, model or data. The CLI turns it into exit code 2."""


class NotTwiceDifferentiableError(OptDiagError, RuntimeError):
    """The model's backward pass cannot be differentiated again, so Hessian-vector products are impossible."""


class NonFiniteError(OptDiagError, FloatingPointError):
    """A loss, gradient or curvature product came out NaN or infinite."""
