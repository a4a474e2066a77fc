"""Sub-modules imported on first use, so ``import medssl`` is instant and configs can write ``medssl.data.scan.x``."""

from __future__ import annotations

import importlib
import importlib.util

__all__ = ["lazy_submodules"]


def lazy_submodules(package: str):
    """A module-level ``__getattr__`` for ``package`` that imports any of its sub-modules when first named.

    It asks the import system instead of a hand-kept list, which went stale (``medssl.data.views``).
    """

    def __getattr__(name: str):
        if not name.startswith("_") and importlib.util.find_spec(f"{package}.{name}") is not None:
            return importlib.import_module(f"{package}.{name}")
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    return __getattr__
