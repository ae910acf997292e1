"""``--set KEY=VALUE`` of the benchmark scripts: OptDiag settings other than its defaults, parsed and labelled in one
place (verdict_corpus.py, bench_overhead.py)."""

from __future__ import annotations

import argparse
import ast
from typing import Any, Mapping


def setting(text: str) -> tuple[str, Any]:
    """The argparse ``type`` of ``--set``: ``KEY=VALUE``, the value a Python literal.

    Example:
        >>> setting("budget=0.03"), setting(" loss = 'auto' ")
        (('budget', 0.03), ('loss', 'auto'))
    """
    key, sep, value = (part.strip() for part in text.partition("="))
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    try:
        return key, ast.literal_eval(value)
    except (ValueError, SyntaxError):
        raise argparse.ArgumentTypeError(
            f"{value!r} is not a Python literal (a string needs quotes: {key}='...')") from None


def not_the_defaults(settings: Mapping[str, Any]) -> str:
    """What a report says when settings replace the defaults ("" when none do).

    Example:
        >>> not_the_defaults({"budget": 0.03}), not_the_defaults({})
        ('NOT THE DEFAULTS: OptDiag(budget=0.03)', '')
    """
    return "NOT THE DEFAULTS: OptDiag(" + ", ".join(f"{k}={v!r}" for k, v in settings.items()) + ")" \
        if settings else ""
