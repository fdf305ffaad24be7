"""JSON -> result dataclasses: the inverse of ``to_plain``, with type checks.

Reports are read back (``bdscan report audit.json``) from files a user may have edited or
that an attacker may have crafted, so every value is checked against the field's declared
type and a mismatch names the field. Keys the dataclass does not know are ignored, so a
report written by a newer bdscan (more fields) still loads into the fields this one has.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import types
import typing
from typing import Any

from bdscan.errors import InputError


@functools.lru_cache(maxsize=None)
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _fail(where: str, expected: str, value: Any) -> InputError:
    return InputError(f"{where}: expected {expected}, got {type(value).__name__}")


def _convert_union(args: tuple, value: Any, where: str) -> Any:
    if value is None and type(None) in args:
        return None
    errors = []
    for arg in args:
        if arg is type(None):
            continue
        try:
            return convert(arg, value, where)
        except InputError as e:
            errors.append(e)
    raise errors[0] if errors else _fail(where, "a value", value)


def _convert_scalar(tp: type, value: Any, where: str) -> Any:
    if tp is float:
        if value is None:  # to_plain writes NaN and infinities as null
            return math.nan
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise _fail(where, "a number", value)
        return float(value)
    if tp is int and (isinstance(value, bool) or not isinstance(value, int)):
        raise _fail(where, "an integer", value)
    if tp in (str, bool) and not isinstance(value, tp):
        raise _fail(where, tp.__name__, value)
    return value


def convert(tp: Any, value: Any, where: str) -> Any:
    """``value`` (parsed JSON) as an instance of the annotation ``tp``."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        return _convert_union(args, value, where)
    if tp is Any:
        return value
    if dataclasses.is_dataclass(tp):
        return from_plain(tp, value, where)
    if origin in (list, tuple) or tp in (list, tuple):
        if not isinstance(value, list):
            raise _fail(where, "a list", value)
        item = args[0] if args else Any
        items = [convert(item, v, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if (origin or tp) is tuple else items
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise _fail(where, "an object", value)
        item = args[1] if len(args) == 2 else Any
        return {str(k): convert(item, v, f"{where}.{k}") for k, v in value.items()}
    if tp in (float, int, str, bool):
        return _convert_scalar(tp, value, where)
    return value


def from_plain(cls: type, data: Any, where: str = "report") -> Any:
    """Build dataclass ``cls`` from its ``to_plain`` form; raises ``InputError`` naming the
    first field that is missing or of the wrong type."""
    if not isinstance(data, dict):
        raise _fail(where, f"an object ({cls.__name__})", data)
    hints = _hints(cls)
    values = {}
    for f in dataclasses.fields(cls):
        if f.name.startswith("_") or not f.init:
            continue
        if f.name not in data:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise InputError(f"{where}: missing field {f.name!r}")
            continue
        values[f.name] = convert(hints[f.name], data[f.name], f"{where}.{f.name}")
    return cls(**values)
