"""Numbers in, verdicts out: stall detection, stability thresholds, classification and advice.

Plain Python with numpy/scipy; it knows nothing of models, so every rule is testable on synthetic numbers.
"""

from optdiag._lazy import lazy_exports

_EXPORTS = {
    "Diagnosis": ".types",
    "Suggestion": ".types",
    "KINDS": ".types",
    "Finding": ".triage",
    "Recommendation": ".triage",
    "FINDING_KINDS": ".triage",
    "TriageInputs": ".triage",
    "triage": ".triage",
    "OptimizerSpec": ".stability",
    "stability_threshold": ".stability",
    "StallDetector": ".stall",
    "StallEvent": ".stall",
    "theil_sen": ".stall",
    "Evidence": ".evidence",
    "diagnose_stall": ".classify",
    "classify_point": ".classify",
    "suggest": ".advice",
    "batch_size_advice": ".advice",
    "polyak_heavy_ball": ".tuning",
    "yellowfin": ".tuning",
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
