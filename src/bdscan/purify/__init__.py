"""Purification methods, each registered by name in ``PURIFIERS`` with one interface.

Methods are declared in ``catalog`` and imported on first use (``PURIFIERS.get``). The
names below load on first access too, so reading ``bdscan.purify.catalog`` loads no torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {"PURIFIERS": "base", "PurifierSpec": "base", "PurifyInputs": "base", "PurifyOutcome": "base",
            "purify": "run"}
__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
