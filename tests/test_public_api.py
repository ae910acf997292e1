"""The public contract (docs/index.md, "Public names"): every name resolves, and the core stays free of Lightning."""

import subprocess
import sys

import pytest

import optdiag

CONTRACT_NAMES = [
    "HessianOperator",
    "supervised_loss",
    "top_eigenvalues",
    "hessian_trace",
    "spectral_density",
    "EigenResult",
    "TraceResult",
    "DensityResult",
    "GradientNormMonitor",
    "HessianMonitor",
    "StallDiagnoser",
    "OptDiag",
    "Diagnosis",
    "Suggestion",
    "analyze_checkpoint",
]


@pytest.mark.parametrize("name", sorted(optdiag.__all__))
def test_every_exported_name_resolves(name):
    assert getattr(optdiag, name) is not None


@pytest.mark.parametrize("name", CONTRACT_NAMES)
def test_contract_names_are_exported(name):
    assert name in optdiag.__all__
    assert name in dir(optdiag)


def test_callbacks_importable_from_subpackage():
    from optdiag.callbacks import GradientNormMonitor, HessianMonitor, OptDiag, StallDiagnoser

    assert optdiag.OptDiag is OptDiag
    assert {GradientNormMonitor, HessianMonitor, StallDiagnoser}


def test_unknown_attribute_raises_attribute_error():
    with pytest.raises(AttributeError, match="no attribute 'does_not_exist'"):
        optdiag.does_not_exist  # noqa: B018


def test_core_import_does_not_load_lightning():
    code = (
        "import sys, optdiag; from optdiag import HessianOperator, top_eigenvalues, Diagnosis; "
        "bad = [m for m in ('pytorch_lightning', 'lightning', 'tensorboard', 'matplotlib') if m in sys.modules]; "
        "print(bad); sys.exit(1 if bad else 0)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
