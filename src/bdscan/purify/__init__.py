"""Purification methods, each registered by name in ``PURIFIERS`` with one interface.

Importing this package imports every method module so that they register themselves.
"""

from bdscan.purify.base import PURIFIERS, PurifierSpec, PurifyInputs, PurifyOutcome
from bdscan.purify.run import purify

__all__ = ["PURIFIERS", "PurifierSpec", "PurifyInputs", "PurifyOutcome", "purify"]


def _load_methods() -> None:
    import importlib
    import pkgutil

    for info in pkgutil.iter_modules(__path__):
        if info.name not in ("base", "run"):
            importlib.import_module(f"{__name__}.{info.name}")


_load_methods()
