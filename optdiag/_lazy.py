"""Lazy re-exports (PEP 562), so `import optdiag` stays light.

The curvature core needs only torch; the callbacks pull in Lightning and TensorBoard. A user who only wants
``optdiag.top_eigenvalues`` should not pay for importing Lightning, so each package's public names are resolved on
first access.
"""

from __future__ import annotations

import importlib
from typing import Any, Callable


def lazy_exports(package: str, exports: dict[str, str]) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """Build ``__getattr__`` and ``__dir__`` for a package from ``{public name: submodule}``.

    Submodule names are relative to ``package`` when they start with a dot.
    """

    def __getattr__(name: str) -> Any:
        try:
            module_name = exports[name]
        except KeyError:
            raise AttributeError(f"module {package!r} has no attribute {name!r}") from None
        module = importlib.import_module(module_name, package)
        value = getattr(module, name)
        # Cache on the package so the next lookup is a plain attribute access.
        setattr(importlib.import_module(package), name, value)
        return value

    def __dir__() -> list[str]:
        return sorted(set(exports) | set(globals_of(package)))

    return __getattr__, __dir__


def globals_of(package: str) -> list[str]:
    return list(vars(importlib.import_module(package)))
