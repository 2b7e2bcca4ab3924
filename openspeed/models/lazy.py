"""Light family packages: ``from openspeed.models.<family> import Name`` loads ``Name`` on first use.

A family's package must import cheaply (its ``family.py`` is read before torch is imported), so its
``__init__`` names what it exports and where, and :func:`lazy_exports` resolves them on access,
registering the family's spec first.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any


def lazy_exports(package: str, spec_module: str, exports: dict[str, str]) -> Callable[[str], Any]:
    """A module ``__getattr__`` for ``package`` that imports ``exports[name]`` (after ``spec_module``)."""

    def __getattr__(name: str) -> Any:
        if name in exports:
            importlib.import_module(spec_module)  # registers the model type
            return getattr(importlib.import_module(exports[name]), name)
        raise AttributeError(f"module '{package}' has no attribute '{name}'")

    return __getattr__


__all__ = ["lazy_exports"]
